"""Training loops, train state, checkpoints and metrics (the side-effecting layer).

Submodules are imported on use: ``novarl_jax.trainer.config`` must stay importable
without JAX, because the command line validates a config before JAX starts.
"""
