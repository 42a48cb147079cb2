"""Training a config to the end in a test: no console output, the layout's first devices."""

import jax

from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.loop import train


def train_quietly(config, workdir, mesh=None, log=None):
    """``train(config, workdir)`` on ``mesh`` (default: the config's layout on the first
    devices), printing nothing unless ``log`` is given."""
    spec = validate_config(config)
    mesh = mesh or spec.layout.make_mesh(jax.devices()[: spec.layout.world_size])
    return train(config, str(workdir), spec=spec, mesh=mesh, log=log or (lambda line: None))
