"""Policy-optimisation losses as pure functions of ``(params, batch)``.

The public API is exactly what this module re-exports: the PPO and GRPO losses and their
configs, the algorithm registry, token-loss aggregation (micro-batch and shard invariant), KL
estimators, and the log-prob/entropy helper the trainer uses to build ``apply_fn``.
"""

from novarl_jax.algorithms.aggregation import (
    LOSS_AGG_MODES,
    LossDenominators,
    aggregate,
    combine_micro_batch_metrics,
    loss_denominators,
    masked_max,
    masked_mean,
    split_micro_batches,
)
from novarl_jax.algorithms.common import clipped_surrogate_loss, truncated_importance_weights
from novarl_jax.algorithms.grpo import (
    IMPORTANCE_SAMPLING_LEVELS,
    GRPOLossConfig,
    grpo_loss,
    sequence_log_ratio,
)
from novarl_jax.algorithms.kl import (
    KL_KINDS,
    adaptive_kl_coef,
    kl_penalty,
    kl_penalty_token_rewards,
)
from novarl_jax.algorithms.logprobs import entropy_from_logits, token_logprobs_and_entropy
from novarl_jax.algorithms.ppo import PPOLossConfig, ppo_loss, ppo_policy_loss, value_loss
from novarl_jax.algorithms.registry import (
    ALGORITHMS,
    AlgorithmSpec,
    LossFn,
    make_loss_config,
    make_loss_fn,
)

__all__ = [
    "ALGORITHMS",
    "IMPORTANCE_SAMPLING_LEVELS",
    "KL_KINDS",
    "LOSS_AGG_MODES",
    "AlgorithmSpec",
    "GRPOLossConfig",
    "LossDenominators",
    "LossFn",
    "PPOLossConfig",
    "adaptive_kl_coef",
    "aggregate",
    "clipped_surrogate_loss",
    "combine_micro_batch_metrics",
    "entropy_from_logits",
    "grpo_loss",
    "kl_penalty",
    "kl_penalty_token_rewards",
    "loss_denominators",
    "make_loss_config",
    "make_loss_fn",
    "masked_max",
    "masked_mean",
    "ppo_loss",
    "ppo_policy_loss",
    "sequence_log_ratio",
    "split_micro_batches",
    "token_logprobs_and_entropy",
    "truncated_importance_weights",
    "value_loss",
]
