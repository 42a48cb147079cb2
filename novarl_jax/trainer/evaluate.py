"""Validation: the policy's score on fixed evaluation prompts, every ``eval.interval`` steps.

Every evaluation samples the same prompts with the same keys, so its figures move only with
the policy. The prompts are drawn and tokenized once, when the evaluator is made, and sampled
in batches of ``eval.prompts_per_batch`` prompts (by default as many rows as a training
rollout has), so the device memory an evaluation needs is bounded by one batch, not by the
set's size. The built-in tasks draw the prompts with a key of their own (the training stream
never uses it; a small synthetic task can still repeat training prompts); the ``jsonl`` task
reads them from ``eval.path`` in file order. Nothing here touches the training task, its
position or the training keys: the synchronous loop trains the same with validation on or
off. (In threaded asynchronous runs an evaluation pauses the trainer while the rollout
workers go on, which changes how stale their samples get, as any pause of the trainer does.)

Metrics (verl calls them ``val-core/...``): ``val/score/mean`` and ``val/score/std`` over the
samples, ``val/response_length/mean`` in tokens, and with ``eval.samples > 1``
``val/score/best_of_n/mean``, the mean over prompts of their best sample's score (pass@n for
0/1 rewards). Samples whose reward is not finite are reported by the rollout engine and left
out.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from novarl_jax.core.distributed import host_array
from novarl_jax.rollout.chat import RenderError
from novarl_jax.rollout.engine import EmptyPromptError, RolloutInfo, Trajectory, take_info
from novarl_jax.rollout.tokenizers import TextTooLongError
from novarl_jax.trainer.config import (
    ConfigError,
    eval_prompts_per_batch,
    prompt_too_long,
    prompt_unrenderable,
)

# Folded into the run's seed for the evaluation key ("eval" in ASCII).
EVAL_KEY_TAG = 0x6576616C


class Evaluator:
    """Scores a policy on the run's evaluation prompts (the same ones every time).

    Args:
        run: a :class:`~novarl_jax.trainer.build.Run` built with ``eval.interval > 0``.
        mesh: where the policy's parameters live (as the training rollouts').
    """

    def __init__(self, run: Any, mesh: Any = None):
        config = run.spec.config
        if run.eval_task is None:
            raise ValueError("the run has no validation: set eval.interval > 0")
        self.interval = int(config.eval.interval)
        self.prompts = int(config.eval.prompts)
        self.samples = int(config.eval.samples)
        self.prompts_per_batch = eval_prompts_per_batch(config)
        self.total = int(config.experiment.steps)
        self.engine = run.rollout_engine(mesh, validation=True)
        self.key = jax.random.fold_in(jax.random.key(config.experiment.seed), EVAL_KEY_TAG)
        self._encoded = self._encode_prompts(config)

    def _encode_prompts(self, config: Any) -> tuple:
        """The evaluation's prompts, drawn and tokenized once; fails now, naming the key, on
        prompts an evaluation could not run."""
        jsonl = config.task.name == "jsonl"
        if jsonl and len(self.engine.task) < self.prompts:
            raise ConfigError(
                "eval.prompts",
                f"{self.prompts} prompts asked but {config.eval.path} has {len(self.engine.task)}",
            )
        key = "eval.path" if jsonl else "rollout.max_prompt_length"
        try:
            return self.engine.encode_prompts(self.key, self.prompts)
        except TextTooLongError as e:
            raise prompt_too_long(e, key, "an evaluation prompt") from None
        except EmptyPromptError as e:
            where = "eval.path" if jsonl else "task.name"
            raise ConfigError(where, f"an evaluation prompt: {e}") from None
        except RenderError as e:
            raise prompt_unrenderable(e, "an evaluation prompt") from None
        except ValueError as e:
            raise ConfigError(key, f"an evaluation prompt does not fit: {e}") from None

    def due(self, step: int) -> bool:
        """Whether step ``step`` (1-based, finished) is evaluated."""
        return step % self.interval == 0 or step == self.total

    def sample(self, policy_params: Any, policy_version: int = 0) -> tuple[Any, Any]:
        """The evaluation rollouts of ``policy_params``: ``(trajectory, info)`` as
        :meth:`~novarl_jax.rollout.engine.RolloutEngine.rollout` returns them, over all
        ``eval.prompts`` prompts (the trajectory's arrays on the host when there were several
        batches)."""
        sample_key = jax.random.split(self.key)[1]  # as a rollout with self.key would
        parts = []
        for i, start in enumerate(range(0, self.prompts, self.prompts_per_batch)):
            rows = slice(start, start + self.prompts_per_batch)
            encoded = tuple(part[rows] for part in self._encoded)
            key = sample_key if i == 0 else jax.random.fold_in(sample_key, i)
            parts.append(self.engine.complete(policy_params, key, int(policy_version), encoded))
        return parts[0] if len(parts) == 1 else _joined(parts, self.prompts_per_batch)

    def __call__(self, policy_params: Any, policy_version: int = 0) -> dict[str, float]:
        """The validation metrics of ``policy_params`` (the policy's parameter tree)."""
        return self.metrics(self.sample(policy_params, policy_version)[0])

    def metrics(self, traj: Any) -> dict[str, float]:
        """The validation metrics of an evaluation's trajectory (from :meth:`sample`)."""
        valid = host_array(traj.valid) > 0
        scores = host_array(traj.rewards).astype(np.float64)
        lengths = host_array(traj.response_mask).sum(axis=1)
        kept = scores[valid]
        metrics = {
            "val/score/mean": float(kept.mean()) if kept.size else float("nan"),
            "val/score/std": float(kept.std()) if kept.size else float("nan"),
            "val/response_length/mean": (
                float(lengths[valid].mean()) if kept.size else float("nan")
            ),
        }
        if self.samples > 1:
            per_prompt = np.where(valid, scores, -np.inf).reshape(self.prompts, self.samples)
            best = per_prompt.max(axis=1)
            best = best[np.isfinite(best)]
            metrics["val/score/best_of_n/mean"] = float(best.mean()) if best.size else float("nan")
        return metrics


def _joined(parts: list[tuple[Trajectory, RolloutInfo]], prompts_per_batch: int) -> tuple:
    """One ``(trajectory, info)`` of batches of ``prompts_per_batch`` prompts, in order: host
    arrays, prompt (group) ids and invalid rows counted across the batches."""
    trajectories = [
        t._replace(group_ids=host_array(t.group_ids) + i * prompts_per_batch)
        for i, (t, _) in enumerate(parts)
    ]
    trajectory = jax.tree.map(
        lambda *xs: np.concatenate([host_array(x) for x in xs]), *trajectories
    )
    info = take_info(
        [(info, np.arange(len(info.prompts))) for _, info in parts],
        task_state=parts[-1][1].task_state,
    )
    return trajectory, info
