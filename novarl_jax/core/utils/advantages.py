"""Advantage and return estimators for token-level policy-gradient training.

Every estimator maps one rollout batch to token-level advantages ``[B, T]`` (and returns, when
the estimator defines them), so PPO, GRPO, RLOO and REINFORCE++ swap without touching the
rollout loop. The primitives are pure functions; the estimator classes are frozen, validated
configurations around them, and :func:`make_advantage_estimator` builds one by name.

Conventions shared by everything here:

* Arrays are batch-major ``[B, T]``: row ``b`` is one sampled response, right-padded to ``T``.
* ``response_mask`` ``[B, T]``: nonzero (1) = a real generated token, 0 = padding (or a token
  the policy did not generate, such as a tool's output inside a multi-turn response).
* Masked-out positions are *skipped*: they neither receive nor pass on advantage, return or
  value, and their outputs are exactly 0. Whatever they hold in ``rewards`` or ``values``
  (even NaN) never reaches a valid token.
* Sequence scores ``[B]`` (one verifiable reward per response) become token rewards for the
  token-level estimators (GAE, REINFORCE++) by placing the score on the last valid token of the
  row (:func:`scores_to_token_rewards`; a row with no valid token drops its score there). The
  sequence-level estimators (GRPO, RLOO) use ``scores`` plus the summed token rewards directly
  (:func:`sequence_scores`).
* Arrays are right-padded in the usual case; left padding and masks with holes are exact too.
* Group estimators (GRPO, RLOO, REINFORCE++-baseline) expect ``B = num_groups * group_size``
  with the ``group_size`` samples of one prompt in consecutive rows. An optional
  ``sample_mask`` ``[B]`` in the batch (0 = excluded, e.g. a reward that came back NaN) keeps
  a sample out of its group's statistics; a zero ``response_mask`` row does not (an empty
  response is still a scored member of its group).
* All statistics (means and variances for whitening) are global over the batch. Under ``jit``
  with the batch sharded over a mesh, ``jnp.sum`` reduces over every shard, so the result equals
  the unsharded computation; nothing here reduces per shard.

Example:
    >>> import jax.numpy as jnp
    >>> estimator = make_advantage_estimator("grpo", group_size=2)
    >>> batch = {"scores": jnp.array([1.0, 0.0, 0.5, 0.5]),
    ...          "response_mask": jnp.ones((4, 3))}
    >>> advantages, returns = estimator(batch)
    >>> advantages.shape, returns is None
    ((4, 3), True)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from novarl_jax.core.checks import real_value

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "AdvantageEstimator",
    "GAEAdvantageEstimator",
    "GRPOAdvantageEstimator",
    "RLOOAdvantageEstimator",
    "ReinforcePlusPlusAdvantageEstimator",
    "discounted_returns",
    "gae",
    "group_relative_advantages",
    "make_advantage_estimator",
    "normalize_advantages",
    "rloo_advantages",
    "scores_to_token_rewards",
    "sequence_scores",
]


# --------------------------------------------------------------------------- input checks


def _as_2d(name: str, x: ArrayLike) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must have shape [B, T] (rank 2), got shape {x.shape}")
    return x


def _as_float_2d(name: str, x: ArrayLike) -> jax.Array:
    return _as_2d(name, x).astype(jnp.float32)


def _check_same_shape(**arrays: jax.Array) -> None:
    shapes = {name: tuple(a.shape) for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"arrays must share one shape [B, T], got {shapes}")


def _check_unit_interval(name: str, value: Any) -> None:
    # Traced values (vmapping over gamma) cannot be checked; numbers and concrete arrays can.
    if isinstance(value, jax.core.Tracer):
        return
    number = real_value(value)
    if number is None:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    if not 0.0 <= number <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _as_python_floats(estimator: Any, *names: str) -> None:
    """Stores concrete numbers (numpy or JAX scalars) of a frozen estimator as Python floats,
    so the estimator stays hashable (a static argument of ``jit``)."""
    for name in names:
        value = getattr(estimator, name)
        if not isinstance(value, jax.core.Tracer):
            object.__setattr__(estimator, name, float(value))


def _check_bool(name: str, value: Any) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_eps(name: str, value: Any, *, positive: bool = False) -> None:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (value > 0 if positive else value >= 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value!r}")


def _check_group_size(group_size: Any, batch_size: int | None = None) -> None:
    if (
        isinstance(group_size, bool)
        or not isinstance(group_size, numbers.Integral)
        or group_size < 2
    ):
        raise ValueError(
            f"group_size must be an integer >= 2 (samples per prompt; a baseline needs at least "
            f"two samples), got {group_size!r}"
        )
    if batch_size is not None and batch_size % group_size:
        raise ValueError(
            f"batch size B={batch_size} is not a multiple of group_size={group_size}; the batch "
            f"must hold whole groups of {group_size} consecutive samples per prompt"
        )


def _valid(response_mask: jax.Array) -> jax.Array:
    return response_mask != 0


# --------------------------------------------------------------------------- primitives


def gae(
    rewards: ArrayLike,
    values: ArrayLike,
    response_mask: ArrayLike,
    *,
    gamma: float,
    lam: float,
) -> tuple[jax.Array, jax.Array]:
    """Generalized advantage estimation over right-padded token sequences.

    GAE (Schulman et al., 2016, "High-Dimensional Continuous Control Using Generalized
    Advantage Estimation"), written as the backward recursion over the valid tokens of each
    row, where ``n(t)`` is the next valid position after ``t``::

        delta_t = r_t + gamma * V_{n(t)} - V_t
        A_t     = delta_t + gamma * lam * A_{n(t)}
        R_t     = A_t + V_t                       (the lambda-return, the critic's target)

    with ``V`` and ``A`` after the last valid token equal to 0 (each response is one episode
    that ends at its last token). Masked-out positions are skipped: they neither receive nor
    pass on advantage, and get ``A = R = 0``. ``gamma = lam = 1`` reduces to reward-to-go minus
    value; ``lam = 0`` to the one-step TD error.

    Two exact implementations, picked at run time by :func:`jax.lax.cond` after one pass over
    the mask. When the valid tokens of every row form one contiguous run (right- or left-padded
    responses, the usual case), ``n(t) = t + 1`` inside the run and the recursion is
    ``A_t = beta_t + c * A_{t+1}`` with ``c = gamma * lam`` constant: ``A`` is a discounted
    suffix sum of ``beta``, computed on the batch-major layout with no loop and no transposes
    as one ``[B * T / U, U] x [U, U]`` matmul within blocks of ``U`` tokens, one small matmul
    that carries each block's start into the blocks before it, and one fused pass that adds the
    carries (:func:`_discounted_suffix_sums`). Masks with holes (tool output inside a
    multi-turn response) take a reverse :func:`jax.lax.scan` over time-major copies of the
    inputs that carries each row's next valid value and advantage; that scan alone, serving
    both cases with no check, measured 2-3x slower than the check plus the matmul path on a
    2-core CPU at ``B = 256, T = 1024`` (``benchmarks/RESULTS.md``).

    Args:
        rewards: ``[B, T]`` token rewards (any float dtype; computed in float32).
        values: ``[B, T]`` critic values ``V_t`` of the state before emitting token ``t``.
        response_mask: ``[B, T]``; nonzero = a real generated token.
        gamma: discount in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` float32, 0 on masked-out positions.

    Raises:
        ValueError: inputs are not rank 2 with one shape, or gamma/lam lie outside [0, 1].

    Example:
        >>> adv, ret = gae(jnp.array([[0.0, 1.0]]), jnp.zeros((1, 2)), jnp.ones((1, 2)),
        ...                gamma=1.0, lam=1.0)
        >>> adv.tolist()
        [[1.0, 1.0]]
    """
    rewards = _as_float_2d("rewards", rewards)
    values = _as_float_2d("values", values)
    mask = _as_2d("response_mask", response_mask)
    _check_same_shape(rewards=rewards, values=values, response_mask=mask)
    _check_unit_interval("gamma", gamma)
    _check_unit_interval("lam", lam)
    if rewards.size == 0:
        return jnp.zeros_like(rewards), jnp.zeros_like(rewards)
    if _is_number(gamma) and _is_number(lam):
        # Python numbers stay Python numbers: the matmul weights become float64-accurate
        # constants folded into the program instead of powers computed on every call.
        gamma, gamma_lam = float(gamma), float(gamma) * float(lam)
    else:
        gamma = jnp.asarray(gamma, jnp.float32)
        gamma_lam = gamma * jnp.asarray(lam, jnp.float32)
    # The branches take the mask itself, not `mask != 0`: the comparison then fuses into each
    # pass that reads the mask instead of being written out once more for the cond.
    advantages = jax.lax.cond(
        _valid_runs_are_contiguous(mask),
        lambda r, v, m: _gae_contiguous(r, v, _valid(m), gamma, gamma_lam),
        lambda r, v, m: _gae_scan(r, v, _valid(m), gamma, gamma_lam),
        rewards,
        values,
        mask,
    )
    # Returns outside the cond, from the batch-major advantages: inside the scan branch XLA
    # fused them into a strided read of the scan's time-major output (that path ran 25-40%
    # slower).
    returns = jnp.where(_valid(mask), advantages + values, 0.0)
    return advantages, returns


def _is_number(x: Any) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _valid_runs_are_contiguous(mask: jax.Array) -> jax.Array:
    """Whether the valid tokens of every row start at most once (no holes); a bool scalar."""
    valid = _valid(mask)
    starts = valid & ~jnp.pad(valid[:, :-1], ((0, 0), (1, 0)))
    # A float32 sum counts exactly (T < 2**24) and XLA:CPU runs it as one matrix-vector
    # product, faster than its integer or boolean reductions.
    return jnp.max(jnp.sum(starts.astype(jnp.float32), axis=1)) <= 1


def _gae_contiguous(rewards, values, valid, gamma, gamma_lam):
    """GAE for rows whose valid tokens are contiguous (see :func:`gae`); 0 on padding."""
    masked_values = jnp.where(valid, values, 0.0)
    next_values = jnp.pad(masked_values[:, 1:], ((0, 0), (0, 1)))
    # With no holes the value after a valid token is the next token's, or 0 after the last.
    beta = jnp.where(valid, rewards + gamma * next_values - values, 0.0)
    # Left padding receives a decaying sum; the same pass that adds the carries zeroes it.
    return jnp.where(valid, _discounted_suffix_sums(beta, gamma_lam), 0.0)


# Tokens per block of the suffix-sum matmul: large enough that the carries between blocks
# are few (T / U of them, one small matmul), small enough that the [U, U] matmul (2 * U flops
# per element) stays cheap. 16 and 64 measured no faster on a CPU, 8 slower.
_GAE_BLOCK = 32


def _discounted_suffix_sums(x: jax.Array, c) -> jax.Array:
    """``y_t = sum_{s >= t} c ** (s - t) * x_s`` along the last axis of ``x [B, n]``.

    In blocks of ``U`` tokens: ``L = x_block @ W`` with ``W[s, t] = c ** (s - t)`` for
    ``s >= t`` (0 above) gives each block's own suffix sums, and
    ``y_{kU + j} = L_{kU + j} + c ** (U - j) * y_{(k + 1) U}`` adds what comes in from the
    blocks after it, where ``y`` at the block starts is the same suffix sum one level up, over
    the blocks' own sums at their starts with ``c ** U`` (one ``[B, T/U] x [T/U, T/U]``
    matmul for ``T <= U * U``). ``c`` is a Python float (the weights are then constants) or a
    float32 scalar array.
    """
    batch, n = x.shape
    block = min(_GAE_BLOCK, n)
    num_blocks = -(-n // block)
    padded = num_blocks * block
    x = jnp.pad(x, ((0, 0), (0, padded - n)))
    lag = np.arange(block)[:, None] - np.arange(block)[None, :]
    # HIGHEST: GPUs and TPUs would otherwise multiply float32 in reduced precision.
    y = jnp.dot(
        x.reshape(batch * num_blocks, block),
        _decay_weights(c, lag),
        precision=jax.lax.Precision.HIGHEST,
    ).reshape(batch, padded)
    if num_blocks == 1:
        return y[:, :n]
    # carried[k] = y at the start of block k + 1 (0 after the last block).
    next_starts = jnp.pad(y[:, block::block], ((0, 0), (0, 1)))
    carried = _discounted_suffix_sums(next_starts, c**block)
    # Spelled as a [B, T] broadcast times a [T] constant rather than [B, T/U, 1] * [U]:
    # XLA:CPU vectorises this form and compiled the other to scalar code, twice as slow.
    carried = jnp.broadcast_to(carried[:, :, None], (batch, num_blocks, block))
    tail = _decay_weights(c, np.tile(block - np.arange(block), num_blocks))
    return (y + carried.reshape(batch, padded) * tail)[:, :n]


def _decay_weights(c, exponents: np.ndarray):
    """``c ** exponents`` where ``exponents >= 0``, else 0, as float32.

    A NumPy constant (computed in float64) when ``c`` is a Python float, else an array.
    """
    keep = exponents >= 0
    exponents = np.maximum(exponents, 0)
    if isinstance(c, float):
        return np.where(keep, c ** exponents.astype(np.float64), 0.0).astype(np.float32)
    return jnp.where(keep, c ** jnp.asarray(exponents, jnp.float32), 0.0)


def _gae_scan(rewards, values, valid, gamma, gamma_lam):
    """GAE for any mask: a reverse scan over time that skips masked-out positions."""

    def step(carry, x):
        next_value, next_advantage = carry
        r_t, v_t, valid_t = x
        advantage = r_t + gamma * next_value - v_t + gamma_lam * next_advantage
        # A skipped position hands its successor's value and advantage through unchanged.
        next_value = jnp.where(valid_t, v_t, next_value)
        next_advantage = jnp.where(valid_t, advantage, next_advantage)
        return (next_value, next_advantage), jnp.where(valid_t, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], jnp.float32)
    _, advantages = jax.lax.scan(step, (zeros, zeros), (rewards.T, values.T, valid.T), reverse=True)
    return advantages.T


def discounted_returns(
    rewards: ArrayLike, response_mask: ArrayLike, *, gamma: float = 1.0
) -> jax.Array:
    """Discounted reward-to-go ``G_t = r_t + gamma * G_{n(t)}`` over the valid tokens.

    This is :func:`gae` with ``V = 0`` and ``lam = 1``; masked-out positions are skipped and get
    0. With a sequence score on the last token and ``gamma = 1`` every valid token gets the
    score (REINFORCE, Williams 1992).

    Args:
        rewards: ``[B, T]`` token rewards.
        response_mask: ``[B, T]``; nonzero = a real generated token.
        gamma: discount in [0, 1].

    Returns:
        ``[B, T]`` float32 reward-to-go.
    """
    rewards = _as_float_2d("rewards", rewards)
    returns, _ = gae(rewards, jnp.zeros_like(rewards), response_mask, gamma=gamma, lam=1.0)
    return returns


def normalize_advantages(
    advantages: ArrayLike,
    mask: ArrayLike,
    eps: float = 1e-8,
    *,
    shift_mean: bool = True,
) -> jax.Array:
    """Masked whitening: ``(A - mean) / sqrt(var + eps)`` over the valid tokens only.

    ``mean = sum(m * A) / N`` and ``var = sum(m * (A - mean)**2) / N`` (population variance)
    with ``N = sum(m)`` the number of valid tokens in the whole batch; padding stays 0. This is
    the advantage normalisation of PPO implementations (OpenAI baselines, OpenRLHF; verl's
    ``masked_whiten`` and TRL divide the variance by ``N - 1`` instead, a factor
    ``sqrt(N / (N - 1))`` on the result, negligible over a batch's tokens). Under ``jit`` with
    a sharded batch the sums are global, so the statistics are those of the full batch, never
    per shard. A batch without valid tokens returns zeros; one whose valid advantages all
    agree returns zeros (``shift_mean``) or those values unchanged (``shift_mean=False``).

    Args:
        advantages: ``[B, T]`` (or any shape matching ``mask``).
        mask: same shape; nonzero = a valid token.
        eps: added to the variance before the square root, > 0.
        shift_mean: False adds the mean back after whitening, ``(A - mean) / sqrt(var + eps)
            + mean``: unit spread around the batch's own mean (the ``shift_mean=False`` of
            OpenAI's lm-human-preferences ``whiten``, TRL's and verl's ``masked_whiten``).

    Returns:
        float32 array of the input's shape.

    Raises:
        ValueError: shapes differ.
    """
    _check_eps("eps", eps, positive=True)
    _check_bool("shift_mean", shift_mean)
    advantages = jnp.asarray(advantages, jnp.float32)
    mask = jnp.asarray(mask)
    if advantages.shape != mask.shape:
        raise ValueError(
            f"advantages {advantages.shape} and mask {mask.shape} must have the same shape"
        )
    valid = _valid(mask)
    weights = valid.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    masked = jnp.where(valid, advantages, 0.0)
    mean = jnp.sum(masked) / count
    var = jnp.sum(jnp.where(valid, jnp.square(advantages - mean), 0.0)) / count
    equal = _all_equal(advantages, valid, axis=None)
    whitened = (advantages - mean) * jax.lax.rsqrt(var + eps)
    # Values that all agree: exactly 0, or exactly themselves (a float32 mean can miss them).
    whitened = (
        jnp.where(equal, 0.0, whitened)
        if shift_mean
        else jnp.where(equal, advantages, whitened + mean)
    )
    return jnp.where(valid, whitened, 0.0)


def _all_equal(values: jax.Array, kept: Any, *, axis: int | None) -> jax.Array:
    """Whether the kept ``values`` along ``axis`` are one finite value (keepdims).

    Values that all agree are centred to exactly 0 with this: a float32 mean of equal values
    that are no binary fraction (0.1, 0.7) misses them by a rounding step, which a division
    by their near-zero spread would blow up. A NaN or infinity is never equal (it stays
    non-finite, as documented)."""
    hi = jnp.max(jnp.where(kept, values, -jnp.inf), axis=axis, keepdims=True)
    lo = jnp.min(jnp.where(kept, values, jnp.inf), axis=axis, keepdims=True)
    return (hi == lo) & jnp.isfinite(hi)


def group_relative_advantages(
    scores: ArrayLike,
    group_size: int,
    *,
    scale_by_std: bool = True,
    eps: float = 1e-6,
    sample_mask: ArrayLike | None = None,
) -> jax.Array:
    """GRPO's group-relative advantage of every sample.

    GRPO (Shao et al., 2024, "DeepSeekMath"): with the ``G = group_size`` samples of one prompt
    in consecutive rows, ``A_i = (r_i - mean_g(r)) / (std_g(r) + eps)``, ``std`` being the
    unbiased (``G - 1``) sample standard deviation as in TRL and verl. ``scale_by_std=False``
    gives Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training"), ``A_i = r_i -
    mean_g(r)``, which removes the bias towards prompts whose rewards barely vary. A group whose
    samples all score the same gets advantage 0.

    Args:
        scores: ``[B]`` sequence scores, ``B = num_groups * group_size``.
        group_size: G >= 2, samples per prompt.
        scale_by_std: divide by the group's standard deviation (GRPO) or not (Dr. GRPO).
        eps: added to the standard deviation, >= 0 (with 0, a group whose scores all agree
            still gets 0, not 0 / 0).
        sample_mask: optional ``[B]``, nonzero = the sample counts. Excluded samples (a reward
            that could not be computed) take no part in their group's mean and standard
            deviation, which are then over the ``n`` samples that count (``n - 1`` in the
            standard deviation), and get advantage 0; so does a group with fewer than two.
            Without it, a NaN or infinite score makes its whole group's advantages
            non-finite, as in :func:`rloo_advantages` and :func:`gae` (never a silent 0).

    Returns:
        ``[B]`` float32 advantages.

    Raises:
        ValueError: ``scores`` is not rank 1, ``group_size`` < 2, B is not a multiple of it,
            or ``sample_mask`` is not ``[B]``.

    Example:
        >>> group_relative_advantages(jnp.array([1.0, 0.0, 2.0, 2.0]), 2).round(3).tolist()
        [0.7070000171661377, -0.7070000171661377, 0.0, 0.0]
    """
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim != 1:
        raise ValueError(f"scores must have shape [B] (rank 1), got shape {scores.shape}")
    _check_group_size(group_size, scores.shape[0])
    _check_bool("scale_by_std", scale_by_std)
    _check_eps("eps", eps)
    grouped = scores.reshape(-1, group_size)
    if sample_mask is None:
        centred = grouped - jnp.mean(grouped, axis=1, keepdims=True)
        dof = jnp.float32(group_size - 1)
    else:
        counts = _grouped_sample_mask(sample_mask, scores.shape[0], group_size)
        n = jnp.sum(counts, axis=1, keepdims=True)
        grouped = jnp.where(counts > 0, grouped, 0.0)  # an excluded score may be NaN
        mean = jnp.sum(grouped, axis=1, keepdims=True) / jnp.maximum(n, 1.0)
        # A group of one has nothing to compare against: its sample gets 0 too.
        centred = jnp.where((counts > 0) & (n >= 2), grouped - mean, 0.0)
        dof = jnp.maximum(n - 1, 1.0)
    kept = True if sample_mask is None else counts > 0
    centred = jnp.where(_all_equal(grouped, kept, axis=1), 0.0, centred)
    if scale_by_std:
        std = jnp.sqrt(jnp.sum(jnp.square(centred), axis=1, keepdims=True) / dof)
        scale = std + eps  # NaN for a group with a non-finite score: kept, not made 0
        centred = jnp.where(scale == 0, 0.0, centred / jnp.where(scale == 0, 1.0, scale))
    return centred.reshape(-1)


def _grouped_sample_mask(sample_mask: ArrayLike, batch: int, group_size: int) -> jax.Array:
    """``sample_mask [B]`` as ``[B / G, G]`` float32 ones (counts) and zeros."""
    mask = jnp.asarray(sample_mask)
    if mask.shape != (batch,):
        raise ValueError(
            f"sample_mask must have shape [B]=({batch},) like the scores, got {mask.shape}"
        )
    return (mask != 0).astype(jnp.float32).reshape(-1, group_size)


def rloo_advantages(
    scores: ArrayLike, group_size: int, *, sample_mask: ArrayLike | None = None
) -> jax.Array:
    """REINFORCE leave-one-out advantages.

    RLOO (Kool et al., 2019; Ahmadian et al., 2024, "Back to Basics: Revisiting
    REINFORCE-Style Optimization for Learning from Human Feedback in LLMs"): each sample's
    baseline is the mean score of the *other* samples of its prompt,
    ``A_i = r_i - sum_{j != i} r_j / (G - 1) = G / (G - 1) * (r_i - mean_g(r))``, an unbiased
    baseline.

    Args:
        scores: ``[B]`` sequence scores, ``B = num_groups * group_size``.
        group_size: G >= 2, samples per prompt.
        sample_mask: optional ``[B]``, nonzero = the sample counts; the baseline is then the
            mean of the other samples that count (``n / (n - 1) * (r_i - mean)`` over the
            group's ``n``), and excluded samples, or a group with fewer than two, get 0.

    Returns:
        ``[B]`` float32 advantages.

    Raises:
        ValueError: ``scores`` is not rank 1, ``group_size`` < 2, B is not a multiple of it,
            or ``sample_mask`` is not ``[B]``.
    """
    centred = group_relative_advantages(
        scores, group_size, scale_by_std=False, sample_mask=sample_mask
    )
    if sample_mask is None:
        return centred * (group_size / (group_size - 1))
    n = jnp.sum(_grouped_sample_mask(sample_mask, centred.shape[0], group_size), axis=1)
    factor = jnp.repeat(n / jnp.maximum(n - 1, 1.0), group_size)
    return centred * factor


def scores_to_token_rewards(scores: ArrayLike, response_mask: ArrayLike) -> jax.Array:
    """Places each sequence score on the last valid token of its row.

    The usual reward of outcome-supervised RLHF/RLVR: the whole response is scored once, and
    the score arrives with the token that ends it. A row without valid tokens drops its score.

    Args:
        scores: ``[B]`` sequence scores.
        response_mask: ``[B, T]``; nonzero = a real generated token.

    Returns:
        ``[B, T]`` float32, ``scores[b]`` at the last valid position of row ``b``, 0 elsewhere.

    Raises:
        ValueError: ``scores`` is not ``[B]`` for the mask's B.
    """
    mask = _as_2d("response_mask", response_mask)
    scores = jnp.asarray(scores, jnp.float32)
    if scores.shape != mask.shape[:1]:
        raise ValueError(
            f"scores must have shape [B]={mask.shape[:1]} to match response_mask {mask.shape}, "
            f"got {scores.shape}"
        )
    valid = _valid(mask)
    num_tokens = mask.shape[1]
    last = num_tokens - 1 - jnp.argmax(valid[:, ::-1], axis=1)
    at_last = (jnp.arange(num_tokens)[None, :] == last[:, None]) & jnp.any(valid, 1)[:, None]
    return jnp.where(at_last, scores[:, None], 0.0)


# --------------------------------------------------------------------------- batch inputs


def _batch_mask(batch: Mapping[str, ArrayLike]) -> jax.Array:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"an estimator takes one batch mapping ({{'response_mask': [B, T], 'scores': [B], "
            f"...}}; Trajectory.estimator_batch() makes it from a rollout), got "
            f"{type(batch).__name__}"
        )
    if "response_mask" not in batch:
        raise ValueError(
            f"the batch needs 'response_mask' [B, T] (1 = a real generated token); it has keys "
            f"{sorted(batch)}"
        )
    if "valid" in batch and "sample_mask" not in batch:
        # A Trajectory's name for it: silently ignored, its invalid samples (reward 0) would
        # enter their groups' baselines.
        raise ValueError(
            "the batch has 'valid' but no 'sample_mask': an estimator reads which samples count "
            "from 'sample_mask' (Trajectory.estimator_batch() maps a rollout's names)"
        )
    return _as_2d("response_mask", batch["response_mask"])


def _check_group_ids(batch: Mapping[str, ArrayLike], group_size: int) -> None:
    """Raises ValueError when the batch's ``group_ids`` (when given, and not traced) are not
    consecutive groups of ``group_size`` rows, the layout every group estimator assumes."""
    ids = batch.get("group_ids")
    if ids is None or isinstance(ids, jax.core.Tracer):
        return
    ids = np.asarray(ids)
    grouped = ids.reshape(-1, group_size) if ids.ndim == 1 and ids.size % group_size == 0 else None
    if grouped is not None and (grouped == grouped[:, :1]).all():
        if (grouped[1:, 0] != grouped[:-1, 0]).all():
            return
    shown = ids.reshape(-1)[:12].tolist()
    raise ValueError(
        f"group_ids {shown}{' ...' if ids.size > 12 else ''} are not consecutive groups of "
        f"group_size={group_size} rows; build the estimator with the rollout's samples per "
        f"prompt (the rows of one prompt consecutive)"
    )


def _require_rewards(batch: Mapping[str, ArrayLike]) -> None:
    if "scores" not in batch and "token_rewards" not in batch:
        raise ValueError(
            f"the batch needs 'scores' [B] (one reward per response) and/or 'token_rewards' "
            f"[B, T]; it has keys {sorted(batch)}"
        )


def _token_rewards(batch: Mapping[str, ArrayLike], mask: jax.Array) -> jax.Array:
    """Token rewards: ``token_rewards`` plus the sequence ``scores`` on the last valid token."""
    _require_rewards(batch)
    rewards = jnp.zeros(mask.shape, jnp.float32)
    if "token_rewards" in batch:
        token_rewards = _as_float_2d("token_rewards", batch["token_rewards"])
        _check_same_shape(token_rewards=token_rewards, response_mask=mask)
        rewards = rewards + jnp.where(_valid(mask), token_rewards, 0.0)
    if "scores" in batch:
        rewards = rewards + scores_to_token_rewards(batch["scores"], mask)
    return rewards


def sequence_scores(batch: Mapping[str, ArrayLike]) -> jax.Array:
    """The undiscounted return of each response: ``scores + sum_t mask * token_rewards``.

    Sequence-level estimators (GRPO, RLOO) read this, so a batch that carries only token
    rewards, only scores, or both, means the same thing to every estimator. A response without
    valid tokens keeps its score here (it still belongs to its group).

    Args:
        batch: mapping with ``response_mask`` and ``scores`` [B] and/or ``token_rewards``
            [B, T].

    Returns:
        ``[B]`` float32.
    """
    mask = _batch_mask(batch)
    _require_rewards(batch)
    total = jnp.zeros(mask.shape[:1], jnp.float32)
    if "token_rewards" in batch:
        total = total + jnp.sum(_token_rewards({"token_rewards": batch["token_rewards"]}, mask), 1)
    if "scores" in batch:
        scores = jnp.asarray(batch["scores"], jnp.float32)
        if scores.shape != mask.shape[:1]:
            raise ValueError(
                f"scores must have shape [B]={mask.shape[:1]} to match response_mask "
                f"{mask.shape}, got {scores.shape}"
            )
        total = total + scores
    return total


def _broadcast_to_tokens(sequence_advantages: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(_valid(mask), sequence_advantages[:, None], 0.0)


# --------------------------------------------------------------------------- estimators


class AdvantageEstimator(Protocol):
    """One rollout batch in, token-level advantages (and returns, or None) out.

    ``batch`` holds ``response_mask`` [B, T], ``scores`` [B] and/or ``token_rewards`` [B, T],
    ``values`` [B, T] for estimators with a critic, and optionally ``sample_mask`` [B]
    (0 = a sample left out of its group's statistics, for the group estimators). The result
    is ``(advantages [B, T] float32, returns [B, T] float32 or None)``, 0 on masked-out
    positions. Estimators are frozen dataclasses, hashable, so they can be passed to
    ``jax.jit`` as static arguments.
    """

    def __call__(self, batch: Mapping[str, ArrayLike]) -> tuple[jax.Array, jax.Array | None]:
        """Computes ``(advantages, returns or None)``."""
        ...


@dataclasses.dataclass(frozen=True, kw_only=True)
class GAEAdvantageEstimator:
    """PPO's estimator: GAE over token rewards with a learned critic.

    Token rewards are ``token_rewards`` (for example the per-token KL penalty of
    :func:`novarl_jax.algorithms.kl.kl_penalty_token_rewards`) plus the sequence ``scores``
    placed on the last valid token; :func:`gae` turns them and ``values`` into advantages and
    lambda-returns; the advantages are then whitened over the batch's valid tokens
    (:func:`normalize_advantages`) when ``normalize``. Returns are never whitened: they are the
    critic's regression target.

    Attributes:
        gamma: discount (verl ``algorithm.gamma``; 1.0 is usual for language).
        lam: GAE lambda (verl ``algorithm.lam``; TRL ``lam``).
        normalize: whiten the advantages.

    Example:
        >>> estimator = GAEAdvantageEstimator(gamma=1.0, lam=1.0)
        >>> batch = {"scores": jnp.array([1.0, 0.0]), "values": jnp.zeros((2, 3)),
        ...          "response_mask": jnp.array([[1, 1, 1], [1, 1, 0]])}
        >>> advantages, returns = estimator(batch)
        >>> returns.tolist()
        [[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
    """

    gamma: float = 1.0
    lam: float = 0.95
    normalize: bool = True

    def __post_init__(self) -> None:
        _check_unit_interval("gamma", self.gamma)
        _check_unit_interval("lam", self.lam)
        _check_bool("normalize", self.normalize)
        _as_python_floats(self, "gamma", "lam")

    def __call__(self, batch: Mapping[str, ArrayLike]) -> tuple[jax.Array, jax.Array]:
        """Computes ``(advantages, returns)``, both ``[B, T]`` float32."""
        mask = _batch_mask(batch)
        if "values" not in batch:
            raise ValueError(
                f"GAE needs the critic's 'values' [B, T] in the batch; it has keys {sorted(batch)}"
            )
        rewards = _token_rewards(batch, mask)
        advantages, returns = gae(rewards, batch["values"], mask, gamma=self.gamma, lam=self.lam)
        if self.normalize:
            advantages = normalize_advantages(advantages, mask)
        return advantages, returns


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOAdvantageEstimator:
    """GRPO's (or Dr. GRPO's) group-relative advantage, the same for every token of a sample.

    ``A_{i,t} = (R_i - mean_g(R)) / (std_g(R) + eps)`` for every valid token ``t`` of sample
    ``i`` (:func:`group_relative_advantages`), ``R_i`` the response's return
    (:func:`sequence_scores`). No critic; returns are None.

    Attributes:
        group_size: G, samples per prompt (verl ``rollout.n``, TRL ``num_generations``, the
            quickstart's ``grpo_group_size``).
        scale_by_std: GRPO (True) or Dr. GRPO (False; verl
            ``norm_adv_by_std_in_grpo=False``, TRL ``scale_rewards='none'``).
        eps: added to the group's standard deviation.
    """

    group_size: int
    scale_by_std: bool = True
    eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)
        _check_bool("scale_by_std", self.scale_by_std)
        _check_eps("eps", self.eps)

    def __call__(self, batch: Mapping[str, ArrayLike]) -> tuple[jax.Array, None]:
        """Computes ``(advantages [B, T] float32, None)``."""
        mask = _batch_mask(batch)
        _check_group_ids(batch, self.group_size)
        scores = sequence_scores(batch)
        advantages = group_relative_advantages(
            scores,
            self.group_size,
            scale_by_std=self.scale_by_std,
            eps=self.eps,
            sample_mask=batch.get("sample_mask"),
        )
        return _broadcast_to_tokens(advantages, mask), None


@dataclasses.dataclass(frozen=True, kw_only=True)
class RLOOAdvantageEstimator:
    """RLOO's leave-one-out advantage, the same for every token of a sample.

    ``A_{i,t} = R_i - mean_{j != i} R_j`` (:func:`rloo_advantages`). No critic; returns are
    None.

    Attributes:
        group_size: G >= 2, samples per prompt (TRL ``rloo_k``).
    """

    group_size: int

    def __post_init__(self) -> None:
        _check_group_size(self.group_size)

    def __call__(self, batch: Mapping[str, ArrayLike]) -> tuple[jax.Array, None]:
        """Computes ``(advantages [B, T] float32, None)``."""
        mask = _batch_mask(batch)
        _check_group_ids(batch, self.group_size)
        advantages = rloo_advantages(
            sequence_scores(batch), self.group_size, sample_mask=batch.get("sample_mask")
        )
        return _broadcast_to_tokens(advantages, mask), None


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReinforcePlusPlusAdvantageEstimator:
    """REINFORCE++ and REINFORCE++-baseline: discounted returns, whitened over the batch.

    REINFORCE++ (Hu et al., 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning
    Large Language Models"): token rewards (``token_rewards``, typically the per-token KL
    penalty, plus ``scores`` on the last token) give the reward-to-go
    ``G_t = r_t + gamma * G_{t+1}`` (:func:`discounted_returns`), and the advantage is ``G``
    whitened over every valid token of the batch (global, not per prompt, normalisation).

    With ``baseline=True`` (REINFORCE++-baseline, as OpenRLHF computes it) each sample's score
    first has its group's mean score subtracted (``scores - mean_g(scores)``; token rewards
    such as KL penalties are not baselined), then the same reward-to-go and global whitening
    follow. verl's version instead baselines each row's summed token rewards (KL included) and
    gives every token that value, without reward-to-go.

    Attributes:
        gamma: discount (1.0 in the paper's outcome-reward setting).
        baseline: subtract the group mean score (REINFORCE++-baseline).
        group_size: G >= 2, samples per prompt; required when ``baseline``.

    The returns (un-whitened reward-to-go) are returned too.
    """

    gamma: float = 1.0
    baseline: bool = False
    group_size: int | None = None

    def __post_init__(self) -> None:
        _check_unit_interval("gamma", self.gamma)
        _check_bool("baseline", self.baseline)
        _as_python_floats(self, "gamma")
        if self.baseline:
            if self.group_size is None:
                raise ValueError(
                    "group_size is required when baseline=True (REINFORCE++-baseline subtracts "
                    "each prompt group's mean score); pass the samples per prompt, e.g. "
                    "group_size=8"
                )
            _check_group_size(self.group_size)
        elif self.group_size is not None:
            _check_group_size(self.group_size)

    def __call__(self, batch: Mapping[str, ArrayLike]) -> tuple[jax.Array, jax.Array]:
        """Computes ``(advantages, returns)``, both ``[B, T]`` float32."""
        mask = _batch_mask(batch)
        if self.baseline:
            if "scores" not in batch:
                raise ValueError(
                    f"REINFORCE++-baseline needs the sequence 'scores' [B] in the batch (the "
                    f"group baseline is their mean); it has keys {sorted(batch)}"
                )
            assert self.group_size is not None
            _check_group_ids(batch, self.group_size)
            centred = group_relative_advantages(
                batch["scores"],
                self.group_size,
                scale_by_std=False,
                sample_mask=batch.get("sample_mask"),
            )
            batch = {**batch, "scores": centred}
        rewards = _token_rewards(batch, mask)
        returns = discounted_returns(rewards, mask, gamma=self.gamma)
        return normalize_advantages(returns, mask), returns


def _dr_grpo(**kwargs: Any) -> GRPOAdvantageEstimator:
    if kwargs.get("scale_by_std", False):
        raise ValueError(
            "'dr_grpo' is GRPO with scale_by_std=False; use 'grpo' for scale_by_std=True"
        )
    return GRPOAdvantageEstimator(**{**kwargs, "scale_by_std": False})


def _reinforce_plus_plus(**kwargs: Any) -> ReinforcePlusPlusAdvantageEstimator:
    if kwargs.get("baseline", False):
        raise ValueError(
            "'reinforce_plus_plus' has no group baseline; use 'reinforce_plus_plus_baseline'"
        )
    return ReinforcePlusPlusAdvantageEstimator(**{**kwargs, "baseline": False})


def _reinforce_plus_plus_baseline(**kwargs: Any) -> ReinforcePlusPlusAdvantageEstimator:
    if not kwargs.get("baseline", True):
        raise ValueError(
            "'reinforce_plus_plus_baseline' always uses the group baseline; use "
            "'reinforce_plus_plus' for baseline=False"
        )
    return ReinforcePlusPlusAdvantageEstimator(**{**kwargs, "baseline": True})


# name -> constructor taking the estimator's keyword arguments.
ADVANTAGE_ESTIMATORS: dict[str, Callable[..., AdvantageEstimator]] = {
    "gae": GAEAdvantageEstimator,
    "grpo": GRPOAdvantageEstimator,
    "dr_grpo": _dr_grpo,
    "rloo": RLOOAdvantageEstimator,
    "reinforce_plus_plus": _reinforce_plus_plus,
    "reinforce_plus_plus_baseline": _reinforce_plus_plus_baseline,
}

_ESTIMATOR_CLASSES: dict[str, type] = {
    "gae": GAEAdvantageEstimator,
    "grpo": GRPOAdvantageEstimator,
    "dr_grpo": GRPOAdvantageEstimator,
    "rloo": RLOOAdvantageEstimator,
    "reinforce_plus_plus": ReinforcePlusPlusAdvantageEstimator,
    "reinforce_plus_plus_baseline": ReinforcePlusPlusAdvantageEstimator,
}


def make_advantage_estimator(name: str, **kwargs: Any) -> AdvantageEstimator:
    """Builds an advantage estimator by the name a config uses.

    Names (verl's ``algorithm.adv_estimator`` spellings): ``'gae'`` (PPO),
    ``'grpo'``, ``'dr_grpo'`` (GRPO without std scaling), ``'rloo'``,
    ``'reinforce_plus_plus'``, ``'reinforce_plus_plus_baseline'``.

    Args:
        name: the estimator's name.
        **kwargs: the estimator's fields (for example ``gamma``, ``lam``, ``group_size``).

    Returns:
        A frozen, hashable estimator: ``estimator(batch) -> (advantages, returns or None)``.

    Raises:
        ValueError: an unknown name, an unknown or invalid keyword argument.

    Example:
        >>> make_advantage_estimator("dr_grpo", group_size=4)
        GRPOAdvantageEstimator(group_size=4, scale_by_std=False, eps=1e-06)
    """
    if not isinstance(name, str) or name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage estimator {name!r}; valid names: {sorted(ADVANTAGE_ESTIMATORS)}"
        )
    fields = {f.name for f in dataclasses.fields(_ESTIMATOR_CLASSES[name])}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"advantage estimator {name!r} has no argument(s) {unknown}; valid arguments: "
            f"{sorted(fields)}"
        )
    required = sorted(
        f.name
        for f in dataclasses.fields(_ESTIMATOR_CLASSES[name])
        if f.default is dataclasses.MISSING and f.name not in kwargs
    )
    if required:
        raise ValueError(f"advantage estimator {name!r} needs the argument(s) {required}")
    return ADVANTAGE_ESTIMATORS[name](**kwargs)
