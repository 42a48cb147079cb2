"""Checkpoints with orbax: the train state plus a JSON record of host-side state.

A checkpoint step directory holds two items: ``state`` (the :class:`TrainState` pytree, saved
with ``StandardSave``; restored onto the *current* mesh's shardings, so a checkpoint written
under one layout restores under another) and ``host`` (JSON: dataset position, metrics
history length, the config it was written with). orbax writes each step into a temporary
directory and renames it when complete, so a process killed mid-save leaves the previous
checkpoint restorable. Old checkpoints are removed the same way: orbax first renames a
step directory into ``todelete/`` (atomic), and its files are deleted from there, so a
process killed while deleting never leaves a half-deleted step that looks complete.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

TRASH = "todelete"


class Checkpointer:
    """Saves every ``interval`` steps, keeps the last ``keep``, restores the latest.

    Args:
        directory: where step directories go (created if missing).
        interval: save when ``step % interval == 0`` (and on ``force``).
        keep: how many recent checkpoints to keep.
        async_save: write in a background thread while training goes on.
    """

    def __init__(
        self, directory: str, *, interval: int = 10, keep: int = 3, async_save: bool = True
    ):
        self.directory = os.path.abspath(directory)
        self._trash = os.path.join(self.directory, TRASH)
        self._empty_trash()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(interval, 1),
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            todelete_subdir=TRASH,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "host")
        )

    def _empty_trash(self) -> None:
        # Steps in the trash were renamed there whole: deleting them loses nothing.
        if os.path.isdir(self._trash):
            for name in os.listdir(self._trash):
                shutil.rmtree(os.path.join(self._trash, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, host: dict, *, force: bool = False) -> bool:
        """Saves (asynchronously when enabled); returns whether a save was started."""
        self._empty_trash()
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
            ),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``step`` (default: latest) onto the shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set
        (see :func:`abstract_like`): arrays come back placed and resharded for it.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["host"])

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``tree``, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
