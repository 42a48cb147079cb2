"""Training a config to the end in a test: no console output, the layout's first devices."""

from novarl_jax.trainer.loop import train


def train_quietly(config, workdir, mesh=None, log=None, **kwargs):
    """``train(config, workdir, **kwargs)`` on ``mesh`` (default: the config's layout on the
    first devices), printing nothing unless ``log`` is given."""
    return train(config, str(workdir), mesh=mesh, log=log or (lambda line: None), **kwargs)
