"""One run per workdir, and no run in a directory that holds something else's config.json.

A run holds an exclusive ``flock`` on ``WORKDIR/.lock`` (which records its pid) from the
moment it opens the workdir until it closes it: a second run on the same workdir, which would
interleave its metrics with the first's and race it for the same checkpoint steps, stops
naming the first. The operating system releases the lock when the process ends, however it
ends (a SIGKILL included), so a stale file never blocks a rerun. The main process of a
multi-process run takes it for all of them, and then checks that every process sees the
directory it locked (:data:`SHARED_CHECK_FILE`): the processes write each checkpoint together,
so a workdir on each host's own disk is refused before anything runs. On a file system without
``flock`` (some parallel file systems mount without it) the run goes on unlocked, with a
warning.

A run writes its own ``config.json`` into the workdir, so a directory whose ``config.json``
is not a run config (a Hugging Face model's, typically) is refused before it is overwritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from typing import IO

from novarl_jax.trainer.config import ConfigError
from novarl_jax.trainer.saved_config import FILE_NAME as CONFIG_FILE

LOCK_FILE = ".lock"
SHARED_CHECK_FILE = ".shared_check"  # + "-TOKEN": a multi-process run's start, removed after


class WorkdirInUseError(ConfigError):
    """Another process holds the workdir's lock."""


class LockUnsupported(OSError):
    """The workdir's file system cannot ``flock``; the message says which error it gave."""


def url_path(path: str | os.PathLike) -> str | None:
    """Why ``path`` (a workdir or an export directory) cannot be used: it is a URL
    (``gs://bucket/run``), which the files of a run, written with ``open``, would take for
    a relative directory named ``gs:``; None for a file system path."""
    path = os.fspath(path)
    if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path):
        return None
    return (
        f"{path} is a URL; give a file system path (mount the bucket, e.g. with gcsfuse, and "
        "give a directory under the mount)"
    )


def _token_path(workdir: str, token: int) -> str:
    # Named by the token: a file system's cached lookup of an earlier run's file (gcsfuse,
    # NFS) cannot answer for this one.
    return os.path.join(workdir, f"{SHARED_CHECK_FILE}-{token}")


def write_token(workdir: str) -> int:
    """Writes a fresh token (an int in [1, 2**31 - 1)) into ``workdir`` for the other
    processes of a run to read back (:func:`sees_token`); returns it.

    Raises:
        OSError: it cannot be written.
    """
    token = int.from_bytes(os.urandom(4), "little") % (2**31 - 2) + 1
    with open(_token_path(workdir, token), "w") as f:
        f.write(f"{token}\n")
    return token


def sees_token(workdir: str, token: int) -> bool:
    """Whether this process reads ``token`` back from ``workdir``."""
    try:
        with open(_token_path(workdir, token)) as f:
            return f.read().strip() == str(token)
    except OSError:
        return False


def remove_token(workdir: str, token: int) -> None:
    """Removes the token file of :func:`write_token` (gone already: nothing to do)."""
    with contextlib.suppress(OSError):
        os.remove(_token_path(workdir, token))


def _in_use(workdir: str, path: str, handle: IO[str]) -> WorkdirInUseError:
    handle.seek(0)
    pid = handle.read().strip() or "unknown"
    return WorkdirInUseError(
        "--workdir",
        f"{workdir} is in use by another run (pid {pid}, holding {path}); wait for it to "
        "finish, or train in another directory",
    )


def lock_workdir(workdir: str) -> IO[str]:
    """Takes the workdir's lock (creating the directory); returns the open lock file, which
    holds the lock until :func:`release` (keep a reference: closing it releases the lock).

    Raises:
        WorkdirInUseError: another run holds it; the message names its pid.
        LockUnsupported: the file system cannot lock (the caller may go on without).
        OSError: the lock file cannot be written.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    handle = open(path, "a+")  # noqa: SIM115 (held for the run's lifetime)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _in_use(workdir, path, handle) from None
        except OSError as e:
            raise LockUnsupported(f"cannot lock {path}: {e.strerror}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def release(handle: IO[str] | None) -> None:
    """Releases a lock from :func:`lock_workdir` (None: nothing to release). Unlocks before
    closing: a child process forked meanwhile holds a copy of the descriptor, which would
    otherwise keep the lock after the run."""
    if handle is not None and not handle.closed:
        try:
            fcntl.flock(handle, fcntl.LOCK_UN)
        finally:
            handle.close()


def workdir_in_use(workdir: str) -> WorkdirInUseError | None:
    """The error a run starting on ``workdir`` now would stop with, without taking the lock
    or creating anything (None: free, or not lockable here)."""
    path = os.path.join(workdir, LOCK_FILE)
    try:
        handle = open(path)  # noqa: SIM115
    except OSError:
        return None  # no lock file: no run has it
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return _in_use(workdir, path, handle)
        except OSError:
            return None
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def existing_ancestor(path: str) -> str | None:
    """The absolute ``path`` itself when it exists, else its nearest ancestor that does (None
    when none does)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return path


# The directories a run keeps in its workdir: orbax checkpoints, the plots of the end of a
# run, TensorBoard's event files.
RUN_DIRECTORIES = ("checkpoints", "plots", "tensorboard")


def foreign_config(workdir: str) -> str | None:
    """Why ``workdir`` cannot hold a run: its ``config.json`` is not a run's config, one of
    the files a run keeps there is a directory or another non-file, one of its directories a
    file, or it cannot be written (None when none of these)."""
    from novarl_jax.trainer.metrics import METRICS_FILE  # imports the run's config modules
    from novarl_jax.trainer.samples import FILE_NAME as SAMPLES_FILE
    from novarl_jax.trainer.saved_config import MODEL_FILE, TOKENIZER_FILE

    for name in (CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, METRICS_FILE, SAMPLES_FILE):
        entry = os.path.join(workdir, name)
        if os.path.lexists(entry) and not os.path.isfile(entry):
            what = "a directory" if os.path.isdir(entry) else "a broken link or a special file"
            return f"{entry} is {what}, where a run keeps its {name} file; move it away"
    for name in RUN_DIRECTORIES:
        entry = os.path.join(workdir, name)
        if os.path.lexists(entry) and not os.path.isdir(entry):
            return f"{entry} is a file, where a run keeps its {name}/ directory; move it away"
    existing = existing_ancestor(workdir) or os.path.abspath(workdir)
    if not os.access(existing, os.W_OK | os.X_OK):
        where = (
            ""
            if existing == os.path.abspath(workdir)
            else f" (its nearest existing parent {existing} is not)"
        )
        return f"{workdir} is not writable by this user{where}; train in another directory"
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
