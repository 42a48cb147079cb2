"""Gradient checkpointing (``ModelConfig.remat``): same numbers, less activation memory."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import MESH_CONFIG, MOE, TINY, scaled

from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import ModelConfig, forward, forward_shared_prompt, init_params
from novarl_jax.models import shard_params as shard

TOKENS = jax.random.randint(jax.random.key(1), (8, 12), 1, 64)


def _loss(params, config, mesh=None, shared=False):
    if shared:
        logits, _, aux = forward_shared_prompt(
            params, TOKENS, config, prompt_length=5, group_size=4, mesh=mesh
        )
    else:
        logits, _, aux = forward(params, TOKENS, config, mesh=mesh)
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.mean(jnp.take_along_axis(logp, TOKENS[:, 1:, None], -1))
    return nll + 0.1 * jnp.mean(aux["values"] ** 2) + 0.01 * aux["moe_aux_loss"]


_grad = jax.jit(jax.value_and_grad(_loss), static_argnums=(1, 2, 3))


def _assert_same(got, want):
    (g_loss, g_grads), (w_loss, w_grads) = got, want
    np.testing.assert_allclose(g_loss, w_loss, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(g_grads), jax.tree.leaves(w_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)


def test_config_field():
    assert not ModelConfig(**TINY).remat
    with pytest.raises(ValueError, match=r"remat must be a bool \(True or False\), got 'yes'"):
        ModelConfig(**TINY, remat="yes")
    assert "remat" not in ModelConfig(**TINY, remat=True).to_hf_config()


@pytest.mark.parametrize("shared", [False, True], ids=["forward", "shared_prompt"])
def test_gradients_equal_and_the_layers_are_checkpointed(shared):
    params = scaled(init_params(MOE, jax.random.key(0)), 2.0)
    remat = MOE.replace(remat=True)
    _assert_same(_grad(params, remat, None, shared), _grad(params, MOE, None, shared))
    for config, expected in ((remat, True), (MOE, False)):
        assert _checkpointed(params, config, None, shared) == expected


def _checkpointed(params, config, mesh, shared):
    """Whether the loss's jaxpr holds a jax.checkpoint (its primitive prints as 'remat2' in
    jax 0.10.2's jaxprs, 'checkpoint' in others; nested jaxprs, a pipeline's included)."""
    text = str(jax.make_jaxpr(_loss, static_argnums=(1, 2, 3))(params, config, mesh, shared))
    return bool(re.search(r"\b(remat2?|checkpoint)\[", text))


def test_pipelined_and_sharded_gradients_equal(devices):
    params = scaled(init_params(MESH_CONFIG, jax.random.key(0)), 2.0)
    want = _grad(params, MESH_CONFIG, None, False)
    for layout in (ParallelLayout(dp=2, tp=2, ep=2), ParallelLayout(pp=2, tp=2, ep=2)):
        mesh = layout.make_mesh(devices)
        sharded = shard(params, MESH_CONFIG, mesh)
        got = _grad(sharded, MESH_CONFIG.replace(remat=True), mesh, False)
        (g_loss, g_grads), (w_loss, w_grads) = got, want
        np.testing.assert_allclose(g_loss, w_loss, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(g_grads), jax.tree.leaves(w_grads), strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-6)
        # With pp = 2 the layers run inside the pipeline's stages: checkpointed there too.
        assert _checkpointed(sharded, MESH_CONFIG.replace(remat=True), mesh, False)
        assert not _checkpointed(sharded, MESH_CONFIG, mesh, False)


def test_activation_memory_no_longer_grows_with_every_layers_activations():
    """XLA's own count of the backward pass's temporary buffers (compiled, not run)."""
    config = ModelConfig(**{**TINY, "num_hidden_layers": 8}, num_local_experts=4, value_head=True)
    params = init_params(config, jax.random.key(0))

    def temp_bytes(c):
        compiled = _grad.lower(params, c, None, False).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain, remat = temp_bytes(config), temp_bytes(config.replace(remat=True))
    assert remat < 0.5 * plain, (remat, plain)
