"""The decoder: config validation, NumPy references, KV-cache decoding, sharded == single device."""

import dataclasses
import functools
import json
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from tiny_models import (
    DENSE,
    LLAMA3_ROPE,
    MESH_CONFIG,
    MOE,
    TINY,
    decode_steps,
    padded_batch,
    scaled,
)

from novarl_jax.core import sharding as shd
from novarl_jax.core.distributed import ParallelLayout
from novarl_jax.models import (
    KVCache,
    ModelConfig,
    cache_logical_axes,
    forward,
    init_cache,
    init_params,
    layers,
    param_logical_axes,
    shard_params,
)
from novarl_jax.models.layers import (
    Attention,
    apply_rotary,
    attention_mask_for,
    cached_attention_mask,
    rms_norm,
    rotary_cos_sin,
)

jit_forward = jax.jit(forward, static_argnames=("config", "mesh", "return_routing", "train"))


# ------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(vocab_size=0), "vocab_size must be an integer >= 1, got 0"),
        (dict(num_hidden_layers=1.5), "num_hidden_layers must be an integer >= 1"),
        (dict(num_key_value_heads=3), "num_key_value_heads=3 must be an integer >= 1 that divides"),
        (dict(hidden_size=30, head_dim=None), "head_dim=None needs hidden_size=30 divisible"),
        (dict(head_dim=7), "head_dim=7 must be an even integer"),
        (dict(head_dim=0), "head_dim=0 must be an even integer"),
        (dict(num_key_value_heads=0), "num_key_value_heads=0 must be an integer >= 1 that div"),
        (dict(num_key_value_heads=-2), "num_key_value_heads=-2 must be an integer >= 1 that d"),
        (dict(hidden_size=0), "hidden_size must be an integer >= 1, got 0"),
        (dict(intermediate_size=0), "intermediate_size must be an integer >= 1, got 0"),
        (dict(num_attention_heads=0), "num_attention_heads must be an integer >= 1, got 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be an integer >= 1"),
        (dict(num_local_experts=-1), "num_local_experts must be an integer >= 0"),
        (
            dict(num_local_experts=4, num_experts_per_tok=5),
            r"num_experts_per_tok=5 must be an integer in \[1, num_local_experts=4\]",
        ),
        (dict(num_experts_per_tok="two"), "num_experts_per_tok='two' must be an integer >= 1"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok=0 must be an integer >= 1"),
        (dict(rope_theta=0.0), "rope_theta must be > 0"),
        (dict(rms_norm_eps=0.0), "rms_norm_eps must be > 0"),
        (dict(router_z_loss_coef=-1.0), "router_z_loss_coef must be >= 0"),
        (dict(capacity_factor=0.0), "capacity_factor must be > 0 or None"),
        (dict(min_capacity=-1), "min_capacity must be an integer >= 0"),
        (dict(drop_policy="random"), "drop_policy='random' is not one of"),
        (dict(dtype="int8"), "dtype='int8' is not one of"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **changes})


@pytest.mark.parametrize(
    "changes,match",
    [
        # A truthy string must not mean True.
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be a bool .* got 'false'"),
        (dict(value_head="no"), r"value_head must be a bool \(True or False\), got 'no'"),
        (dict(value_head=1), "value_head must be a bool"),
        # Wrong types name the field and the expected type (no bare comparison TypeError).
        (dict(rope_theta="1e4"), "rope_theta must be an int or float, got '1e4' of type str"),
        (dict(rope_theta=None), "rope_theta must be an int or float, got None"),
        (dict(rms_norm_eps="1e-5"), "rms_norm_eps must be an int or float"),
        (dict(router_aux_loss_coef=None), "router_aux_loss_coef must be an int or float"),
        (dict(capacity_factor="1.25"), "capacity_factor must be an int or float, or None"),
        (dict(eval_capacity_factor=True), "eval_capacity_factor must be an int or float"),
        (dict(rope_theta=float("inf")), "rope_theta must be finite, got inf"),
        (dict(capacity_factor=float("nan")), "capacity_factor must be finite, got nan"),
    ],
)
def test_config_field_types(changes, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**{**TINY, **changes})


def test_config_accepts_numpy_scalars_as_python_values():
    cfg = ModelConfig(
        **{**TINY, "vocab_size": np.int64(64)}, tie_word_embeddings=np.bool_(True),
        rope_theta=np.float32(500.0), capacity_factor=np.float64(1.5), dtype=np.dtype("float32"),
    )  # fmt: skip
    assert cfg == ModelConfig(
        **TINY, tie_word_embeddings=True, rope_theta=500.0, capacity_factor=1.5
    )
    assert type(cfg.vocab_size) is int and cfg.tie_word_embeddings is True
    assert type(cfg.rope_theta) is float and cfg.dtype == "float32"
    json.dumps(cfg.to_hf_config())  # plain values: config.json can be written


def test_config_resolves_defaults_and_router():
    cfg = ModelConfig(
        vocab_size=8, hidden_size=12, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=3,
    )  # fmt: skip
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.router, cfg.is_moe) == (4, 3, None, False)
    router = MOE.replace(capacity_factor=1.5, eval_capacity_factor=2.0, min_capacity=3).router
    assert (router.num_experts, router.top_k, router.capacity_factor) == (4, 2, 1.5)
    assert (router.eval_capacity_factor, router.min_capacity) == (2.0, 3)
    assert router.aux_loss_coef == MOE.router_aux_loss_coef
    assert router.z_loss_coef == MOE.router_z_loss_coef
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.hidden_size = 4


def test_from_hf_config_rope_conventions_and_round_trip():
    base = {
        "model_type": "mixtral", **TINY, "num_local_experts": 4, "num_experts_per_tok": 2,
        "head_dim": None, "sliding_window": None,
    }  # fmt: skip
    old = ModelConfig.from_hf_config({**base, "rope_theta": 1234.0})
    new = ModelConfig.from_hf_config(
        {**base, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}}
    )
    assert old == new and old.rope_theta == 1234.0 and old.head_dim == 8
    assert ModelConfig.from_hf_config(base).rope_theta == 1e6  # Mixtral's own default
    # transformers' order: a legacy rope_scaling block replaces rope_parameters, and a block's
    # rope_theta wins over the top-level key.
    both = {
        **base, "rope_theta": 7.0, "rope_parameters": {"rope_theta": 1234.0, "rope_type": "default"}
    }  # fmt: skip
    assert ModelConfig.from_hf_config(both).rope_theta == 1234.0
    both["rope_scaling"] = {"rope_theta": 500.0, "rope_type": "default"}
    assert ModelConfig.from_hf_config(both).rope_theta == 500.0
    both["rope_scaling"] = {"rope_type": "default"}
    assert ModelConfig.from_hf_config(both).rope_theta == 7.0
    assert ModelConfig.from_hf_config({**base, "model_type": "llama", "num_local_experts": 0})
    hf = old.to_hf_config()
    assert hf["architectures"] == ["MixtralForCausalLM"]
    assert hf["rope_parameters"] == {"rope_theta": 1234.0, "rope_type": "default"}
    assert ModelConfig.from_hf_config(hf) == old
    over = ModelConfig.from_hf_config(hf, capacity_factor=1.25, value_head=True)
    assert (over.capacity_factor, over.value_head) == (1.25, True)
    dense = DENSE.to_hf_config()
    assert dense["architectures"] == ["LlamaForCausalLM"] and "num_local_experts" not in dense
    assert ModelConfig.from_hf_config(dense) == DENSE
    assert DENSE.to_hf_config("mistral")["architectures"] == ["MistralForCausalLM"]


def test_from_hf_config_fills_missing_keys_with_each_architectures_own_defaults():
    # transformers' LlamaConfig / MistralConfig / MixtralConfig defaults (5.x): a hand-written
    # config.json that leaves these keys out means them, not this package's own defaults.
    needed = {k: TINY[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                   "num_hidden_layers")}  # fmt: skip
    needed["num_attention_heads"] = 16
    llama = ModelConfig.from_hf_config({"model_type": "llama", **needed})
    assert (llama.rms_norm_eps, llama.num_key_value_heads, llama.rope_theta) == (1e-6, 16, 1e4)
    assert llama.max_position_embeddings == 2048
    mixtral = ModelConfig.from_hf_config({"model_type": "mixtral", **needed})
    assert (mixtral.rms_norm_eps, mixtral.num_key_value_heads, mixtral.rope_theta) == (
        1e-5, 8, 1e6)  # fmt: skip
    assert (mixtral.num_local_experts, mixtral.max_position_embeddings) == (8, 131072)
    # Mistral's sliding window (4096) is on unless config.json turns it off: the model runs
    # sequences of up to 4096 tokens, where the window changes nothing.
    windowed = ModelConfig.from_hf_config({"model_type": "mistral", **needed})
    assert windowed.max_position_embeddings == 4096
    mistral = ModelConfig.from_hf_config(
        {"model_type": "mistral", **needed, "sliding_window": None}
    )
    assert (mistral.rms_norm_eps, mistral.num_key_value_heads) == (1e-6, 8)
    assert mistral.max_position_embeddings == 131072
    # Keys that are present win.
    given = ModelConfig.from_hf_config({"model_type": "llama", **needed, "rms_norm_eps": 1e-5})
    assert given.rms_norm_eps == 1e-5


@pytest.mark.parametrize(
    "changes,match",
    [
        (dict(model_type="gpt2"), "model_type='gpt2' is not supported; supported: "),
        (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
        (dict(attention_bias=True), "attention_bias=true is not supported"),
        (
            dict(rope_parameters={"rope_theta": 1.0, "rope_type": "yarn"}),
            r"rope_parameters.rope_type='yarn' is not supported",
        ),
        (
            dict(rope_parameters={"rope_theta": 1.0, "rope_type": "llama3"}),
            r"rope_parameters of rope_type 'llama3' lacks \['factor', 'low_freq_factor'",
        ),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling.rope_type='linear'"),
        (dict(vocab_size=None), "vocab_size must be an integer >= 1, got None"),
        (dict(model_type=["llama"]), r"model_type=\['llama'\] is not supported"),
        (dict(attention_bias="false"), "attention_bias must be true, false or null, got 'false'"),
        (dict(tie_word_embeddings="false"), "tie_word_embeddings must be a bool .* 'false'"),
        (dict(rope_theta=None), "config rope_theta must be a number, got None"),
        (dict(rope_theta="1e4"), "config rope_theta must be a number, got '1e4'"),
        (
            dict(rope_parameters={"rope_theta": None, "rope_type": "default"}),
            "config rope_parameters.rope_theta must be a number, got None",
        ),
        (
            dict(model_type="mistral", sliding_window="4096"),
            "sliding_window must be an integer >= 1 or null, got '4096'",
        ),
        (
            dict(model_type="mistral", sliding_window=0),
            "sliding_window must be an integer >= 1 or null, got 0",
        ),
        (
            dict(model_type="mistral", sliding_window=16, max_position_embeddings=None),
            "max_position_embeddings must be an integer >= 1, got None",
        ),
    ],
)
def test_from_hf_config_errors(changes, match):
    hf = {"model_type": "llama", **TINY, **changes}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_hf_config(hf)


@pytest.mark.parametrize("hf_config", [[1, 2], None, '{"model_type": "llama"}'])
def test_from_hf_config_needs_a_mapping(hf_config):
    with pytest.raises(TypeError, match="hf_config must be a mapping .* got "):
        ModelConfig.from_hf_config(hf_config)


@pytest.mark.parametrize(
    "key", ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads"]
)  # fmt: skip
def test_from_hf_config_missing_key(key):
    hf = {"model_type": "llama", **TINY}
    del hf[key]
    with pytest.raises(ValueError, match=rf"missing required key\(s\) \['{key}'\]"):
        ModelConfig.from_hf_config(hf)


def test_from_hf_config_reads_the_moe_keys_and_their_defaults():
    base = {"model_type": "mixtral", **TINY}
    mixtral = ModelConfig.from_hf_config(base)
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (8, 2)
    assert mixtral.router_aux_loss_coef == 0.001  # MixtralConfig's default
    given = ModelConfig.from_hf_config({**base, "num_experts": 4, "router_aux_loss_coef": 0.02})
    assert (given.num_local_experts, given.router_aux_loss_coef) == (4, 0.02)
    # A window as long as the context changes nothing, and is kept for config.json.
    window = {"model_type": "mistral", **TINY, "max_position_embeddings": 64}
    same = ModelConfig.from_hf_config({**window, "sliding_window": 64})
    assert (same.max_position_embeddings, same.sliding_window) == (64, 64)
    # Llama has no window: transformers ignores the key, and so do we.
    llama = ModelConfig.from_hf_config({**window, "model_type": "llama", "sliding_window": 8})
    assert (llama.max_position_embeddings, llama.sliding_window) == (64, None)
    odd = ModelConfig.from_hf_config({**window, "model_type": "llama", "sliding_window": "x"})
    assert odd.sliding_window is None
    with pytest.raises(ValueError, match=r"^sliding_window must be an integer >= 1 or None, got 0"):
        ModelConfig(**{**TINY, "sliding_window": 0})
    # A shorter window bounds the sequences the model runs; an override may shorten it
    # further, never lengthen it past the window.
    assert (
        ModelConfig.from_hf_config({**window, "sliding_window": 16}).max_position_embeddings == 16
    )
    shorter = ModelConfig.from_hf_config(
        {**window, "sliding_window": 16}, max_position_embeddings=8
    )
    assert (shorter.max_position_embeddings, shorter.sliding_window) == (8, 16)
    with pytest.raises(ValueError, match=r"max_position_embeddings=64 is longer than the "
                       r"config's sliding_window=16: .* at most 16 tokens"):  # fmt: skip
        ModelConfig.from_hf_config({**window, "sliding_window": 16}, max_position_embeddings=64)


def test_to_hf_config_writes_what_transformers_reads():
    moe = MOE.replace(router_aux_loss_coef=0.02, rope_theta=1234.0, dtype="bfloat16")
    hf = moe.to_hf_config()
    assert hf["router_aux_loss_coef"] == 0.02 and hf["torch_dtype"] == "bfloat16"
    # transformers 4 reads the top-level rope_theta, 5 the rope_parameters block.
    assert hf["rope_theta"] == 1234.0
    legacy = {k: v for k, v in hf.items() if k != "rope_parameters"}
    assert ModelConfig.from_hf_config(legacy) == ModelConfig.from_hf_config(hf)
    assert ModelConfig.from_hf_config(hf).router_aux_loss_coef == 0.02
    # Mistral turns its 4096-token window off explicitly; left out, transformers would use it.
    long = DENSE.replace(max_position_embeddings=8192)
    mistral = long.to_hf_config("mistral")
    assert "sliding_window" in mistral and mistral["sliding_window"] is None
    assert ModelConfig.from_hf_config(mistral) == long
    # A window read from a checkpoint is written back, by default as Mistral (Llama has none).
    windowed = DENSE.replace(max_position_embeddings=16, sliding_window=16)
    assert windowed.to_hf_config()["model_type"] == "mistral"
    assert windowed.to_hf_config()["sliding_window"] == 16
    assert ModelConfig.from_hf_config(windowed.to_hf_config()) == windowed
    moe = MOE.replace(max_position_embeddings=16, sliding_window=32)
    assert ModelConfig.from_hf_config(moe.to_hf_config(), value_head=True) == moe
    with pytest.raises(ValueError, match="model_type='llama' has no sliding window; .*=16"):
        windowed.to_hf_config("llama")
    with pytest.raises(ValueError, match="max_position_embeddings=32 is longer than sliding_"):
        DENSE.replace(max_position_embeddings=32, sliding_window=16)


def test_to_hf_config_errors():
    with pytest.raises(ValueError, match="model_type='llama' does not match num_local_experts=4"):
        MOE.to_hf_config("llama")
    with pytest.raises(ValueError, match="model_type='bert' is not supported"):
        DENSE.to_hf_config("bert")


# ------------------------------------------------------------------------------------------
# NumPy float64 references for the layers


def np_rms_norm(x, scale, eps):
    out = np.zeros(x.shape, np.float64)
    for idx in np.ndindex(x.shape[:-1]):
        row = x[idx].astype(np.float64)
        ms = sum(v * v for v in row) / len(row)
        out[idx] = [scale[i] * row[i] / np.sqrt(ms + eps) for i in range(len(row))]
    return out


def np_rotary(x, positions, theta):
    b, t, n, dh = x.shape
    half = dh // 2
    out = np.zeros(x.shape, np.float64)
    for bi in range(b):
        for ti in range(t):
            for ni in range(n):
                for j in range(half):
                    angle = positions[bi, ti] * theta ** (-2.0 * j / dh)
                    c, s = np.cos(angle), np.sin(angle)
                    a, bb = float(x[bi, ti, ni, j]), float(x[bi, ti, ni, j + half])
                    out[bi, ti, ni, j] = a * c - bb * s
                    out[bi, ti, ni, j + half] = bb * c + a * s
    return out


@settings(max_examples=10, deadline=None)
@given(
    rows=st.integers(1, 3),
    width=st.sampled_from([1, 4, 7]),
    eps=st.sampled_from([1e-6, 1e-2]),
    seed=st.integers(0, 1000),
)
def test_rms_norm_matches_numpy(rows, width, eps, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 2, width)).astype(np.float32) * 3
    scale = rng.normal(size=(width,)).astype(np.float32)
    want = np_rms_norm(x, scale, eps)
    np.testing.assert_allclose(rms_norm(x, scale, eps), want, rtol=1e-5, atol=1e-6)
    got_jit = jax.jit(rms_norm, static_argnums=2)(x, scale, eps)
    np.testing.assert_allclose(got_jit, want, rtol=1e-5, atol=1e-6)
    # Invariance: RMSNorm ignores the scale of its input.
    np.testing.assert_allclose(rms_norm(x * 10, scale, 0.0), rms_norm(x, scale, 0.0), rtol=1e-5)


def test_rms_norm_rounds_to_the_input_dtype_before_the_scale():
    # Like Hugging Face's Llama/Mixtral RMSNorm: normalise in float32, round to the input's
    # dtype, then multiply by the (float32) gain. Rounding after the multiply differs.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(4, 64)) * 3, jnp.bfloat16)
    scale = jnp.asarray(1 + rng.normal(size=(64,)) / 3, jnp.float32)
    x64 = np.asarray(x, np.float64)
    normed = x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + 1e-6)
    want = np.asarray(scale, np.float64) * np.asarray(jnp.asarray(normed, jnp.bfloat16), np.float64)
    got = rms_norm(x, scale, 1e-6)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6)
    unrounded = np.asarray(scale, np.float64) * normed
    assert np.abs(np.asarray(got, np.float64) - unrounded).max() > 1e-4


@settings(max_examples=8, deadline=None)
@given(
    head_dim=st.sampled_from([2, 4, 8]),
    theta=st.sampled_from([10.0, 1e4]),
    seed=st.integers(0, 99),
)
def test_rotary_matches_numpy(head_dim, theta, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 3, 2, head_dim)).astype(np.float32)
    positions = rng.integers(0, 50, size=(2, 3))
    want = np_rotary(x, positions, theta)
    cos, sin = rotary_cos_sin(positions, head_dim, theta)
    np.testing.assert_allclose(apply_rotary(x, cos, sin), want, rtol=1e-5, atol=1e-5)
    fn = jax.jit(lambda x, p: apply_rotary(x, *rotary_cos_sin(p, head_dim, theta)))
    np.testing.assert_allclose(fn(x, positions), want, rtol=1e-5, atol=1e-5)
    # Invariance: rotation keeps the norm of each pair, and q.k depends on p_q - p_k only.
    np.testing.assert_allclose(np.linalg.norm(want, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    q = apply_rotary(x[:, :1], *rotary_cos_sin(positions[:, :1], head_dim, theta))
    k = apply_rotary(x[:, 1:2], *rotary_cos_sin(positions[:, 1:2], head_dim, theta))
    q2 = apply_rotary(x[:, :1], *rotary_cos_sin(positions[:, :1] + 7, head_dim, theta))
    k2 = apply_rotary(x[:, 1:2], *rotary_cos_sin(positions[:, 1:2] + 7, head_dim, theta))
    np.testing.assert_allclose(np.sum(q * k, -1), np.sum(q2 * k2, -1), rtol=1e-4, atol=1e-4)


def np_attention(x, wq, wk, wv, wo, positions, mask, theta):
    """GQA attention in float64 with explicit loops over batch, heads and keys."""
    x = x.astype(np.float64)
    b, t, _ = x.shape
    n, dh = wq.shape[1], wq.shape[2]
    nkv = wk.shape[1]
    q = np_rotary(np.einsum("btd,dnh->btnh", x, wq), positions, theta)
    k = np_rotary(np.einsum("btd,dnh->btnh", x, wk), positions, theta)
    v = np.einsum("btd,dnh->btnh", x, wv)
    out = np.zeros((b, t, n, dh))
    for bi in range(b):
        for head in range(n):
            kv = head // (n // nkv)
            for ti in range(t):
                visible = [s for s in range(t) if s <= ti and mask[bi, s]]
                if not visible:
                    continue
                scores = np.array([q[bi, ti, head] @ k[bi, s, kv] / np.sqrt(dh) for s in visible])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, ti, head] = sum(wi * v[bi, s, kv] for wi, s in zip(w, visible, strict=True))
    return np.einsum("btnh,nhd->btd", out, wo)


@pytest.mark.parametrize("use_jit", [False, True])
def test_attention_matches_numpy(use_jit):
    rng = np.random.default_rng(0)
    b, t, d, n, nkv, dh = 2, 5, 8, 4, 2, 4
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    mask = np.ones((b, t), np.int32)
    mask[1, :2] = 0  # left padding
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    module = Attention(n, nkv, dh)
    cos, sin = rotary_cos_sin(positions, dh, 100.0)
    full = attention_mask_for(mask, mask, 0)
    params = module.init(jax.random.key(0), x, cos, sin, full)["params"]
    params = jax.tree.map(lambda w: w * 10, params)
    apply = jax.jit(module.apply) if use_jit else module.apply
    got, cache = apply({"params": params}, x, cos, sin, full)
    assert cache is None
    want = np_attention(
        x, *(np.asarray(params[k]) for k in ("q_proj", "k_proj", "v_proj", "o_proj")),
        positions, mask, 100.0,
    )  # fmt: skip
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[real], want[real], rtol=1e-4, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # padding rows see no key but stay finite


_ATTENTION_WEIGHTS = ("q_proj", "k_proj", "v_proj", "o_proj")


def _left_padded_attention(rng):
    """An Attention layer (4 heads, 2 KV heads) on a batch of 2 x 5 tokens whose second row
    has 2 left-padding tokens: ``(module, params, x, cos, sin, full_mask, mask, positions)``."""
    b, t, d, n, nkv, dh = 2, 5, 8, 4, 2, 4
    x = rng.normal(size=(b, t, d)).astype(np.float32)
    mask = np.ones((b, t), np.int32)
    mask[1, :2] = 0
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    module = Attention(n, nkv, dh)
    cos, sin = rotary_cos_sin(positions, dh, 100.0)
    full = attention_mask_for(mask, mask, 0)
    params = module.init(jax.random.key(0), x, cos, sin, full)["params"]
    return module, params, x, cos, sin, full, mask, positions


def _assert_grads_match_autodiff(loss, params, x, grads, dx):
    """``(grads, dx)`` of ``loss`` against autodiff of the same forward with the attention
    core's VJP bypassed."""

    def plain(rows, keys, values, mask, group, dtype):
        return layers._softmax_attention_fwd(rows, keys, values, mask, group, dtype)[0]

    with mock.patch.object(layers, "_softmax_attention", plain):
        want_grads, want_dx = jax.grad(loss, argnums=(0, 1))(params, x)
    for k in _ATTENTION_WEIGHTS:
        np.testing.assert_allclose(grads[k], want_grads[k], rtol=1e-5, atol=1e-5, err_msg=k)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_attention_backward_keeps_no_probabilities(dtype):
    """The attention core keeps its inputs and per-row statistics for the backward pass, not
    the [B, N_kv, G*T, S] probabilities (recomputed there), so what a layer keeps grows with
    T + S per row rather than T x S. Its output is the softmax's: uniform over the values for
    a query that sees no key (left padding), and with the probabilities rounded to the compute
    dtype before they weight the values."""
    b, nkv, g, t, dh = 2, 2, 3, 16, 4
    rng = np.random.default_rng(0)
    rows = jnp.asarray(rng.normal(size=(b, nkv, g * t, dh)), dtype)
    keys, values = (jnp.asarray(rng.normal(size=(b, nkv, t, dh)), dtype) for _ in "kv")
    mask = np.tril(np.ones((t, t), bool))[None].repeat(b, 0)
    mask[1, :3] = False  # the second row's first 3 queries see no key
    mask = jnp.asarray(mask)
    out, res = layers._softmax_attention_fwd(rows, keys, values, mask, g, dtype)
    big = [x.shape for x in jax.tree.leaves(res) if x.size > max(rows.size, keys.size, mask.size)]
    assert not big, big
    stats = [x for x in jax.tree.leaves(res) if x.shape == (b, nkv, g, t, 1)]
    assert len(stats) == 2  # the row maxima and exponential sums
    probs = jax.nn.softmax(layers._masked_scores(rows, keys, mask, g), axis=-1)
    probs = probs.astype(dtype).reshape(b, nkv, g * t, t)
    want = jnp.einsum("bnrs,bnsh->bnrh", probs, values, preferred_element_type=jnp.float32)
    tol = 1e-6 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
    if dtype == jnp.bfloat16:  # unrounded probabilities would move the output further
        exact = jnp.einsum("bnrs,bnsh->bnrh", probs.astype(jnp.float32),
                           values.astype(jnp.float32))  # fmt: skip
        assert float(jnp.max(jnp.abs(out - want))) < float(jnp.max(jnp.abs(exact - want)))
    blind = out.reshape(b, nkv, g, t, dh)[1, :, :, :3]  # queries that see no key
    mean = jnp.mean(values[1].astype(jnp.float32), axis=1)[:, None, None, :]
    np.testing.assert_allclose(blind, jnp.broadcast_to(mean, blind.shape), rtol=tol, atol=tol)


@pytest.mark.parametrize("use_jit", [False, True])
def test_attention_gradients_match_numpy_and_autodiff(use_jit):
    """The attention's hand-written VJP against float64 finite differences of the NumPy
    reference (a random direction in every weight and the input) and against JAX's autodiff
    of the same forward."""
    rng = np.random.default_rng(1)
    module, params, x, cos, sin, full, mask, positions = _left_padded_attention(rng)
    real = mask.astype(bool)
    params = jax.tree.map(lambda w: w * 10, params)
    weight = rng.normal(size=x.shape) * real[:, :, None]
    names = _ATTENTION_WEIGHTS

    def loss(params, x):
        out, _ = module.apply({"params": params}, x, cos, sin, full)
        return jnp.sum(out * weight.astype(np.float32))

    grad = jax.grad(loss, argnums=(0, 1))
    grads, dx = (jax.jit(grad) if use_jit else grad)(params, x)

    def np_loss(ws, x):
        return float(np.sum(np_attention(x, *ws, positions, mask, 100.0) * weight))

    ws = [np.asarray(params[k], np.float64) for k in names]
    dirs = [rng.normal(size=w.shape) for w in ws]
    dir_x = rng.normal(size=x.shape)
    eps = 1e-5
    pairs = list(zip(ws, dirs, strict=True))
    plus = np_loss([w + eps * u for w, u in pairs], x.astype(np.float64) + eps * dir_x)
    minus = np_loss([w - eps * u for w, u in pairs], x.astype(np.float64) - eps * dir_x)
    numeric = (plus - minus) / (2 * eps)
    analytic = sum(
        float(np.sum(np.asarray(grads[k]) * u)) for k, u in zip(names, dirs, strict=True)
    )
    analytic += float(np.sum(np.asarray(dx) * dir_x))
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4)
    _assert_grads_match_autodiff(loss, params, x, grads, dx)
    assert all(np.abs(np.asarray(grads[k])).max() > 1e-3 for k in names)


def test_attention_gradients_at_queries_that_see_no_key():
    """A left-padding query sees no key: its output is the mean of the values whatever q and
    k are, so no gradient may reach q or k from it (JAX's autodiff of the same forward)."""
    rng = np.random.default_rng(2)
    module, params, x, cos, sin, full, _, _ = _left_padded_attention(rng)
    assert not np.asarray(full)[1, 0].any()  # the padding query's row is all masked
    weight = rng.normal(size=x.shape).astype(np.float32)  # also at the padding rows

    def loss(params, x):
        out, _ = module.apply({"params": params}, x, cos, sin, full)
        return jnp.sum(out * weight)

    grads, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    _assert_grads_match_autodiff(loss, params, x, grads, dx)


@pytest.mark.parametrize("first_slot", [0, 3, 6])
def test_cached_attention_mask_matches_the_written_cache(first_slot):
    # Seeing cached slots < first_slot and the new tokens causally must be the same as
    # writing the new tokens' mask into the cache and applying the full causal slot mask.
    rng = np.random.default_rng(first_slot)
    b, t, s = 3, 2, 8
    key_mask = rng.integers(0, 2, size=(b, s)).astype(np.int32)
    new = rng.integers(0, 2, size=(b, t)).astype(np.int32)
    got = np.asarray(jax.jit(cached_attention_mask)(new, key_mask, first_slot))
    assert got.shape == (b, t, s + t)
    written = key_mask.copy()
    written[:, first_slot : first_slot + t] = new
    want = np.zeros((b, t, s), bool)
    for bi in range(b):
        for ti in range(t):
            for si in range(s):
                want[bi, ti, si] = si <= first_slot + ti and written[bi, si] == 1
    # Cached part: slots before first_slot; new part: the slots the new tokens are written to.
    np.testing.assert_array_equal(got[:, :, :first_slot], want[:, :, :first_slot])
    np.testing.assert_array_equal(got[:, :, first_slot:s], False)
    np.testing.assert_array_equal(got[:, :, s:], want[:, :, first_slot : first_slot + t])


# ------------------------------------------------------------------------------------------
# Parameters


@pytest.mark.parametrize("config", [DENSE, MOE, MOE.replace(tie_word_embeddings=True)])
def test_param_tree_and_logical_axes(config):
    shapes = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    axes = param_logical_axes(config)
    is_names = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(shapes) == jax.tree.structure(axes, is_leaf=is_names)
    for p, names in zip(
        jax.tree.leaves(shapes), jax.tree.leaves(axes, is_leaf=is_names), strict=True
    ):
        assert p.ndim == len(names) and p.dtype == jnp.float32
        assert all(n is None or n in shd.LOGICAL_AXES for n in names)
    layers = shapes["layers"]
    assert layers["attn"]["q_proj"].shape == (2, 32, 4, 8)
    assert layers["attn"]["k_proj"].shape == (2, 32, 2, 8)
    assert layers["attn"]["o_proj"].shape == (2, 4, 8, 32)
    assert ("lm_head" in shapes) == (not config.tie_word_embeddings)
    assert ("value_head" in shapes) == config.value_head
    assert ("moe" in layers) == config.is_moe and ("mlp" in layers) != config.is_moe


def test_init_params_values():
    params = init_params(MOE, jax.random.key(0))
    q = params["layers"]["attn"]["q_proj"]
    assert not np.allclose(q[0], q[1])  # each layer got its own key
    np.testing.assert_allclose(np.std(q), 0.02, rtol=0.2)
    np.testing.assert_array_equal(params["final_norm"]["scale"], 1.0)
    np.testing.assert_array_equal(params["value_head"]["bias"], 0.0)
    again = init_params(MOE, jax.random.key(0))
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, again))
    raw = init_params(MOE, jax.random.PRNGKey(0))  # raw uint32 key data: the same key
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), params, raw))
    with pytest.raises(ValueError, match=r"^key must be a jax.random key .*, got 0$"):
        init_params(MOE, 0)
    with pytest.raises(TypeError, match="config must be a ModelConfig, got dict"):
        init_params({"vocab_size": 64}, jax.random.key(0))


def test_bfloat16_params_float32_logits():
    config = DENSE.replace(dtype="bfloat16", value_head=True)
    params = init_params(config, jax.random.key(0))
    assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    logits, _, aux = jit_forward(params, jnp.ones((1, 3), jnp.int32), config=config)
    assert logits.dtype == jnp.float32 and aux["values"].dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_forward_input_errors():
    params = init_params(DENSE, jax.random.key(0))
    toks = jnp.zeros((2, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"tokens must be \[B, T\]"):
        forward(params, jnp.zeros((3,), jnp.int32), DENSE)
    with pytest.raises(ValueError, match="attention_mask must have the shape of tokens"):
        forward(params, toks, DENSE, attention_mask=jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="positions must have the shape of tokens"):
        forward(params, toks, DENSE, positions=jnp.zeros((1, 3), jnp.int32))
    with pytest.raises(ValueError, match="routing= was given but the model is dense"):
        forward(params, toks, DENSE, routing=jnp.zeros((2, 2, 3, 2), jnp.int32))
    bad_cache = (
        r"cache must hold L = 2 key arrays \[B, N_kv, Dh, S\] and 2 value arrays "
        r"\[B, N_kv, S, Dh\] with B, N_kv, Dh = \(2, 2, 8\) and one S; got 2 key arrays of "
        r"shapes \[\(3, 2, 8, 8\)\]"
    )
    with pytest.raises(ValueError, match=bad_cache):
        forward(params, toks, DENSE, cache=init_cache(DENSE, 3, 8))
    one_layer = init_cache(DENSE, 2, 8)
    one_layer = one_layer._replace(k=one_layer.k[:1])
    with pytest.raises(ValueError, match=r"got 1 key arrays of shapes \[\(2, 2, 8, 8\)\]"):
        forward(params, toks, DENSE, cache=one_layer)
    with pytest.raises(ValueError, match="3 tokens do not fit a cache of 2 slots"):
        forward(params, toks, DENSE, cache=init_cache(DENSE, 2, 2))
    with pytest.raises(ValueError, match="batch_size and max_length must be >= 1"):
        init_cache(DENSE, 0, 4)


def test_forward_refuses_inputs_it_would_reinterpret():
    params = init_params(DENSE, jax.random.key(0))
    toks = jnp.array([[1, 2, 3, 4]], jnp.int32)
    with pytest.raises(TypeError, match=r"tokens must be an integer array .* got dtype float32"):
        forward(params, toks.astype(jnp.float32), DENSE)
    with pytest.raises(TypeError, match=r"tokens must be an integer array .* got dtype bool"):
        forward(params, toks > 2, DENSE)
    with pytest.raises(TypeError, match=r"tokens must be a numeric array of token ids .* <U1"):
        forward(params, [["a", "b"]], DENSE)
    with pytest.raises(TypeError, match=r"tokens must be an array of token ids \[B, T\], got list"):
        forward(params, [[1, 2], [3]], DENSE)
    with pytest.raises(TypeError, match=r"attention_mask must be a numeric array of \[B, T\]"):
        forward(params, toks, DENSE, attention_mask=[["x"] * 4])
    with pytest.raises(TypeError, match=r"positions must be an integer array .* dtype float32"):
        forward(params, toks, DENSE, positions=jnp.array([[0.5, 1.5, 2.5, 3.5]]))
    in_range = r"tokens must be ids in \[0, vocab_size=64\), got "
    with pytest.raises(ValueError, match=in_range + r"64 at \[0, 1\]"):
        forward(params, jnp.array([[1, 64]]), DENSE)
    with pytest.raises(ValueError, match=in_range + r"-5 at \[0, 1\]"):
        forward(params, jnp.array([[1, -5]]), DENSE)
    with pytest.raises(ValueError, match=r"B >= 1 and T >= 1, got shape \(1, 0\)"):
        forward(params, jnp.ones((1, 0), jnp.int32), DENSE)
    with pytest.raises(ValueError, match=r"B >= 1 and T >= 1, got shape \(0, 3\)"):
        forward(params, jnp.ones((0, 3), jnp.int32), DENSE)
    with pytest.raises(TypeError, match=r"train must be a bool \(True or False\), got 'no'"):
        forward(params, toks, DENSE, train="no")
    with pytest.raises(TypeError, match="return_routing must be a bool"):
        forward(params, toks, DENSE, return_routing=1)
    # Params of another vocabulary would give logits of the wrong width.
    small = init_params(DENSE.replace(vocab_size=32), jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"params\['embed_tokens'\]\['embedding'\] has shape \(32, 32\), but config "
        r"vocab_size=64, hidden_size=32 need \(64, 32\)",
    ):
        forward(small, toks, DENSE)
    with pytest.raises(ValueError, match=r"params\['lm_head'\]\['kernel'\] is missing"):
        forward(params, toks, DENSE.replace(tie_word_embeddings=False))
    with pytest.raises(ValueError, match=r"params\['layers'\]\['moe'\] is missing"):
        forward(params, toks, MOE.replace(tie_word_embeddings=True, value_head=False))
    # Inner shapes too: Flax's own error named an initializer and a scope.
    with pytest.raises(ValueError, match=re.escape(
        "params['layers']['attn']['k_proj'] has shape (2, 32, 2, 8), but config (hidden_size="
        "32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=4, head_dim=8, "
        "num_local_experts=0, qkv_bias=False, qk_norm=False) needs (2, 32, 4, 8)"
    )):  # fmt: skip
        forward(params, toks, DENSE.replace(num_key_value_heads=4))
    with pytest.raises(ValueError, match=r"params\['final_norm'\]\['scale'\] has shape \(16,\)"):
        forward({**params, "final_norm": {"scale": jnp.ones(16)}}, toks, DENSE)
    with pytest.raises(ValueError, match=r"params\['final_norm'\]\['scale'\] is missing; config"):
        forward({**params, "final_norm": {}}, toks, DENSE)
    # numpy bools are bools; the checks do not stop a traced forward.
    assert forward(params, toks, DENSE, train=np.bool_(False))[0].shape == (1, 4, 64)
    assert jit_forward(params, toks, config=DENSE)[0].shape == (1, 4, 64)


def test_attention_mask_nonzero_means_a_real_token():
    params = scaled(init_params(DENSE, jax.random.key(0)))
    toks = jnp.array([[5, 6, 7, 8]], jnp.int32)
    want, _, _ = forward(params, toks, DENSE, attention_mask=jnp.array([[0, 1, 1, 1]]))
    for mask in ([[0, 0.5, 2, 1]], [[False, True, True, True]], [[0.0, -1.0, 1.0, 3.0]]):
        got, _, _ = forward(params, toks, DENSE, attention_mask=jnp.asarray(mask))
        np.testing.assert_allclose(got, want, atol=1e-6)
    padded, _, _ = forward(params, toks, DENSE, attention_mask=jnp.array([[0, 0, 1, 1]]))
    assert np.abs(np.asarray(padded[0, 3]) - np.asarray(want[0, 3])).max() > 1e-3


def test_cache_overflow_and_non_caches_are_refused():
    params = init_params(DENSE, jax.random.key(0))
    toks = jnp.array([[1, 2, 3, 4]], jnp.int32)
    cache = init_cache(DENSE, 1, 6)
    _, cache4, _ = forward(params, toks, DENSE, cache=cache)
    overflow = r"cache.index 4 \+ 4 new tokens exceed the cache's 6 slots"
    with pytest.raises(ValueError, match=overflow):
        forward(params, jnp.array([[5, 6, 7, 8]]), DENSE, cache=cache4)
    _, full, _ = forward(params, jnp.array([[5, 6]]), DENSE, cache=cache4)  # exactly full: fine
    assert int(full.index) == 6
    with pytest.raises(ValueError, match=r"cache.index 6 \+ 1 new tokens exceed"):
        forward(params, jnp.array([[7]]), DENSE, cache=full)
    with pytest.raises(ValueError, match=r"cache.index -3 \+ 4 new tokens exceed"):
        forward(params, toks, DENSE, cache=cache._replace(index=jnp.int32(-3)))
    for bad in [(1, 2), {"k": 1}]:
        with pytest.raises(TypeError, match=r"cache must be a KVCache \(from init_cache or"):
            forward(params, toks, DENSE, cache=bad)
    with pytest.raises(ValueError, match="max_length must be an integer >= 1, got 4.5"):
        init_cache(DENSE, 1, 4.5)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got None"):
        init_cache(DENSE, None, 4)
    assert init_cache(DENSE, np.int64(1), np.int32(4)).key_mask.shape == (1, 4)


def test_routing_shape_and_values_are_checked():
    params = init_params(MOE, jax.random.key(0))
    toks = jnp.array([[1, 2, 3, 4]], jnp.int32)
    with pytest.raises(
        ValueError, match=r"routing must be \[L, B, T, K\] = \(2, 1, 4, 2\) .* shape \(1, 4, 2\)"
    ):
        forward(params, toks, MOE, routing=jnp.zeros((1, 4, 2), jnp.int32))
    for value in (4, -2):
        with pytest.raises(
            ValueError, match=rf"routing values must be in \[0, num_experts=4\) .*, got {value}"
        ):
            forward(params, toks, MOE, routing=jnp.full((2, 1, 4, 2), value, jnp.int32))
    with pytest.raises(TypeError, match="routing must be an integer array"):
        forward(params, toks, MOE, routing=jnp.zeros((2, 1, 4, 2)))


def test_value_head_and_aux():
    params = scaled(init_params(MOE, jax.random.key(3)))
    toks = jax.random.randint(jax.random.key(4), (2, 5), 0, 64)
    logits, cache, aux = jit_forward(params, toks, config=MOE)
    assert cache is None and logits.shape == (2, 5, 64) and logits.dtype == jnp.float32
    assert aux["values"].shape == (2, 5)
    # The value head reads the final normalised hidden state: recompute it from the logits'
    # input by replacing the LM head's first column with the value head.
    vh = params["value_head"]
    kernel = jnp.zeros_like(params["lm_head"]["kernel"]).at[:, :1].set(vh["kernel"])
    swapped = {**params, "lm_head": {"kernel": kernel}}
    v_logits, _, _ = jit_forward(swapped, toks, config=MOE)
    np.testing.assert_allclose(aux["values"], v_logits[..., 0] + vh["bias"][0], atol=1e-6)
    assert aux["expert_load"].shape == (2, 4)
    np.testing.assert_allclose(np.sum(aux["expert_load"], -1), 1.0, rtol=1e-5)
    assert float(aux["moe_aux_loss"]) > 0 and float(aux["moe_z_loss"]) > 0
    assert float(aux["dropped_fraction"]) == 0.0  # dropless
    dense_aux = jit_forward(init_params(DENSE, jax.random.key(0)), toks, config=DENSE)[2]
    assert dense_aux["expert_load"].shape == (2, 0) and float(dense_aux["moe_aux_loss"]) == 0


def test_router_replay_and_capacity():
    config = MOE.replace(capacity_factor=0.5, eval_capacity_factor=4.0)
    params = scaled(init_params(MOE, jax.random.key(5)))
    toks = jax.random.randint(jax.random.key(6), (2, 8), 0, 64)
    fwd = functools.partial(jit_forward, config=config, return_routing=True)
    logits, _, aux = fwd(params, toks)
    routing = aux["routing"]
    assert routing.shape == (2, 2, 8, 2) and routing.dtype == jnp.int32  # [L, B, T, K]
    assert float(aux["dropped_fraction"]) > 0  # capacity 0.5 drops choices
    layers = np.asarray(aux["layer_dropped_fraction"])
    assert layers.shape == (2,) and np.all((layers > 0) & (layers <= 1))
    assert float(aux["dropped_fraction"]) == pytest.approx(layers.mean(), rel=1e-6)
    assert float(fwd(params, toks, train=False)[2]["dropped_fraction"]) == 0.0
    # Replaying the choices on perturbed weights keeps exactly those experts...
    other = jax.tree.map(lambda x: x * 1.3, params)
    _, _, aux2 = fwd(other, toks, routing=routing)
    np.testing.assert_array_equal(aux2["routing"], routing)
    free = fwd(other, toks)[2]["routing"]
    assert np.any(np.asarray(free) != np.asarray(routing))  # ...which differ without replay
    replayed, _, _ = fwd(params, toks, routing=routing)
    np.testing.assert_allclose(replayed, logits, atol=1e-6)


# ------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize(
    "config,side", [(DENSE, "left"), (MOE, "left"), (MOE, "right"), (LLAMA3_ROPE, "left")]
)
def test_kv_cache_decode_equals_full_forward(config, side):
    b, p, n = 3, 6, 4
    params = scaled(init_params(config, jax.random.key(1)))
    toks, mask, positions = padded_batch(jax.random.key(2), b, p, n, (0, 2, 4), side)
    full, _, full_aux = jit_forward(
        params, toks, config=config, positions=positions, attention_mask=mask
    )
    cache = init_cache(config, b, p + n + 2)  # spare slots stay masked
    logits, cache, aux = jit_forward(
        params, toks[:, :p], config=config, positions=positions[:, :p],
        attention_mask=mask[:, :p], cache=cache,
    )  # fmt: skip
    assert isinstance(cache, KVCache) and int(cache.index) == p
    np.testing.assert_array_equal(cache.key_mask[:, :p], mask[:, :p])
    real = np.asarray(mask[:, :p]).astype(bool)
    np.testing.assert_allclose(np.asarray(logits)[real], np.asarray(full[:, :p])[real], atol=2e-5)
    run = functools.partial(jit_forward, config=config)
    steps, cache = decode_steps(run, params, toks, positions, mask, cache, range(p, p + n))
    for i, step, aux in steps:
        np.testing.assert_allclose(step[:, 0], full[:, i], atol=2e-5, rtol=1e-5)
        if config.value_head:
            np.testing.assert_allclose(aux["values"][:, 0], full_aux["values"][:, i], atol=2e-5)
    assert int(cache.index) == p + n
    assert [k.shape for k in cache.k] == [(b, 2, 8, p + n + 2)] * 2  # L x [B, N_kv, Dh, S]
    assert [v.shape for v in cache.v] == [(b, 2, p + n + 2, 8)] * 2  # L x [B, N_kv, S, Dh]
    np.testing.assert_array_equal(cache.key_mask[:, p + n :], 0)
    # The logits really depend on the cached context (a test that can fail).
    fresh, _, _ = jit_forward(params, toks[:, -1:], config=config, positions=positions[:, -1:])
    assert np.abs(np.asarray(fresh[:, 0]) - np.asarray(full[:, -1])).max() > 1e-3


def test_default_positions_continue_from_cache():
    params = init_params(DENSE, jax.random.key(0))
    toks = jax.random.randint(jax.random.key(1), (2, 5), 0, 64)
    full, _, _ = forward(params, toks, DENSE)
    cache = init_cache(DENSE, 2, 5)
    _, cache, _ = forward(params, toks[:, :3], DENSE, cache=cache)
    rest, cache, _ = forward(params, toks[:, 3:], DENSE, cache=cache)
    np.testing.assert_allclose(rest, full[:, 3:], atol=1e-5)
    names = cache_logical_axes(DENSE)
    layers = DENSE.num_hidden_layers
    assert names.k == ((shd.BATCH, shd.KV_HEADS, shd.HEAD_DIM, shd.LENGTH),) * layers
    assert names.v == ((shd.BATCH, shd.KV_HEADS, shd.LENGTH, shd.HEAD_DIM),) * layers


def test_out_of_range_padding_ids_stay_finite():
    params = init_params(DENSE, jax.random.key(0))
    toks = jnp.array([[-1, 999, 5, 6]], jnp.int32)
    mask = jnp.array([[0, 0, 1, 1]], jnp.int32)
    logits, _, _ = forward(params, toks, DENSE, attention_mask=mask)
    assert np.isfinite(np.asarray(logits)).all()


def test_padding_and_batch_invariance():
    params = scaled(init_params(MOE, jax.random.key(7)))
    toks = jax.random.randint(jax.random.key(8), (1, 6), 1, 64)
    alone, _, _ = jit_forward(params, toks, config=MOE)
    padded = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), toks], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 6), jnp.int32)], 1)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    other = jax.random.randint(jax.random.key(9), (1, 9), 1, 64)
    batch = jnp.concatenate([padded, other], 0)
    got, _, _ = jit_forward(
        params, batch, config=MOE, positions=jnp.concatenate([positions, positions], 0),
        attention_mask=jnp.concatenate([mask, jnp.ones_like(mask)], 0),
    )  # fmt: skip
    np.testing.assert_allclose(got[0, 3:], alone[0], atol=2e-5)


# ------------------------------------------------------------------------------------------
# Sharded == single device

LAYOUTS = {
    "dp8": ParallelLayout(dp=8),
    "tp2-ep2-dp2": ParallelLayout(dp=2, tp=2, ep=2),
    "ep8": ParallelLayout(ep=8),
    "tp8": ParallelLayout(tp=8),
}


def _loss(params, toks, mask, config, mesh):
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    logits, _, aux = forward(
        params, toks, config, positions=positions, attention_mask=mask, mesh=mesh
    )
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
    weights = mask[:, 1:]
    loss = jnp.sum(nll * weights) / jnp.sum(weights)
    loss = loss + 0.1 * jnp.mean(aux["values"] ** 2)
    loss = loss + 0.01 * aux["moe_aux_loss"] + 0.01 * aux["moe_z_loss"]
    return loss, logits


@functools.cache
def _single_device_reference():
    params = scaled(init_params(MESH_CONFIG, jax.random.key(11)))
    toks = jax.random.randint(jax.random.key(12), (8, 8), 1, 64)
    mask = jnp.ones((8, 8), jnp.int32).at[1, :3].set(0).at[5, :5].set(0)
    toks = jnp.where(mask > 0, toks, 0)
    fn = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=(3, 4))
    (loss, logits), grads = fn(params, toks, mask, MESH_CONFIG, None)
    return params, toks, mask, loss, logits, grads


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_sharded_forward_and_grads_equal_single_device(name, devices):
    params, toks, mask, loss, logits, grads = _single_device_reference()
    mesh = LAYOUTS[name].make_mesh(devices)
    sharded = shard_params(params, MESH_CONFIG, mesh)
    batch = NamedSharding(mesh, shd.batch_spec(2, mesh, batch_size=8))
    fn = jax.jit(jax.value_and_grad(_loss, has_aux=True), static_argnums=(3, 4))
    (s_loss, s_logits), s_grads = fn(
        sharded, jax.device_put(toks, batch), jax.device_put(mask, batch), MESH_CONFIG, mesh
    )
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(s_logits, logits, atol=1e-5, rtol=1e-5)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), s in zip(flat, jax.tree.leaves(s_grads), strict=True):
        np.testing.assert_allclose(s, g, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # The weights really are split as the rule table says.
    q_spec = tuple(sharded["layers"]["attn"]["q_proj"].sharding.spec) + (None,) * 4
    w_spec = tuple(sharded["layers"]["moe"]["w_gate_up"].sharding.spec) + (None,) * 4
    layout = LAYOUTS[name]
    assert (q_spec[2] == "tp") == (layout.tp > 1)
    assert (w_spec[1] == "ep") == (layout.ep > 1)
    assert sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads)) > 0


def test_sharded_kv_cache_decode_equals_single_device_forward(devices):
    params, toks, mask, _, logits, _ = _single_device_reference()
    mesh = LAYOUTS["tp2-ep2-dp2"].make_mesh(devices)
    sharded = shard_params(params, MESH_CONFIG, mesh)
    cache = init_cache(MESH_CONFIG, 8, 8)
    cache = jax.device_put(cache, shd.tree_shardings(cache_logical_axes(MESH_CONFIG), mesh, cache))
    assert all(tuple(k.sharding.spec)[0] == ("dp", "ep") for k in cache.k)
    positions = jnp.maximum(jnp.cumsum(mask, 1) - 1, 0)
    run = functools.partial(jit_forward, config=MESH_CONFIG, mesh=mesh)
    prefill, cache, _ = run(
        sharded, toks[:, :6], positions=positions[:, :6], attention_mask=mask[:, :6], cache=cache
    )
    real = np.asarray(mask[:, :6]).astype(bool)
    np.testing.assert_allclose(
        np.asarray(prefill)[real], np.asarray(logits[:, :6])[real], atol=1e-5
    )
    steps, cache = decode_steps(run, sharded, toks, positions, mask, cache, (6, 7))
    for i, step, _ in steps:
        np.testing.assert_allclose(step[:, 0], logits[:, i], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Pipeline parallelism (pp > 1): the layers run as stages over microbatches


def _pp_loss(params, toks, mask, config, mesh, num_microbatches):
    logits, _, aux = forward(
        params, toks, config, positions=jnp.maximum(jnp.cumsum(mask, 1) - 1, 0),
        attention_mask=mask, mesh=mesh, return_routing=True, num_microbatches=num_microbatches,
    )  # fmt: skip
    logp = jax.nn.log_softmax(logits[:, :-1])
    nll = -jnp.take_along_axis(logp, toks[:, 1:, None], -1)[..., 0]
    loss = jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:]) + 0.1 * jnp.mean(aux["values"] ** 2)
    loss = loss + 0.01 * aux["moe_aux_loss"] + 0.01 * aux["moe_z_loss"]
    return loss, (logits, aux)


_pp_value_and_grad = jax.jit(jax.value_and_grad(_pp_loss, has_aux=True), static_argnums=(3, 4, 5))


@pytest.mark.parametrize(
    "layout,num_microbatches",
    [(ParallelLayout(pp=2, tp=2, ep=2), 4), (ParallelLayout(pp=2, dp=4), 2)],
    ids=["pp2-tp2-ep2-m4", "pp2-dp4-m2"],
)
def test_pipelined_forward_and_grads_equal_single_device(layout, num_microbatches, devices):
    params, toks, mask, *_ = _single_device_reference()
    (loss, (logits, aux)), grads = _pp_value_and_grad(params, toks, mask, MESH_CONFIG, None, 1)
    mesh = layout.make_mesh(devices)
    sharded = shard_params(params, MESH_CONFIG, mesh)
    # The layer axis is split over 'pp' (stage s holds layers [s L/pp, (s+1) L/pp)), while the
    # tree keeps its [L, ...] shapes: checkpoints do not depend on pp.
    q = sharded["layers"]["attn"]["q_proj"]
    assert q.shape == params["layers"]["attn"]["q_proj"].shape
    assert q.sharding.spec[0] == "pp"
    batch = NamedSharding(mesh, shd.batch_spec(2, mesh, batch_size=8))
    (s_loss, (s_logits, s_aux)), s_grads = _pp_value_and_grad(
        sharded, jax.device_put(toks, batch), jax.device_put(mask, batch), MESH_CONFIG, mesh,
        num_microbatches,
    )  # fmt: skip
    np.testing.assert_allclose(s_loss, loss, rtol=1e-5)
    np.testing.assert_allclose(s_logits, logits, atol=1e-5, rtol=1e-5)
    # MoE statistics are combined from per-microbatch sums: exactly the whole batch's.
    for key in (
        "moe_aux_loss", "moe_z_loss", "dropped_fraction", "layer_dropped_fraction",
        "expert_load", "values",
    ):  # fmt: skip
        np.testing.assert_allclose(s_aux[key], aux[key], atol=1e-5, rtol=1e-5, err_msg=key)
    np.testing.assert_array_equal(s_aux["routing"], aux["routing"])
    assert s_aux["routing"].shape == (2, 8, 8, 2)
    flat, _ = jax.tree_util.tree_flatten_with_path(grads)
    for (path, g), s in zip(flat, jax.tree.leaves(s_grads), strict=True):
        np.testing.assert_allclose(s, g, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # Back onto one device (a pp=2 layout restored as pp=1): the same values.
    leaves = zip(jax.tree.leaves(jax.device_get(sharded)), jax.tree.leaves(params), strict=True)
    for got, want in leaves:
        np.testing.assert_array_equal(got, want)


def test_pipelined_router_replay_equals_single_device(devices):
    params, toks, mask, *_ = _single_device_reference()
    # Replay choices that are not the router's own (shifted experts), so replay matters.
    routing = jax.random.randint(jax.random.key(3), (2, 8, 8, 2), 0, 8)
    routing = routing.at[..., 1].set((routing[..., 0] + 1 + routing[..., 1] % 7) % 8)
    run = jax.jit(
        lambda p, t, m, r, mesh, n: forward(
            p, t, MESH_CONFIG, attention_mask=m, routing=r, mesh=mesh, num_microbatches=n,
            return_routing=True,
        ),
        static_argnums=(4, 5),
    )  # fmt: skip
    logits, _, aux = run(params, toks, mask, routing, None, 1)
    np.testing.assert_array_equal(aux["routing"], routing)
    mesh = ParallelLayout(pp=2, dp=4).make_mesh(devices)
    p_logits, _, p_aux = run(shard_params(params, MESH_CONFIG, mesh), toks, mask, routing, mesh, 2)
    np.testing.assert_allclose(p_logits, logits, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(p_aux["routing"], routing)
    np.testing.assert_allclose(p_aux["moe_aux_loss"], aux["moe_aux_loss"], rtol=1e-5)


def test_param_logical_axes_name_the_stage_axis_when_pipelined():
    axes = param_logical_axes(MESH_CONFIG, pp=2)
    assert axes["layers"]["attn"]["q_proj"] == (shd.STAGE, shd.EMBED, shd.HEADS, shd.HEAD_DIM)
    assert axes["layers"]["moe"]["w_down"] == (shd.STAGE, shd.EXPERT, shd.MLP, shd.EMBED)
    assert axes["embed_tokens"] == param_logical_axes(MESH_CONFIG)["embed_tokens"]
    assert param_logical_axes(MESH_CONFIG)["layers"]["input_norm"]["scale"][0] == shd.LAYERS


def test_pipeline_errors(devices):
    params, toks, mask, *_ = _single_device_reference()
    pp4 = ParallelLayout(pp=4, ep=2).make_mesh(devices)
    pp2 = ParallelLayout(pp=2, dp=4).make_mesh(devices)
    layers = r"num_hidden_layers=2 is not divisible by pipeline_parallel_size=4; valid .*\[1, 2\]"
    with pytest.raises(ValueError, match=layers):
        forward(params, toks, MESH_CONFIG, mesh=pp4)
    with pytest.raises(ValueError, match=layers):
        shard_params(params, MESH_CONFIG, pp4)
    with pytest.raises(ValueError, match=layers):
        param_logical_axes(MESH_CONFIG, pp=4)
    with pytest.raises(ValueError, match="pp must be an integer >= 1, got 0"):
        param_logical_axes(MESH_CONFIG, pp=0)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="num_microbatches must be an integer >= 1, got"):
            forward(params, toks, MESH_CONFIG, mesh=pp2, num_microbatches=bad)
    with pytest.raises(
        ValueError,
        match=r"num_microbatches=3 does not divide the batch size B=8; valid num_microbatches: "
        r"\[1, 2, 4, 8\]",
    ):
        forward(params, toks, MESH_CONFIG, mesh=pp2, num_microbatches=3)
    # Without a pipeline (pp = 1, or a KV cache) the microbatch count is not used.
    forward(params, toks[:, :1], MESH_CONFIG, num_microbatches=3)
