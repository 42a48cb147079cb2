"""Per-token KL estimators between the policy and a reference policy.

With tokens sampled from the policy ``pi`` and ``log_ratio = log pi(y_t) - log pi_ref(y_t)``,
the per-token estimators of ``KL(pi || pi_ref)`` from John Schulman's note "Approximating KL
Divergence" (2020) are:

=========================  ==============================================  ===================
kind (alias)               value                                           property
=========================  ==============================================  ===================
``'k1'`` (``'kl'``)        ``log_ratio``                                   unbiased, can be < 0
``'k2'`` (``'mse'``)       ``0.5 * log_ratio ** 2``                        biased, low variance
``'k3'`` (``'low_var_kl'``) ``exp(-log_ratio) + log_ratio - 1``            unbiased, >= 0
``'abs'``                  ``abs(log_ratio)``                              biased
=========================  ==============================================  ===================

``'k3'`` is evaluated like verl's ``low_var_kl``: ``log_ratio`` is clamped to [-20, 20] before
the exponential and the result to [-10, 10], so a token the reference finds very unlikely cannot
blow up the loss. A ``'+'`` suffix (``'k1+'``, ``'k3+'`` ...) keeps the value of the estimator
but takes its gradient from ``'k2'`` (a straight-through estimator): the gradient of ``k2`` is
an unbiased estimate of the gradient of the KL, which the gradients of ``k1`` and ``k3`` are not
(no gradient where the log-ratio is not finite).

The same estimates serve two purposes: a token-reward penalty for PPO (InstructGPT, Ouyang et
al., 2022; :func:`kl_penalty_token_rewards`) or a loss term (GRPO, Shao et al., 2024, uses
``k3``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from novarl_jax.core.checks import real_value

__all__ = [
    "KL_KINDS",
    "adaptive_kl_coef",
    "kl_penalty",
    "kl_penalty_token_rewards",
]

# Canonical kinds and the verl/TRL aliases that mean the same estimator.
_ALIASES = {"k1": "k1", "kl": "k1", "k2": "k2", "mse": "k2", "k3": "k3", "low_var_kl": "k3",
            "abs": "abs"}  # fmt: skip
KL_KINDS: tuple[str, ...] = tuple(_ALIASES) + tuple(f"{k}+" for k in _ALIASES)

# verl's clamps for the k3 estimator.
_K3_LOG_RATIO_CLAMP = 20.0
_K3_VALUE_CLAMP = 10.0


def _check_kind(kind: str) -> str:
    if kind not in KL_KINDS:
        raise ValueError(f"unknown KL kind {kind!r}; valid kinds: {list(KL_KINDS)}")
    return _ALIASES[kind.rstrip("+")]


def _estimate(log_ratio: jax.Array, kind: str) -> jax.Array:
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * jnp.square(log_ratio)
    if kind == "abs":
        return jnp.abs(log_ratio)
    neg = jnp.clip(-log_ratio, -_K3_LOG_RATIO_CLAMP, _K3_LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(neg) - neg - 1.0, -_K3_VALUE_CLAMP, _K3_VALUE_CLAMP)


def kl_penalty(logprobs: ArrayLike, ref_logprobs: ArrayLike, kind: str = "k1") -> jax.Array:
    """Per-token estimate of ``KL(pi || pi_ref)`` from the sampled tokens' log-probs.

    Args:
        logprobs: ``[B, T]`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``[B, T]`` the same tokens' log-probs under the reference policy.
        kind: ``'k1'`` (``'kl'``), ``'k2'`` (``'mse'``), ``'k3'`` (``'low_var_kl'``),
            ``'abs'``, optionally with a ``'+'`` suffix for the straight-through k2 gradient;
            the formulas are in the module docstring.

    Returns:
        ``[B, T]`` float32 estimates (padding is not masked here; aggregate with the mask).

    Raises:
        ValueError: an unknown kind or shapes that differ.

    Example:
        >>> kl_penalty(jnp.array([0.0]), jnp.array([-1.0]), "k2").tolist()
        [0.5]
    """
    canonical = _check_kind(kind)
    logprobs = jnp.asarray(logprobs, jnp.float32)
    ref_logprobs = jnp.asarray(ref_logprobs, jnp.float32)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs {logprobs.shape} and ref_logprobs {ref_logprobs.shape} must have the "
            f"same shape"
        )
    log_ratio = logprobs - ref_logprobs
    value = _estimate(log_ratio, canonical)
    if kind.endswith("+"):
        # k2's gradient, d(0.5 x^2)/dx = x, from a term whose value is exactly 0, so the
        # estimate keeps its own value to the last bit (k2 + stop_gradient(value - k2) rounds
        # it: 8.0 for a clamped k3 of 10 at a log-ratio of 1e4). A log-ratio that is not
        # finite (a reference log-prob of -inf) contributes no gradient, never a NaN.
        finite = jnp.where(jnp.isfinite(log_ratio), log_ratio, 0.0)
        fixed = jax.lax.stop_gradient(finite)
        value = jax.lax.stop_gradient(value) + fixed * (finite - fixed)
    return value


def kl_penalty_token_rewards(
    logprobs: ArrayLike,
    ref_logprobs: ArrayLike,
    response_mask: ArrayLike,
    *,
    kl_coef: float,
    kind: str = "k1",
) -> jax.Array:
    """The InstructGPT per-token KL penalty, ``r_t = -kl_coef * KL_t`` on valid tokens.

    InstructGPT (Ouyang et al., 2022) and Ziegler et al. (2019) shape PPO's reward as
    ``r_t = -beta * KL_t`` plus the response's score on its last token. Pass the result as the
    batch's ``'token_rewards'`` next to ``'scores'``: the token-reward estimators
    (:class:`~novarl_jax.core.utils.advantages.GAEAdvantageEstimator`, REINFORCE++) add the
    score on the last valid token themselves. The penalty carries no gradient (it is part of
    the reward).

    Args:
        logprobs: ``[B, T]`` rollout policy log-probs of the sampled tokens.
        ref_logprobs: ``[B, T]`` reference log-probs of the same tokens.
        response_mask: ``[B, T]``; nonzero = a real generated token.
        kl_coef: beta >= 0 (verl ``algorithm.kl_ctrl.kl_coef``, TRL ``kl_coef``).
        kind: KL estimator (see :func:`kl_penalty`); verl's default for rewards is ``'k1'``.

    Returns:
        ``[B, T]`` float32 rewards, 0 on padding.

    Raises:
        ValueError: a negative ``kl_coef``, an unknown kind or mismatched shapes.
    """
    _check_number("kl_coef", kl_coef, minimum=0.0)
    kl = jax.lax.stop_gradient(kl_penalty(logprobs, ref_logprobs, kind))
    mask = jnp.asarray(response_mask)
    if mask.shape != kl.shape:
        raise ValueError(f"response_mask {mask.shape} must have the shape of logprobs {kl.shape}")
    return jnp.where(mask != 0, -kl_coef * kl, 0.0)


def adaptive_kl_coef(
    kl_coef: ArrayLike,
    observed_kl: ArrayLike,
    num_steps: int,
    *,
    target_kl: float,
    horizon: float,
) -> jax.Array:
    """One update of the adaptive KL controller of Ziegler et al. (2019).

    ``error = clip(observed_kl / target_kl - 1, -0.2, 0.2)`` and
    ``kl_coef <- kl_coef * (1 + error * num_steps / horizon)``: the coefficient grows while the
    policy drifts further from the reference than ``target_kl`` and shrinks otherwise (verl's
    ``kl_ctrl.type='adaptive'`` with ``target_kl`` and ``horizon``).

    Args:
        kl_coef: current coefficient (scalar).
        observed_kl: mean per-token KL of the latest batch (scalar).
        num_steps: samples (or steps) since the last update, as in the paper, >= 0.
        target_kl: the KL to hold, > 0.
        horizon: how many samples a full correction takes, > 0.

    Returns:
        The new coefficient, a float32 scalar (never below 0: a step whose correction
        ``error * num_steps / horizon`` is below -1 gives 0).

    Raises:
        ValueError: ``target_kl`` or ``horizon`` is not positive.
    """
    _check_number("target_kl", target_kl, minimum=0.0, strict=True)
    _check_number("horizon", horizon, minimum=0.0, strict=True)
    _check_number("num_steps", num_steps, minimum=0.0)
    error = jnp.clip(jnp.asarray(observed_kl, jnp.float32) / target_kl - 1.0, -0.2, 0.2)
    # A correction larger than the coefficient itself stops at 0, never below.
    factor = jnp.maximum(1.0 + error * num_steps / horizon, 0.0)
    return jnp.asarray(kl_coef, jnp.float32) * factor


def _check_number(name: str, value: Any, *, minimum: float, strict: bool = False) -> None:
    """Raises ValueError unless ``value`` is a real number (Python, NumPy or a concrete 0-d
    array) >= ``minimum`` (> with ``strict``); traced values are not checked."""
    if isinstance(value, jax.core.Tracer):
        return
    if real_value(value) is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (value > minimum if strict else value >= minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum:g}, got {value!r}")
