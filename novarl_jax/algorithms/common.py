"""Pieces shared by the PPO and GRPO losses: the clipped surrogate, truncated importance
sampling, the entropy/KL/MoE terms, batch checks and config validation.

The ``apply_fn`` contract (what the loss functions call): ``apply_fn(params, batch) -> dict``
with ``'logprobs'`` ``[B, T]`` float32 (position ``t`` is the log-prob of the response token at
``t``, see :mod:`novarl_jax.algorithms.logprobs`), and optionally ``'entropy'`` ``[B, T]``,
``'values'`` ``[B, T]`` (PPO's critic), ``'moe_aux_loss'`` and ``'moe_z_loss'`` (unweighted
scalars from the policy's MoE routers), and ``'critic_moe_aux_loss'`` / ``'critic_moe_z_loss'``
(the same for a separate MoE critic; they take the same coefficients).

The batch: a mapping with ``'response_mask'`` ``[B, T]`` (1 = a real generated token),
``'old_logprobs'`` ``[B, T]`` (the policy that collected the data, recomputed by the trainer),
``'advantages'`` ``[B, T]``, and, when the config uses them, ``'returns'`` and ``'old_values'``
(PPO's critic), ``'ref_logprobs'`` (KL loss), ``'behavior_logprobs'`` (the sampler's own
log-probs, for truncated importance sampling) and ``'loss_denominators'`` (the mini-batch's
global counts, see :mod:`novarl_jax.algorithms.aggregation`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from novarl_jax.algorithms.aggregation import (
    LossDenominators,
    aggregate,
    check_loss_agg_mode,
    loss_denominators,
    masked_max,
    masked_mean,
)
from novarl_jax.algorithms.kl import KL_KINDS, kl_penalty
from novarl_jax.core.checks import real_value

__all__ = [
    "clipped_surrogate_loss",
    "truncated_importance_weights",
]

# exp() of a log-ratio beyond this is clamped, as verl does, so one stale token cannot overflow.
_LOG_RATIO_CLAMP = 20.0


def zero_masked(x: ArrayLike, mask: ArrayLike) -> jax.Array:
    """``x`` as float32 with its masked-out entries set to 0.

    Applied to a loss's inputs before any arithmetic, so whatever padding holds (even NaN or
    inf) reaches neither the loss nor its gradient: masking only the result would keep the
    value finite but pass ``0 * NaN`` back through the masked entries' derivatives.
    """
    return jnp.where(jnp.asarray(mask) != 0, jnp.asarray(x, jnp.float32), 0.0)


def check_clip_args(
    clip_ratio_low: Any, clip_ratio_high: Any, dual_clip_c: Any, *, prefix: str = ""
) -> None:
    """Raises ValueError unless the clip ranges are valid (skipped for traced values)."""
    values = (clip_ratio_low, clip_ratio_high, dual_clip_c)
    if any(isinstance(v, jax.core.Tracer) for v in values):
        return
    if not (is_number(clip_ratio_low) and 0 <= clip_ratio_low < 1):
        raise ValueError(f"{prefix}clip_ratio_low must be in [0, 1), got {clip_ratio_low!r}")
    check_non_negative(f"{prefix}clip_ratio_high", clip_ratio_high)
    check_positive_or_none(f"{prefix}dual_clip_c", dual_clip_c, bound=1.0)


def clipped_surrogate_loss(
    log_ratio: ArrayLike,
    advantages: ArrayLike,
    response_mask: ArrayLike,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip_c: float | None = None,
    token_weights: ArrayLike | None = None,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped surrogate objective, as a loss, from a given log importance ratio.

    With ``rho = exp(log_ratio)`` and advantage ``A`` (PPO, Schulman et al., 2017)::

        L_clip = max(-A * rho, -A * clip(rho, 1 - clip_ratio_low, 1 + clip_ratio_high))

    ``clip_ratio_high > clip_ratio_low`` is DAPO's clip-higher (Yu et al., 2025: 0.2 / 0.28).
    Dual-clip (Ye et al., 2020, "Mastering Complex Control in MOBA Games with Deep RL") bounds
    the loss of negative-advantage tokens whose ratio has exploded::

        L = min(L_clip, -A * dual_clip_c)   where A < 0        (dual_clip_c > 1)

    ``token_weights`` (truncated importance-sampling weights) multiply ``L`` per token; then
    :func:`~novarl_jax.algorithms.aggregation.aggregate` reduces it.

    Args:
        log_ratio: ``[B, T]`` ``log pi(y_t) - log pi_old(y_t)`` (token level), or a sequence's
            ratio broadcast over its tokens (GSPO). Clamped to [-20, 20] before ``exp``.
        advantages: ``[B, T]``.
        response_mask: ``[B, T]``; nonzero = a real generated token.
        clip_ratio_low: epsilon below 1, in [0, 1).
        clip_ratio_high: epsilon above 1, >= 0.
        dual_clip_c: the dual-clip bound c > 1 (verl ``clip_ratio_c``, 3.0), or None for none.
        token_weights: ``[B, T]`` non-negative weights (no gradient flows into them), or None.
        loss_agg_mode: see :mod:`novarl_jax.algorithms.aggregation`.
        denominators: the mini-batch's global counts; None counts this batch.
        loss_scale_factor: ``S`` of ``'seq-mean-token-sum-norm'``.

    Raises:
        ValueError: bad clip arguments, or a token array whose shape is not the mask's
            ``[B, T]`` (a ``[B]`` advantage would otherwise broadcast silently along T).

    Returns:
        ``(loss, metrics)``: a float32 scalar and ``actor/pg_loss``, ``actor/pg_clipfrac``
        (fraction of tokens where the clipped term is active), ``actor/pg_clipfrac_lower``
        (fraction where dual-clip is active), ``actor/ppo_kl`` (mean of ``-log_ratio``, an
        estimate of ``KL(pi_old || pi)``), ``actor/ratio_mean`` and ``actor/ratio_max``.
    """
    check_clip_args(clip_ratio_low, clip_ratio_high, dual_clip_c)
    arrays = {"response_mask": response_mask, "log_ratio": log_ratio, "advantages": advantages}
    if token_weights is not None:
        arrays["token_weights"] = token_weights
    check_token_arrays("response_mask", arrays)
    mask = jnp.asarray(response_mask)
    log_ratio = jnp.clip(zero_masked(log_ratio, mask), -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    advantages = zero_masked(advantages, mask)
    if denominators is None:
        denominators = loss_denominators(mask)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_ratio_low, 1.0 + clip_ratio_high)
    loss_mat = jnp.maximum(unclipped, clipped)
    clip_active = clipped > unclipped
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual_active = (advantages < 0) & (loss_mat > bound)
        loss_mat = jnp.where(advantages < 0, jnp.minimum(loss_mat, bound), loss_mat)
    else:
        dual_active = jnp.zeros_like(clip_active)
    if token_weights is not None:
        loss_mat = loss_mat * jax.lax.stop_gradient(zero_masked(token_weights, mask))
    loss = aggregate(
        loss_mat,
        mask,
        loss_agg_mode,
        denominators=denominators,
        loss_scale_factor=loss_scale_factor,
    )

    def mean(x):
        return masked_mean(jax.lax.stop_gradient(x), mask, denominators=denominators)

    metrics = {
        "actor/pg_loss": jax.lax.stop_gradient(loss),
        "actor/pg_clipfrac": mean(clip_active.astype(jnp.float32)),
        "actor/pg_clipfrac_lower": mean(dual_active.astype(jnp.float32)),
        "actor/ppo_kl": mean(-log_ratio),
        "actor/ratio_mean": mean(ratio),
        "actor/ratio_max": masked_max(jax.lax.stop_gradient(ratio), mask),
    }
    return loss, metrics


def truncated_importance_weights(
    old_logprobs: ArrayLike, behavior_logprobs: ArrayLike, tis_cap: float
) -> jax.Array:
    """Truncated importance-sampling weights ``min(pi_old / pi_behavior, tis_cap)`` per token.

    When the sampler's log-probs (``behavior``: another engine, another precision, or stale
    weights in asynchronous training) differ from the trainer's recomputation of the same policy
    (``old``), the data is off-policy; weighting each token's policy-gradient term by the
    truncated ratio corrects most of the bias at bounded variance (Yao et al., 2025, "Your
    Efficient RL Framework Secretly Brings You Off-Policy RL Training"; verl
    ``tis_imp_ratio_cap``). No gradient flows through the weights.

    Args:
        old_logprobs: ``[B, T]`` trainer log-probs of the policy that sampled.
        behavior_logprobs: ``[B, T]`` the sampler's log-probs of the same tokens.
        tis_cap: C > 0, the truncation.

    Returns:
        ``[B, T]`` float32 weights in [0, C].

    Raises:
        ValueError: ``tis_cap <= 0``, or the two arrays are not of one ``[B, T]`` shape.
    """
    if not tis_cap > 0:
        raise ValueError(f"tis_cap must be > 0, got {tis_cap!r}")
    check_token_arrays(
        "old_logprobs", {"old_logprobs": old_logprobs, "behavior_logprobs": behavior_logprobs}
    )
    return jnp.minimum(_importance_ratio(old_logprobs, behavior_logprobs), tis_cap)


def _importance_ratio(old_logprobs: ArrayLike, behavior_logprobs: ArrayLike) -> jax.Array:
    """``pi_old / pi_behavior`` per token (log-ratio clamped), without gradient."""
    log_w = jnp.asarray(old_logprobs, jnp.float32) - jnp.asarray(behavior_logprobs, jnp.float32)
    log_w = jnp.clip(log_w, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    return jax.lax.stop_gradient(jnp.exp(log_w))


# --------------------------------------------------------------------------- loss plumbing


def as_mapping(batch: Any) -> Mapping[str, Any]:
    """The batch as a mapping (dicts as they are, NamedTuples through ``_asdict``)."""
    if isinstance(batch, Mapping):
        return batch
    if hasattr(batch, "_asdict"):
        return batch._asdict()
    raise ValueError(f"batch must be a mapping or a NamedTuple, got {type(batch).__name__}")


def require_keys(mapping: Mapping[str, Any], keys: tuple[str, ...], what: str, why: str) -> None:
    """Raises ValueError naming the first key of ``keys`` missing from ``mapping``."""
    for key in keys:
        if key not in mapping:
            raise ValueError(f"{what} has no {key!r} ({why}); it has keys {sorted(mapping)}")


def check_token_arrays(reference: str, arrays: Mapping[str, Any]) -> None:
    """Raises ValueError unless every array has the ``[B, T]`` shape of ``arrays[reference]``."""
    shape = np.shape(arrays[reference])
    if len(shape) != 2:
        raise ValueError(f"{reference} must have shape [B, T], got {shape}")
    for name, array in arrays.items():
        if np.shape(array) != shape:
            raise ValueError(
                f"{name} has shape {np.shape(array)}; every token array must have the shape "
                f"[B, T] = {shape} of {reference}"
            )


def run_policy(
    params: Any,
    batch: Any,
    apply_fn: Any,
    needed: tuple[str, ...],
    needed_out: tuple[str, ...],
    why: str,
) -> tuple[Mapping[str, Any], Mapping[str, Any], jax.Array, LossDenominators]:
    """Checks the batch, calls ``apply_fn`` and checks its output: the losses' common start.

    Returns:
        ``(batch as a mapping, apply_fn's output, response_mask, denominators)``.
    """
    mapping = as_mapping(batch)
    require_keys(mapping, needed, "batch", why)
    out = apply_fn(params, batch)  # the caller's own batch type
    if not isinstance(out, Mapping):
        raise ValueError(
            f"apply_fn must return a mapping with 'logprobs' [B, T] (and {list(needed_out)}), "
            f"got {type(out).__name__}"
        )
    require_keys(out, ("logprobs",) + needed_out, "apply_fn's output", why)
    token_arrays = {k: mapping[k] for k in needed} | {k: out[k] for k in ("logprobs",) + needed_out}
    check_token_arrays("response_mask", token_arrays)
    mask = jnp.asarray(mapping["response_mask"])
    for key in ("moe_aux_loss", "moe_z_loss", "critic_moe_aux_loss", "critic_moe_z_loss"):
        if key in out and np.ndim(out[key]) != 0:
            raise ValueError(
                f"apply_fn's {key!r} must be a scalar (the forward's mean), got shape "
                f"{np.shape(out[key])}"
            )
    return mapping, out, mask, batch_denominators(mapping, mask)


def batch_denominators(batch: Mapping[str, Any], mask: jax.Array) -> LossDenominators:
    """The batch's ``'loss_denominators'`` if present, else the counts of ``mask`` itself."""
    denominators = batch.get("loss_denominators")
    if denominators is None:
        return loss_denominators(mask)
    denominators = LossDenominators(*denominators)
    if any(np.ndim(d) != 0 for d in denominators):
        raise ValueError(
            "batch['loss_denominators'] must hold scalars (one micro-batch's view of the "
            f"mini-batch's counts), got shapes {[np.shape(d) for d in denominators]}; index "
            "split_micro_batches' stacked denominators per micro-batch"
        )
    return denominators


def auxiliary_terms(
    out: Mapping[str, Any],
    batch: Mapping[str, Any],
    mask: jax.Array,
    denominators: LossDenominators,
    config: Any,
    kl_coef: float,
    kl_field: str = "kl_coef",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """``-entropy_coef * H + kl_coef * KL + MoE router losses``, and their metrics.

    ``kl_field`` names ``kl_coef`` in ``config`` (GRPO's is ``beta``) for the messages.

    ``config`` is a PPOLossConfig or GRPOLossConfig (``loss_agg_mode``,
    ``loss_scale_factor``, ``entropy_coef``, ``kl_kind``, ``moe_aux_loss_coef``,
    ``moe_z_loss_coef``). The entropy bonus and the KL loss are aggregated with the policy
    loss's mode. The MoE losses are per-forward means; each micro-batch's is weighted by its
    share of the mini-batch's valid tokens, so the weights of a mini-batch's micro-batches sum
    to 1.
    """
    total = jnp.zeros((), jnp.float32)
    metrics: dict[str, jax.Array] = {}

    entropy_coef, kl_kind = config.entropy_coef, config.kl_kind

    def agg(x):
        return aggregate(
            x,
            mask,
            config.loss_agg_mode,
            denominators=denominators,
            loss_scale_factor=config.loss_scale_factor,
        )

    if "entropy" in out:
        check_token_arrays("response_mask", {"response_mask": mask, "entropy": out["entropy"]})
        entropy = zero_masked(out["entropy"], mask)
        metrics["actor/entropy"] = masked_mean(
            jax.lax.stop_gradient(entropy), mask, denominators=denominators
        )
        if entropy_coef:
            total = total - entropy_coef * agg(entropy)
    elif entropy_coef:
        raise ValueError(
            f"entropy_coef={entropy_coef} needs apply_fn to return 'entropy' [B, T]; it returned "
            f"keys {sorted(out)}"
        )
    if kl_coef:
        require_keys(batch, ("ref_logprobs",), "batch", f"the KL loss is on: {kl_field}={kl_coef}")
        # zero_masked would broadcast a [B, 1] or [T] array against the mask silently.
        check_token_arrays(
            "response_mask", {"response_mask": mask, "ref_logprobs": batch["ref_logprobs"]}
        )
        kl = kl_penalty(
            zero_masked(out["logprobs"], mask), zero_masked(batch["ref_logprobs"], mask), kl_kind
        )
        kl_loss = agg(kl)
        total = total + kl_coef * kl_loss
        metrics["actor/kl_loss"] = jax.lax.stop_gradient(kl_loss)
    share = jnp.sum(mask != 0, dtype=jnp.float32) / jnp.maximum(denominators.num_tokens, 1.0)
    for key, metric, coef in (
        ("moe_aux_loss", "actor/moe_aux_loss", config.moe_aux_loss_coef),
        ("moe_z_loss", "actor/moe_z_loss", config.moe_z_loss_coef),
        ("critic_moe_aux_loss", "critic/moe_aux_loss", config.moe_aux_loss_coef),
        ("critic_moe_z_loss", "critic/moe_z_loss", config.moe_z_loss_coef),
    ):
        if key in out:
            value = share * jnp.asarray(out[key], jnp.float32)
            metrics[metric] = jax.lax.stop_gradient(value)
            if coef:
                total = total + coef * value
    return total, metrics


# --------------------------------------------------------------------------- config checks


def check_non_negative(name: str, value: Any) -> None:
    """Raises ValueError unless ``value`` is a real number >= 0."""
    if not (is_number(value) and value >= 0):
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def is_number(value: Any) -> bool:
    """A concrete real number: Python, NumPy or a 0-d array (not a bool, not traced)."""
    return real_value(value) is not None


def check_positive_or_none(name: str, value: Any, bound: float = 0.0) -> None:
    """Raises ValueError unless ``value`` is None or a real number > ``bound``."""
    if value is not None and not (is_number(value) and value > bound):
        raise ValueError(f"{name} must be > {bound:g} or None, got {value!r}")


def check_policy_fields(config: Any) -> None:
    """Validates the fields PPOLossConfig and GRPOLossConfig share."""
    check_clip_args(config.clip_ratio_low, config.clip_ratio_high, config.dual_clip_c)
    check_loss_agg_mode(config.loss_agg_mode)
    check_positive_or_none("loss_scale_factor", config.loss_scale_factor)
    check_non_negative("entropy_coef", config.entropy_coef)
    if config.kl_kind not in KL_KINDS:
        raise ValueError(f"kl_kind={config.kl_kind!r} is not one of {list(KL_KINDS)}")
    check_positive_or_none("tis_cap", config.tis_cap)
    check_non_negative("moe_aux_loss_coef", config.moe_aux_loss_coef)
    check_non_negative("moe_z_loss_coef", config.moe_z_loss_coef)


def tis_weights_and_metrics(
    old_logprobs: ArrayLike,
    behavior_logprobs: ArrayLike,
    mask: jax.Array,
    denominators: LossDenominators,
    tis_cap: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Truncated importance weights and their metrics ``actor/tis_weight_mean``,
    ``actor/tis_clipfrac`` (the fraction of tokens whose ratio exceeded the cap: a ratio equal
    to it is not truncated)."""
    weights = truncated_importance_weights(old_logprobs, behavior_logprobs, tis_cap)
    truncated = _importance_ratio(old_logprobs, behavior_logprobs) > tis_cap
    metrics = {
        "actor/tis_weight_mean": masked_mean(weights, mask, denominators=denominators),
        "actor/tis_clipfrac": masked_mean(
            truncated.astype(jnp.float32), mask, denominators=denominators
        ),
    }
    return weights, metrics
