"""One run per workdir, and no run in a directory that holds something else's config.json.

A run holds an exclusive ``flock`` on ``WORKDIR/.lock`` (which records its pid) from the
moment it opens the workdir until it closes it: a second run on the same workdir, which would
interleave its metrics with the first's and race it for the same checkpoint steps, stops at
once naming the first. The operating system releases the lock when the process ends, however
it ends (a SIGKILL included), so a stale file never blocks a rerun. Only the main process of
a multi-process run locks; the others share its workdir.

A run writes its own ``config.json`` into the workdir, so a directory whose ``config.json``
is not a run config (a Hugging Face model's, typically) is refused before it is overwritten.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import IO

from novarl_jax.trainer.config import ConfigError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"  # saved_config.FILE_NAME


class WorkdirInUseError(ConfigError):
    """Another process holds the workdir's lock."""


def lock_workdir(workdir: str) -> IO[str]:
    """Takes the workdir's lock (creating the directory); returns the open lock file, which
    holds the lock until it is closed (see :func:`release`).

    Raises:
        WorkdirInUseError: another run holds it; the message names its pid.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    handle = open(path, "a+")  # noqa: SIM115 (held for the run's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "unknown"
        handle.close()
        raise WorkdirInUseError(
            "--workdir",
            f"{workdir} is in use by another run (pid {pid}, holding {path}); wait for it to "
            "finish, or train in another directory",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def release(handle: IO[str] | None) -> None:
    """Releases a lock from :func:`lock_workdir` (None: nothing to release)."""
    if handle is not None and not handle.closed:
        handle.close()  # closing the descriptor releases the flock


def foreign_config(workdir: str) -> str | None:
    """Why ``workdir/config.json`` is not a run's config (None when it is one, or absent)."""
    path = os.path.join(workdir, CONFIG_FILE)
    try:
        with open(path) as f:
            saved = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None  # a run's damaged record: the resume's own check names it
    if isinstance(saved, dict) and isinstance(saved.get("experiment"), dict):
        return None
    kind = saved.get("model_type") if isinstance(saved, dict) else None
    what = f"a Hugging Face model's (model_type {kind!r})" if kind else "not a run's config"
    return (
        f"{workdir} holds a config.json that is {what}, which a run would overwrite with its "
        "own; train in another directory"
    )
