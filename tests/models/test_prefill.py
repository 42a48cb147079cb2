"""`prefill`: a prompt into a fresh cache equals `forward` into `init_cache`'s, and decodes on."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import DENSE, MESH_CONFIG, MOE, decode_steps, padded_batch, scaled

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import KVCache, forward, init_cache, init_params, prefill, shard_params

jit_forward = jax.jit(forward, static_argnames=("config", "mesh", "return_routing", "train"))
jit_prefill = jax.jit(
    prefill, static_argnames=("config", "max_length", "mesh", "return_routing", "train")
)


def _assert_same_cache(got: KVCache, want: KVCache) -> None:
    """Equal index and slot mask, and equal keys/values in every slot a query can see.

    Slots of padding tokens may differ: a padding query sees no key, so its softmax is uniform
    over whatever keys its call scores (the prompt's, or also the fresh cache's empty slots)
    and its hidden state, which no real token ever reads, differs after the first layer.
    """
    assert int(got.index) == int(want.index)
    np.testing.assert_array_equal(got.key_mask, want.key_mask)
    seen = np.asarray(want.key_mask).astype(bool)
    assert len(got.k) == len(want.k) and len(got.v) == len(want.v)
    keys = [(g, w, -1) for g, w in zip(got.k, want.k, strict=True)]  # [B, N_kv, Dh, S]
    values = [(g, w, 2) for g, w in zip(got.v, want.v, strict=True)]  # [B, N_kv, S, Dh]
    for g, w, slot_axis in keys + values:
        assert g.shape == w.shape and g.dtype == w.dtype
        g, w = (np.moveaxis(np.asarray(a), slot_axis, 1) for a in (g, w))  # [B, S, ...]
        np.testing.assert_allclose(g[seen], w[seen], atol=1e-5, rtol=1e-5)
        np.testing.assert_array_equal(g[:, int(want.index) :], 0.0)


@pytest.mark.parametrize("use_jit", [False, True])
@pytest.mark.parametrize("config,side", [(DENSE, "left"), (MOE, "left"), (MOE, "right")])
def test_prefill_equals_forward_into_a_fresh_cache(config, side, use_jit):
    b, p, n = 3, 6, 4
    params = scaled(init_params(config, jax.random.key(1)))
    toks, mask, positions = padded_batch(jax.random.key(2), b, p, n, (0, 2, 4), side)
    run_prefill = jit_prefill if use_jit else prefill
    kw = dict(positions=positions[:, :p], attention_mask=mask[:, :p], return_routing=config.is_moe)
    logits, cache, aux = run_prefill(params, toks[:, :p], config=config, max_length=p + n, **kw)
    want_logits, want_cache, want_aux = jit_forward(
        params, toks[:, :p], config=config, cache=init_cache(config, b, p + n), **kw
    )
    real = np.asarray(mask[:, :p]).astype(bool)
    np.testing.assert_allclose(
        np.asarray(logits)[real], np.asarray(want_logits)[real], atol=1e-5, rtol=1e-5
    )
    _assert_same_cache(cache, want_cache)
    for name in ("moe_aux_loss", "moe_z_loss", "dropped_fraction", "expert_load"):
        np.testing.assert_allclose(aux[name], want_aux[name], atol=1e-6, rtol=1e-5)
    if config.value_head:
        np.testing.assert_allclose(
            np.asarray(aux["values"])[real], np.asarray(want_aux["values"])[real], atol=1e-5
        )
    if config.is_moe:
        # Padding tokens are not routed; their (unused) choices follow their hidden states.
        np.testing.assert_array_equal(
            np.asarray(aux["routing"])[:, real], np.asarray(want_aux["routing"])[:, real]
        )
    # Decoding on from the prefilled cache gives the full forward's logits.
    full, _, _ = jit_forward(params, toks, config=config, positions=positions, attention_mask=mask)
    run = functools.partial(jit_forward, config=config)
    steps, cache = decode_steps(run, params, toks, positions, mask, cache, range(p, p + n))
    for i, step, _ in steps:
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5, rtol=1e-5)
    # The cache holds real context: dropping it changes the last logits (a test that can fail).
    alone, _, _ = jit_forward(params, toks[:, -1:], config=config, positions=positions[:, -1:])
    assert np.abs(np.asarray(alone[:, 0]) - np.asarray(full[:, -1])).max() > 1e-3


def test_prefill_errors():
    params = init_params(DENSE, jax.random.key(0))
    toks = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="5 tokens do not fit a cache of 4 slots"):
        prefill(params, toks, DENSE, max_length=4)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        prefill(params, jnp.ones((5,), jnp.int32), DENSE, max_length=8)
    with pytest.raises(TypeError, match=r"tokens must be an integer array .* dtype float32"):
        prefill(params, jnp.full((2, 3), 1.7), DENSE, max_length=8)  # was truncated to 1
    with pytest.raises(ValueError, match="max_length must be an integer >= 1, got 4.5"):
        prefill(params, toks, DENSE, max_length=4.5)


@pytest.mark.parametrize(
    "layout", [ParallelLayout(dp=2, tp=2, ep=2), ParallelLayout(dp=2, pp=2, ep=2)]
)
def test_sharded_prefill_equals_single_device(layout, devices):
    """On a mesh (also with pp > 1: the layers run as one scan) the cache decodes on."""
    config = MESH_CONFIG
    params = scaled(init_params(config, jax.random.key(11)))
    toks = jax.random.randint(jax.random.key(12), (8, 8), 1, 64)
    mask = jnp.ones((8, 8), jnp.int32).at[1, :3].set(0).at[5, :5].set(0)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    full, _, _ = jit_forward(params, toks, config=config, positions=positions, attention_mask=mask)
    mesh = layout.make_mesh(devices)
    sharded = shard_params(params, config, mesh)
    run = functools.partial(jit_forward, config=config, mesh=mesh)
    logits, cache, _ = jit_prefill(
        sharded, toks[:, :6], config=config, max_length=8, mesh=mesh,
        positions=positions[:, :6], attention_mask=mask[:, :6],
    )  # fmt: skip
    real = np.asarray(mask[:, :6]).astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, :6])[real], atol=1e-5)
    batch_axes = shd.logical_to_spec((shd.BATCH,), mesh)[0]
    assert all(tuple(k.sharding.spec)[0] == batch_axes for k in cache.k)
    steps, cache = decode_steps(run, sharded, toks, positions, mask, cache, (6, 7))
    for i, step, _ in steps:
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5, rtol=1e-5)
