"""The synchronous training loop: rollout -> score -> advantages -> updates -> log/save.

All randomness of iteration ``i`` comes from ``fold_in(state.key, i)`` (the state's key is
split from ``key(experiment.seed)`` at the start, and again at a resume that was allowed
another seed; a run resumed here after training asynchronously goes on from the rollout index
its checkpoint records, past the keys its rollouts used), the task's position is
checkpointed, and
every step is a deterministic jitted program, so a run of 2N steps and a run of N steps +
restart + N steps give the same parameters and metrics.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from novarl_jax.algorithms.aggregation import extreme_of
from novarl_jax.core.distributed import MESH_AXES, host_array
from novarl_jax.rollout.chat import RenderError
from novarl_jax.rollout.engine import EmptyPromptError, check_prompt_rows, take_info
from novarl_jax.rollout.tokenizers import TextTooLongError, UnencodableTextError
from novarl_jax.trainer import steps
from novarl_jax.trainer.build import Run, build_run
from novarl_jax.trainer.checkpoint import Checkpointer, CheckpointMismatchError
from novarl_jax.trainer.config import (
    ConfigError,
    RunSpec,
    ignored_settings,
    prompt_too_long,
    prompt_unrenderable,
    updates_per_step,
    updates_share_prompts,
    validate_config,
)
from novarl_jax.trainer.evaluate import Evaluator
from novarl_jax.trainer.metrics import METRICS_FILE, JsonLines, MetricsWriter, read_metrics
from novarl_jax.trainer.samples import FILE_NAME as SAMPLES_FILE
from novarl_jax.trainer.samples import sample_rows
from novarl_jax.trainer.saved_config import (
    allowed_changes_note,
    check_start_config,
    may_change,
    model_changes,
    write_config,
)
from novarl_jax.trainer.state import TrainState, init_train_state, train_state_shardings
from novarl_jax.trainer.stop import StopRequested, StopWatch
from novarl_jax.trainer.workdir import (
    LockUnsupported,
    foreign_config,
    lock_workdir,
    release,
    remove_token,
    sees_token,
    url_path,
    write_token,
)


class TrainingError(RuntimeError):
    """Training cannot go on (for example too many non-finite updates in a row)."""


def _rows(tree: Any, index: Any) -> Any:
    return jax.tree.map(lambda x: x[index], tree)


def _routing_rows_first(routing: Any) -> Any:
    # The model stacks routing over layers first; rows must lead for minibatch slicing.
    return None if routing is None else jax.tree.map(lambda x: jnp.moveaxis(x, 1, 0), routing)


def takes_old_logprobs_from_update(config: Any, run: Run) -> bool:
    """Whether the loss's own forward gives the old log-probs (no policy scoring forward).

    True when each rollout batch gets one optimizer step (``train.epochs == 1`` and
    ``train.minibatches == 1``) and nothing else needs the policy's scores before the update:
    no critic values for GAE and no KL-in-reward (which reads the old log-probs). See
    :func:`~novarl_jax.trainer.steps.on_policy_loss`.
    """
    return (
        config.train.epochs == 1
        and config.train.minibatches == 1
        and run.model.critic is None
        and not run.model.policy.value_head
        and run.reward_kl[0] == 0
    )


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(params key, loop key)`` of a run: the loop key becomes ``TrainState.key``."""
    k_params, k_loop = jax.random.split(jax.random.key(seed))
    return k_params, k_loop


def iteration_keys(loop_key: jax.Array, i: int) -> tuple[jax.Array, jax.Array]:
    """``(rollout key, minibatch-order key)`` of iteration ``i``."""
    k_rollout, k_perm = jax.random.split(jax.random.fold_in(loop_key, i))
    return k_rollout, k_perm


def minibatch_order(key: jax.Array, rows: int, minibatches: int) -> jax.Array:
    """The rows of an epoch in minibatch order: a random permutation of the rows, or the
    rollout order when the epoch is one minibatch (its micro-batches then hold whole groups
    of samples, which the shared-prompt forward needs; the summed gradient is the same).
    """
    if minibatches == 1:
        return jnp.arange(rows)
    return jax.random.permutation(key, rows)


def check_shared_prompts(batch: Mapping[str, Any], prompt_length: int, group: int) -> None:
    """Raises RuntimeError unless every group of ``group`` consecutive rows has one prompt.

    The shared-prompt forward reads only each group's first row of the prompt, so a batch
    whose groups differ there would be trained on the wrong prompts.
    """
    if group == 1:
        return
    for name in ("tokens", "attention_mask", "positions"):
        prompt = host_array(batch[name])[:, :prompt_length]
        grouped = prompt.reshape(-1, group, prompt_length)
        if not (grouped == grouped[:, :1]).all():
            bad = int(np.flatnonzero((grouped != grouped[:, :1]).any(axis=(1, 2)))[0])
            raise RuntimeError(
                f"rows {bad * group}..{(bad + 1) * group - 1} of the training batch are one "
                f"group but their prompt {name} differ; the shared-prompt forward needs each "
                "group's samples to share one prompt (set train.share_prompts=False to run "
                "every row's prompt)"
            )


class Trainer:
    """Holds the compiled steps of one run; :meth:`iteration` runs one training iteration
    (:func:`train` calls it up to ``experiment.steps``)."""

    def __init__(self, run: Run, workdir: str, mesh: Any = None):
        self.run_ = run
        self.workdir = workdir
        self.mesh = mesh
        config = run.spec.config
        self.config = config
        self.engine = run.rollout_engine(mesh)

        def make_apply_fn(share_prompts: bool):
            apply_fn = steps.make_apply_fn(run.model, mesh, share_prompts=share_prompts)
            if not run.model.router_replay:
                return apply_fn

            def replaying(params, batch):  # routing travels rows-first, the model wants L first
                routing = jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1), batch["routing"])
                return apply_fn(params, {**batch, "routing": routing})

            return replaying

        # Scoring sees whole batches, whose rows keep their groups; the update's minibatch
        # rows keep them only with one minibatch per epoch.
        apply_fn = make_apply_fn(True)
        update_apply_fn = make_apply_fn(updates_share_prompts(config, run.spec.layout.pp))
        self.apply_fn = apply_fn
        self.on_policy = takes_old_logprobs_from_update(config, run)
        loss_fn = run.loss_fn
        if self.on_policy:
            loss_fn = steps.on_policy_loss(loss_fn, micro_batches=config.train.micro_batches)
        self._score = jax.jit(
            lambda p, r, b: steps.score_batch(
                apply_fn, p, r, b, need_ref=run.needs_reference, need_policy=not self.on_policy
            )
        )
        self._advantages = jax.jit(run.estimator)
        update = steps.make_update_step(
            loss_fn,
            update_apply_fn,
            run.optimizer,
            micro_batches=config.train.micro_batches,
            mesh=mesh,
        )
        self._update = jax.jit(
            lambda state, batch, index: update(state, _rows(batch, index)), donate_argnums=0
        )
        self._token_rewards = jax.jit(
            lambda b: steps.reward_kl_token_rewards(
                b, kl_coef=run.reward_kl[0], kind=run.reward_kl[1]
            )
        )

    # -- state -----------------------------------------------------------------------------

    def initial_state(self, seed: int | None = None) -> tuple[TrainState, Any]:
        """(train state, reference params), both placed on the mesh; ``seed`` replaces
        ``experiment.seed`` (the seed a resumed run started with)."""
        k_params, k_loop = seed_keys(self.config.experiment.seed if seed is None else seed)
        params = self._place_params(self.run_.init_params(k_params))
        state = self._init_state(k_loop, params)(params)
        return state, self._reference(params)

    def abstract_state(self) -> TrainState:
        """The shapes, dtypes and shardings of :meth:`initial_state`'s train state
        (``jax.ShapeDtypeStruct`` leaves), computing and placing nothing: the target a
        checkpoint restores onto, so that a resume does not hold a fresh state beside the
        restored one."""
        k_params, k_loop = seed_keys(self.config.experiment.seed)
        params = jax.eval_shape(self.run_.init_params, k_params)
        if self.mesh is not None:
            shardings = self._param_shardings(params)
            params = jax.tree.map(
                lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings
            )
        init = self._init_state(k_loop, params)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(init, params),
            init.lower(params).compile().output_shardings,
        )

    def initial_reference(self, seed: int | None = None) -> Any:
        """:meth:`initial_state`'s reference params alone (None when the run has none)."""
        if not self.run_.needs_reference:
            return None
        k_params, _ = seed_keys(self.config.experiment.seed if seed is None else seed)
        # Fresh arrays of their own: no copy; a separate critic's are not placed.
        return self._place_params({"policy": self.run_.init_params(k_params)["policy"]})

    def _reference(self, params: dict) -> Any:
        # The reference is the initial policy; a separate critic has no part in it.
        if not self.run_.needs_reference:
            return None
        return {"policy": jax.tree.map(jnp.copy, params["policy"])}

    def _init_state(self, k_loop: jax.Array, params: Any) -> Any:
        """The jitted :func:`init_train_state` of ``params`` (placed, or shapes with their
        shardings), Adam's moments placed like the parameters where optax can match them."""
        init = lambda p: init_train_state(p, self.run_.optimizer, k_loop)  # noqa: E731
        shardings = None
        if self.mesh is not None:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            shardings = train_state_shardings(params, self.run_.optimizer, k_loop, replicated)
        return jax.jit(init) if shardings is None else jax.jit(init, out_shardings=shardings)

    def _param_shardings(self, params: dict) -> dict:
        from novarl_jax.models import param_shardings

        models = {"policy": self.run_.model.policy, "critic": self.run_.model.critic}
        return {
            name: param_shardings(models[name], self.mesh, part) for name, part in params.items()
        }

    def _place_params(self, params: dict) -> dict:
        if self.mesh is None:
            return params
        return jax.device_put(params, self._param_shardings(params))

    # -- one iteration ---------------------------------------------------------------------

    def rollout_key(self, i: int) -> jax.Array:
        """The key of iteration ``i``'s rollout (its prompts and samples)."""
        return iteration_keys(seed_keys(self.config.experiment.seed)[1], i)[0]

    def check_prompts(self, i: int = 0) -> list[str]:
        """Fails now, naming the key, when iteration ``i``'s prompts do not fit
        ``rollout.max_prompt_length`` (the task's position is left where it was); so does any
        prompt of a task that can list them all (a JSONL file: the message gives its line).

        Returns:
            warnings about prompts (all of a task that lists them, else iteration ``i``'s)
            that fit, but not as written: see :func:`prompt_warnings`.
        """
        task = self.engine.task
        listed = getattr(task, "all_prompts", None)
        prompts = listed() if listed is not None else []
        limit = self.engine.sampling.max_prompt_length  # what each rollout encodes with
        for begin in range(0, len(prompts), 1024):  # first: these messages give the line
            chunk = prompts[begin : begin + 1024]
            texts = [text for _, text in chunk]
            try:
                _, mask = self.engine.tokenizer.encode_batch(texts, max_length=limit)
                check_prompt_rows(texts, mask)
            except TextTooLongError as e:
                raise prompt_too_long(e, what=f"the prompt at {chunk[e.index][0]}") from None
            except RenderError as e:
                raise prompt_unrenderable(e, f"the prompt at {chunk[e.index][0]}") from None
            except EmptyPromptError as e:
                raise ConfigError("task.path", f"{chunk[e.index][0]}: {e}") from None
            except UnencodableTextError as e:
                where = chunk[e.index][0]
                raise ConfigError("model.tokenizer", f"the prompt at {where}: {e.reason}") from None
        with _prompt_errors():
            first, *_ = self.engine.encode_prompts(
                self.rollout_key(i), self.config.rollout.prompts_per_step
            )
        if prompts:
            return prompt_warnings(
                self.engine, self.config, [t for _, t in prompts], "in task.path"
            )
        return prompt_warnings(self.engine, self.config, first, f"of step {i + 1}")

    def _rollout(self, state: TrainState, key: jax.Array) -> tuple[Any, Any, dict]:
        cfg, exp = self.config, self.config.experiment
        version = int(state.policy_version)
        prompts = cfg.rollout.prompts_per_step
        with _prompt_errors():
            traj, info = self.engine.rollout(state.params["policy"], key, version, prompts)
            stats = {"dapo/extra_batches": 0.0}
            if cfg.dapo.dynamic_sampling and exp.algorithm == "grpo":
                traj, info, stats = self._dynamic_sampling(state, key, traj, info, version)
        return traj, info, stats

    def _dynamic_sampling(self, state, key, traj, info, version):
        """DAPO: keep groups whose rewards differ, sampling extra batches to refill."""
        prompts = self.config.rollout.prompts_per_step

        def more(extra: int) -> tuple[Any, Any]:
            fold = jax.random.fold_in(key, 1000 + extra)
            return self.engine.rollout(state.params["policy"], fold, version, prompts)

        return dynamic_sampling(
            traj, info, more,
            group=self.config.experiment.grpo_group_size,
            prompts=prompts,
            max_extra_batches=self.config.dapo.max_extra_batches,
        )  # fmt: skip

    def _training_batch(self, state, reference, traj) -> tuple[dict, dict]:
        cfg, run = self.config, self.run_
        batch = steps.model_inputs(traj)
        ro, dapo = cfg.rollout, cfg.dapo
        # Each array gathered once (in a multi-process run every read is a collective).
        response_mask = host_array(traj.response_mask)
        valid = host_array(traj.valid) > 0
        lengths = response_mask.sum(1)
        stopped = (
            np.isin(host_array(traj.response_tokens), self.engine.stop_token_ids)
            & (response_mask > 0)
        ).any(1)
        truncated = ~stopped
        scores = (
            steps.shaped_rewards(
                traj.rewards,
                batch["response_mask"],
                max_new_tokens=ro.max_new_tokens,
                overlong_buffer=dapo.overlong_buffer,
                overlong_penalty=dapo.overlong_penalty,
            )
            * traj.valid
        )
        if dapo.mask_truncated:
            keep = jnp.asarray(~truncated, jnp.int32)[:, None]
            batch["response_mask"] = batch["response_mask"] * keep
        # Truncated importance sampling corrects for the sampler computing the policy
        # differently from the trainer (kernels, staleness), so it compares log-probs of the
        # same distribution: the policy at the rollout temperature, without top-k / top-p
        # (the sampled distribution's log-probs are 0 when greedy).
        batch["behavior_logprobs"] = traj.policy_logprobs
        check_shared_prompts(batch, run.model.prompt_length, run.model.prompt_group)
        if traj.routing is not None and run.model.router_replay:
            batch["routing"] = _routing_rows_first(traj.routing)
        batch = self._place_rows(batch)
        scored = self._score(state.params, reference, batch)
        if not self.on_policy:
            batch["old_logprobs"] = scored["old_logprobs"]
        if run.needs_reference:
            batch["ref_logprobs"] = scored["ref_logprobs"]
        # A sample whose reward was not finite is out of the loss (its mask row is zero) and
        # out of its group's baseline (sample_mask), not a fake reward of 0 there.
        est = {"response_mask": batch["response_mask"], "scores": scores, "sample_mask": traj.valid}
        if "old_values" in scored:
            batch["old_values"] = scored["old_values"]
            est["values"] = scored["old_values"]
        if run.reward_kl[0] > 0:
            est["token_rewards"] = self._token_rewards(batch)
        advantages, returns = self._advantages(est)
        batch["advantages"] = advantages
        if returns is not None:
            batch["returns"] = returns
        mask = host_array(batch["response_mask"])
        task_scores = host_array(traj.rewards)
        # verl's critic/rewards: each sequence's summed token rewards (the shaped score plus
        # the KL penalty when it is in the reward), against critic/score, the task's reward.
        rewards = host_array(scores).astype(np.float64)
        token_kl = None
        if run.reward_kl[0] > 0:
            token_kl = host_array(est["token_rewards"])
            rewards = rewards + token_kl.astype(np.float64).sum(1)

        def valid_mean(x, stat=np.mean):
            return float(stat(x[valid])) if valid.any() else float("nan")

        stats = {
            "critic/score/mean": valid_mean(task_scores),
            "critic/score/std": valid_mean(task_scores, np.std),
            "critic/rewards/mean": valid_mean(rewards),
            "critic/advantages/mean": float(host_array(advantages)[mask > 0].mean())
            if mask.any()
            else 0.0,
            # Over valid rows: an excluded sample's mask is zeroed, not its response empty.
            "response_length/mean": valid_mean(lengths),
            "response_length/clip_ratio": valid_mean(truncated),
            "rollout/invalid_samples": float(np.count_nonzero(~valid)),
            # Tokens the loss sees; 0 when every sample is invalid or dapo.mask_truncated
            # masked them all (the step then trains nothing: Session.record says so).
            "train/response_tokens": float(mask.sum()),
            "dapo/masked_samples": float(np.count_nonzero(valid & truncated))
            if dapo.mask_truncated
            else 0.0,
        }
        if "entropy" in scored:
            entropy = host_array(scored["entropy"])
            stats["actor/entropy_rollout"] = float((entropy * mask).sum() / max(mask.sum(), 1))
        if "moe_dropped_fraction" in scored:
            moe = steps.moe_stats(scored["moe_dropped_fraction"], scored["moe_expert_load"])
            stats.update({name: float(value) for name, value in moe.items()})
        if token_kl is not None:
            coef = run.reward_kl[0]
            stats["actor/reward_kl_penalty"] = reward_kl_penalty(token_kl, mask, valid, coef)
            stats["actor/reward_kl_penalty_coeff"] = float(coef)
        return batch, stats

    def _place_rows(self, batch: dict) -> dict:
        if self.mesh is None:
            return batch
        return jax.tree.map(lambda x: jax.device_put(x, steps.row_sharding(x, self.mesh)), batch)

    def iteration(self, state, reference, i: int) -> tuple[TrainState, dict, Any]:
        """Runs iteration ``i``; returns the new state, its metrics and the rollout it trained
        on, ``(trajectory, info)`` (:class:`~novarl_jax.rollout.engine.Trajectory`,
        :class:`~novarl_jax.rollout.engine.RolloutInfo`; with DAPO's dynamic sampling, the
        rows kept from all the batches sampled)."""
        cfg = self.config
        k_rollout, k_perm = iteration_keys(jax.random.wrap_key_data(state.key), i)
        t0 = time.perf_counter()
        traj, info, stats = self._rollout(state, k_rollout)
        jax.block_until_ready(traj.response_tokens)
        t1 = time.perf_counter()
        batch, batch_stats = self._training_batch(state, reference, traj)
        rows = int(batch["tokens"].shape[0])
        per_minibatch = rows // cfg.train.minibatches
        update_metrics = []
        for epoch in range(cfg.train.epochs):
            order = minibatch_order(jax.random.fold_in(k_perm, epoch), rows, cfg.train.minibatches)
            for m in range(cfg.train.minibatches):
                index = order[m * per_minibatch : (m + 1) * per_minibatch]
                state, metrics = self._update(state, batch, index)
                update_metrics.append(metrics)
        update_metrics = jax.device_get(update_metrics)
        t2 = time.perf_counter()
        metrics = combine_update_metrics(update_metrics)
        skipped = [bool(m["train/skipped"]) for m in update_metrics]
        metrics["train/skipped"] = float(sum(skipped))
        leading, longest, trailing = skip_runs(skipped)
        metrics["train/skipped_leading"] = float(leading)
        metrics["train/skipped_longest"] = float(longest)
        metrics["train/skipped_trailing"] = float(trailing)
        tokens = int(host_array(batch["attention_mask"]).sum())
        if self.on_policy and "actor/entropy" in metrics:
            # The update's forward ran on the same parameters as scoring would have.
            metrics["actor/entropy_rollout"] = metrics["actor/entropy"]
        metrics.update(stats)
        metrics.update(batch_stats)
        metrics.update(
            {
                "timing_s/gen": t1 - t0,
                "timing_s/update": t2 - t1,
                "timing_s/step": t2 - t0,
                "perf/total_num_tokens": float(tokens),
                "perf/throughput": per_device_throughput(tokens, t2 - t0, self.mesh),
                "train/policy_version": int(state.policy_version),
                "train/optimizer_step": int(state.step),
                # The rate of the step's last applied update (update k uses schedule(k)).
                "actor/lr": float(self.run_.schedule(max(int(state.step) - 1, 0))),
            }
        )
        return state, metrics, (traj, info)


def restore_task_position(
    task: Any, host: dict, config: Any, changed: list[str], log: Callable[[str], Any]
) -> None:
    """Puts ``task`` at the position a checkpoint's ``host`` record saved; ``changed``: the
    config keys a resume changed (a new ``task.path``, allowed, is read from its start).

    Raises:
        ConfigError: the position cannot be restored (a JSONL file edited since), naming
            ``task.path`` (or ``task.name``); or a resume changed the order the position is
            in (``task.options.seed`` or ``shuffle`` of a JSONL task), naming that key.
    """
    if "task.path" in changed:
        log(f"task.path changed: {config.task.path} is read from its first example")
        return
    state = host["task_state"]
    ordered = isinstance(state, dict) and "seed" in state and "index" in state
    for key in ("task.options.seed", "task.options.shuffle"):
        if ordered and key in changed:
            raise ConfigError(
                key,
                f"the run resumes after {state['index']} examples of epoch "
                f"{state['epoch']} in the order its checkpoint's seed and shuffle gave them; "
                f"the position holds only in that order, so another {key} cannot take "
                f"effect on resume: resume with the run's, or train in a new --workdir",
            )
    try:
        task.set_state(state)
    except ValueError as e:
        key = "task.path" if config.task.name == "jsonl" else "task.name"
        raise ConfigError(key, f"cannot resume the task's position: {e}") from None


def combine_update_metrics(update_metrics: list[dict]) -> dict[str, float]:
    """One step's metrics from its updates': the max of ``*_max`` names, the min of ``*_min``
    names, the mean of the rest. An extreme over no token at all (every update without a
    valid token: ``-inf`` for a max, ``inf`` for a min) is 0, as the other update metrics
    of a step that trained nothing are."""
    reduce = {"max": np.max, "min": np.min, None: np.mean}
    out = {}
    for name in update_metrics[0]:
        kind = extreme_of(name)
        value = float(reduce[kind]([m[name] for m in update_metrics]))
        none = {"max": -math.inf, "min": math.inf}.get(kind)
        out[name] = 0.0 if value == none else value
    return out


def reward_kl_penalty(
    token_rewards: np.ndarray, response_mask: np.ndarray, valid: np.ndarray, kl_coef: float
) -> float:
    """verl's ``actor/reward_kl_penalty``: the KL estimate PPO puts in its token rewards
    (``token_rewards = -kl_coef * kl`` on response tokens), averaged over each valid sample's
    tokens, then over the valid samples that have tokens in ``response_mask`` (not those
    ``dapo.mask_truncated`` emptied); NaN when there are none."""
    kl = -np.asarray(token_rewards, np.float64) / kl_coef
    mask = np.asarray(response_mask) > 0
    per_sample = (kl * mask).sum(1) / np.maximum(mask.sum(1), 1)
    counted = (np.asarray(valid) > 0) & mask.any(1)
    return float(per_sample[counted].mean()) if counted.any() else float("nan")


def dynamic_sampling(
    traj: Any, info: Any, more: Any, *, group: int, prompts: int, max_extra_batches: int
) -> tuple[Any, Any, dict[str, float]]:
    """DAPO's dynamic sampling: a batch of ``prompts`` groups whose rewards differ.

    ``traj`` and ``info`` are the step's rollout; while fewer than ``prompts`` of the groups
    sampled so far are informative (:func:`informative_groups`) and fewer than
    ``max_extra_batches`` extra batches were sampled, ``more(extra)`` (extra = 1, 2, ...)
    samples another batch. The result takes the informative groups first, in sampling order,
    then (if still short) the uninformative ones, so its shape never changes. Its task state
    is the last batch's: the task has moved past every batch sampled here.

    Returns:
        (trajectory, info, stats) with stats ``dapo/extra_batches`` and ``dapo/kept_groups``
        (the informative groups kept).
    """

    def informative(t):
        return informative_groups(host_array(t.rewards), host_array(t.valid), group)

    pool = [(traj, info, informative(traj))]
    extra = 0
    while sum(int(m.sum()) for *_, m in pool) < prompts and extra < max_extra_batches:
        extra += 1
        t, t_info = more(extra)
        pool.append((t, t_info, informative(t)))
    chosen = [(i, g) for i, (*_, m) in enumerate(pool) for g in np.flatnonzero(m)]
    chosen += [(i, g) for i, (*_, m) in enumerate(pool) for g in np.flatnonzero(~m)]
    chosen = chosen[:prompts]
    kept = sum(1 for i, g in chosen if pool[i][2][g])
    parts, info_parts = [], []
    for i, g in chosen:
        rows = np.arange(g * group, (g + 1) * group)
        parts.append(_rows(pool[i][0]._replace(routing=None), rows))
        info_parts.append((pool[i][1], rows))
    merged = jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)
    merged = merged._replace(
        group_ids=jnp.asarray(np.repeat(np.arange(prompts, dtype=np.int32), group)),
        routing=_merge_routing(pool, chosen, group),
    )
    merged_info = take_info(info_parts, task_state=pool[-1][1].task_state)
    stats = {"dapo/extra_batches": float(extra), "dapo/kept_groups": float(kept)}
    return merged, merged_info, stats


def _merge_routing(pool, chosen, group):
    if pool[0][0].routing is None:
        return None
    parts = [
        jax.tree.map(lambda x: x[:, g * group : (g + 1) * group], pool[i][0].routing)  # noqa: B023
        for i, g in chosen
    ]
    return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=1), *parts)


@contextlib.contextmanager
def _prompt_errors() -> Iterator[None]:
    """A rollout's prompt errors as ConfigErrors naming the key at fault: too long, empty, or
    one the chat template cannot render."""
    try:
        yield
    except TextTooLongError as e:
        raise prompt_too_long(e) from None
    except EmptyPromptError as e:
        raise ConfigError("task.name", str(e)) from None
    except RenderError as e:
        raise prompt_unrenderable(e) from None


def informative_groups(rewards: np.ndarray, valid: np.ndarray, group: int) -> np.ndarray:
    """Which groups of ``group`` consecutive samples teach GRPO something: at least two valid
    samples whose rewards differ (an invalid sample, whose reward failed, is left out of its
    group's baseline and so out of this test too). ``[B]`` rewards and valid flags -> ``[B /
    group]`` bool."""
    r = np.asarray(rewards, np.float64).reshape(-1, group)
    v = np.asarray(valid).reshape(-1, group) > 0
    high = np.where(v, r, -np.inf).max(1)
    low = np.where(v, r, np.inf).min(1)
    return (v.sum(1) >= 2) & (high > low)


def skip_runs(skipped: list[bool]) -> tuple[int, int, int]:
    """Runs of skipped updates among a step's updates, in order: ``(leading, longest,
    trailing)``, how many in a row it begins with, the most in a row anywhere, and how many in
    a row it ends with."""
    run = longest = 0
    leading = None
    for flag in skipped:
        run = run + 1 if flag else 0
        longest = max(longest, run)
        if not flag and leading is None:
            leading = longest
    return (run if leading is None else leading), longest, run


def skip_streak(
    previous: int, leading: int, longest: int, trailing: int, updates: int
) -> tuple[int, int]:
    """Non-finite updates in a row, for a step of ``updates`` updates whose skips run as
    :func:`skip_runs` says, when ``previous`` were skipped in a row before it: ``(most,
    carried)``, the most in a row up to the step's end (a run may begin in an earlier step) and
    how many in a row the next step goes on from."""
    if leading == updates:  # every update skipped: the run goes on through the step
        return previous + updates, previous + updates
    return max(previous + leading, longest), trailing


def _scores(metrics: dict, workdir: str, recent: int = 10) -> str:
    """The summary's scores: the last step's (one batch, noisy), the mean of the last
    ``recent`` steps', and the last validation's when the last step was evaluated."""
    text = f"last-step score {metrics['critic/score/mean']:.3f}"
    try:
        rows = read_metrics(workdir)[-recent:]
    except (OSError, ValueError):  # not this process's file, or damaged: the rest still holds
        rows = []
    scores = [r.get("critic/score/mean") for r in rows]
    finite = [
        float(s)
        for s in scores
        if isinstance(s, int | float) and not isinstance(s, bool) and math.isfinite(s)
    ]
    if len(finite) > 1:
        what = "" if len(finite) == len(scores) else f" ({len(finite)} finite)"
        text += f", mean of the last {len(scores)} steps{what} {sum(finite) / len(finite):.3f}"
    if "val/score/mean" in metrics:
        text += f", validation {metrics['val/score/mean']:.3f}"
    return text


def per_device_throughput(tokens: float, seconds: float, mesh: Any) -> float:
    """Tokens per second per device of the run (``perf/throughput``, verl's measure)."""
    devices = 1 if mesh is None else mesh.size
    return float(tokens) / max(seconds, 1e-9) / devices


def _progress_line(step: int, total: int, metrics: dict) -> str:
    kl = metrics.get("actor/kl_loss", metrics.get("actor/reward_kl_penalty"))
    return (
        f"step {step}/{total}  score {metrics['critic/score/mean']:.3f}  "
        + (f"kl {kl:.4f}  " if kl is not None else "")
        + f"entropy {metrics.get('actor/entropy', float('nan')):.3f}  "
        f"tok/s {metrics['perf/total_num_tokens'] / max(metrics['timing_s/step'], 1e-9):.0f}"
        + (f"  val {metrics['val/score/mean']:.3f}" if "val/score/mean" in metrics else "")
    )


def unsplit_tensor_parallelism(params: Any, mesh: Any, run: Run) -> str | None:
    """A warning when the mesh has ``tp > 1`` but no weight of ``params`` is split over it:
    every dimension ``tp`` shards (heads, KV heads, MLP hidden units, vocabulary) fails to
    divide by it, so the tp devices all compute the same thing."""
    tp = dict(getattr(mesh, "shape", {})).get("tp", 1)
    if tp <= 1:
        return None
    for leaf in jax.tree.leaves(params):
        spec = getattr(getattr(leaf, "sharding", None), "spec", ())
        for entry in spec:
            if entry == "tp" or (isinstance(entry, tuple) and "tp" in entry):
                return None
    policy = run.model.policy
    sizes = (
        f"{policy.num_attention_heads} heads, {policy.num_key_value_heads} KV heads, "
        f"intermediate_size {policy.intermediate_size}, vocabulary {policy.vocab_size}"
    )
    return (
        f"experiment.tensor_parallel_size={tp} splits no weight of the policy ({sizes}: none "
        f"is a multiple of {tp}), so the {tp} tensor-parallel devices all compute the same; "
        "use a tensor_parallel_size that divides them"
    )


def finished_schedule(run: Run, update: int, config: Any) -> str | None:
    """A warning when every update a resumed run has left, from update ``update`` on,
    trains at learning rate 0 (a decay that ended with the run it was sized for); else None."""
    last = config.experiment.steps * updates_per_step(config) - 1
    if last < update or float(run.schedule(update)) or float(run.schedule(last)):
        return None
    return (
        f"the learning-rate schedule is at 0 from update {update} to the run's last, {last}: "
        f"nothing the remaining steps sample will be learned from (optim.schedule="
        f"{config.optim.schedule!r}, optim.decay_steps={config.optim.decay_steps}, "
        f"optim.end_learning_rate={config.optim.end_learning_rate})"
    )


def mismatch_note(workdir: str, changes: list, step: int, steps: list[int]) -> str:
    """What a resume adds to checkpoint ``step``'s CheckpointMismatchError: the allowed config
    ``changes`` that may explain it, else (the config is the run's own, so the step may be
    another run's, copied in) the way to resume from the step before; '' when neither."""
    older = [s for s in steps if s < step]
    note = allowed_changes_note(changes)
    if note or not older:
        return note
    where = os.path.join(workdir, "checkpoints", str(step))
    return (
        f"; if that step is not this run's (copied in?), move {where} out to resume from "
        f"step {older[-1]}"
    )


def check_startup(run: Run, mesh: Any = None) -> list[str]:
    """The checks a run makes before its first step, without training: the first step's
    prompts and the evaluation prompts fit ``rollout.max_prompt_length``, and (a warning) a
    built-in task's longest answers fit ``rollout.max_new_tokens``.

    Returns:
        the warnings of :meth:`Trainer.check_prompts`.

    Raises:
        ConfigError: naming the key.
    """
    warnings = Trainer(run, "", mesh=mesh).check_prompts(0)
    if run.eval_task is not None:
        Evaluator(run, mesh)
    longest = getattr(run.task, "longest_answer", None)  # the built-in tasks tell
    if longest is not None:
        answer, room = longest(), run.sampling.max_new_tokens
        tokens = len(run.tokenizer.encode(answer))
        if tokens > room:
            warnings.append(
                f"rollout.max_new_tokens={room} is shorter than the task's longest answers "
                f"({answer!r}: {tokens} tokens): their completions are cut before the end, so "
                f"they cannot earn the full reward"
            )
        elif tokens == room and run.spec.config.dapo.mask_truncated:
            warnings.append(
                f"rollout.max_new_tokens={room} leaves no room for the end token after the "
                f"task's longest answers ({answer!r}: {tokens} tokens), and "
                f"dapo.mask_truncated=True trains on no completion that lacks one"
            )
    return warnings


def prompt_warnings(engine: Any, config: Any, texts: list[str], where: str) -> list[str]:
    """Warnings about prompts ``texts`` (``where`` says which) that ``engine`` encodes
    without error but not as written: how many ``rollout.prompt_truncation`` cuts to
    ``rollout.max_prompt_length`` (the task still scores the whole prompt), and how many
    begin with the BOS token the tokenizer puts before every prompt (a prompt template that
    writes it gets two)."""
    tokenizer = engine.tokenizer
    limit, mode = engine.sampling.max_prompt_length, config.rollout.prompt_truncation
    bos = tokenizer.bos_id if tokenizer.add_bos else None
    ids = [tokenizer.encode(text) for text in texts]
    out = []
    cut = sum(len(row) + (bos is not None) > limit for row in ids)
    if cut and mode != "error":
        kept = "last" if mode == "left" else "first"
        out.append(
            f"{cut} of the {len(texts)} prompts {where} have more than "
            f"rollout.max_prompt_length={limit} tokens; rollout.prompt_truncation={mode!r} "
            f"keeps their {kept} tokens, while the task scores the whole prompt"
        )
    doubled = 0 if bos is None else sum(row[:1] == [bos] for row in ids)
    if doubled:
        name = getattr(tokenizer, "bos_token", None) or f"id {bos}"
        chat = getattr(tokenizer, "chat_template", None) is not None
        start = f"{doubled} of the {len(texts)} prompts {where}"
        if chat:
            start += " begin, as the chat template renders them,"
        else:
            start += " begin"
        out.append(
            f"{start} with the BOS token {name}, and the tokenizer puts another before each "
            f"(model.bos_token={config.model.bos_token!r}); "
            + ("set model.bos_token='auto' (the template's BOS alone) or ''"
               if chat else "drop it from the prompts, or set model.bos_token=''")
        )  # fmt: skip
    return out


def default_mesh(spec: RunSpec) -> Any:
    """The layout's mesh over the first ``world_size`` devices (all of them when the sizes
    agree; too few devices fail with the layout's own message)."""
    devices = jax.devices()
    return spec.layout.make_mesh(devices[: spec.layout.world_size] or devices)


_LAYOUT_KEYS = {
    "dp": "experiment.world_size",
    "pp": "experiment.pipeline_parallel_size",
    "ep": "experiment.expert_parallel_size",
    "tp": "experiment.tensor_parallel_size",
}


def check_mesh(spec: RunSpec, mesh: Any) -> None:
    """Raises ConfigError unless ``mesh`` (one given to ``train``, ``train_async`` or
    ``export_policy``) has the config's layout: its axes and sizes decide how every weight is
    sharded, and what the workdir records as the run's layout."""
    want = dict(zip(MESH_AXES, spec.layout.mesh_shape, strict=True))
    got = dict(getattr(mesh, "shape", {}))
    if got == want:  # the same named axes and sizes, in any order
        return
    if set(got) != set(want):
        key = "mesh"  # other axes: no config key would make them fit
    elif math.prod(got.values()) != math.prod(want.values()):
        key = _LAYOUT_KEYS["dp"]  # another device count
    else:  # the same devices split otherwise: the first size that differs
        differ = [a for a in ("pp", "ep", "tp", "dp") if got.get(a) != want[a]]
        key = _LAYOUT_KEYS[differ[0]]
    raise ConfigError(
        key,
        f"the mesh given has axes {got}, not the config's layout {want}; pass mesh=None for "
        f"the layout's own mesh, or the experiment.* sizes of the mesh (axes {MESH_AXES})",
    )


class Session:
    """The side-effecting shell of one run, shared by the synchronous and asynchronous loops.

    Opening a session builds the run's objects and its :class:`Trainer` (or a subclass),
    places the initial state on the mesh, restores the latest checkpoint of ``workdir`` when
    there is one (``start``, ``host`` and ``resumed_from`` say where), and opens the metrics
    writers. :meth:`record` logs, checks and checkpoints each finished step; :meth:`finish`
    prints the summary and draws the plot. Use it as a context manager so checkpoints and
    writers are closed on every exit.
    """

    def __init__(
        self,
        config,
        workdir: str,
        *,
        spec: RunSpec | None = None,
        mesh: Any = None,
        log=None,
        run: Run | None = None,
        trainer_cls: type = Trainer,
        allow_config_change: bool = False,
        asynchronous: bool = False,
    ):
        self.config = config
        self.workdir = os.fspath(workdir)
        if url := url_path(self.workdir):  # before anything is built or loaded
            raise ConfigError("--workdir", url)
        spec = spec or validate_config(config)
        if mesh is not None:
            check_mesh(spec, mesh)  # before anything is built or written
        self.run = run or build_run(spec)
        self.main_process = jax.process_index() == 0
        if log is None:
            log = (lambda line: print(line, flush=True)) if self.main_process else (lambda _: None)
        self.log = log
        for warning in ignored_settings(config, asynchronous=asynchronous):
            log(f"warning: {warning}")
        self._lock = self._claim_workdir()  # held until close()
        try:
            self._open(spec, mesh, trainer_cls, allow_config_change)
        except BaseException:
            release(self._lock)
            raise

    def _claim_workdir(self) -> Any:
        """The workdir's lock (see :mod:`novarl_jax.trainer.workdir`), taken by the main
        process for all; every process raises when it refuses the workdir.

        In a multi-process run the main process writes a token into the workdir, which every
        process must read back (the processes write each checkpoint together; on directories
        of their own, each host's local disk, the first save would wait forever). Whatever the
        main process meets, every process reaches the same collectives, so none waits alone.
        """
        lock, problem, token = None, None, 0
        if self.main_process:
            try:
                if foreign := foreign_config(self.workdir):
                    raise ConfigError("--workdir", foreign)
                try:
                    lock = lock_workdir(self.workdir)
                except LockUnsupported as e:
                    self.log(f"warning: {e}; a second run on this workdir would not be refused")
                if jax.process_count() > 1:
                    token = write_token(self.workdir)
            except OSError as e:  # cannot be created (a read-only mount) or written
                problem = ConfigError(
                    "--workdir", f"cannot write {e.filename or self.workdir}: "
                    f"{e.strerror or e}; give a directory this process can create and write",
                )  # fmt: skip
                problem.__cause__ = e
            except Exception as e:  # noqa: BLE001 - raised below, after the others are told
                problem = e
        try:
            if jax.process_count() > 1:
                problem = self._agree_on_workdir(problem, token)
        except BaseException:
            release(lock)
            raise
        if problem is not None:
            release(lock)
            raise problem
        return lock

    def _agree_on_workdir(self, problem: BaseException | None, token: int) -> Any:
        """The main process's ``token`` (0: it refused the workdir) to every process, which
        reads it back from the workdir; the error every process raises, or None."""
        from jax.experimental import multihost_utils

        def gather(value: int) -> np.ndarray:
            return np.asarray(multihost_utils.process_allgather(np.asarray([value], np.int32)))

        want = int(gather(token).reshape(-1)[0])
        if want == 0:
            return problem or ConfigError(
                "--workdir", "the main process refused it (see its error)"
            )
        try:
            seen = sees_token(self.workdir, want)
            blind = [i for i, ok in enumerate(gather(int(seen)).reshape(-1)) if not ok]
        finally:
            if self.main_process:
                remove_token(self.workdir, want)
        if not blind:
            return None
        return ConfigError(
            "--workdir",
            f"{self.workdir} is not one directory for every process: process"
            f"{'es' if len(blind) > 1 else ''} {', '.join(map(str, blind))} cannot read what "
            "process 0 wrote there (each host's own disk?); the processes write every "
            "checkpoint together, so give a directory on a file system all hosts mount (NFS, "
            "Filestore, a gcsfuse mount)",
        )

    def _open(self, spec, mesh, trainer_cls, allow_config_change) -> None:
        config, workdir, log = self.config, self.workdir, self.log
        os.makedirs(workdir, exist_ok=True)
        ckpt = config.checkpoint
        self.checkpointer = Checkpointer(
            os.path.join(workdir, "checkpoints"),
            interval=ckpt.interval,
            keep=ckpt.keep,
            async_save=ckpt.async_save,
        )
        self.resumed_from = self.checkpointer.latest_step()
        changes = check_start_config(
            workdir, config, resuming=self.resumed_from is not None,
            allow_change=allow_config_change, log=log, model=self.run.model.policy,
            tokenizer=self.run.tokenizer, stops=self.run.sampling.stops(self.run.tokenizer),
        )  # fmt: skip
        changed = [key for key, _, _ in changes]
        # A resume allowed a change keeps the record of the config its checkpoints were
        # trained with until one of this config lands (a run stopped before that resumes
        # with the old config, not the new one, without --allow_config_change).
        self._record_config = self.resumed_from is None or not (
            any(not may_change(k) for k in changed) or model_changes(workdir, self.run.model.policy)
        )
        mesh = default_mesh(spec) if mesh is None else mesh
        self.trainer = trainer_cls(self.run, workdir, mesh=mesh)
        if self.resumed_from is None:
            self.state, self.reference = self.trainer.initial_state()
        else:  # the checkpoint's state, restored below onto this target
            self.state, self.reference = self.trainer.abstract_state(), None
        if warning := unsplit_tensor_parallelism(self.state.params["policy"], mesh, self.run):
            log(f"warning: {warning}")
        self.evaluator = Evaluator(self.run, mesh) if self.run.eval_task is not None else None
        self.writer = self.samples = None
        if self.main_process and config.logging.samples > 0:
            self.samples = JsonLines(os.path.join(workdir, SAMPLES_FILE))
        if self.main_process:
            self.writer = MetricsWriter(
                workdir,
                tensorboard=config.logging.tensorboard,
                wandb=config.logging.wandb,
                wandb_project=config.logging.wandb_project,
                run_config=config.to_dict(),
            )
        self.start, self.host = 0, {}
        if self.resumed_from is not None:
            try:
                self.state, self.host = self.checkpointer.restore(self.state)
            except CheckpointMismatchError as e:
                note = mismatch_note(
                    workdir, changes, self.resumed_from, self.checkpointer.all_steps()
                )
                if not note:
                    raise
                raise CheckpointMismatchError(f"{e}{note}") from None
            if "experiment.seed" in changed:
                # The loop key is split from the seed and never changes during a run: a
                # resume allowed another seed goes on with that seed's key.
                key = jax.random.key_data(seed_keys(config.experiment.seed)[1])
                self.state = self.state.replace(key=jax.device_put(key, self.state.key.sharding))
            step, saved = self.resumed_from, self.host.get("iteration")
            if saved != step or isinstance(saved, bool) or "task_state" not in self.host:
                what = f"its iteration is {saved!r}" if saved != step else "it has no task_state"
                raise self.checkpointer.unreadable(
                    step, ValueError(f"its host record does not fit step {step}: {what}")
                )
            restore_task_position(self.run.task, self.host, config, changed, log)
            self.start = step
            log(f"resumed from {self.checkpointer.directory} at step {self.start}")
            if warning := finished_schedule(self.run, int(self.state.step), config):
                log(f"warning: {warning}")
        # The seed the run started with: its random initial policy is the KL reference for
        # good, also when a resume is allowed another experiment.seed (which then changes
        # only what is sampled from here on).
        self.init_seed = int(self.host.get("init_seed", config.experiment.seed))
        if self.resumed_from is not None:
            self.reference = self.trainer.initial_reference(seed=self.init_seed)
        # Rows past the restored step (all of them on a fresh start: a run that stopped before
        # its first checkpoint) are redone, so they go.
        samples = self.samples
        if samples is None and self.main_process:  # not written now, but rows of redone steps
            samples = JsonLines(os.path.join(workdir, SAMPLES_FILE))  # must not stay behind
        for lines in (self.writer, samples):
            if lines is not None:
                lines.truncate_after(self.start)
        if self._record_config:
            # Only once the checkpoint has restored: a config it refuses (another model) must
            # not replace the record of the one it was trained with.
            self._write_config()
        self.total = config.experiment.steps
        # The rollout the next step samples (past those an asynchronous run used: dropped
        # rollouts leave the index ahead of the steps); checkpoints record it.
        self.first_index = int(self.host.get("rollout_index", self.start))
        if self.start < self.total:
            for warning in self.trainer.check_prompts(self.first_index):
                log(f"warning: {warning}")
        else:
            log(
                f"nothing to train: the checkpoint is at step {self.start} and "
                f"experiment.steps={self.total}; raise experiment.steps to train on"
            )
        self._skips = int(self.host.get("skip_streak", 0))  # a streak goes on across a resume
        self._empty = int(self.host.get("empty_streak", 0))  # steps in a row that trained nothing
        self._last: tuple[int, dict, bool] | None = None  # this process's last step, host, saved
        interactive = config.logging.progress and sys.stdout.isatty() and self.main_process
        self._progress = _Progress(self.total, self.start) if interactive else None
        self._stop = StopWatch().__enter__()  # SIGTERM: checkpoint the step, then stop

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def record(
        self, i: int, state: TrainState, metrics: dict, host: dict, rollout: Any = None
    ) -> dict:
        """Writes step ``i + 1``'s metrics (and samples), stops on too many skipped updates,
        checkpoints.

        Args:
            i: the finished iteration (0-based).
            state: the state after it.
            metrics: its metrics.
            host: JSON-able host state to checkpoint beside ``state`` (the task's position,
                ...); ``iteration`` is added.
            rollout: ``(trajectory, info)`` it trained on, for ``samples.jsonl``.

        Returns:
            The step's metrics with its validation metrics, when it was evaluated.

        Raises:
            TrainingError: ``train.max_consecutive_skips`` non-finite updates in a row, or
                as many steps in a row that trained nothing (no sample left to train on).
            StopRequested: SIGTERM asked the run to stop; this step is checkpointed (see
                :mod:`~novarl_jax.trainer.stop`).
        """
        config, step = self.config, i + 1
        skipped = int(metrics["train/skipped"])
        most, self._skips = skip_streak(
            self._skips,
            int(metrics["train/skipped_leading"]),
            int(metrics["train/skipped_longest"]),
            int(metrics["train/skipped_trailing"]),
            updates_per_step(config),
        )
        samples = []
        if rollout is not None:
            samples += self._sample_rows(rollout, step, "train")
        if self.evaluator is not None and self.evaluator.due(step):
            val_rollout = self.evaluator.sample(state.params["policy"], int(state.policy_version))
            metrics = {**metrics, **self.evaluator.metrics(val_rollout[0])}
            samples += self._sample_rows(val_rollout, step, "val")
        if self.writer is not None:
            self.writer.write(step, metrics)
        if self.samples is not None:
            self.samples.write(samples)
        empty = metrics.get("train/response_tokens", 1) == 0
        self._empty = self._empty + 1 if empty else 0
        why = ""
        if empty:
            masked = int(metrics.get("dapo/masked_samples", 0))
            invalid = int(metrics.get("rollout/invalid_samples", 0))
            why = "no sample had a finite reward"
            if masked:
                why = (
                    f"dapo.mask_truncated masked every completion with a finite reward ({masked} "
                    f"ran to rollout.max_new_tokens; {invalid} had a reward that was not finite)"
                )
            self.log(f"step {step}: nothing was trained: {why}")
        if skipped:
            names = ("train/loss", "actor/grad_norm", "critic/grad_norm")
            bad = [k for k in names if k in metrics and not np.isfinite(metrics[k])]
            self.log(f"step {step}: skipped {skipped} update(s) with non-finite {', '.join(bad)}")
        limit = config.train.max_consecutive_skips
        if most >= limit:
            raise TrainingError(
                f"stopped at step {step}: {most} consecutive non-finite updates "
                f"(train.max_consecutive_skips={limit}); {self._kept()}"
            )
        if self._empty >= limit:  # its parameters do not move: the next steps would do alike
            raise TrainingError(
                f"stopped at step {step}: {self._empty} consecutive steps trained nothing "
                f"(the last: {why}; train.max_consecutive_skips={limit}); {self._kept()}"
            )
        host = {**host, "iteration": step, "skip_streak": self._skips, "init_seed": self.init_seed}
        host["empty_streak"] = self._empty
        stop = step < self.total and self._stop.requested()
        saved = self.checkpointer.save(step, state, host, force=(step == self.total or stop))
        self._last = (step, host, bool(saved))
        if saved and not self._record_config:
            self.checkpointer.wait()  # this start's first checkpoint, on disk
            self._write_config()
        if self._progress is not None:
            self._progress.update(step, metrics)
        elif config.logging.progress:
            self.log(_progress_line(step, self.total, metrics))
        if stop:
            self.checkpointer.wait()
            raise StopRequested(step)
        return metrics

    def stop_between_steps(self, state: TrainState) -> None:
        """For a loop that waits between steps (the asynchronous trainer, for a rollout): when
        SIGTERM asked the run to stop after this process finished a step, checkpoints that
        step (``state``, unless it is checkpointed already) and raises StopRequested, rather
        than waiting for the next step, which may be long in coming. Before this process's
        first step it returns (the run stops after that step, as the synchronous loop does).
        """
        if self._last is None or not self._stop.requested():
            return
        step, host, saved = self._last
        if step == self.total:
            return  # nothing is waited for after the last step
        if not saved:
            self.checkpointer.save(step, state, host, force=True)
        self.checkpointer.wait()
        if not self._record_config:
            self._write_config()
        raise StopRequested(step)

    def _write_config(self) -> None:
        """Records the run's config, model and tokenizer in the workdir (the main process)."""
        if self.main_process:
            run = self.run
            stops = run.sampling.stops(run.tokenizer)
            write_config(self.workdir, self.config, run.model.policy, run.tokenizer, stops)
        self._record_config = True

    def _sample_rows(self, rollout: Any, step: int, split: str) -> list[dict]:
        # Every process builds the rows (gathering a multi-process rollout is collective);
        # process 0 writes them.
        if self.config.logging.samples <= 0:
            return []
        trajectory, info = rollout
        stop = self.trainer.engine.stop_token_ids
        count = self.config.logging.samples
        return sample_rows(trajectory, info, count, step=step, split=split, stop_token_ids=stop)

    def close(self) -> None:
        self._stop.__exit__()
        if self._progress is not None:
            self._progress.close()
            self._progress = None
        try:
            self.checkpointer.close()  # raises a pending save's failure
        finally:
            for lines in (self.writer, self.samples):
                if lines is not None:
                    lines.close()
            release(self._lock)

    def _kept(self) -> str:
        """What a stopped run leaves to resume from."""
        self.checkpointer.wait()
        last = self.checkpointer.latest_step()
        if last is None:
            return "no checkpoint was written before it"
        return f"the last checkpoint (step {last}) in {self.checkpointer.directory} is intact"

    def finish(self, state: TrainState, metrics: dict, summary: str = "") -> dict:
        """Prints the one-line summary, draws the plot; returns the result of the run."""
        if metrics:
            self.log(
                f"done: {self.total} step{'s' if self.total != 1 else ''}, "
                f"{_scores(metrics, self.workdir)}, "
                f"policy version {int(state.policy_version)}, {summary}"
                f"workdir {os.path.abspath(self.workdir)}"
            )
        plot = self.config.logging.plot and self.main_process
        if plot and os.path.exists(os.path.join(self.workdir, METRICS_FILE)):
            try:
                from novarl_jax.plot import plot_training

                self.log(f"plot: {plot_training(self.workdir)}")
            except ImportError:
                self.log("plot: skipped (matplotlib is not installed; pip install -e '.[plot]')")
            except (OSError, ValueError) as e:
                # The run itself succeeded: a plot that cannot be drawn does not fail it.
                self.log(f"plot: skipped ({e})")
        return {**metrics, "resumed_from": self.resumed_from, "state": state}


def train(
    config,
    workdir: str,
    *,
    spec: RunSpec | None = None,
    mesh: Any = None,
    log=None,
    run: Run | None = None,
    allow_config_change: bool = False,
) -> dict:
    """Trains to ``experiment.steps`` iterations, resuming from ``workdir`` if it has a
    checkpoint. Writes ``config.json``, ``metrics.jsonl``, checkpoints, ``plots/training.png``
    and, with ``logging.samples``, ``samples.jsonl`` there.

    Args:
        config: the run's ConfigDict.
        workdir: output directory (created if missing).
        spec: an already validated spec (validated here otherwise).
        mesh: the device mesh; default: the layout's mesh over the first world_size devices.
        log: a callable taking one line of text (default: print on process 0).
        run: the run's objects already built from ``spec`` (built here otherwise).
        allow_config_change: resume even when ``config`` differs from the workdir's
            ``config.json`` in keys that change the run (see
            :mod:`~novarl_jax.trainer.saved_config`).

    Returns:
        The last step's metrics, plus ``'resumed_from'`` (a step or None) and ``'state'``.

    Raises:
        ConfigError: a bad config value (before anything compiles), or a resume whose
            config changes the run (``ConfigChangedError``).
        TrainingError: too many consecutive non-finite updates.
        StopRequested: SIGTERM asked the run to stop; the step it finished is checkpointed
            and the same call resumes there (see :mod:`~novarl_jax.trainer.stop`).

    With ``experiment.async_rollouts`` the run is
    :func:`~novarl_jax.trainer.async_loop.train_async`'s (its workers and queue from the
    config; its deterministic schedule, without threads, in a multi-process run).
    """
    spec = spec or validate_config(config)
    common = dict(spec=spec, mesh=mesh, log=log, run=run, allow_config_change=allow_config_change)
    if spec.config.experiment.async_rollouts:
        from novarl_jax.trainer.async_loop import train_async

        # Several processes must issue the same programs in the same order: no threads.
        return train_async(config, workdir, synchronous=jax.process_count() > 1, **common)
    metrics: dict = {}
    with Session(config, workdir, **common) as session:
        state = session.state
        # Step i samples rollout i here; an asynchronous run resumed here (with
        # --allow_config_change) may have used keys beyond its steps (dropped rollouts): go on
        # after its last, so no step trains a batch trained before.
        offset = session.first_index - session.start
        for i in range(session.start, session.total):
            index = i + offset
            state, metrics, rollout = session.trainer.iteration(state, session.reference, index)
            host = {"task_state": rollout[1].task_state, "rollout_index": index + 1}
            metrics = session.record(i, state, metrics, host, rollout)
    return session.finish(state, metrics)


class _Progress:
    """A rich progress bar with live score, KL and throughput."""

    def __init__(self, total: int, start: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
        )
        self._task = self._bar.add_task("train", total=total, completed=start, info="")
        self._bar.start()

    def update(self, step: int, metrics: dict) -> None:
        self._bar.update(
            self._task, completed=step, info=_progress_line(step, 0, metrics).split("  ", 1)[1]
        )

    def close(self) -> None:
        self._bar.stop()
