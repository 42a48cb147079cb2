"""Algorithms by name: the loss function, its config preset and its advantage estimator.

A config names an algorithm; :func:`make_loss_fn` turns the name into
``loss_fn(params, batch, apply_fn) -> (loss, metrics)``, and :data:`ALGORITHMS` says which
advantage estimator (:func:`~novarl_jax.core.utils.advantages.make_advantage_estimator`) goes
with it. The rollout loop does not change with the algorithm; what each one reads does: PPO's
GAE estimator needs ``values`` from the forward and its loss ``returns`` and ``old_values`` in
the batch, GRPO's estimator a ``group_size`` (consecutive rows of one prompt) and no critic.
The trainer (``experiment.algorithm`` in a config) fills in both, so there the switch is a
change of this one name. These names are for the library; a config's ``experiment.algorithm``
takes ``'ppo'`` or ``'grpo'`` and reaches the others' settings through its keys.

==============  ==================  ========================================================
name            estimator           preset (on top of the config's defaults)
==============  ==================  ========================================================
``'ppo'``       ``'gae'``           :class:`~novarl_jax.algorithms.ppo.PPOLossConfig` defaults
``'grpo'``      ``'grpo'``          :class:`~novarl_jax.algorithms.grpo.GRPOLossConfig` defaults
``'dapo'``      ``'grpo'``          ``clip_ratio_high=0.28, beta=0, loss_agg_mode='token-mean'``
``'dr_grpo'``   ``'dr_grpo'``       ``beta=0, loss_agg_mode='seq-mean-token-sum-norm'``
``'gspo'``      ``'grpo'``          ``importance_sampling_level='sequence', clip_ratio_low=3e-4,
                                    clip_ratio_high=4e-4, beta=0,
                                    loss_agg_mode='seq-mean-token-mean'``
==============  ==================  ========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax

from novarl_jax.algorithms.grpo import GRPOLossConfig, grpo_loss
from novarl_jax.algorithms.ppo import PPOLossConfig, ppo_loss

__all__ = ["ALGORITHMS", "AlgorithmSpec", "LossFn", "make_loss_config", "make_loss_fn"]

LossFn = Callable[[Any, Mapping[str, Any], Callable[..., Any]], tuple[jax.Array, dict]]


class AlgorithmSpec(NamedTuple):
    """What an algorithm name stands for.

    Attributes:
        loss: ``loss(params, batch, config, apply_fn) -> (loss, metrics)``.
        config_cls: the loss's frozen config dataclass.
        preset: keyword overrides of the config's defaults that define the algorithm.
        advantage_estimator: the name of the advantage estimator it is used with.
    """

    loss: Callable[..., tuple[jax.Array, dict]]
    config_cls: type
    preset: Mapping[str, Any]
    advantage_estimator: str


ALGORITHMS: dict[str, AlgorithmSpec] = {
    "ppo": AlgorithmSpec(ppo_loss, PPOLossConfig, {}, "gae"),
    "grpo": AlgorithmSpec(grpo_loss, GRPOLossConfig, {}, "grpo"),
    "dapo": AlgorithmSpec(
        grpo_loss,
        GRPOLossConfig,
        {"clip_ratio_high": 0.28, "beta": 0.0, "loss_agg_mode": "token-mean"},
        "grpo",
    ),
    "dr_grpo": AlgorithmSpec(
        grpo_loss,
        GRPOLossConfig,
        {"beta": 0.0, "loss_agg_mode": "seq-mean-token-sum-norm"},
        "dr_grpo",
    ),
    "gspo": AlgorithmSpec(
        grpo_loss,
        GRPOLossConfig,
        {
            "importance_sampling_level": "sequence",
            "clip_ratio_low": 3e-4,
            "clip_ratio_high": 4e-4,
            "beta": 0.0,
            "loss_agg_mode": "seq-mean-token-mean",
        },
        "grpo",
    ),
}


def _spec(name: str) -> AlgorithmSpec:
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid names: {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def make_loss_config(name: str, **overrides: Any) -> PPOLossConfig | GRPOLossConfig:
    """The loss config of algorithm ``name``: its preset, then ``overrides``.

    Raises:
        ValueError: an unknown name or a field the config does not have (or an invalid value).

    Example:
        >>> make_loss_config("dapo").clip_ratio_high
        0.28
    """
    spec = _spec(name)
    fields = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(
            f"algorithm {name!r} ({spec.config_cls.__name__}) has no field(s) {unknown}; valid "
            f"fields: {sorted(fields)}"
        )
    return spec.config_cls(**{**spec.preset, **overrides})


def make_loss_fn(
    name: str, config: PPOLossConfig | GRPOLossConfig | None = None, **overrides: Any
) -> LossFn:
    """``loss_fn(params, batch, apply_fn) -> (loss, metrics)`` of algorithm ``name``.

    Args:
        name: a key of :data:`ALGORITHMS`.
        config: a ready config of the algorithm's config class; None builds one with
            :func:`make_loss_config` from the preset and ``overrides``.
        **overrides: config fields (only without ``config``).

    Raises:
        ValueError: an unknown name, a config of the wrong class, or bad overrides.

    Example:
        >>> import jax.numpy as jnp
        >>> loss_fn = make_loss_fn("grpo", beta=0.0)
        >>> batch = {"response_mask": jnp.ones((1, 2)), "old_logprobs": jnp.zeros((1, 2)),
        ...          "advantages": jnp.ones((1, 2))}
        >>> float(loss_fn(jnp.zeros((1, 2)), batch, lambda p, b: {"logprobs": p})[0])
        -1.0
    """
    spec = _spec(name)
    if config is None:
        config = make_loss_config(name, **overrides)
    elif overrides:
        raise ValueError("pass either a config or field overrides, not both")
    elif not isinstance(config, spec.config_cls):
        raise ValueError(
            f"algorithm {name!r} takes a {spec.config_cls.__name__}, got {type(config).__name__}"
        )
    loss = spec.loss

    def loss_fn(params, batch, apply_fn):
        return loss(params, batch, config, apply_fn)

    loss_fn.config = config  # type: ignore[attr-defined]
    return loss_fn
