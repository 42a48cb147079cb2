"""The pure, jitted pieces of a training iteration.

Everything here is a function of arrays: building the model's view of a rollout batch, the
``apply_fn`` the losses call, scoring a batch under the current/reference policies, shaping
rewards, advantages, and one optimizer update with gradient accumulation. The loop in
:mod:`novarl_jax.trainer.loop` strings them together and owns all side effects.

Parameter tree of a run: ``{'policy': <model params>}`` plus ``'critic'`` when PPO uses a
separate critic model. With a shared critic, the policy model has a value head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from novarl_jax.algorithms.aggregation import combine_micro_batch_metrics, split_micro_batches
from novarl_jax.algorithms.kl import kl_penalty_token_rewards
from novarl_jax.algorithms.logprobs import token_logprobs_and_entropy
from novarl_jax.core.sharding import batch_spec
from novarl_jax.models import forward, forward_shared_prompt
from novarl_jax.trainer.state import TrainState, model_grad_norms

# Keys of a training batch that are per-row arrays (sliced into minibatches).
ROW_KEYS = (
    "tokens",
    "attention_mask",
    "positions",
    "response_tokens",
    "response_mask",
    "old_logprobs",
    "ref_logprobs",
    "behavior_logprobs",
    "advantages",
    "returns",
    "old_values",
)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Static description of the networks a loss runs (hashable: a jit static argument).

    Attributes:
        policy: the policy's ModelConfig.
        critic: a separate critic's ModelConfig (with a value head), or None.
        prompt_length: P, the padded prompt length; response token t sits at P + t.
        router_replay: feed the rollout's expert choices into the training forward.
        num_microbatches: pipeline microbatches of each forward (used when pp > 1).
        prompt_group: > 1 when rows come in groups of this many samples of one prompt and
            the scoring forwards run each prompt once
            (:func:`~novarl_jax.models.shared_prompt.forward_shared_prompt`; see
            :func:`~novarl_jax.trainer.config.shared_prompt_group`).
        temperature: the log-probs and entropy are those of ``softmax(logits /
            temperature)``, the policy the rollouts sample from (as in verl and TRL): the
            rollout's temperature, or 1 for greedy rollouts.
    """

    policy: Any
    critic: Any = None
    prompt_length: int = 0
    router_replay: bool = False
    num_microbatches: int = 1
    prompt_group: int = 1
    temperature: float = 1.0


def model_inputs(trajectory: Any) -> dict[str, jax.Array]:
    """Token ids, mask and rotary positions of prompt + response, as the model reads them.

    Args:
        trajectory: a rollout :class:`~novarl_jax.rollout.engine.Trajectory`.

    Returns:
        dict with ``tokens``, ``attention_mask``, ``positions`` ([R, P+T] int32),
        ``response_tokens`` and ``response_mask`` ([R, T] int32).
    """
    tokens = jnp.concatenate([trajectory.prompt_tokens, trajectory.response_tokens], axis=1)
    mask = jnp.concatenate([trajectory.prompt_mask, trajectory.response_mask], axis=1)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0).astype(jnp.int32)
    return {
        "tokens": tokens.astype(jnp.int32),
        "attention_mask": mask.astype(jnp.int32),
        "positions": positions,
        "response_tokens": trajectory.response_tokens.astype(jnp.int32),
        "response_mask": trajectory.response_mask.astype(jnp.int32),
    }


def make_apply_fn(
    spec: ModelSpec, mesh: Any = None, *, share_prompts: bool = True
) -> Callable[[Any, Mapping], dict]:
    """``apply_fn(params, batch) -> {'logprobs', 'entropy', ['values'], 'moe_*'}``.

    Position ``t`` of every output is response token ``t``: the logits at prompt position
    ``P - 1 + t`` predict it, and the value is the critic's estimate at that same state.
    With ``share_prompts`` and ``spec.prompt_group > 1`` the batch's rows must come in
    groups of ``prompt_group`` samples of one prompt, and each prompt runs once
    (:func:`~novarl_jax.models.shared_prompt.forward_shared_prompt`).
    """
    p = spec.prompt_length

    # Pipeline microbatches for pp > 1 (the shared-prompt forward runs with pp = 1 only).
    shared = {"num_microbatches": spec.num_microbatches}
    fwd = forward
    if share_prompts and spec.prompt_group > 1:
        fwd, shared = forward_shared_prompt, {"prompt_length": p, "group_size": spec.prompt_group}

    def run(params, config, batch, routing=None):
        logits, _, aux = fwd(
            params,
            batch["tokens"],
            config,
            positions=batch["positions"],
            attention_mask=batch["attention_mask"],
            mesh=mesh,
            routing=routing,
            **shared,
        )
        return logits[:, p - 1 : -1], aux

    def apply_fn(params, batch):
        replay = batch.get("routing") if spec.router_replay else None
        logits, aux = run(params["policy"], spec.policy, batch, replay)
        logprobs, entropy = token_logprobs_and_entropy(
            logits, batch["response_tokens"], temperature=spec.temperature
        )
        out = {"logprobs": logprobs, "entropy": entropy}
        if spec.policy.num_local_experts:
            out["moe_aux_loss"] = aux["moe_aux_loss"]
            out["moe_z_loss"] = aux["moe_z_loss"]
            out["moe_dropped_fraction"] = aux["layer_dropped_fraction"]
            out["moe_expert_load"] = aux["expert_load"]
        if spec.critic is not None and "critic" in params:
            # (The reference policy's tree has no critic.) The critic routes its tokens
            # itself: replayed choices are the policy's. Its logits are unused, so XLA drops
            # its LM head from the program.
            _, critic_aux = run(params["critic"], spec.critic, batch)
            out["values"] = critic_aux["values"][:, p - 1 : -1]
            if spec.critic.num_local_experts:
                out["critic_moe_aux_loss"] = critic_aux["moe_aux_loss"]
                out["critic_moe_z_loss"] = critic_aux["moe_z_loss"]
        elif spec.policy.value_head:
            out["values"] = aux["values"][:, p - 1 : -1]
        return out

    return apply_fn


def score_batch(
    apply_fn, params, ref_params, batch: dict, *, need_ref: bool, need_policy: bool = True
) -> dict:
    """Old log-probs (and values) under ``params``, reference log-probs under ``ref_params``.

    Pure; jit it with ``apply_fn`` closed over. Gradients are stopped. With
    ``need_policy=False`` only the reference is scored (the loss takes its old log-probs
    from its own forward: :func:`on_policy_loss`).
    """
    scored = {}
    if need_policy:
        out = apply_fn(jax.lax.stop_gradient(params), batch)
        scored = {"old_logprobs": out["logprobs"], "entropy": out["entropy"]}
        if "values" in out:
            scored["old_values"] = out["values"]
        for name in ("moe_dropped_fraction", "moe_expert_load"):
            if name in out:
                scored[name] = out[name]
    if need_ref:
        scored["ref_logprobs"] = apply_fn(jax.lax.stop_gradient(ref_params), batch)["logprobs"]
    return scored


def moe_stats(dropped_fraction: jax.Array, expert_load: jax.Array) -> dict[str, jax.Array]:
    """Logged MoE routing statistics of one forward: dropped fraction and expert loads.

    Args:
        dropped_fraction: [L] float32, each layer's dropped fraction in the forward.
        expert_load: [L, E] float32, each layer's share of the routed choices per expert.

    Returns:
        ``moe/dropped_fraction`` (the mean over layers), ``moe/expert_load_max``,
        ``moe/expert_load_min``, and ``moe/layer{l}/load_max`` and
        ``moe/layer{l}/dropped_fraction`` for every layer, float32 scalars.
    """
    load = jnp.asarray(expert_load, jnp.float32)
    load = load.reshape(load.shape[0], -1)
    dropped = jnp.asarray(dropped_fraction, jnp.float32).reshape(load.shape[0])
    stats = {
        "moe/dropped_fraction": jnp.mean(dropped),
        "moe/expert_load_max": jnp.max(load),
        "moe/expert_load_min": jnp.min(load),
    }
    for layer in range(load.shape[0]):
        stats[f"moe/layer{layer}/load_max"] = jnp.max(load[layer])
        stats[f"moe/layer{layer}/dropped_fraction"] = dropped[layer]
    return stats


def on_policy_loss(loss_fn: Callable, *, micro_batches: int) -> Callable:
    """``loss_fn`` with the old log-probs taken from its own forward, gradient stopped.

    When each rollout batch gets exactly one optimizer step (one epoch, one minibatch), the
    parameters that would score the batch are the ones being differentiated, so
    ``old_logprobs = stop_gradient(logprobs)`` is exactly the recomputed value: the ratio is
    1 in the forward and its gradient is the policy gradient. This saves one forward of the
    policy over the batch per step (TRL's GRPO does the same when it takes one step per
    generation batch). The MoE routing statistics that scoring would have logged come from
    this forward instead: dropped fractions as the mean over the ``micro_batches``
    micro-batches (each carries ``1 / micro_batches`` of it, and micro-batch metrics are
    summed), loads as the maximum / minimum over them.

    Args:
        loss_fn: ``loss_fn(params, batch, apply_fn) -> (loss, metrics)`` reading
            ``batch['old_logprobs']`` (the PPO and GRPO losses).
        micro_batches: micro-batches per optimizer step.

    Returns:
        A loss with the same signature that ignores ``batch['old_logprobs']``.
    """

    def loss(params, batch, apply_fn):
        out = apply_fn(params, batch)
        batch = {**batch, "old_logprobs": jax.lax.stop_gradient(out["logprobs"])}
        value, metrics = loss_fn(params, batch, lambda p, b: out)
        metrics = dict(metrics)
        if "moe_dropped_fraction" in out:
            stats = moe_stats(
                jax.lax.stop_gradient(out["moe_dropped_fraction"]),
                jax.lax.stop_gradient(out["moe_expert_load"]),
            )
            for name in stats:  # summed over the micro-batches, as a mean
                if name.endswith("dropped_fraction"):
                    stats[name] = stats[name] / micro_batches
            metrics.update(stats)
        return value, metrics

    return loss


def shaped_rewards(
    rewards: jax.Array,
    response_mask: jax.Array,
    *,
    max_new_tokens: int,
    overlong_buffer: int,
    overlong_penalty: float,
) -> jax.Array:
    """DAPO's soft overlong punishment (Yu et al., 2025), added to the sequence rewards.

    With ``L`` the response length, ``L_max = max_new_tokens`` and buffer ``b``:
    ``penalty = 0`` for ``L <= L_max - b``, ``((L_max - b) - L) / b * overlong_penalty`` for
    ``L_max - b < L <= L_max`` (reaching ``-overlong_penalty`` at ``L_max``).
    """
    if overlong_buffer <= 0:
        return rewards
    length = response_mask.sum(axis=1).astype(jnp.float32)
    start = max_new_tokens - overlong_buffer
    penalty = jnp.minimum((start - length) / overlong_buffer, 0.0) * overlong_penalty
    return rewards + penalty


def reward_kl_token_rewards(batch: dict, *, kl_coef: float, kind: str) -> jax.Array:
    """InstructGPT's per-token KL penalty against the reference, for PPO's token rewards."""
    return kl_penalty_token_rewards(
        batch["old_logprobs"],
        batch["ref_logprobs"],
        batch["response_mask"],
        kl_coef=kl_coef,
        kind=kind,
    )


def row_sharding(x: Any, mesh: Any) -> jax.sharding.NamedSharding:
    """Sharding of an array whose leading (row) dimension is split over ('dp', 'ep')."""
    return jax.sharding.NamedSharding(mesh, batch_spec(x.ndim, mesh, batch_size=x.shape[0]))


def constrain_rows(tree: Any, mesh: Any) -> Any:
    """Shards every array's leading (row) dimension over ('dp', 'ep'), inside jit."""
    if mesh is None:
        return tree

    def put(x):
        if x.ndim == 0:  # per-micro-batch scalars (the global loss denominators)
            return x
        return jax.lax.with_sharding_constraint(x, row_sharding(x, mesh))

    return jax.tree.map(put, tree)


def make_update_step(
    loss_fn: Callable,
    apply_fn: Callable,
    optimizer: optax.GradientTransformation,
    *,
    micro_batches: int,
    mesh: Any = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """One optimizer step on a minibatch: accumulate micro-batch gradients, clip, AdamW.

    The micro-batches carry the minibatch's global loss denominators
    (:func:`~novarl_jax.algorithms.aggregation.split_micro_batches`), so the summed
    gradient equals the whole minibatch's gradient however it is split. A non-finite loss
    or gradient norm leaves the state unchanged (``metrics['train/skipped'] = 1``); so does
    a minibatch without a valid response token (its gradient is zero, but AdamW's momentum
    would still move the parameters, and the step count and schedule would advance).

    Returns:
        ``update(state, minibatch) -> (state, metrics)``, not yet jitted.
    """

    def update(state: TrainState, minibatch: dict) -> tuple[TrainState, dict]:
        micro = split_micro_batches(minibatch, micro_batches)
        grad_fn = jax.value_and_grad(lambda p, b: loss_fn(p, b, apply_fn), has_aux=True)

        def body(acc, mb):
            mb = constrain_rows(mb, mesh)
            (loss, metrics), grads = grad_fn(state.params, mb)
            return jax.tree.map(jnp.add, acc, grads), (loss, metrics)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metrics) = jax.lax.scan(body, zeros, micro)
        loss = losses.sum()
        metrics = combine_micro_batch_metrics(metrics)
        norms = model_grad_norms(grads)  # each model's, as it is clipped
        finite = jnp.isfinite(loss)
        for norm in norms.values():
            finite &= jnp.isfinite(norm)
        applied = finite & jnp.any(minibatch["response_mask"] != 0)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)
        step = applied.astype(jnp.int32)
        new_state = state.replace(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + step,
            policy_version=state.policy_version + step,
        )
        metrics = dict(metrics)
        metrics["actor/grad_norm"] = norms["policy"]
        if "critic" in norms:
            metrics["critic/grad_norm"] = norms["critic"]
        metrics["train/skipped"] = 1.0 - finite.astype(jnp.float32)
        metrics["train/loss"] = loss
        return new_state, metrics

    return update
