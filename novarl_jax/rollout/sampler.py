"""Autoregressive sampling with a preallocated KV cache: one jitted prefill, one jitted decode.

The sampler turns prompts into completions and records, for every generated token, the
log-probability under the distribution it was drawn from and under the policy at the
sampling temperature without top-k / top-p, ``log_softmax(logits / temperature)`` (the raw
policy for greedy decoding). The latter equal what a training forward (no cache) gives for
the same sequence at that temperature (the trainer scores rollouts at the rollout's
temperature), so a trainer can use them as the behaviour policy's log-probs; for an MoE
policy this holds with dropless routing (``capacity_factor=None``, or one large enough that
nothing is dropped). With a capacity factor the routing groups differ: the prefill routes the
prompts, each decode step only that step's tokens, the training forward whole sequences, so
different tokens can be dropped and the log-probs differ where they are (router replay does
not change that: capacity is decided afresh). ``ppo.tis_cap`` or ``grpo.tis_cap`` corrects
for the difference.

How it runs:

1. Prompts are moved to the left (real tokens at the end; right-padded input is converted),
   with positions ``max(cumsum(mask) - 1, 0)``.
2. ``_prefill`` (jitted) runs the prompt once through the model into a fresh KV cache of
   ``P + max_new_tokens`` slots, repeats the cache G times along the batch for G samples
   per prompt (one prefill per prompt, not per sample) and samples the first token.
3. ``_decode`` (jitted, the cache donated so it is updated in place) is a ``lax.while_loop``
   that feeds the last token, samples the next, and stops as soon as every row has emitted
   a stop token (or after ``max_new_tokens``). Shapes are static throughout.

Sampling at step ``t`` uses ``jax.random.fold_in(key, t)``, so a key fixes the result.
Temperature 0 is greedy (argmax of the raw logits); a positive temperature must be at least
:data:`MIN_TEMPERATURE`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from novarl_jax.core.checks import check_int, check_random_key, real_value
from novarl_jax.core.sharding import batch_spec


class SampleOutput(NamedTuple):
    """What :func:`sample` returns (a pytree of arrays). Rows are prompt-major: row
    ``b * G + g`` is sample ``g`` of prompt ``b``.

    Attributes:
        tokens: [B*G, P+T] int32, the left-padded prompt followed by the response; feed it
            to a training forward with ``attention_mask = concat(prompt_mask, response_mask)``.
        prompt_tokens: [B*G, P] int32, the prompt, left-padded (pads hold ``pad_id``).
        prompt_mask: [B*G, P] int32, 1 = a real prompt token.
        response_tokens: [B*G, T] int32, generated tokens; ``pad_id`` after the stop token.
        response_mask: [B*G, T] int32, 1 = a real generated token (the stop token included),
            0 after it.
        logprobs: [B*G, T] float32, log-prob of each token under the distribution it was
            sampled from (after temperature, top-k and top-p); 0 where the mask is 0 and for
            greedy decoding (a point mass).
        policy_logprobs: [B*G, T] float32, log-prob under the policy at the sampling
            temperature, ``log_softmax(logits / temperature)`` (no top-k / top-p;
            ``log_softmax(logits)`` when greedy); 0 where the mask is 0.
        lengths: [B*G] int32, generated tokens per row (``response_mask.sum(-1)``).
        routing: expert choices made while sampling, laid out like the model's routing for a
            training forward on ``tokens`` (for router replay), or None. Tokens the model was
            never fed (each row's last generated token, and the padding after a stop) hold
            -1, which a replaying forward reads as "choose as usual".
    """

    tokens: jax.Array
    prompt_tokens: jax.Array
    prompt_mask: jax.Array
    response_tokens: jax.Array
    response_mask: jax.Array
    logprobs: jax.Array
    policy_logprobs: jax.Array
    lengths: jax.Array
    routing: Any = None


# The model returns routing leaves shaped [L, B, T, K]: batch on axis 1, tokens on axis 2.
_ROUTING_BATCH_AXIS = 1
_ROUTING_TOKEN_AXIS = 2

# The smallest positive temperature :func:`sample` accepts (0 = greedy). ``logits / T`` is
# computed in float32, and XLA may fuse it differently into the max and the sum of the
# log-softmax; once ``|logit| / T`` nears 1e9 their rounding no longer agrees and the
# log-probs come out -inf, +inf or NaN (seen at T = 1e-10 for logits ~0.1, at T = 1e-8 for
# logits ~30). At 1e-4, logits up to 1e3 stay below 1e7 (a margin of 100), and sampling is
# already greedy in all but near-exact ties.
MIN_TEMPERATURE = 1e-4


# --------------------------------------------------------------------------------------------
# Sampling distributions (pure functions of logits).


def apply_temperature(logits: ArrayLike, temperature: float) -> jax.Array:
    """Tempered logits ``logits / temperature`` (``temperature > 0``).

    Args:
        logits: [..., V] float.
        temperature: a positive float (or a traced scalar under jit).

    Returns:
        [..., V] float32.
    """
    if not isinstance(temperature, jax.core.Tracer) and not temperature > 0:
        raise ValueError(f"temperature must be > 0 here, got {temperature!r}")
    return jnp.asarray(logits, jnp.float32) / jnp.asarray(temperature, jnp.float32)


def top_k_mask(logits: ArrayLike, k: int) -> jax.Array:
    """Which tokens top-k sampling keeps: those with a logit >= the k-th largest.

    Ties at the k-th value are all kept (so more than k tokens may survive). ``k == 0`` or
    ``k >= V`` keeps everything.

    Args:
        logits: [..., V] float.
        k: number of tokens to keep, an integer >= 0 (0 = all).

    Returns:
        [..., V] bool, True = kept.

    Raises:
        ValueError: ``k`` is not an integer >= 0.

    Example:
        >>> top_k_mask(jnp.array([3.0, 1.0, 3.0, 2.0]), 2).tolist()
        [True, False, True, False]
    """
    k = check_int("top_k_mask k", k, 0)
    logits = jnp.asarray(logits)
    vocab = logits.shape[-1]
    if k == 0 or k >= vocab:
        return jnp.ones(logits.shape, bool)
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return logits >= kth


def top_p_mask(logits: ArrayLike, p: float) -> jax.Array:
    """Which tokens nucleus (top-p) sampling keeps (Holtzman et al., 2020).

    Sort the probabilities ``pi = softmax(logits)`` descending; keep the shortest prefix whose
    mass reaches ``p``: sorted token ``j`` is kept when ``sum_{i<j} pi_(i) < p``. Every token
    whose probability equals the smallest kept one is kept too (ties are not broken by
    sort order). The most likely token is always kept. ``p == 1`` keeps everything.

    Args:
        logits: [..., V] float (may contain -inf for tokens already excluded).
        p: the nucleus mass, in (0, 1] (a float, or a traced scalar under jit, which is not
            checked).

    Returns:
        [..., V] bool, True = kept.

    Raises:
        ValueError: a concrete ``p`` outside (0, 1].

    Example:
        >>> top_p_mask(jnp.log(jnp.array([0.5, 0.3, 0.2])), 0.7).tolist()
        [True, True, False]
    """
    logits = jnp.asarray(logits, jnp.float32)
    if not isinstance(p, jax.core.Tracer):
        value = real_value(p)
        if value is None or not 0 < value <= 1:
            raise ValueError(f"top_p_mask p must be a float in (0, 1], got {p!r}")
        if value == 1:
            return jnp.ones(logits.shape, bool)
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_probs = -jnp.sort(-probs, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept_sorted = mass_before < p
    threshold = jnp.min(jnp.where(kept_sorted, sorted_probs, jnp.inf), axis=-1, keepdims=True)
    return probs >= threshold


def sampling_logits(
    logits: ArrayLike, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Logits of the distribution actually sampled from: temperature, then top-k, then top-p.

    The order follows Hugging Face ``generate``: top-p is computed on the distribution that
    remains after top-k. Excluded tokens get ``-inf``.

    Args:
        logits: [..., V] float.
        temperature: > 0.
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass (1.0 = off).

    Returns:
        [..., V] float32; ``log_softmax`` of it is the sampled distribution.

    Raises:
        ValueError: ``top_k`` or ``top_p`` (when not traced) out of range.
    """
    top_k = _check_top_k(top_k)
    if not isinstance(top_p, jax.core.Tracer):
        _check_top_p(top_p)
    x = apply_temperature(logits, temperature)
    if 0 < top_k < x.shape[-1]:
        x = jnp.where(top_k_mask(x, top_k), x, -jnp.inf)
    if isinstance(top_p, jax.core.Tracer) or top_p < 1.0:
        x = jnp.where(top_p_mask(x, top_p), x, -jnp.inf)
    return x


# --------------------------------------------------------------------------------------------
# Static settings and helpers.


def _check_top_k(top_k: Any) -> int:
    try:
        return check_int("top_k", top_k, 0)
    except ValueError:
        raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}") from None


def _check_top_p(top_p: Any) -> float:
    value = real_value(top_p)
    if value is None or not 0 < value <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p!r}")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Validated sampling settings (see :func:`sample` for their meaning).

    The jitted programs take the structural ones as static (changing them recompiles:
    ``max_new_tokens``, greedy or not, ``top_k``, whether top-p is on, ``pad_id``,
    ``num_samples``, ``return_routing``) and the values ``temperature``, ``top_p`` and the
    stop set as array arguments (changing them does not recompile).
    """

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_token_ids: tuple[int, ...]
    pad_id: int
    num_samples: int
    return_routing: bool

    def static(self) -> _Static:
        return _Static(
            max_new_tokens=self.max_new_tokens,
            greedy=self.temperature == 0,
            top_k=self.top_k,
            use_top_p=self.top_p < 1.0,
            pad_id=self.pad_id,
            num_samples=self.num_samples,
            return_routing=self.return_routing,
        )

    def dynamic(self, vocab_size: int) -> _Dynamic:
        bad = [t for t in self.stop_token_ids if t >= vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})")
        if self.pad_id >= vocab_size:
            raise ValueError(f"pad_id={self.pad_id} is outside the vocabulary [0, {vocab_size})")
        stop_mask = np.zeros((vocab_size,), bool)
        stop_mask[list(self.stop_token_ids)] = True
        return _Dynamic(
            temperature=np.float32(self.temperature if self.temperature > 0 else 1.0),
            top_p=np.float32(self.top_p),
            stop_mask=stop_mask,
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Static:
    """The hashable, structural part of the settings (static under jit)."""

    max_new_tokens: int
    greedy: bool
    top_k: int
    use_top_p: bool
    pad_id: int
    num_samples: int
    return_routing: bool


class _Dynamic(NamedTuple):
    """The value part of the settings, passed to the jitted programs as arrays."""

    temperature: Any  # float32 scalar (> 0)
    top_p: Any  # float32 scalar
    stop_mask: Any  # [V] bool, True = the token ends a row


def _choose(logits: jax.Array, key: jax.Array, st: _Static, dyn: _Dynamic):
    """Samples one token per row. Returns (tokens [B] int32, sampled logp [B], policy logp [B])."""
    logits = logits.astype(jnp.float32)
    # The policy at the sampling temperature (1 when greedy), without top-k / top-p.
    policy_logp = jax.nn.log_softmax(apply_temperature(logits, dyn.temperature), axis=-1)
    if st.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        sampled_logp = jnp.zeros(tokens.shape, jnp.float32)
    else:
        masked = sampling_logits(
            logits,
            temperature=dyn.temperature,
            top_k=st.top_k,
            top_p=dyn.top_p if st.use_top_p else 1.0,
        )
        tokens = jax.random.categorical(key, masked, axis=-1).astype(jnp.int32)
        sampled_logp = jnp.take_along_axis(
            jax.nn.log_softmax(masked, axis=-1), tokens[:, None], axis=-1
        )[:, 0]
    policy = jnp.take_along_axis(policy_logp, tokens[:, None], axis=-1)[:, 0]
    return tokens, sampled_logp, policy


def _is_stop(tokens: jax.Array, stop_mask: jax.Array) -> jax.Array:
    return jnp.take(stop_mask, tokens, axis=0)


def left_pad(tokens: ArrayLike, mask: ArrayLike, pad_id: int) -> tuple[jax.Array, jax.Array]:
    """Moves each row's real tokens to the end, keeping their order (left padding).

    Works for right-padded, left-padded and even holed masks: a stable sort of the mask
    puts the padding first.

    Args:
        tokens: [B, P] int.
        mask: [B, P], nonzero = a real token.
        pad_id: written into every padding slot, an integer.

    Returns:
        ``(tokens, mask)``, int32 [B, P], left-padded.

    Raises:
        ValueError: ``tokens`` is not [B, P], ``mask`` has another shape, or ``pad_id`` is
            not an integer.
    """
    tokens = jnp.asarray(tokens)
    mask = jnp.asarray(mask)
    if tokens.ndim != 2:
        raise ValueError(f"left_pad tokens must have shape [B, P], got {tokens.shape}")
    if mask.shape != tokens.shape:
        raise ValueError(f"left_pad mask shape {mask.shape} != tokens shape {tokens.shape}")
    if not isinstance(pad_id, jax.core.Tracer) and (
        isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer))
    ):
        raise ValueError(f"left_pad pad_id must be an integer, got {pad_id!r}")
    tokens = tokens.astype(jnp.int32)
    mask = (mask != 0).astype(jnp.int32)
    order = jnp.argsort(mask, axis=1, stable=True)
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    mask = jnp.take_along_axis(mask, order, axis=1)
    return jnp.where(mask == 1, tokens, pad_id).astype(jnp.int32), mask


def _constrain_batch(x: jax.Array, mesh: Any) -> jax.Array:
    if mesh is None:
        return x
    spec = batch_spec(x.ndim, mesh, x.shape[0])
    return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, spec))


def _repeat_cache(cache: Any, n: int) -> Any:
    """Repeats a KVCache n times along its batch axis (axis 0 of every array)."""
    if n == 1:
        return cache
    return cache._replace(
        k=tuple(jnp.repeat(k, n, axis=0) for k in cache.k),
        v=tuple(jnp.repeat(v, n, axis=0) for v in cache.v),
        key_mask=jnp.repeat(cache.key_mask, n, axis=0),
    )


def _model():
    from novarl_jax import models

    return models


# --------------------------------------------------------------------------------------------
# The jitted programs.


@functools.partial(jax.jit, static_argnames=("config", "static", "mesh"))
def _prefill(params, prompt_tokens, prompt_mask, key, dyn, *, config, static: _Static, mesh):
    """Prompt forward into a fresh cache, repeated G times; samples the first token."""
    models = _model()
    s = static
    prompt_len = prompt_tokens.shape[1]
    positions = jnp.maximum(jnp.cumsum(prompt_mask, axis=1) - 1, 0).astype(jnp.int32)
    logits, cache, aux = models.prefill(
        params,
        prompt_tokens,
        config,
        max_length=prompt_len + s.max_new_tokens,
        positions=positions,
        attention_mask=prompt_mask,
        mesh=mesh,
        return_routing=s.return_routing,
        train=False,
    )
    n = s.num_samples
    cache = _repeat_cache(cache, n)
    last_logits = jnp.repeat(logits[:, -1, :], n, axis=0)
    token, logp, policy = _choose(last_logits, jax.random.fold_in(key, 0), s, dyn)
    routing = None
    if s.return_routing:
        routing = jax.tree.map(lambda r: jnp.repeat(r, n, axis=_ROUTING_BATCH_AXIS), aux["routing"])
    next_position = jnp.repeat(jnp.sum(prompt_mask, axis=1), n, axis=0).astype(jnp.int32)
    return cache, token, logp, policy, next_position, routing


@functools.partial(
    jax.jit, static_argnames=("config", "static", "mesh"), donate_argnames=("cache",)
)
def _decode(params, cache, first, key, dyn, *, config, static: _Static, mesh):
    """The decode ``while_loop``: feed the last token, sample the next, until all rows stop.

    ``first`` = (token [R], logp [R], policy logp [R], position of the first generated token
    [R], prefill routing or None), R = B*G. Returns the filled buffers and the final cache.
    """
    models = _model()
    s = static
    # Cast once (mixed precision): each step's forward then finds its params cast already.
    params = models.cast_params(params, config)
    token0, logp0, policy0, position0, prompt_routing = first
    rows = token0.shape[0]
    steps = s.max_new_tokens

    def column0(value, fill, dtype):
        buf = jnp.full((rows, steps), fill, dtype)
        return _constrain_batch(buf.at[:, 0].set(value.astype(dtype)), mesh)

    done0 = _is_stop(token0, dyn.stop_mask)
    buffers = (
        column0(token0, s.pad_id, jnp.int32),
        column0(jnp.ones_like(token0), 0, jnp.int32),
        column0(logp0, 0.0, jnp.float32),
        column0(policy0, 0.0, jnp.float32),
    )
    routing_buf = None
    if s.return_routing:
        # One slot per generated token; the last generated token is never fed to the model,
        # so its slot (and the slots after an early stop) keep -1: "no choice was made", which
        # a replay fills with the training forward's own choice.
        routing_buf = jax.tree.map(
            lambda r: jnp.full(r.shape[:2] + (steps,) + r.shape[3:], -1, r.dtype),
            prompt_routing,
        )

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < steps) & ~jnp.all(done)

    def body(carry):
        step, cache, (tok_buf, mask_buf, logp_buf, pol_buf), routing_buf, done, last, pos = carry
        fed_mask = jax.lax.dynamic_slice_in_dim(mask_buf, step - 1, 1, axis=1)
        logits, cache, aux = models.forward(
            params,
            last[:, None],
            config,
            positions=pos[:, None],
            attention_mask=fed_mask,
            cache=cache,
            mesh=mesh,
            return_routing=s.return_routing,
            train=False,
        )
        token, logp, policy = _choose(logits[:, -1, :], jax.random.fold_in(key, step), s, dyn)
        live = ~done
        token = jnp.where(live, token, s.pad_id)
        updates = (
            token,
            live.astype(jnp.int32),
            jnp.where(live, logp, 0.0),
            jnp.where(live, policy, 0.0),
        )
        new_buffers = tuple(
            jax.lax.dynamic_update_slice_in_dim(buf, u[:, None].astype(buf.dtype), step, axis=1)
            for buf, u in zip((tok_buf, mask_buf, logp_buf, pol_buf), updates, strict=True)
        )
        if s.return_routing:
            # A row that had already stopped fed padding: no choice there either.
            fed = (fed_mask > 0)[None, :, :, None]  # [1, R, 1, 1] against [L, R, 1, K]
            routing_buf = jax.tree.map(
                lambda buf, r: jax.lax.dynamic_update_slice_in_dim(
                    buf, jnp.where(fed, r, -1).astype(buf.dtype), step - 1,
                    axis=_ROUTING_TOKEN_AXIS,
                ),
                routing_buf,
                aux["routing"],
            )  # fmt: skip
        done = done | _is_stop(token, dyn.stop_mask)
        return step + 1, cache, new_buffers, routing_buf, done, token, pos + 1

    carry = (jnp.int32(1), cache, buffers, routing_buf, done0, token0, position0)
    _, cache, buffers, routing_buf, _, _, _ = jax.lax.while_loop(cond, body, carry)
    routing = None
    if s.return_routing:
        routing = jax.tree.map(
            lambda p, r: jnp.concatenate([p, r], axis=_ROUTING_TOKEN_AXIS),
            prompt_routing,
            routing_buf,
        )
    return buffers, routing, cache


# --------------------------------------------------------------------------------------------
# Public entry point.


def make_settings(
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    pad_id: int,
    num_samples: int = 1,
    return_routing: bool = False,
) -> Settings:
    """Validates sampling arguments (raising ValueError naming the bad one) into settings."""
    check_int("max_new_tokens", max_new_tokens, 1)
    _check_top_k(top_k)
    check_int("num_samples", num_samples, 1)
    check_int("pad_id", pad_id, 0)
    temp = real_value(temperature)
    if temp is None or not (temp == 0 or MIN_TEMPERATURE <= temp < np.inf):
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite float >= {MIN_TEMPERATURE:g} (smaller "
            f"ones overflow float32 and give NaN/inf log-probs), got {temperature!r}"
        )
    top_p_value = _check_top_p(top_p)
    if isinstance(stop_token_ids, (int, np.integer)):
        stop_token_ids = (stop_token_ids,)
    if stop_token_ids is None or isinstance(stop_token_ids, (str, bytes)):
        raise ValueError(
            f"stop_token_ids must be a sequence of token ids (() for none), got {stop_token_ids!r}"
        )
    stops = tuple(check_int("stop_token_ids entry", t, 0) for t in stop_token_ids)
    return Settings(
        max_new_tokens=int(max_new_tokens),
        temperature=temp,
        top_k=int(top_k),
        top_p=top_p_value,
        stop_token_ids=stops,
        pad_id=int(pad_id),
        num_samples=int(num_samples),
        return_routing=bool(return_routing),
    )


def sample(
    params: Any,
    model_config: Any,
    prompt_tokens: ArrayLike,
    prompt_mask: ArrayLike,
    key: jax.Array,
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    stop_token_ids: Sequence[int] = (),
    pad_id: int,
    mesh: Any = None,
    num_samples: int = 1,
    return_routing: bool = False,
) -> SampleOutput:
    """Samples ``num_samples`` completions per prompt with a KV cache.

    Each step draws ``y_t ~ softmax(top_p(top_k(logits_t / temperature)))`` (argmax of the
    raw logits when ``temperature == 0``) with key ``fold_in(key, t)``. A row ends after its
    first token in ``stop_token_ids``; the loop ends when every row has ended or after
    ``max_new_tokens``.

    Args:
        params: model parameters (sharded on ``mesh`` when one is given).
        model_config: the ``ModelConfig``.
        prompt_tokens: [B, P] int, left- or right-padded (any mask layout works); real tokens
            must be in ``[0, vocab_size)`` (checked unless traced).
        prompt_mask: [B, P], 1 = a real token; every row needs at least one.
        key: a ``jax.random`` key.
        max_new_tokens: T, generated tokens per row at most (also the output width).
        temperature: 0 = greedy, else a finite float >= :data:`MIN_TEMPERATURE` (1e-4).
        top_k: keep the k most likely tokens (0 = off).
        top_p: nucleus mass in (0, 1] (1 = off).
        stop_token_ids: tokens that end a row (kept in the response, mask 1).
        pad_id: written after a row ends and into prompt padding; in ``[0, vocab_size)``.
        mesh: a mesh from ``ParallelLayout.make_mesh()``; the batch is sharded over
            ('dp', 'ep') when B*G divides evenly, and the model shards the rest.
        num_samples: G, samples per prompt (a GRPO group); the prompt is prefilled once and
            its cache repeated G times.
        return_routing: also return the MoE expert choices for router replay.

    Returns:
        :class:`SampleOutput` with B*G rows, prompt-major.

    Raises:
        ValueError: bad shapes or settings, an empty prompt row, a prompt, stop or pad id
            outside the vocabulary, or ``P + max_new_tokens`` above
            ``max_position_embeddings``.

    Example:
        >>> out = sample(params, config, tokens, mask, jax.random.key(0), max_new_tokens=16,
        ...              stop_token_ids=(tok.eos_id,), pad_id=tok.pad_id,
        ...              num_samples=4)  # doctest: +SKIP
        >>> out.response_tokens.shape  # (B * 4, 16)  # doctest: +SKIP
    """
    settings = make_settings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token_ids=stop_token_ids,
        pad_id=pad_id,
        num_samples=num_samples,
        return_routing=return_routing,
    )
    check_random_key(key)
    prompt_tokens = jnp.asarray(prompt_tokens)
    prompt_mask = jnp.asarray(prompt_mask)
    if prompt_tokens.ndim != 2:
        raise ValueError(f"prompt_tokens must have shape [B, P], got {prompt_tokens.shape}")
    if prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(
            f"prompt_mask shape {prompt_mask.shape} != prompt_tokens shape {prompt_tokens.shape}"
        )
    if not jnp.issubdtype(prompt_tokens.dtype, jnp.integer):
        raise ValueError(f"prompt_tokens must be integers, got dtype {prompt_tokens.dtype}")
    if return_routing and not getattr(model_config, "num_local_experts", 0):
        raise ValueError("return_routing=True needs an MoE model (num_local_experts > 0)")
    total = prompt_tokens.shape[1] + settings.max_new_tokens
    max_pos = getattr(model_config, "max_position_embeddings", None)
    if max_pos is not None and total > max_pos:
        raise ValueError(
            f"prompt length {prompt_tokens.shape[1]} + max_new_tokens "
            f"{settings.max_new_tokens} = {total} exceeds max_position_embeddings={max_pos}"
        )
    vocab = model_config.vocab_size
    static, dyn = settings.static(), settings.dynamic(vocab)
    if not isinstance(prompt_mask, jax.core.Tracer):
        real = np.asarray(prompt_mask != 0)
        empty = np.flatnonzero(real.sum(axis=1) == 0)
        if empty.size:
            raise ValueError(
                f"prompt rows {empty.tolist()} have no real token (prompt_mask all 0); "
                f"every prompt needs at least one token (e.g. BOS)"
            )
        if not isinstance(prompt_tokens, jax.core.Tracer):
            ids = np.asarray(prompt_tokens)
            outside = np.argwhere(real & ((ids < 0) | (ids >= vocab)))
            if outside.size:
                row, col = outside[0].tolist()
                raise ValueError(
                    f"prompt_tokens has {len(outside)} real (prompt_mask != 0) ids outside the "
                    f"vocabulary [0, {vocab}); the first is {int(ids[row, col])} at row {row}, "
                    f"column {col}"
                )
    tokens, mask = left_pad(prompt_tokens, prompt_mask, settings.pad_id)
    if mesh is not None:
        sharding = jax.sharding.NamedSharding(mesh, batch_spec(2, mesh, tokens.shape[0]))
        tokens, mask = jax.device_put(tokens, sharding), jax.device_put(mask, sharding)
    cache, token0, logp0, policy0, pos0, prompt_routing = _prefill(
        params, tokens, mask, key, dyn, config=model_config, static=static, mesh=mesh
    )
    first = (token0, logp0, policy0, pos0, prompt_routing)
    (resp, resp_mask, logp, policy), routing, _ = _decode(
        params,
        cache,
        first,
        key,
        dyn,
        config=model_config,
        static=static,
        mesh=mesh,
    )
    n = settings.num_samples
    prompt_tokens_rep = jnp.repeat(tokens, n, axis=0)
    prompt_mask_rep = jnp.repeat(mask, n, axis=0)
    return SampleOutput(
        tokens=jnp.concatenate([prompt_tokens_rep, resp], axis=1),
        prompt_tokens=prompt_tokens_rep,
        prompt_mask=prompt_mask_rep,
        response_tokens=resp,
        response_mask=resp_mask,
        logprobs=logp,
        policy_logprobs=policy,
        lengths=jnp.sum(resp_mask, axis=1).astype(jnp.int32),
        routing=routing,
    )
