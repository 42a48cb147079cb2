"""Stopping a run cleanly on SIGTERM, the signal schedulers send some time before they kill a
job: a SLURM time limit or ``scancel``, ``docker stop``, ``timeout``, a Kubernetes eviction, a
preemption notice.

The run finishes the step in progress, checkpoints it (whatever ``checkpoint.interval``
says), waits for the save and raises :class:`StopRequested`; the command line prints where
it stopped and exits with status 143 (128 + SIGTERM), and rerunning the same command
resumes there. A step longer than the scheduler's grace period is cut by its SIGKILL, which
leaves the previous checkpoint intact; SLURM's ``--signal=TERM@SECONDS`` sends the signal
earlier.

One process: a SIGTERM handler, installed while the run trains (from the main thread, unless
SIGTERM is ignored), marks the stop; a second SIGTERM ends the process at once. Several
processes: JAX's preemption service, started by ``jax.distributed.initialize``, catches the
signal on any process, and every process stops after the same step
(``jax.experimental.multihost_utils.reached_preemption_sync_point``).
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any


class StopRequested(Exception):
    """A run stopped on SIGTERM after ``step`` (1-based), checkpointed there."""

    def __init__(self, step: int):
        super().__init__(f"stopped by SIGTERM after step {step}")
        self.step = step


class StopWatch:
    """Whether SIGTERM asked the run to stop; a context manager that installs the handler."""

    def __init__(self) -> None:
        import jax

        self._multi_process = jax.process_count() > 1
        self._received = False
        self._previous: Any = None

    def __enter__(self) -> StopWatch:
        main = threading.current_thread() is threading.main_thread()
        # Several processes: the preemption service's own handler must keep the signal.
        if main and not self._multi_process:
            previous = signal.getsignal(signal.SIGTERM)
            if previous is not signal.SIG_IGN:
                self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._received:  # a second SIGTERM: no more waiting for the step
            signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)
            self._previous = None
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self._received = True

    def requested(self, step: int) -> bool:
        """Whether to stop after ``step``; every process of a run calls it at every step."""
        if not self._multi_process:
            return self._received
        from jax.experimental import multihost_utils

        try:
            return bool(multihost_utils.reached_preemption_sync_point(step))
        except RuntimeError:  # jax_enable_preemption_service is off: SIGTERM ends the process
            return False
