"""One-line messages of the command line: a backend JAX could not start, and where a run
stopped by Ctrl-C stands."""

from __future__ import annotations

import importlib.util
import json
import os
import re

# Neither imports JAX: this module is loaded before JAX may start.
from novarl_jax.trainer.metrics import METRICS_FILE
from novarl_jax.trainer.saved_config import checkpoint_steps

# The packages that give JAX a backend besides the CPU, and the platform of each.
_PLUGINS = (("jax_cuda12_plugin", "cuda"), ("jax_cuda13_plugin", "cuda"), ("libtpu", "tpu"))


def accelerator_installed() -> bool:
    return any(importlib.util.find_spec(m) is not None for m, _ in _PLUGINS)


def nvidia_gpu_visible() -> bool:
    # The device files JAX looks for before it starts its CUDA backend.
    return any(os.path.exists(d) for d in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg"))


def backend_error_message(platforms: str, error: BaseException) -> str:
    """One line for JAX's failure to start a backend: what was asked for, why it failed and
    which backends are installed.

    Args:
        platforms: the ``JAX_PLATFORMS`` value ('' when unset).
        error: what ``jax.devices()`` raised (a RuntimeError naming the backend, or a bare
            AssertionError when every platform asked for was skipped, as ``cuda`` is without
            a visible NVIDIA GPU).
    """
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    failed = re.match(r"Unable to initialize backend '([^']+)': (.*)$", text)
    if failed:
        name, reason = failed.group(1), failed.group(2)
        reason = re.sub(r"\s*\((set JAX_PLATFORMS|you may need)[^)]*\)\.?$", "", reason)
        reason = reason.rstrip(".")
    else:
        name = platforms or "its default backend"
        asked = {p.strip() for p in platforms.split(",")}
        if text:
            reason = text
        elif asked & {"cuda", "gpu"} and not nvidia_gpu_visible():
            reason = "no NVIDIA GPU is visible"
        else:
            reason = f"{type(error).__name__}, no backend started"
    found = [f"{platform} ({m})" for m, platform in _PLUGINS if importlib.util.find_spec(m)]
    installed = (
        "cpu, " + ", ".join(found)
        if found
        else "cpu only (no " + ", ".join(m for m, _ in _PLUGINS[:-1]) + f" or {_PLUGINS[-1][0]})"
    )
    if platforms:
        return (
            f"JAX_PLATFORMS={platforms}: JAX could not start {name!r} ({reason}); installed: "
            f"{installed}; unset JAX_PLATFORMS or set it to an installed backend (pip install "
            "-e '.[cuda12]' or '.[tpu]' adds one)"
        )
    return (
        f"JAX could not start its backend {name!r} ({reason}); installed: {installed}; set "
        "JAX_PLATFORMS=cpu to run on the CPU"
    )


def _file_mark(path: str) -> tuple[int, int] | None:
    """What tells whether ``path`` changed since: its modification time and size."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


def _last_row_step(path: str) -> int | None:
    """The ``step`` of the last row of a JSON-lines file (None if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue
        return step if isinstance(step, int) else None
    return None


def training_mark(workdir: str) -> tuple[tuple[int, int] | None, int]:
    """What :func:`interrupted_message` compares with: the metrics file's
    :func:`_file_mark` and the last checkpoint step (0 without one) before training."""
    steps = checkpoint_steps(workdir)
    return _file_mark(os.path.join(workdir, METRICS_FILE)), steps[-1] if steps else 0


def write_failed_message(error: OSError, workdir: str) -> str:
    """The line for a run stopped by a file it could not write (a full disk, a workdir made
    read-only): the file, the cause and the checkpoint a rerun resumes from."""
    what = f"{error.filename}: {error.strerror}" if error.filename else str(error)
    if error.filename and error.filename2:  # a rename onto the file that failed
        what = f"{error.filename2} (replacing it with {error.filename}): {error.strerror}"
    return (
        f"cannot write {what}; {last_checkpoint(workdir)}; free the space or fix the "
        "permissions and rerun"
    )


def last_checkpoint(workdir: str) -> str:
    """``the last checkpoint is step N in WORKDIR`` (or that there is none yet)."""
    steps = checkpoint_steps(workdir)
    workdir = os.path.abspath(workdir)
    if steps:
        return f"the last checkpoint is step {steps[-1]} in {workdir}"
    return f"no checkpoint in {workdir} yet"


def interrupted_message(workdir: str, before: tuple | None) -> str:
    """The line for a run stopped by Ctrl-C: the last step it finished, its last checkpoint.

    Args:
        workdir: the run's directory.
        before: :func:`training_mark` when training began, None on a process that does not
            write the metrics. The metrics file's last row is a step of this run when the
            file changed since and the step is past the checkpoint the run resumed from.
    """
    workdir = os.path.abspath(workdir)
    step = None
    if before is not None:
        metrics_mark, resumed_from = before
        path = os.path.join(workdir, METRICS_FILE)
        if _file_mark(path) not in (None, metrics_mark):
            step = _last_row_step(path)
        if step is not None and step <= resumed_from:
            step = None
    if step is not None:
        head = f"interrupted after step {step}"
    elif before is not None:
        head = "interrupted before this run finished a step"
    else:
        head = "interrupted"
    then = "resume from it" if checkpoint_steps(workdir) else "start again"
    return f"{head}; {last_checkpoint(workdir)}; rerun the same command to {then}"
