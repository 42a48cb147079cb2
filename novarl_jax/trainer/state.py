"""The train state pytree and the optimizer built from config."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from novarl_jax.trainer.config import decay_updates

SCHEDULES = ("constant", "cosine", "linear")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training, as one pytree (what checkpoints hold).

    Attributes:
        params: ``{'policy': ...}`` (with the value head when the critic shares the trunk),
            plus ``'critic'`` for a separate PPO critic.
        opt_state: optax state of ``params``.
        step: optimizer updates applied so far (not counting skipped ones: non-finite, or
            without a valid response token).
        policy_version: version of ``params`` that rollouts record; bumped by every applied
            update.
        key: raw PRNG key data (uint32), the source of all later randomness.
    """

    params: Any
    opt_state: Any
    step: jax.Array
    policy_version: jax.Array
    key: jax.Array


def make_schedule(optim, *, default_decay_steps: int = 1) -> optax.Schedule:
    """Learning-rate schedule from the ``optim`` config section.

    'constant' (after linear warmup), 'cosine' (warmup then cosine decay to
    ``end_learning_rate`` over ``decay_steps``) or 'linear' (warmup then linear decay).
    ``decay_steps`` counts the updates after the warmup; 0 means the rest of the run,
    ``default_decay_steps`` (the run's number of updates) less ``warmup_steps``, so that the
    decay ends where the run does.
    """
    decay_steps = decay_updates(optim.decay_steps, default_decay_steps, optim.warmup_steps)
    warmup = optax.linear_schedule(0.0, optim.learning_rate, max(optim.warmup_steps, 1))
    if optim.schedule == "constant":
        after = optax.constant_schedule(optim.learning_rate)
    elif optim.schedule == "cosine":
        after = optax.cosine_decay_schedule(
            optim.learning_rate,
            decay_steps,
            optim.end_learning_rate / max(optim.learning_rate, 1e-30),
        )
    elif optim.schedule == "linear":
        after = optax.linear_schedule(optim.learning_rate, optim.end_learning_rate, decay_steps)
    else:
        raise ValueError(f"optim.schedule={optim.schedule!r} is not one of {list(SCHEDULES)}")
    if optim.warmup_steps <= 0:
        return after
    return optax.join_schedules([warmup, after], [optim.warmup_steps])


def _decays(path: tuple, param: Any) -> bool:
    """Whether weight decay applies: a matrix (or more) of one layer."""
    keys = [str(getattr(key, "key", "")) for key in path]
    if keys and (keys[-1] == "bias" or keys[-1].endswith("_bias")):
        return False
    return param.ndim - ("layers" in keys) >= 2


def make_optimizer(
    optim, *, default_decay_steps: int = 1, schedule: optax.Schedule | None = None
) -> optax.GradientTransformation:
    """Gradient clipping by each model's global norm, then AdamW on the configured schedule.

    The top-level entries of the parameters (``'policy'``, a separate ``'critic'``) are
    clipped each by its own norm, as verl clips its actor and critic (``actor.grad_clip``,
    ``critic.grad_clip``): the critic's value-loss gradient, often far larger, does not
    shrink the policy's update. Weight decay skips vectors (norm scales) and biases: only
    weights of rank >= 2 decay, a layer's rank counted without the leading axis that stacks
    the layers (every entry under a ``'layers'`` key), so each layer's norm scales are
    vectors like the final norm's; biases (entries named ``bias`` or ``*_bias``, such as
    Qwen2's ``[N, Dh]`` query bias) never decay.
    ``schedule``: the learning rate by update, when the caller has built it already
    (default: :func:`make_schedule` of ``optim`` and ``default_decay_steps``).
    """
    decay_mask = lambda params: jax.tree_util.tree_map_with_path(_decays, params)
    parts = []
    if optim.max_grad_norm > 0:
        parts.append(clip_each_model(optim.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule or make_schedule(optim, default_decay_steps=default_decay_steps),
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts)


def init_train_state(params, optimizer: optax.GradientTransformation, key: jax.Array) -> TrainState:
    """A fresh state at step 0, version 0. ``key`` may be a typed or a raw uint32 key."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        policy_version=jnp.zeros((), jnp.int32),
        key=key,
    )


def train_state_shardings(
    params: Any, optimizer: optax.GradientTransformation, key: jax.Array, replicated: Any
) -> TrainState | None:
    """Where :func:`init_train_state` of ``params`` (placed arrays) should put each entry:
    the parameters, and every optimizer entry shaped like them (Adam's moments), as the
    parameters are placed; the rest (counts, step, version, key) on ``replicated``.

    Without it the moments, zeros that do not depend on the parameters' values, would start
    whole on every device, and the first update would compile again for sharded ones. None
    when optax cannot match the optimizer's state to the parameters (XLA then places it).
    """
    placed = jax.tree.map(lambda x: x.sharding, params)
    abstract = jax.eval_shape(lambda p: init_train_state(p, optimizer, key), params)

    def like_param(entry: Any, sharding: Any, param: Any) -> Any:
        if isinstance(entry, optax.MaskedNode):  # a part optax.masked leaves out
            return entry
        # Same tree, other shapes (Adafactor's factored rows and columns): replicated.
        return sharding if entry.shape == param.shape else replicated

    try:
        opt_state = optax.tree_map_params(
            optimizer,
            like_param,
            abstract.opt_state,
            placed,
            params,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
    except Exception:  # noqa: BLE001 - optax cannot match this state to the parameters
        return None
    return TrainState(
        params=placed,
        opt_state=opt_state,
        step=replicated,
        policy_version=replicated,
        key=replicated,
    )


MODELS = ("policy", "critic")  # the top-level entries of a run's parameters


def _is_by_model(tree: Any) -> bool:
    """Whether ``tree`` is a run's ``{'policy': ..., ['critic': ...]}`` (else: one model)."""
    return isinstance(tree, dict) and bool(tree) and set(tree) <= set(MODELS)


def _models(tree: Any) -> dict[str, Any]:
    return dict(tree) if _is_by_model(tree) else {"policy": tree}


def model_grad_norms(grads: Any) -> dict[str, jax.Array]:
    """The global norm of each model's gradients (``'policy'``, and ``'critic'`` when the
    tree has a separate critic), by name."""
    return {name: optax.tree.norm(part) for name, part in _models(grads).items()}


def clip_each_model(max_norm: float) -> optax.GradientTransformation:
    """``optax.clip_by_global_norm`` applied to each model's gradients on its own (see
    :func:`model_grad_norms`); no state, as that transformation has none."""
    global_clip = optax.clip_by_global_norm(max_norm)

    def clip(part: Any) -> Any:
        return global_clip.update(part, optax.EmptyState())[0]

    def update(updates, state, params=None):
        del params
        if _is_by_model(updates):
            return {name: clip(part) for name, part in updates.items()}, state
        return clip(updates), state

    return optax.GradientTransformation(global_clip.init, update)
