"""Every ``>>>`` example in the package's docstrings runs and prints what it shows.

Examples are written as a user would read them, some with names a reader supplies (a model
``config`` and its ``params``, a ``prompt``): the namespace below gives those names tiny
values, the same for every module. An example that cannot run here (it writes to a user's
path, or is a fragment from inside a ``shard_map``) says ``# doctest: +SKIP``.
"""

import doctest
import importlib
import pkgutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import novarl_jax
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, forward, init_params
from novarl_jax.rollout import CharTokenizer, SamplingConfig
from novarl_jax.rollout.tasks import AdditionTask

MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(novarl_jax.__path__, "novarl_jax.")
    if name != "novarl_jax.train"  # the command line: its flags are its documentation
)


def _namespace():
    config = ModelConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return {
        "jax": jax, "jnp": jnp, "np": np, "ParallelLayout": ParallelLayout,
        "ModelConfig": ModelConfig, "forward": forward, "init_params": init_params,
        "AdditionTask": AdditionTask, "CharTokenizer": CharTokenizer,
        "SamplingConfig": SamplingConfig, "config": config,
        "params": init_params(config, jax.random.key(0)), "key": jax.random.key(0),
        "prompt": jnp.array([[1, 2, 3]]), "tokens": jnp.array([[1, 2, 3, 4]]),
        "prompts": jnp.array([[1, 2, 3], [4, 5, 6]]),
        "completions": jnp.arange(32).reshape(8, 4) % 30 + 1,
    }  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name, devices, monkeypatch):
    monkeypatch.chdir(novarl_jax.__path__[0] + "/..")  # examples read tests/data/...
    module = importlib.import_module(name)
    globs = {**vars(module), **_namespace()}
    result = doctest.testmod(
        module, globs=globs, optionflags=doctest.NORMALIZE_WHITESPACE, report=True
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples of {name} failed"
