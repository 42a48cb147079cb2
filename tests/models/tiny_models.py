"""Tiny decoder configs and inputs shared by the model tests."""

import jax
import jax.numpy as jnp
import numpy as np

from novarl_jax.models import ModelConfig

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
DENSE = ModelConfig(**TINY, tie_word_embeddings=True)
MOE = ModelConfig(**TINY, num_local_experts=4, num_experts_per_tok=2, value_head=True)
# Llama 3.1's rotary scaling; with head_dim 8 and theta 1e4 the wavelengths (6.3, 63, 628,
# 6283) fall in the blended band (4, 16) once and above it three times.
LLAMA3_ROPE = DENSE.replace(
    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
)  # fmt: skip

# With q/k/v biases (Qwen2's attention) and query/key norms (Qwen3's), split over tp with
# their heads.
MESH_CONFIG = ModelConfig(
    vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=8, num_key_value_heads=4, num_local_experts=8,
    num_experts_per_tok=2, value_head=True, qkv_bias=True, qk_norm=True,
)  # fmt: skip


def scaled(params, factor=5.0):
    """Weights with std 0.1 instead of 0.02, so logits and routing depend clearly on input;
    attention biases (which start at zero) drawn with std 0.3 and query/key norm gains (which
    start at one) around 1 with std 0.2."""
    out = jax.tree.map(lambda x: x * factor if x.ndim >= 2 else x, params)
    attn = out.get("layers", {}).get("attn", {})
    start = {"q_bias": 0.0, "k_bias": 0.0, "v_bias": 0.0, "q_norm": 1.0, "k_norm": 1.0}
    std = {"q_bias": 0.3, "k_bias": 0.3, "v_bias": 0.3, "q_norm": 0.2, "k_norm": 0.2}
    for i, name in enumerate(k for k in start if k in attn):
        noise = jax.random.normal(jax.random.key(100 + i), attn[name].shape, attn[name].dtype)
        attn[name] = start[name] + std[name] * noise
    return out


def padded_batch(key, b, p, n, pads, side):
    """b rows of p prompt + n tokens; row i has pads[i] padding tokens on the prompt's side."""
    toks = jax.random.randint(key, (b, p + n), 1, 64)
    mask = np.ones((b, p + n), np.int32)
    for i, pad in enumerate(pads):
        if side == "left":
            mask[i, :pad] = 0
        else:
            mask[i, p - pad : p] = 0
    toks = jnp.where(mask > 0, toks, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return toks, jnp.asarray(mask), jnp.asarray(positions)


def decode_steps(run, params, toks, positions, mask, cache, steps):
    """Feeds the tokens at ``steps`` one at a time through the cached forward ``run(params,
    tokens, positions=, attention_mask=, cache=)``.

    Returns:
        ``([(i, logits [B, 1, V], aux) per step], the final cache)``.
    """
    outputs = []
    for i in steps:
        logits, cache, aux = run(
            params, toks[:, i : i + 1], positions=positions[:, i : i + 1],
            attention_mask=mask[:, i : i + 1], cache=cache,
        )  # fmt: skip
        outputs.append((i, logits, aux))
    return outputs, cache
