"""Tasks: prompts to sample and verifiable rewards to score completions with.

``make_task(name, **kwargs)`` builds a task from a config name: 'copy', 'reverse', 'sort',
'addition' or 'jsonl' (which needs ``path=``).
"""

from __future__ import annotations

from typing import Any

from novarl_jax.rollout.tasks.base import BaseTask, Task, numpy_rng, rewards_to_array
from novarl_jax.rollout.tasks.builtin import AdditionTask, CopyTask, ReverseTask, SortTask
from novarl_jax.rollout.tasks.jsonl import JSONLTask

TASKS: dict[str, type] = {
    "copy": CopyTask,
    "reverse": ReverseTask,
    "sort": SortTask,
    "addition": AdditionTask,
    "jsonl": JSONLTask,
}


def make_task(name: str, **kwargs: Any) -> Task:
    """Builds a task by name; ``kwargs`` go to its constructor.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).

    Example:
        >>> task = make_task("addition", reward_fn="novarl_jax.rollout.rewards:numeric_reward")
        >>> task.name
        'addition'
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = [
    "AdditionTask",
    "BaseTask",
    "CopyTask",
    "JSONLTask",
    "ReverseTask",
    "SortTask",
    "TASKS",
    "Task",
    "make_task",
    "numpy_rng",
    "rewards_to_array",
]
