"""When the trainer broadcasts new weights to its rollout workers.

A pure decision core over a small :class:`SyncState` (the optax pattern: ``init`` makes the
state, pure functions read it and return a new one; the clock is an argument, never read here)
and :class:`WeightSyncController`, a thin thread-safe wrapper that owns the state and a clock.

Versions count optimizer updates (the train state's ``policy_version``). A broadcast carries
the trainer's current version, and happens when (checked in this order)

- a *forced* broadcast is pending: ``'initial'`` (nothing broadcast yet), ``'resume'`` (the
  first broadcast after restoring a checkpoint) or ``'worker_restart'`` (a worker lost its
  parameters), or
- ``'interval'``: updates since the last broadcast >= ``interval``, or
- ``'staleness'``: some worker lags, ``trainer_version - worker_version >= max_staleness``, or
- ``'timeout'``: ``timeout_s > 0`` seconds have passed since the last broadcast,

and, except for the very first broadcast, only when there are updates not yet broadcast:
every broadcast carries a strictly greater version than the one before. A forced request
that arrives when nothing is new is served by the latest broadcast (the
:class:`~novarl_jax.sync.versioned.ParamStore` keeps it), and makes the next update broadcast
at once.

The trained-sample bound is :func:`admissible`: a rollout row sampled by version ``s`` may be
trained when the trainer, at version ``v`` as it takes the batch, has ``v - s <= max_staleness``.
The batch's PPO epochs and minibatches then reuse it exactly as the synchronous loop does.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import numpy as np

from novarl_jax.core.checks import check_int

INITIAL = "initial"
RESUME = "resume"
WORKER_RESTART = "worker_restart"
INTERVAL = "interval"
STALENESS = "staleness"
TIMEOUT = "timeout"
FORCED_REASONS = (INITIAL, RESUME, WORKER_RESTART)
REASONS = FORCED_REASONS + (INTERVAL, STALENESS, TIMEOUT)
# Why should_broadcast said no.
UP_TO_DATE = "up_to_date"  # nothing new since the last broadcast
NOT_DUE = "not_due"  # updates are pending, but no trigger has fired yet


class SyncState(NamedTuple):
    """The controller's state (host-side Python values, not a traced pytree).

    Attributes:
        interval: broadcast after this many updates (>= 1).
        max_staleness: broadcast when a worker lags this many versions (>= 1); also the bound
            on trained samples (:func:`admissible`).
        timeout_s: broadcast pending updates this many seconds after the last broadcast
            (0 = off).
        last_version: version of the last broadcast; None before the first.
        last_time: clock reading of the last broadcast; None before the first.
        forced: the pending forced reason (one of :data:`FORCED_REASONS`), or None.
        broadcasts: broadcasts recorded so far.
    """

    interval: int
    max_staleness: int
    timeout_s: float
    last_version: int | None = None
    last_time: float | None = None
    forced: str | None = INITIAL
    broadcasts: int = 0


def _check_forced(reason: Any) -> str:
    if reason not in FORCED_REASONS:
        raise ValueError(f"reason must be one of {list(FORCED_REASONS)}, got {reason!r}")
    return reason


def init(interval: int, max_staleness: int, timeout_s: float = 0.0, *, reason: str = INITIAL):
    """A fresh state whose first broadcast is forced with ``reason``.

    Args:
        interval: updates per broadcast, >= 1.
        max_staleness: versions a worker may lag before a broadcast, >= 1.
        timeout_s: seconds after which pending updates are broadcast, >= 0 (0 = off).
        reason: ``'initial'`` for a new run, ``'resume'`` after restoring a checkpoint.

    Returns:
        A :class:`SyncState`.

    Raises:
        ValueError: naming the bad argument.
    """
    interval = check_int("interval", interval, 1)
    max_staleness = check_int("max_staleness", max_staleness, 1)
    if (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float | np.integer | np.floating)
        or not math.isfinite(timeout_s)
        or timeout_s < 0
    ):
        raise ValueError(f"timeout_s must be a finite number >= 0 (0 = off), got {timeout_s!r}")
    return SyncState(
        interval=interval,
        max_staleness=max_staleness,
        timeout_s=float(timeout_s),
        forced=_check_forced(reason),
    )


def request_broadcast(state: SyncState, reason: str) -> SyncState:
    """Forces the next broadcast (a worker restarted, a run resumed).

    An earlier pending forced reason is kept: it is the one that names the broadcast.
    """
    reason = _check_forced(reason)
    return state if state.forced is not None else state._replace(forced=reason)


def _versions(worker_versions: Mapping[Any, int] | Iterable[int]) -> list[int]:
    items = (
        worker_versions.items()
        if isinstance(worker_versions, Mapping)
        else enumerate(worker_versions)
    )
    return [check_int(f"worker_versions[{k!r}]", v, 0) for k, v in items]


def should_broadcast(
    state: SyncState,
    now: float,
    trainer_version: int,
    worker_versions: Mapping[Any, int] | Iterable[int],
) -> tuple[bool, str]:
    """Whether to broadcast the trainer's version now, and why (pure).

    Args:
        state: the controller state.
        now: the current clock reading in seconds (any monotonic clock).
        trainer_version: the trainer's current policy version.
        worker_versions: the version each rollout worker holds (a mapping or an iterable).

    Returns:
        ``(True, reason)`` with reason in :data:`REASONS`, or ``(False, 'up_to_date')`` when
        nothing is new since the last broadcast, or ``(False, 'not_due')``.

    Raises:
        ValueError: a version is not an integer >= 0, the trainer is behind the last
            broadcast, or a worker is ahead of the trainer.
    """
    trainer_version = check_int("trainer_version", trainer_version, 0)
    held = _versions(worker_versions)
    if held and max(held) > trainer_version:
        raise ValueError(
            f"worker_versions {sorted(set(held))} include a version newer than "
            f"trainer_version={trainer_version}"
        )
    if state.last_version is None:
        return True, state.forced or INITIAL
    if trainer_version < state.last_version:
        raise ValueError(
            f"trainer_version={trainer_version} is older than the last broadcast "
            f"({state.last_version}); start a new state with init(..., reason='resume')"
        )
    pending = trainer_version - state.last_version
    if pending == 0:
        return False, UP_TO_DATE
    if state.forced is not None:
        return True, state.forced
    if pending >= state.interval:
        return True, INTERVAL
    if held and trainer_version - min(held) >= state.max_staleness:
        return True, STALENESS
    if state.timeout_s > 0 and now - state.last_time >= state.timeout_s:
        return True, TIMEOUT
    return False, NOT_DUE


def check_clock(clock: Any) -> Callable[[], float]:
    """``clock`` if it is a callable (returning seconds, e.g. ``time.monotonic``).

    Raises:
        ValueError: it is not callable.
    """
    if not callable(clock):
        raise ValueError(
            f"clock must be a callable returning seconds (e.g. time.monotonic), got {clock!r:.80}"
        )
    return clock


def _seconds(name: str, value: Any) -> float:
    """A clock reading as a finite float, or a ValueError naming where it came from."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
        raise ValueError(f"{name} must be a number of seconds, got {value!r:.80}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def record_broadcast(state: SyncState, now: float, version: int) -> SyncState:
    """The state after broadcasting ``version`` at clock reading ``now``.

    Raises:
        ValueError: ``version`` is not greater than the last broadcast version.
    """
    version = check_int("version", version, 0)
    if state.last_version is not None and version <= state.last_version:
        raise ValueError(
            f"version must increase: got {version} after the broadcast of {state.last_version}"
        )
    return state._replace(
        last_version=version, last_time=float(now), forced=None, broadcasts=state.broadcasts + 1
    )


def _sample_versions(sample_versions: Any, trainer_version: int) -> np.ndarray:
    """``sample_versions`` as flat int64 after checking they are integers in [0, trainer]."""
    if isinstance(sample_versions, (str, bytes, Mapping)):
        raise ValueError(
            f"sample_versions must be an array or sequence of integer versions, got "
            f"{sample_versions!r:.80}"
        )
    try:
        versions = np.asarray(sample_versions)
    except ValueError:  # a ragged nesting
        raise ValueError(
            f"sample_versions must be an array of integers, got a ragged "
            f"{type(sample_versions).__name__}"
        ) from None
    if versions.size == 0:
        return np.zeros((0,), np.int64)
    if versions.dtype.kind not in "iu":
        raise ValueError(
            f"sample_versions must be integers (e.g. Trajectory.policy_version), got dtype "
            f"{versions.dtype} (first values {versions.reshape(-1)[:4].tolist()})"
        )
    versions = versions.astype(np.int64).reshape(-1)
    if versions.min() < 0:
        raise ValueError(f"sample_versions must be >= 0, got {int(versions.min())}")
    if versions.max() > trainer_version:
        raise ValueError(
            f"sample_versions include {int(versions.max())}, newer than "
            f"trainer_version={trainer_version}; a sample cannot be newer than the trainer "
            f"that takes it"
        )
    return versions


def staleness(trainer_version: int, sample_versions: Any) -> np.ndarray:
    """Per-row staleness ``trainer_version - sample_version``.

    Args:
        trainer_version: the trainer's version as it takes the batch, an integer >= 0.
        sample_versions: [R] int, the version that sampled each row
            (``Trajectory.policy_version``; any integer array or sequence).

    Returns:
        [R] int64, every entry >= 0.

    Raises:
        ValueError: a version is not an integer >= 0, or a sample version is newer than
            ``trainer_version``.
    """
    trainer_version = check_int("trainer_version", trainer_version, 0)
    return trainer_version - _sample_versions(sample_versions, trainer_version)


def admissible(trainer_version: int, sample_versions: Any, max_staleness: int) -> bool:
    """True when no row is staler than ``max_staleness`` (the batch may be trained).

    Raises:
        ValueError: as :func:`staleness`, or ``max_staleness`` is not an integer >= 0.
    """
    max_staleness = check_int("max_staleness", max_staleness, 0)
    lag = staleness(trainer_version, sample_versions)
    return bool(lag.size == 0 or lag.max() <= max_staleness)


class WeightSyncController:
    """Decides when the trainer broadcasts weights to rollout workers (thread-safe).

    The quickstart's cadence flags map onto the arguments:
    ``experiment.weight_sync_interval`` -> ``interval``,
    ``experiment.weight_sync_max_staleness`` -> ``max_staleness``,
    ``experiment.weight_sync_timeout_s`` -> ``timeout_s`` (see :meth:`from_config`).

    Args:
        interval: updates per broadcast, >= 1.
        max_staleness: versions a worker may lag before a broadcast is forced, >= 1; also the
            most a trained sample may lag the trainer.
        timeout_s: broadcast pending updates at least this often, in seconds (0 = off).
        clock: returns seconds; called only when a method gets no ``now``.
        reason: what forces the first broadcast: ``'initial'`` or ``'resume'``.

    Raises:
        ValueError: naming the bad argument.

    Example:
        >>> controller = WeightSyncController(interval=4, max_staleness=6, timeout_s=30.0)
        >>> controller.maybe_broadcast(0, {}, publish_fn=lambda v: None)
        'initial'
        >>> [controller.maybe_broadcast(v, {"w0": 0}, lambda v: None) for v in (1, 2, 3, 4)]
        [None, None, None, 'interval']
    """

    def __init__(
        self,
        interval: int,
        max_staleness: int,
        timeout_s: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        reason: str = INITIAL,
    ):
        self._state = init(interval, max_staleness, timeout_s, reason=reason)
        self._clock = check_clock(clock)
        self._lock = threading.RLock()
        self._counts: collections.Counter[str] = collections.Counter()

    @classmethod
    def from_config(
        cls, config: Any, *, clock: Callable[[], float] = time.monotonic, reason: str = INITIAL
    ) -> WeightSyncController:
        """From a run config's ``experiment.weight_sync_*`` keys.

        Raises:
            ValueError: a bad value, naming its config key.
        """
        exp = config.experiment
        try:
            return cls(
                exp.weight_sync_interval,
                exp.weight_sync_max_staleness,
                exp.weight_sync_timeout_s,
                clock=clock,
                reason=reason,
            )
        except ValueError as e:
            name = str(e).split(" ", 1)[0]
            if name in ("interval", "max_staleness", "timeout_s"):
                raise ValueError(f"experiment.weight_sync_{e}") from None
            raise

    @property
    def state(self) -> SyncState:
        return self._state

    @property
    def max_staleness(self) -> int:
        return self._state.max_staleness

    def counts(self) -> dict[str, int]:
        """Broadcasts so far by reason (every reason in :data:`REASONS`, zeros included)."""
        with self._lock:
            return {reason: self._counts[reason] for reason in REASONS}

    def _now(self, now: float | None) -> float:
        """``now``, else the clock's reading; checked before anything is decided or published
        (a reading that cannot be recorded would leave a broadcast published but unrecorded).
        """
        if now is None:
            return _seconds("the clock's reading", self._clock())
        return _seconds("now", now)

    def should_broadcast(
        self, trainer_version: int, worker_versions: Any, *, now: float | None = None
    ) -> tuple[bool, str]:
        """:func:`should_broadcast` on the current state."""
        with self._lock:
            return should_broadcast(self._state, self._now(now), trainer_version, worker_versions)

    def record_broadcast(self, version: int, reason: str, *, now: float | None = None) -> None:
        """Records a broadcast of ``version`` made for ``reason``."""
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {list(REASONS)}, got {reason!r}")
        with self._lock:
            self._state = record_broadcast(self._state, self._now(now), version)
            self._counts[reason] += 1

    def request_broadcast(self, reason: str = WORKER_RESTART) -> None:
        """Forces the next broadcast (:func:`request_broadcast`)."""
        with self._lock:
            self._state = request_broadcast(self._state, reason)

    def maybe_broadcast(
        self,
        trainer_version: int,
        worker_versions: Any,
        publish_fn: Callable[[int], Any],
        *,
        now: float | None = None,
    ) -> str | None:
        """Decides, and if due calls ``publish_fn(trainer_version)`` and records it.

        Returns:
            The broadcast's reason, or None when nothing was broadcast.
        """
        if not callable(publish_fn):  # found on every call, not only when one is due
            raise ValueError(f"publish_fn must be callable, got {publish_fn!r}")
        with self._lock:
            now = self._now(now)
            due, reason = should_broadcast(self._state, now, trainer_version, worker_versions)
            if not due:
                return None
            publish_fn(trainer_version)
            self.record_broadcast(trainer_version, reason, now=now)
            return reason
