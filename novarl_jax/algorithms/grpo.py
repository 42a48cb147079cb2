"""GRPO: the clipped surrogate with group-relative advantages and a KL loss to the reference.

GRPO (Shao et al., 2024, "DeepSeekMath") drops PPO's critic: the advantages come from a group
of samples per prompt (:class:`~novarl_jax.core.utils.advantages.GRPOAdvantageEstimator`), and
the pull towards the reference policy is a loss term ``beta * KL`` (``k3`` in the paper) rather
than a reward penalty. Per token::

    L_t = max(-A rho_t, -A clip(rho_t, 1 - eps_low, 1 + eps_high)) + beta * KL_t

aggregated with one of the modes of :mod:`novarl_jax.algorithms.aggregation`. The variants
users know are settings of :class:`GRPOLossConfig`: DAPO (Yu et al., 2025) is
``clip_ratio_high=0.28, loss_agg_mode='token-mean', beta=0``; Dr. GRPO (Liu et al., 2025) is
``loss_agg_mode='seq-mean-token-sum-norm'`` with the ``'dr_grpo'`` estimator; GSPO (Zheng et
al., 2025) is ``importance_sampling_level='sequence'`` with its own clip range (``3e-4`` /
``4e-4``), ``beta=0`` and ``loss_agg_mode='seq-mean-token-mean'`` (the ``'gspo'`` preset of
:mod:`novarl_jax.algorithms.registry`); the sequence level alone, with the defaults'
``token-mean``, weights each sequence by its length, unlike the paper.

Example:
    >>> import jax.numpy as jnp
    >>> def apply_fn(params, batch):
    ...     return {"logprobs": params}
    >>> batch = {"response_mask": jnp.ones((2, 2)), "old_logprobs": jnp.zeros((2, 2)),
    ...          "ref_logprobs": jnp.zeros((2, 2)), "advantages": jnp.array([[1.0, 1.0],
    ...                                                                      [-1.0, -1.0]])}
    >>> loss, metrics = grpo_loss(jnp.zeros((2, 2)), batch, GRPOLossConfig(), apply_fn)
    >>> float(loss), float(metrics["actor/kl_loss"])
    (0.0, 0.0)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from novarl_jax.algorithms.common import (
    auxiliary_terms,
    check_non_negative,
    check_policy_fields,
    check_token_arrays,
    clipped_surrogate_loss,
    run_policy,
    tis_weights_and_metrics,
)

__all__ = ["IMPORTANCE_SAMPLING_LEVELS", "GRPOLossConfig", "grpo_loss", "sequence_log_ratio"]

ApplyFn = Callable[[Any, Mapping[str, Any]], Mapping[str, Any]]

IMPORTANCE_SAMPLING_LEVELS: tuple[str, ...] = ("token", "sequence")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOLossConfig:
    """Knobs of :func:`grpo_loss` (verl / TRL names in brackets).

    ``loss = pg_loss + beta * kl_loss - entropy_coef * entropy
    + moe_aux_loss_coef * moe_aux_loss + moe_z_loss_coef * moe_z_loss``.

    Attributes:
        clip_ratio_low: epsilon below 1 of the ratio clip (TRL ``epsilon``), in [0, 1).
        clip_ratio_high: epsilon above 1 (TRL ``epsilon_high``; DAPO's clip-higher uses 0.28).
            GSPO's sequence-level ratios want much smaller values (3e-4 / 4e-4 in the paper).
        dual_clip_c: dual-clip bound c > 1 for negative advantages (Ye et al., 2020), or None.
        importance_sampling_level: ``'token'`` ratios (GRPO) or one ``'sequence'`` ratio per
            response, the geometric mean of its token ratios (GSPO; TRL
            ``importance_sampling_level``), see :func:`sequence_log_ratio`.
        loss_agg_mode: token-loss aggregation (TRL ``loss_type``: ``'grpo'`` =
            ``'seq-mean-token-mean'``, ``'dapo'``/``'bnpo'`` = ``'token-mean'``,
            ``'dr_grpo'`` = ``'seq-mean-token-sum-norm'``).
        loss_scale_factor: the constant length S of ``'seq-mean-token-sum-norm'``; None = the
            padded T (set it to the maximum response length).
        beta: weight of the KL-to-reference loss (TRL ``beta``, verl ``kl_loss_coef``); 0 needs
            no reference model. The paper uses 0.04.
        kl_kind: the KL estimator of that loss (verl ``kl_loss_type``; the paper's is ``'k3'``).
        entropy_coef: weight of an entropy bonus.
        tis_cap: truncated importance-sampling cap against the sampler's log-probs, or None;
            needs ``batch['behavior_logprobs']``.
        moe_aux_loss_coef: weight of the router load-balancing loss.
        moe_z_loss_coef: weight of the router z-loss.
    """

    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.2
    dual_clip_c: float | None = None
    importance_sampling_level: str = "token"
    loss_agg_mode: str = "token-mean"
    loss_scale_factor: float | None = None
    beta: float = 0.04
    kl_kind: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    moe_aux_loss_coef: float = 0.0
    moe_z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        check_policy_fields(self)
        if self.importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
            raise ValueError(
                f"importance_sampling_level={self.importance_sampling_level!r} is not one of "
                f"{list(IMPORTANCE_SAMPLING_LEVELS)}"
            )
        check_non_negative("beta", self.beta)


def sequence_log_ratio(
    logprobs: ArrayLike, old_logprobs: ArrayLike, response_mask: ArrayLike
) -> jax.Array:
    """GSPO's sequence importance ratio, in log space, broadcast over the sequence's tokens.

    GSPO (Zheng et al., 2025, "Group Sequence Policy Optimization"):
    ``log s_i = (1 / |y_i|) * sum_t (log pi(y_{i,t}) - log pi_old(y_{i,t}))``, the log of the
    length-normalised sequence likelihood ratio; every token of response ``i`` gets ``log s_i``
    (its gradient flows to all the response's tokens). An empty row gets 0.

    Args:
        logprobs: ``[B, T]`` current log-probs.
        old_logprobs: ``[B, T]`` log-probs of the policy that collected the data.
        response_mask: ``[B, T]``; nonzero = a real generated token.

    Returns:
        ``[B, T]`` float32.

    Raises:
        ValueError: the three arrays are not of one ``[B, T]`` shape.
    """
    check_token_arrays(
        "response_mask",
        {"response_mask": response_mask, "logprobs": logprobs, "old_logprobs": old_logprobs},
    )
    valid = jnp.asarray(response_mask) != 0
    diff = jnp.where(
        valid, jnp.asarray(logprobs, jnp.float32) - jnp.asarray(old_logprobs, jnp.float32), 0.0
    )
    lengths = jnp.maximum(jnp.sum(valid, axis=1, dtype=jnp.float32), 1.0)
    per_sequence = jnp.sum(diff, axis=1) / lengths
    return jnp.broadcast_to(per_sequence[:, None], diff.shape)


def grpo_loss(
    params: Any,
    batch: Mapping[str, Any],
    config: GRPOLossConfig,
    apply_fn: ApplyFn,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The GRPO (or DAPO, Dr. GRPO, GSPO) loss of one (micro-)batch, pure in ``params``.

    See the module docstring for the formula and :class:`GRPOLossConfig` for the knobs; the
    ``apply_fn`` and batch contracts are in :mod:`novarl_jax.algorithms.common`. It reads the
    same batch keys as :func:`~novarl_jax.algorithms.ppo.ppo_loss` and ignores the critic's, so
    one rollout batch serves both.

    Args:
        params: the policy's parameter pytree (differentiated).
        batch: mapping with ``response_mask``, ``old_logprobs``, ``advantages``;
            ``ref_logprobs`` when ``beta > 0``; ``behavior_logprobs`` when ``tis_cap`` is set;
            optional ``loss_denominators``.
        config: :class:`GRPOLossConfig`.
        apply_fn: ``apply_fn(params, batch) -> {'logprobs', ['entropy', 'moe_aux_loss',
            'moe_z_loss']}``.

    Returns:
        ``(loss, metrics)``: float32 scalar and float32 scalar metrics ``actor/pg_loss``,
        ``actor/pg_clipfrac``, ``actor/pg_clipfrac_lower``, ``actor/ppo_kl``,
        ``actor/ratio_mean``, ``actor/ratio_max``, ``actor/kl_loss`` (when ``beta > 0``),
        ``actor/entropy`` (when returned), TIS and MoE metrics when used, and ``actor/loss``.

    Raises:
        ValueError: a missing batch key or ``apply_fn`` output, or token arrays of different
            shapes.
    """
    if not isinstance(config, GRPOLossConfig):
        raise ValueError(f"config must be a GRPOLossConfig, got {type(config).__name__}")
    needed = ("response_mask", "old_logprobs", "advantages")
    if config.tis_cap is not None:
        needed += ("behavior_logprobs",)
    batch, out, mask, denominators = run_policy(
        params, batch, apply_fn, needed, (), f"GRPO needs it with tis_cap={config.tis_cap}"
    )
    logprobs = jnp.asarray(out["logprobs"], jnp.float32)
    if config.importance_sampling_level == "sequence":
        log_ratio = sequence_log_ratio(logprobs, batch["old_logprobs"], mask)
    else:
        log_ratio = logprobs - jnp.asarray(batch["old_logprobs"], jnp.float32)
    weights, metrics = None, {}
    if config.tis_cap is not None:
        weights, metrics = tis_weights_and_metrics(
            batch["old_logprobs"], batch["behavior_logprobs"], mask, denominators, config.tis_cap
        )
    pg_loss, pg_metrics = clipped_surrogate_loss(
        log_ratio,
        batch["advantages"],
        mask,
        clip_ratio_low=config.clip_ratio_low,
        clip_ratio_high=config.clip_ratio_high,
        dual_clip_c=config.dual_clip_c,
        token_weights=weights,
        loss_agg_mode=config.loss_agg_mode,
        denominators=denominators,
        loss_scale_factor=config.loss_scale_factor,
    )
    metrics.update(pg_metrics)
    extra, extra_metrics = auxiliary_terms(
        out, batch, mask, denominators, config, config.beta, kl_field="beta"
    )
    total = pg_loss + extra
    metrics.update(extra_metrics)
    metrics["actor/loss"] = jax.lax.stop_gradient(total)
    return total, metrics
