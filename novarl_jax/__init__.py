"""novarl_jax: reinforcement-learning post-training of language-model policies in JAX."""

__version__ = "0.1.0"
