"""The task protocol: sample prompts with a key, score completions with a verifiable reward.

A task is a host-side object (it works on Python strings and lists, not arrays)::

    prompts, metadata = task.sample_prompts(key, batch_size)     # B prompts, B dicts
    rewards, info = task.score(prompts, completions, metadata)   # float32 [B], B dicts

A prompt is a string, or a conversation (a list of ``{"role", "content"}`` messages, which the
run's chat template lays out: ``rollout.chat_template=True``). ``metadata[i]`` carries what
scoring needs (the built-in tasks put the reference answer under ``'answer'``). Every task
also has ``get_state()`` / ``set_state(state)``: tasks whose prompts come from an iterator
(datasets) return their position as a small JSON-able state, which the trainer checkpoints;
key-driven tasks return ``{}`` (:class:`BaseTask` provides that). A task of your own runs
under the command line as ``task.name="module.path:Class"``
(see :func:`~novarl_jax.rollout.tasks.make_task`).
"""

from __future__ import annotations

import traceback
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import numpy as np

from novarl_jax.rollout.rewards import RewardFn, RewardFunctionError, load_reward_fn


@runtime_checkable
class Task(Protocol):
    """What the rollout engine needs from a task."""

    name: str

    def sample_prompts(self, key: jax.Array, batch_size: int) -> tuple[list[str], list[dict]]:
        """B prompts and one metadata dict per prompt."""
        ...

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[np.ndarray, list[dict]]:
        """Rewards float32 [B] (NaN/inf = could not be scored) and one info dict per sample."""
        ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...


def _where(fn: Any, error: BaseException) -> str:
    """`` (at FILE:LINE)``: the last line of ``fn``'s own file that ``error`` passed through
    (its file and line, not a library's it called), or ``''``."""
    code = getattr(fn, "__code__", None) or getattr(getattr(fn, "__func__", None), "__code__", None)
    if code is None:
        return ""
    frames = [
        f for f in traceback.extract_tb(error.__traceback__) if f.filename == code.co_filename
    ]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def unwrapped(task: Any) -> Any:
    """The task a wrapper (one that sets ``__wrapped__``, e.g. a lock around it) holds."""
    while getattr(task, "__wrapped__", None) is not None:
        task = task.__wrapped__
    return task


def task_label(task: Any) -> str:
    """How messages name ``task``: its ``name``, unless that is only inherited from a built-in
    task (a task of one's own subclassing ``CopyTask`` is not ``'copy'``): then, or without a
    name, ``'module:Class'``."""
    task = unwrapped(task)
    cls = type(task)
    owner = next((c for c in cls.__mro__ if "name" in vars(c)), None)
    own = "name" in getattr(task, "__dict__", {}) or (
        owner is not None
        and (
            cls.__module__.startswith("novarl_jax.")
            or not owner.__module__.startswith("novarl_jax.")
        )
    )
    label = f"{cls.__module__}:{cls.__qualname__}"
    try:
        return str(task.name) if own else label
    except Exception:  # noqa: BLE001 - a name that cannot be read must not hide the error
        return label


class TaskError(RuntimeError):
    """A task's ``sample_prompts`` raised; the message names the task and its line."""


def sample_task_prompts(task: Any, key: jax.Array, batch_size: int) -> tuple[list, list]:
    """``task.sample_prompts(key, batch_size)``, an exception it raises as a
    :class:`TaskError` that names the task and the line of its own code it came from."""
    try:
        return task.sample_prompts(key, batch_size)
    except Exception as e:  # noqa: BLE001 - any error of the task's own code: named, chained
        name = task_label(task)
        where = _where(getattr(type(unwrapped(task)), "sample_prompts", None), e)
        raise TaskError(
            f"task {name!r} sample_prompts() raised {type(e).__name__}: {e}{where}"
        ) from e


def check_task(task: Any, what: str = "task") -> None:
    """Raises ValueError naming what ``task`` (an instance, or a class before it is built)
    lacks of the :class:`Task` protocol, if any; ``what`` begins the message (e.g.
    ``"task 'module:Class'"``)."""
    if isinstance(task, Task):
        return
    missing = [m for m in ("sample_prompts", "score", "get_state", "set_state")
               if not callable(getattr(task, m, None))]  # fmt: skip
    if not missing:
        return
    raise ValueError(
        f"{what} lacks {', '.join(missing)} of the Task protocol "
        f"(novarl_jax.rollout.tasks.base; subclass BaseTask for the state methods)"
    )


def numpy_rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a JAX key (typed or raw uint32), for host-side sampling."""
    key = jax.numpy.asarray(key) if not isinstance(key, jax.Array) else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    data = np.asarray(key)
    if data.dtype != np.uint32 or data.size < 1:
        raise ValueError(
            f"key must be a jax.random key (typed, or raw uint32), got dtype {data.dtype}"
        )
    return np.random.default_rng([int(x) for x in data.reshape(-1)])


def check_batch_size(batch_size: Any) -> int:
    if (
        isinstance(batch_size, bool)
        or not isinstance(batch_size, (int, np.integer))
        or (batch_size < 1)
    ):
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return int(batch_size)


def rewards_to_array(values: Any, batch_size: int, source: str) -> np.ndarray:
    """Converts a reward function's output to float32 [B], checking its length and type.

    Non-finite values pass through (the rollout engine reports and excludes them).

    Raises:
        RewardFunctionError: not a sequence of B real numbers.
    """
    try:
        scalar = values is None or np.ndim(values) == 0
    except ValueError:  # ragged
        scalar = False
    if scalar:
        raise RewardFunctionError(
            f"{source} returned {values!r:.60}, not a list; it is called once per batch and "
            f"must return {batch_size} floats, one per completion"
        )
    if any(isinstance(v, str | bytes) for v in values):
        raise RewardFunctionError(
            f"{source} must return a list of floats, got text among them: {list(values)!r:.80}"
        )
    if (missing := next((i for i, v in enumerate(values) if v is None), None)) is not None:
        # NumPy would read None as NaN, a reward the engine excludes: a forgotten return.
        raise RewardFunctionError(
            f"{source} returned None for completion {missing} (a missing return?); it must "
            f"return a float for every completion (float('nan') to exclude one)"
        )
    try:
        rewards = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        shown = repr(values) if len(repr(values)) <= 200 else repr(values)[:200] + "..."
        raise RewardFunctionError(f"{source} must return a list of floats, got {shown}") from err
    if rewards.shape != (batch_size,):
        raise RewardFunctionError(
            f"{source} returned {rewards.shape} rewards for {batch_size} completions; "
            f"it must return one float per completion"
        )
    return rewards.astype(np.float32)


class BaseTask:
    """Scores with a reward function; subclasses implement ``sample_prompts``.

    Args:
        reward_fn: overrides the task's default reward: a callable or
            ``"module.path:function"`` with the signature
            ``(prompts, completions, metadata) -> list[float]``.
    """

    name = "task"

    def __init__(self, reward_fn: str | RewardFn | None = None):
        self._reward_fn = None if reward_fn is None else load_reward_fn(reward_fn)
        self._reward_name = (
            reward_fn
            if isinstance(reward_fn, str) or reward_fn is None
            else getattr(reward_fn, "__qualname__", repr(reward_fn))
        )

    def default_reward(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> list[float]:
        raise NotImplementedError

    def sample_prompts(self, key: jax.Array, batch_size: int) -> tuple[list[str], list[dict]]:
        raise NotImplementedError

    def score(
        self, prompts: Sequence[str], completions: Sequence[str], metadata: Sequence[dict]
    ) -> tuple[np.ndarray, list[dict]]:
        """Rewards float32 [B] and per-sample info ``{'reward', 'answer', 'completion'}``."""
        if not (len(prompts) == len(completions) == len(metadata)):
            raise ValueError(
                f"prompts, completions and metadata must have the same length, got "
                f"{len(prompts)}, {len(completions)}, {len(metadata)}"
            )
        fn = self._reward_fn or self.default_reward
        if self._reward_fn is None:
            source = f"the default reward function of task {self.name!r}"
        else:
            source = f"reward function {self._reward_name!r} of task {self.name!r}"
        try:
            values = fn(list(prompts), list(completions), list(metadata))
        except Exception as e:  # noqa: BLE001 - named, with the cause chained
            raise RewardFunctionError(
                f"{source} raised {type(e).__name__}: {e}{_where(fn, e)}"
            ) from e
        rewards = rewards_to_array(values, len(prompts), source)
        info = [
            {"reward": float(r), "answer": m.get("answer"), "completion": c}
            for r, m, c in zip(rewards, metadata, completions, strict=True)
        ]
        return rewards, info

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        if state:
            raise ValueError(f"task {self.name!r} has no state, got {state!r}")
