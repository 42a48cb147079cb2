"""Numerical utilities (advantage estimators)."""

from novarl_jax.core.utils.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageEstimator,
    GAEAdvantageEstimator,
    GRPOAdvantageEstimator,
    ReinforcePlusPlusAdvantageEstimator,
    RLOOAdvantageEstimator,
    discounted_returns,
    gae,
    group_relative_advantages,
    make_advantage_estimator,
    normalize_advantages,
    rloo_advantages,
    scores_to_token_rewards,
    sequence_scores,
)

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
