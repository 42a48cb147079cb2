"""Building blocks of the decoder: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

The modules are Flax Linen with plain-array parameters whose layouts are chosen so that
Hugging Face weights map onto them by a transpose and a reshape (no permutation of rows):
rotary embeddings use the "rotate half" convention of Hugging Face Llama/Mixtral.

Activations are annotated with logical axis names through :func:`constrain`, which is a no-op
without a mesh.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from novarl_jax.core import sharding as shd

# Initial weights: normal(0, 0.02) as Hugging Face's default ``initializer_range``.
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)

# Scores of masked keys. A finite value (not -inf) keeps rows with no visible key (left
# padding) free of NaN: they softmax to uniform weights and their outputs are never used.
_MASKED_SCORE = -1e30


def constrain(x: jax.Array, names: Sequence[str | None], mesh: Any) -> jax.Array:
    """Sharding constraint from logical axis names; returns ``x`` unchanged without a mesh.

    Dimensions whose size the mesh axes do not divide stay replicated (the rule table's
    divisibility check).
    """
    if mesh is None:
        return x
    spec = shd.logical_to_spec(tuple(names), mesh, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def rms_norm(x: ArrayLike, scale: ArrayLike, eps: float) -> jax.Array:
    """Root-mean-square layer norm (Zhang & Sennrich, 2019).

    ``y = scale * x / sqrt(mean(x ** 2, axis=-1) + eps)``, with the statistics in float32 and
    the normalised value cast back to ``x.dtype`` before the scale (as Hugging Face does).

    Args:
        x: [..., D] activations.
        scale: [D] learned gain.
        eps: added to the mean square.

    Returns:
        [..., D] array of dtype ``promote(x.dtype, scale.dtype)``.
    """
    x = jnp.asarray(x)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return jnp.asarray(scale) * normed.astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a ``scale`` parameter [D] initialised to ones (see :func:`rms_norm`)."""

    eps: float
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        return rms_norm(x, scale, self.eps)


def rotary_cos_sin(
    positions: ArrayLike, head_dim: int, theta: float, scaling: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines of the rotary embedding (RoFormer, Su et al., 2021).

    ``inv_freq_i = theta ** (-2i / Dh)`` for ``i < Dh/2``; the angle of position p is
    ``p * inv_freq``, repeated twice along the last axis (``[angles, angles]``), which is the
    "rotate half" layout of Hugging Face.

    Args:
        positions: [B, T] integer positions.
        head_dim: Dh (even).
        theta: rotary base wavelength.
        scaling: a :class:`~novarl_jax.models.config.RopeScaling` (Llama 3.1's frequency
            scaling) applied to ``inv_freq``, or None.

    Returns:
        (cos, sin), each [B, T, Dh] float32.
    """
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    inv_freq = 1.0 / (jnp.float32(theta) ** exponents)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def llama3_inv_freq(inv_freq: jax.Array, scaling: Any) -> jax.Array:
    """Rotary frequencies under Llama 3.1's scaling (see
    :class:`~novarl_jax.models.config.RopeScaling` for the rule), float32."""
    length = float(scaling.original_max_position_embeddings)
    low, high, factor = scaling.low_freq_factor, scaling.high_freq_factor, scaling.factor
    wavelength = 2.0 * jnp.pi / inv_freq
    blend = (length / wavelength - low) / (high - low)
    middle = (1.0 - blend) * inv_freq / factor + blend * inv_freq
    out = jnp.where(wavelength > length / low, inv_freq / factor, middle)
    return jnp.where(wavelength < length / high, inv_freq, out).astype(jnp.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    """``[x1, x2] -> [-x2, x1]`` over the last axis split in two halves."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: ArrayLike, cos: ArrayLike, sin: ArrayLike) -> jax.Array:
    """Rotates each channel pair ``(j, j + Dh/2)`` of every head by its position's angle.

    ``y = x * cos + rotate_half(x) * sin``.

    Args:
        x: [B, T, N, Dh] queries or keys.
        cos, sin: [B, T, Dh] from :func:`rotary_cos_sin`.

    Returns:
        [B, T, N, Dh], dtype of ``x``.
    """
    x = jnp.asarray(x)
    cos = jnp.asarray(cos)[:, :, None, :].astype(x.dtype)
    sin = jnp.asarray(sin)[:, :, None, :].astype(x.dtype)
    return x * cos + rotate_half(x) * sin


def attention_mask_for(
    attention_mask: ArrayLike, key_mask: ArrayLike, first_slot: ArrayLike
) -> jax.Array:
    """Which keys each query may attend to: causal by slot and only real keys.

    Query t (written at slot ``first_slot + t``) sees slot s when ``s <= first_slot + t`` and
    ``key_mask[b, s] == 1``. Without a cache, ``key_mask = attention_mask`` and
    ``first_slot = 0``.

    Args:
        attention_mask: [B, T] (1 = a real query token); unused rows are not masked (their
            outputs are ignored), it only fixes the shape.
        key_mask: [B, S] (1 = the slot holds a real token).
        first_slot: int32 scalar, the slot of the first query.

    Returns:
        [B, T, S] bool.
    """
    t = jnp.asarray(attention_mask).shape[1]
    s = jnp.asarray(key_mask).shape[1]
    query_slot = first_slot + jnp.arange(t, dtype=jnp.int32)
    causal = jnp.arange(s, dtype=jnp.int32)[None, :] <= query_slot[:, None]  # [T, S]
    return causal[None] & (jnp.asarray(key_mask)[:, None, :] > 0)


def cached_attention_mask(
    attention_mask: ArrayLike, key_mask: ArrayLike, first_slot: ArrayLike
) -> jax.Array:
    """Which keys each of T new tokens sees in a cached call: cached slots, then new tokens.

    The T new tokens are written at slots ``[first_slot, first_slot + T)``. Query t sees
    cached slot s when ``s < first_slot`` and ``key_mask[b, s] == 1``, and new token t' when
    ``t' <= t`` and ``attention_mask[b, t'] == 1``: exactly the slots ``<= first_slot + t``
    holding real tokens once the new ones are written (:func:`attention_mask_for`).

    Args:
        attention_mask: [B, T] (1 = a real new token).
        key_mask: [B, S] the cache's slot mask before this call (1 = a real token).
        first_slot: int32 scalar, the slot of the first new token.

    Returns:
        [B, T, S + T] bool.
    """
    attention_mask = jnp.asarray(attention_mask)
    t = attention_mask.shape[1]
    s = jnp.asarray(key_mask).shape[1]
    before = jnp.arange(s, dtype=jnp.int32) < first_slot  # [S]
    cached = (before[None, :] & (jnp.asarray(key_mask) > 0))[:, None, :]  # [B, 1, S]
    cached = jnp.broadcast_to(cached, (attention_mask.shape[0], t, s))
    new = attention_mask_for(attention_mask, attention_mask, 0)  # [B, T, T]
    return jnp.concatenate([cached, new], axis=-1)


class LayerKV(NamedTuple):
    """A per-layer KV cache as one layer of a scan sees it: every layer's buffers and its index.

    ``k``: a tuple of L arrays [B, N_kv, Dh, S] (keys stored transposed, so a step's scores
    are a plain ``[G*T, Dh] x [Dh, S]`` matmul, as its weighted sum ``[G*T, S] x [S, Dh]``
    is); ``v``: L arrays [B, N_kv, S, Dh]; ``index``: int32 scalar, this layer.
    :class:`Attention` reads layer ``index`` inside a :func:`jax.lax.switch` over the layers, so
    each branch reads its own buffer in place. A dynamically indexed slice of one stacked
    ``[L, ...]`` cache is copied by XLA:CPU before every matmul instead (0.3 ms per layer and
    decode step at the generation benchmark's sizes).
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    index: jax.Array


def _head_matmul(lhs: jax.Array, rhs: jax.Array, *, contract_rhs: int) -> jax.Array:
    """Batched over (B, N_kv): ``lhs`` [B, N_kv, R, C] times ``rhs`` [B, N_kv, ., .].

    ``contract_rhs=3``: rhs is [B, N_kv, S, C] and the result [B, N_kv, R, S] (scores);
    ``contract_rhs=2``: rhs is [B, N_kv, C, H] and the result [B, N_kv, R, H] (weighted sum).
    Float32 accumulation.
    """
    dims = (((3,), (contract_rhs,)), ((0, 1), (0, 1)))
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _masked_scores(rows, keys, mask, group: int, *, keys_transposed: bool = False):
    """Scaled, masked scores [B, N_kv, G, T, S] of ``rows`` [B, N_kv, G*T, Dh] against
    ``keys`` [B, N_kv, S, Dh] ([B, N_kv, Dh, S] when ``keys_transposed``); mask [B, T, S]."""
    b, nkv, gt, dh = rows.shape
    contract = 2 if keys_transposed else 3
    scores = _head_matmul(rows, keys.astype(rows.dtype), contract_rhs=contract)
    scores = scores.reshape(b, nkv, group, gt // group, -1) * (dh**-0.5)
    return jnp.where(mask[:, None, None, :, :], scores, _MASKED_SCORE)


def _attend_cached(rows, k_new, v_new, mask, k_cache, v_cache, *, group: int, dtype: Any):
    """``softmax(q k^T / sqrt(Dh) + mask) v`` over one layer's cached slots and the new tokens.

    ``rows`` [B, N_kv, G*T, Dh] (each key/value head's G query heads, T tokens each), the new
    tokens' ``k_new`` / ``v_new`` [B, N_kv, T, Dh], the cache's ``k_cache`` [B, N_kv, Dh, S]
    (keys transposed, as :class:`LayerKV` holds them) and ``v_cache`` [B, N_kv, S, Dh];
    ``mask`` [B, T, S + T] (cached slots, then new tokens). Returns [B, N_kv, G*T, Dh].
    """
    b, nkv, gt, _ = rows.shape

    def weighted(probs, values):
        probs = probs.astype(dtype).reshape(b, nkv, gt, -1)
        return _head_matmul(probs, values.astype(dtype), contract_rhs=2)

    # The softmax over the cached slots and the new tokens, taken in two parts rather than
    # over their concatenation: at decode sizes XLA:CPU took ~90 us per layer and step for the
    # concatenation and its fused max-and-exp over [S + T] = 193 slots, ~55 us for the parts.
    s = v_cache.shape[2]
    cached = _masked_scores(rows, k_cache, mask[..., :s], group, keys_transposed=True)
    new = _masked_scores(rows, k_new, mask[..., s:], group)
    top = jnp.maximum(jnp.max(cached, -1, keepdims=True), jnp.max(new, -1, keepdims=True))
    cached, new = jnp.exp(cached - top), jnp.exp(new - top)
    total = jnp.sum(cached, -1, keepdims=True) + jnp.sum(new, -1, keepdims=True)
    return weighted(cached / total, v_cache) + weighted(new / total, v_new)


def _materialized_swap(x: jax.Array) -> jax.Array:
    """``x`` with its last two axes swapped, written out as a new array.

    The barrier keeps XLA from folding the transpose into the matmul that reads it: a matmul
    contracting its left operand's row axis ran on XLA:CPU's slow generic path.
    """
    return jax.lax.optimization_barrier(jnp.swapaxes(x, -1, -2))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _softmax_attention(rows, keys, values, mask, group: int, dtype: Any):
    """``softmax(rows keys^T / sqrt(Dh) + mask) values``: rows [B, N_kv, G*T, Dh], keys and
    values [B, N_kv, S, Dh], mask [B, T, S] bool -> [B, N_kv, G*T, Dh].

    The VJP keeps each query row's score maximum and exponential sum ([B, N_kv, G, T, 1]
    each) instead of its probabilities [B, N_kv, G*T, S] and recomputes them from the scores in the
    backward pass: one more ``[G*T, Dh] x [Dh, S]`` matmul per head, against an O(T * S)
    residual per layer that XLA must also write out and read back.
    """
    return _softmax_attention_fwd(rows, keys, values, mask, group, dtype)[0]


def _softmax_parts(rows, keys, mask, group):
    """Masked scores [B, N_kv, G, T, S] with their row maxima and exponential sums."""
    scores = _masked_scores(rows, keys, mask, group)
    top = jnp.max(scores, axis=-1, keepdims=True)
    total = jnp.sum(jnp.exp(scores - top), axis=-1, keepdims=True)
    return scores, top, total


def _probs(scores, top, total, shape, dtype):
    """``softmax`` of the scores from their parts, as [B, N_kv, G*T, S] in ``dtype``. A row
    that sees no key (every score masked) gets uniform probabilities, as ``jax.nn.softmax``."""
    return (jnp.exp(scores - top) / total).astype(dtype).reshape(*shape[:3], -1)


def _softmax_attention_fwd(rows, keys, values, mask, group, dtype):
    scores, top, total = _softmax_parts(rows, keys, mask, group)
    probs = _probs(scores, top, total, rows.shape, dtype)
    out = _head_matmul(probs, values.astype(dtype), contract_rhs=2)
    return out, (rows, keys, values, mask, top, total)


def _softmax_attention_bwd(group, dtype, res, dout):
    # Every matmul is a plain row-major product: the two that contract over the query rows
    # read explicit transposes of their left operands.
    rows, keys, values, mask, top, total = res
    dh = rows.shape[-1]
    probs = _probs(_masked_scores(rows, keys, mask, group), top, total, rows.shape, dtype)
    dout = dout.astype(dtype)
    dvalues = _head_matmul(_materialized_swap(probs), dout, contract_rhs=2)  # [.., S, Dh]
    # Masked scores are a constant: no gradient reaches q or k through them. A query that sees
    # no key at all (at left padding) has uniform probabilities, not zeros, so its row's
    # cotangent is dropped before it reaches the scores (partly masked rows have exact zeros).
    b, _, gt, _ = dout.shape
    live = jnp.any(mask, axis=-1)[:, None, None, :]  # [B, 1, 1, T]
    live = jnp.broadcast_to(live, (b, 1, group, gt // group)).reshape(b, 1, gt, 1)
    dprobs = _head_matmul(jnp.where(live, dout, 0), values.astype(dtype), contract_rhs=3)
    p = probs.astype(jnp.float32)
    dscores = p * (dprobs - jnp.sum(dprobs * p, axis=-1, keepdims=True)) * (dh**-0.5)
    dscores = dscores.astype(rows.dtype)
    drows = _head_matmul(dscores, keys.astype(rows.dtype), contract_rhs=2)
    dkeys = _head_matmul(_materialized_swap(dscores), rows, contract_rhs=2)  # [.., S, Dh]
    return (
        drows.astype(rows.dtype),
        dkeys.astype(keys.dtype),
        dvalues.astype(values.dtype),
        None,
    )


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings and an optional KV cache.

    ``softmax(q k^T / sqrt(Dh) + mask) v`` (Vaswani et al., 2017), with N query heads
    sharing N_kv key/value heads in groups of ``N / N_kv`` (GQA, Ainslie et al., 2023):
    query head n uses key/value head ``n // (N / N_kv)``, as Hugging Face's ``repeat_kv``.
    Scores and softmax are float32.

    Parameters: ``q_proj`` [D, N, Dh], ``k_proj`` / ``v_proj`` [D, N_kv, Dh],
    ``o_proj`` [N, Dh, D]; with ``qkv_bias`` (Qwen2's attention) also ``q_bias`` [N, Dh] and
    ``k_bias`` / ``v_bias`` [N_kv, Dh], added to the projections before the rotary embedding;
    with ``qk_norm`` (Qwen3's attention) ``q_norm`` / ``k_norm`` [Dh], the gains of an RMSNorm
    of each query and key head (epsilon ``norm_eps``), after the biases and before the rotary
    embedding.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    param_dtype: Any = jnp.float32
    mesh: Any = None
    return_kv: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    norm_eps: float = 1e-6

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        kv_cache: tuple[jax.Array, jax.Array] | LayerKV | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Args: x [B, T, D]; cos, sin [B, T, Dh]; kv_cache (k, v) [B, N_kv, S, Dh] or a
        :class:`LayerKV` (read only) or None; mask [B, T, S + T] bool with a cache (which
        cached slots, then which of the T new tokens, each query sees; see
        :func:`cached_attention_mask`), [B, T, T] without.

        Returns: ([B, T, D], the new tokens' (k, v), both [B, N_kv, T, Dh] (a
        :class:`LayerKV` cache stores the keys transposed), or None without a cache unless
        ``return_kv``). The cache itself is not
        written here: the caller writes every layer's new keys and values into it at once,
        so a decode step moves only the new tokens' bytes instead of rewriting each layer's
        cache.
        """
        d = x.shape[-1]
        n, nkv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        dt = self.param_dtype
        wq = self.param("q_proj", DEFAULT_INIT, (d, n, dh), dt)
        wk = self.param("k_proj", DEFAULT_INIT, (d, nkv, dh), dt)
        wv = self.param("v_proj", DEFAULT_INIT, (d, nkv, dh), dt)
        wo = self.param("o_proj", DEFAULT_INIT, (n, dh, d), dt)
        q_names = (shd.BATCH, shd.LENGTH, shd.HEADS, shd.HEAD_DIM)
        kv_names = (shd.BATCH, shd.LENGTH, shd.KV_HEADS, shd.HEAD_DIM)
        q = jnp.einsum("btd,dnh->btnh", x, wq)
        k = jnp.einsum("btd,dnh->btnh", x, wk)
        v = jnp.einsum("btd,dnh->btnh", x, wv)
        if self.qkv_bias:
            zeros = nn.initializers.zeros
            q = q + self.param("q_bias", zeros, (n, dh), dt).astype(q.dtype)
            k = k + self.param("k_bias", zeros, (nkv, dh), dt).astype(k.dtype)
            v = v + self.param("v_bias", zeros, (nkv, dh), dt).astype(v.dtype)
        if self.qk_norm:
            ones = nn.initializers.ones
            q = rms_norm(q, self.param("q_norm", ones, (dh,), dt), self.norm_eps).astype(q.dtype)
            k = rms_norm(k, self.param("k_norm", ones, (dh,), dt), self.norm_eps).astype(k.dtype)
        q = constrain(q, q_names, self.mesh)
        k = constrain(k, kv_names, self.mesh)
        v = constrain(v, kv_names, self.mesh)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        b, t = q.shape[:2]
        g = n // nkv
        # Head-major operands: each key/value head's G*T queries are the rows of one matmul
        # against its [S, Dh] keys and values, so XLA emits plain row-major batched matmuls
        # (the [B, T, N, Dh] einsums made it transpose operands and results, 2-4x slower).
        rows = jnp.transpose(q.reshape(b, t, nkv, g, dh), (0, 2, 3, 1, 4)).reshape(
            b, nkv, g * t, dh
        )
        k_new, v_new = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [B, N_kv, T, Dh]
        if isinstance(kv_cache, LayerKV):
            branches = [
                functools.partial(
                    _attend_cached, k_cache=k_layer, v_cache=v_layer, group=g, dtype=x.dtype
                )
                for k_layer, v_layer in zip(kv_cache.k, kv_cache.v, strict=True)
            ]
            out = jax.lax.switch(kv_cache.index, branches, rows, k_new, v_new, mask)
        else:
            keys, values = k_new, v_new
            if kv_cache is not None:
                keys = jnp.concatenate([kv_cache[0].astype(k_new.dtype), k_new], axis=2)
                values = jnp.concatenate([kv_cache[1].astype(v_new.dtype), v_new], axis=2)
            out = _softmax_attention(rows, keys, values, mask, g, x.dtype)
        out = jnp.transpose(out.reshape(b, nkv, g, t, dh), (0, 3, 1, 2, 4)).reshape(b, t, n, dh)
        out = constrain(out.astype(x.dtype), q_names, self.mesh)
        new_kv = None
        if kv_cache is not None or self.return_kv:
            cache_names = (shd.BATCH, shd.KV_HEADS, shd.LENGTH, shd.HEAD_DIM)
            new_kv = tuple(constrain(a, cache_names, self.mesh) for a in (k_new, v_new))
        return jnp.einsum("btnh,nhd->btd", out, wo), new_kv


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(x gate) * (x up))`` (Shazeer, 2020), as Llama/Mistral.

    Parameters: ``gate_proj`` / ``up_proj`` [D, F], ``down_proj`` [F, D].
    """

    intermediate_size: int
    param_dtype: Any = jnp.float32
    mesh: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d, f = x.shape[-1], self.intermediate_size
        dt = self.param_dtype
        w_gate = self.param("gate_proj", DEFAULT_INIT, (d, f), dt)
        w_up = self.param("up_proj", DEFAULT_INIT, (d, f), dt)
        w_down = self.param("down_proj", DEFAULT_INIT, (f, d), dt)
        names = (shd.BATCH, shd.LENGTH, shd.MLP)
        h = jax.nn.silu(x @ w_gate) * (x @ w_up)
        return constrain(h, names, self.mesh) @ w_down
