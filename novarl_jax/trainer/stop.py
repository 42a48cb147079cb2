"""Stopping a run cleanly on SIGTERM, the signal schedulers send some time before they kill a
job: a SLURM time limit or ``scancel``, ``docker stop``, ``timeout``, a Kubernetes eviction, a
preemption notice.

The run finishes the step in progress, checkpoints it (whatever ``checkpoint.interval``
says), waits for the save and raises :class:`StopRequested`; the command line prints where
it stopped and exits with status 143 (128 + SIGTERM), and rerunning the same command
resumes there. A step longer than the scheduler's grace period is cut by its SIGKILL, which
leaves the previous checkpoint intact; SLURM's ``--signal=TERM@SECONDS`` sends the signal
earlier. A SIGTERM during the last step changes nothing: the run ends as it would have. The
asynchronous trainer waiting for a rollout between steps does not wait for it: it checkpoints
the step it last finished (``Session.stop_between_steps``) and stops there.

While a :class:`StopWatch` is open (a training session; the command line opens one from its
start, so a signal during start-up or compilation stops the run after its first step), a
SIGTERM handler marks the stop; a second SIGTERM ends the process at once. The handler is
installed from the main thread only (``train()`` called from another thread keeps the
process's own SIGTERM action) and not where SIGTERM is ignored. In a multi-process run every
process gathers every process's mark after each step, so a signal to any of them stops all of
them after the same step; :func:`~novarl_jax.core.distributed.initialize_multihost` turns
JAX's preemption service off, whose own SIGTERM handler would otherwise take the signal.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

# One handler per process, shared by nested watches (the command line's and its session's).
_state: dict[str, Any] = {"depth": 0, "previous": None, "received": False}
_lock = threading.Lock()


class StopRequested(Exception):
    """A run stopped on SIGTERM after ``step`` (1-based), checkpointed there."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


def _handle(signum: int, frame: Any) -> None:
    if _state["received"]:  # a second SIGTERM: no more waiting for the step
        signal.signal(signal.SIGTERM, _state["previous"] or signal.SIG_DFL)
        _state["depth"], _state["previous"] = 0, None
        os.kill(os.getpid(), signal.SIGTERM)
        return
    _state["received"] = True


class StopWatch:
    """Whether SIGTERM asked the run to stop; a context manager that installs the handler
    (the outermost of nested watches installs it and puts the previous one back)."""

    def __init__(self) -> None:
        self._installed = False

    def __enter__(self) -> StopWatch:
        if threading.current_thread() is not threading.main_thread():
            return self
        with _lock:
            if _state["depth"] == 0:
                if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
                    return self
                _state["previous"] = signal.signal(signal.SIGTERM, _handle)
                _state["received"] = False
            _state["depth"] += 1
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._installed:
            return
        self._installed = False
        with _lock:
            _state["depth"] = max(_state["depth"] - 1, 0)  # 0 already after a second SIGTERM
            if _state["depth"] == 0 and _state["previous"] is not None:
                try:
                    signal.signal(signal.SIGTERM, _state["previous"])
                except ValueError:  # closed from another thread: the handler stays
                    return
                _state["previous"] = None

    def requested(self) -> bool:
        """Whether to stop after the step just finished. In a multi-process run this gathers
        every process's mark, so every process must call it after the same steps."""
        import jax

        received = bool(_state["received"]) and self._installed
        if jax.process_count() == 1:
            return received
        import numpy as np
        from jax.experimental import multihost_utils

        marks = multihost_utils.process_allgather(np.asarray([received], np.int32))
        return bool(np.asarray(marks).any())
