"""Tasks: prompts to sample and verifiable rewards to score completions with.

``make_task(name, **kwargs)`` builds a task from a config name: 'copy', 'reverse', 'sort',
'addition' or 'jsonl' (which needs ``path=``), or ``"module.path:Class"`` for a task of your
own: a class following the :class:`~novarl_jax.rollout.tasks.base.Task` protocol (subclass
:class:`~novarl_jax.rollout.tasks.base.BaseTask` to get the reward override and a stateless
``get_state``/``set_state``), built with the config's ``task.options`` as keyword arguments.
Give it an ``alphabet`` string for the built-in character tokenizer (else bytes are used), or
set ``model.tokenizer``.
"""

from __future__ import annotations

import inspect
from typing import Any

from novarl_jax.rollout.tasks.base import (
    BaseTask,
    Task,
    TaskError,
    check_task,
    numpy_rng,
    rewards_to_array,
)
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

    Args:
        name: a key of :data:`TASKS`, or ``"module.path:Class"`` (a task class of your own).

    Raises:
        ValueError: an unknown name (the message lists the valid ones), a class that cannot
            be imported, or one that does not build a :class:`Task`.

    Example:
        >>> task = make_task("addition", reward_fn="novarl_jax.rollout.rewards:numeric_reward")
        >>> task.name
        'addition'
    """
    task = task_class(name)(**kwargs)
    check_task(task, f"task {name!r}")
    return task


def task_class(name: str) -> type:
    """The class a task name stands for: a built-in's, or the ``"module.path:Class"`` one.

    Raises:
        ValueError: an unknown built-in name, or a class that cannot be imported.
    """
    if ":" in name:
        from novarl_jax.rollout.rewards import load_object

        cls = load_object(name, "task", "Class")
        if not inspect.isclass(cls):
            raise ValueError(f"task {name!r} is not a class")
        return cls
    if name not in TASKS:
        raise ValueError(
            f"unknown task {name!r}; valid tasks: {sorted(TASKS)}, or 'module.path:Class' "
            f"for a task of your own"
        )
    return TASKS[name]


__all__ = [
    "AdditionTask",
    "BaseTask",
    "CopyTask",
    "JSONLTask",
    "ReverseTask",
    "SortTask",
    "TASKS",
    "Task",
    "TaskError",
    "make_task",
    "numpy_rng",
    "rewards_to_array",
    "task_class",
]
