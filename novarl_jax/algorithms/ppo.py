"""PPO: the clipped policy loss, the clipped value loss, and the composed loss of (params, batch).

PPO (Schulman et al., 2017, "Proximal Policy Optimization Algorithms") for language models, as
in InstructGPT and verl/TRL/OpenRLHF: token-level ratios against the policy that collected the
data, GAE advantages from a critic, and a regression of the critic on the lambda-returns. Every
function is pure and jittable; :func:`ppo_loss` differentiates in ``params`` only.

Example:
    >>> import jax, jax.numpy as jnp
    >>> def apply_fn(params, batch):   # a policy with one free log-prob per token
    ...     return {"logprobs": params["logp"], "values": params["v"]}
    >>> params = {"logp": jnp.full((2, 3), -1.0), "v": jnp.zeros((2, 3))}
    >>> batch = {"response_mask": jnp.ones((2, 3)), "old_logprobs": jnp.full((2, 3), -1.0),
    ...          "advantages": jnp.ones((2, 3)), "returns": jnp.ones((2, 3)),
    ...          "old_values": jnp.zeros((2, 3))}
    >>> loss, metrics = ppo_loss(params, batch, PPOLossConfig(), apply_fn)
    >>> round(float(loss), 4), float(metrics["critic/vf_loss"])
    (-0.75, 0.5)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from novarl_jax.algorithms.aggregation import (
    LossDenominators,
    aggregate,
    check_loss_agg_mode,
    loss_denominators,
    masked_mean,
)
from novarl_jax.algorithms.common import (
    auxiliary_terms,
    check_non_negative,
    check_policy_fields,
    check_token_arrays,
    clipped_surrogate_loss,
    is_number,
    run_policy,
    tis_weights_and_metrics,
    zero_masked,
)

__all__ = ["PPOLossConfig", "ppo_loss", "ppo_policy_loss", "value_loss"]

ApplyFn = Callable[[Any, Mapping[str, Any]], Mapping[str, Any]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOLossConfig:
    """Knobs of :func:`ppo_loss` (verl / TRL / OpenRLHF names in brackets).

    ``loss = pg_loss + vf_coef * vf_loss - entropy_coef * entropy + kl_coef * kl_loss
    + moe_aux_loss_coef * moe_aux_loss + moe_z_loss_coef * moe_z_loss``.

    Attributes:
        clip_ratio_low: epsilon below 1 of the ratio clip (verl ``clip_ratio_low``, TRL
            ``cliprange``), in [0, 1).
        clip_ratio_high: epsilon above 1; larger than ``clip_ratio_low`` is DAPO's clip-higher
            (Yu et al., 2025) (verl ``clip_ratio_high``).
        dual_clip_c: dual-clip bound c > 1 for negative advantages (Ye et al., 2020) or None
            (verl ``clip_ratio_c``, 3.0 there).
        loss_agg_mode: token-loss aggregation of the policy, entropy and KL terms
            (:mod:`novarl_jax.algorithms.aggregation`; verl ``loss_agg_mode``).
        loss_scale_factor: the constant length S of ``'seq-mean-token-sum-norm'``; None = the
            padded T (set it to the maximum response length).
        vf_coef: weight of the value loss (TRL ``vf_coef``); 0 trains no critic.
        value_clip_range: clip of the new value around the old one, or None (verl
            ``cliprange_value``, TRL ``cliprange_value``, OpenRLHF ``value_clip``).
        value_loss_agg_mode: aggregation of the value loss.
        entropy_coef: weight of the entropy bonus (verl ``entropy_coeff``).
        kl_coef: weight of a KL-to-reference loss term (verl ``use_kl_loss`` +
            ``kl_loss_coef``); 0 = off. The InstructGPT alternative is a KL penalty in the
            token rewards (:func:`~novarl_jax.algorithms.kl.kl_penalty_token_rewards`).
        kl_kind: estimator of that KL term (verl ``kl_loss_type``).
        tis_cap: truncated importance-sampling cap against the sampler's log-probs, or None
            (verl ``tis_imp_ratio_cap``); needs ``batch['behavior_logprobs']``.
        moe_aux_loss_coef: weight of the router load-balancing loss (set it from the model's
            ``router_aux_loss_coef``); a separate MoE critic's routers take it too.
        moe_z_loss_coef: weight of the router z-loss (the critic's too).
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip_c: float | None = None
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None
    vf_coef: float = 0.5
    value_clip_range: float | None = 0.2
    value_loss_agg_mode: str = "token-mean"
    entropy_coef: float = 0.0
    kl_coef: float = 0.0
    kl_kind: str = "low_var_kl"
    tis_cap: float | None = None
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        check_policy_fields(self)
        check_non_negative("vf_coef", self.vf_coef)
        if self.value_clip_range is not None:
            check_non_negative("value_clip_range", self.value_clip_range)
        check_loss_agg_mode(self.value_loss_agg_mode, "value_loss_agg_mode")
        check_non_negative("kl_coef", self.kl_coef)


def ppo_policy_loss(
    logprobs: ArrayLike,
    old_logprobs: ArrayLike,
    advantages: ArrayLike,
    response_mask: ArrayLike,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.2,
    dual_clip_c: float | None = None,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    loss_scale_factor: float | None = None,
    behavior_logprobs: ArrayLike | None = None,
    tis_cap: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO's clipped policy-gradient loss with token-level ratios.

    ``rho_t = exp(logprobs_t - old_logprobs_t)`` and
    ``L_t = max(-A_t rho_t, -A_t clip(rho_t, 1 - clip_ratio_low, 1 + clip_ratio_high))``,
    optionally dual-clipped and weighted by truncated importance weights; see
    :func:`~novarl_jax.algorithms.common.clipped_surrogate_loss` for the formulas.

    Args:
        logprobs: ``[B, T]`` current policy log-probs of the sampled tokens (differentiable).
        old_logprobs: ``[B, T]`` log-probs under the policy that collected the data.
        advantages: ``[B, T]``.
        response_mask: ``[B, T]``; nonzero = a real generated token.
        clip_ratio_low: epsilon below 1, in [0, 1).
        clip_ratio_high: epsilon above 1 (clip-higher when larger than ``clip_ratio_low``).
        dual_clip_c: dual-clip bound c > 1, or None.
        loss_agg_mode: aggregation mode.
        denominators: the mini-batch's global counts, or None for this batch's.
        loss_scale_factor: ``S`` of ``'seq-mean-token-sum-norm'``.
        behavior_logprobs: ``[B, T]`` the sampler's log-probs, for truncated importance
            sampling; used only with ``tis_cap``.
        tis_cap: truncation C of the importance weights ``min(exp(old - behavior), C)``.

    Returns:
        ``(loss, metrics)``: float32 scalar; ``actor/pg_loss``, ``actor/pg_clipfrac``,
        ``actor/pg_clipfrac_lower``, ``actor/ppo_kl``, ``actor/ratio_mean``,
        ``actor/ratio_max`` (and ``actor/tis_weight_mean``, ``actor/tis_clipfrac`` with TIS).

    Raises:
        ValueError: arrays that are not one ``[B, T]`` shape; ``tis_cap`` without
            ``behavior_logprobs``.

    Example:
        >>> loss, m = ppo_policy_loss(jnp.log(jnp.array([[1.5]])), jnp.zeros((1, 1)),
        ...                           jnp.ones((1, 1)), jnp.ones((1, 1)))
        >>> round(float(loss), 4), float(m["actor/pg_clipfrac"])
        (-1.2, 1.0)
    """
    arrays = {
        "logprobs": logprobs,
        "old_logprobs": old_logprobs,
        "advantages": advantages,
        "response_mask": response_mask,
    }
    if tis_cap is not None:
        if behavior_logprobs is None:
            raise ValueError(f"tis_cap={tis_cap} needs behavior_logprobs [B, T]")
        arrays["behavior_logprobs"] = behavior_logprobs
    check_token_arrays("response_mask", arrays)
    mask = jnp.asarray(response_mask)
    if denominators is None:
        denominators = loss_denominators(mask)
    log_ratio = jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32)
    weights, tis_metrics = None, {}
    if tis_cap is not None:
        weights, tis_metrics = tis_weights_and_metrics(
            old_logprobs, behavior_logprobs, mask, denominators, tis_cap
        )
    loss, metrics = clipped_surrogate_loss(
        log_ratio,
        advantages,
        mask,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        dual_clip_c=dual_clip_c,
        token_weights=weights,
        loss_agg_mode=loss_agg_mode,
        denominators=denominators,
        loss_scale_factor=loss_scale_factor,
    )
    return loss, {**metrics, **tis_metrics}


def value_loss(
    values: ArrayLike,
    old_values: ArrayLike,
    returns: ArrayLike,
    response_mask: ArrayLike,
    *,
    clip_range: float | None = None,
    loss_agg_mode: str = "token-mean",
    denominators: LossDenominators | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The critic's (optionally clipped) squared error against the returns.

    ``L_t = 0.5 * (V_t - R_t) ** 2``, or with ``clip_range`` eps (the PPO2 value clipping of
    OpenAI baselines, used by verl, TRL and OpenRLHF)::

        L_t = 0.5 * max((V_t - R_t) ** 2, (clip(V_t, V_old - eps, V_old + eps) - R_t) ** 2)

    Args:
        values: ``[B, T]`` current critic values (differentiable).
        old_values: ``[B, T]`` values at rollout time.
        returns: ``[B, T]`` regression targets (GAE's lambda-returns).
        response_mask: ``[B, T]``; nonzero = a real generated token.
        clip_range: eps >= 0, or None for no clipping.
        loss_agg_mode: aggregation mode.
        denominators: the mini-batch's global counts, or None for this batch's.
        loss_scale_factor: ``S`` of ``'seq-mean-token-sum-norm'``.

    Returns:
        ``(loss, metrics)``: float32 scalar; ``critic/vf_loss``, ``critic/vf_clipfrac`` (the
        fraction of tokens where the clipped error is the larger), ``critic/vpred_mean``.

    Example:
        >>> loss, m = value_loss(jnp.array([[2.0]]), jnp.array([[0.0]]), jnp.array([[0.0]]),
        ...                      jnp.ones((1, 1)), clip_range=0.5)
        >>> float(loss), float(m["critic/vf_clipfrac"])
        (2.0, 0.0)
    """
    check_token_arrays(
        "response_mask",
        {
            "values": values,
            "old_values": old_values,
            "returns": returns,
            "response_mask": response_mask,
        },
    )
    if clip_range is not None and not (is_number(clip_range) and clip_range >= 0):
        raise ValueError(f"clip_range must be a number >= 0 or None, got {clip_range!r}")
    mask = jnp.asarray(response_mask)
    values = zero_masked(values, mask)
    old_values = zero_masked(old_values, mask)
    returns = zero_masked(returns, mask)
    loss_mat = jnp.square(values - returns)
    if clip_range is not None:
        delta = values - old_values
        # Values inside the range are used as they are: old + (v - old) can round away from v,
        # and that rounding would count as clipping (and move with the layout).
        clipped_values = jnp.where(
            jnp.abs(delta) > clip_range,
            old_values + jnp.clip(delta, -clip_range, clip_range),
            values,
        )
        clipped_mat = jnp.square(clipped_values - returns)
        clip_active = clipped_mat > loss_mat
        loss_mat = jnp.maximum(loss_mat, clipped_mat)
    else:
        clip_active = jnp.zeros(loss_mat.shape, bool)
    loss = 0.5 * aggregate(
        loss_mat,
        mask,
        loss_agg_mode,
        denominators=denominators,
        loss_scale_factor=loss_scale_factor,
    )

    def mean(x):
        return masked_mean(jax.lax.stop_gradient(x), mask, denominators=denominators)

    metrics = {
        "critic/vf_loss": jax.lax.stop_gradient(loss),
        "critic/vf_clipfrac": mean(clip_active.astype(jnp.float32)),
        "critic/vpred_mean": mean(values),
    }
    return loss, metrics


def ppo_loss(
    params: Any,
    batch: Mapping[str, Any],
    config: PPOLossConfig,
    apply_fn: ApplyFn,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full PPO loss of one (micro-)batch, pure in ``params``.

    ``loss = pg_loss + vf_coef * vf_loss - entropy_coef * H + kl_coef * KL
    + moe_aux_loss_coef * aux + moe_z_loss_coef * z`` (see :class:`PPOLossConfig`). The
    ``apply_fn`` and batch contracts are in :mod:`novarl_jax.algorithms.common`. With
    ``batch['loss_denominators']`` from
    :func:`~novarl_jax.algorithms.aggregation.split_micro_batches`, the losses and metrics of
    the micro-batches of one mini-batch add up to the mini-batch's.

    Args:
        params: the policy's parameter pytree (differentiated).
        batch: mapping with ``response_mask``, ``old_logprobs``, ``advantages``; ``returns``
            and ``old_values`` when ``vf_coef > 0``; ``ref_logprobs`` when ``kl_coef > 0``;
            ``behavior_logprobs`` when ``tis_cap`` is set; optional ``loss_denominators``.
        config: :class:`PPOLossConfig`.
        apply_fn: ``apply_fn(params, batch) -> {'logprobs', ['values', 'entropy',
            'moe_aux_loss', 'moe_z_loss', 'critic_moe_aux_loss', 'critic_moe_z_loss']}``.

    Returns:
        ``(loss, metrics)``: float32 scalar and a dict of float32 scalars (the policy metrics of
        :func:`ppo_policy_loss`, the critic metrics of :func:`value_loss`, ``actor/entropy``,
        ``actor/kl_loss``, ``actor/moe_aux_loss``, ``actor/moe_z_loss``,
        ``critic/moe_aux_loss``, ``critic/moe_z_loss`` when present, and ``actor/loss``, the
        total).

    Raises:
        ValueError: a missing batch key or ``apply_fn`` output the config needs, or token
            arrays of different shapes.
    """
    if not isinstance(config, PPOLossConfig):
        raise ValueError(f"config must be a PPOLossConfig, got {type(config).__name__}")
    needed = ("response_mask", "old_logprobs", "advantages")
    if config.vf_coef:
        needed += ("returns", "old_values")
    if config.tis_cap is not None:
        needed += ("behavior_logprobs",)
    batch, out, mask, denominators = run_policy(
        params,
        batch,
        apply_fn,
        needed,
        ("values",) if config.vf_coef else (),
        f"PPO needs it with vf_coef={config.vf_coef}, tis_cap={config.tis_cap}",
    )
    pg_loss, metrics = ppo_policy_loss(
        out["logprobs"],
        batch["old_logprobs"],
        batch["advantages"],
        mask,
        clip_ratio_low=config.clip_ratio_low,
        clip_ratio_high=config.clip_ratio_high,
        dual_clip_c=config.dual_clip_c,
        loss_agg_mode=config.loss_agg_mode,
        denominators=denominators,
        loss_scale_factor=config.loss_scale_factor,
        behavior_logprobs=batch.get("behavior_logprobs"),
        tis_cap=config.tis_cap,
    )
    total = pg_loss
    if config.vf_coef:
        vf_loss, vf_metrics = value_loss(
            out["values"],
            batch["old_values"],
            batch["returns"],
            mask,
            clip_range=config.value_clip_range,
            loss_agg_mode=config.value_loss_agg_mode,
            denominators=denominators,
            loss_scale_factor=config.loss_scale_factor,
        )
        total = total + config.vf_coef * vf_loss
        metrics.update(vf_metrics)
    extra, extra_metrics = auxiliary_terms(out, batch, mask, denominators, config, config.kl_coef)
    total = total + extra
    metrics.update(extra_metrics)
    metrics["actor/loss"] = jax.lax.stop_gradient(total)
    return total, metrics
