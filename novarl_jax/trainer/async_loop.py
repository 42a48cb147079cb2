"""Asynchronous PPO/GRPO: rollout workers sample while the trainer learns.

Rollout workers sample with the latest parameters they have received and push rollouts into a
bounded queue; the trainer takes one rollout batch per step, trains on it exactly as the
synchronous loop does (:meth:`Trainer.iteration`: scoring, advantages, epochs x minibatches
of updates), and after every step asks a :class:`~novarl_jax.sync.WeightSyncController`
whether to broadcast its parameters (a copy, published to a :class:`~novarl_jax.sync.ParamStore`
under the train state's ``policy_version``).

Staleness bound. A rollout row records the version that sampled it. When the trainer, at
version ``v``, takes a batch sampled by version ``s``, its staleness is ``v - s``; a batch
with any row staler than ``experiment.weight_sync_max_staleness`` is *dropped* (counted in
``sync/dropped_samples``) and the trainer takes the next one. Waiting cannot make a queued
batch fresher, and dropping keeps every step's batch shape static. Broadcasts bound how stale
a *new* rollout starts: after every poll fewer than ``max_staleness`` updates are unbroadcast
while a worker lags (a worker that had stopped and starts again to replace a dropped rollout
lags by the latest broadcast, which it samples with), so a rollout started after the
trainer's last poll is always admissible and the loop cannot starve.

``queue_size`` rollouts at most are sampled ahead of the trainer (queued or in progress;
default: one per worker). Two schedules run the same loop:

- threaded (default): ``num_workers`` threads. A worker reserves a place in the queue before
  it samples, so each rollout uses the parameters current when a place frees up (with one
  worker, one place and a broadcast every step, every batch is exactly one step behind and
  none is dropped). Worker errors are raised in the caller; the threads are stopped and
  joined on return or error.
- ``synchronous=True``: no threads. Before each step the workers, in turn, top the queue up to
  ``queue_size`` rollouts, each sampling with the latest broadcast. Results do not depend on
  timing (pass ``clock`` too when ``timeout_s > 0``). With ``queue_size=1`` every rollout is
  sampled right after the previous step's poll, so with ``weight_sync_interval=1`` (every
  update is broadcast) rollout ``i`` uses the trainer's current parameters and the key of
  iteration ``i``: the run is the synchronous loop's, bit for bit.

Rollout ``j`` uses the key ``split(fold_in(run key, j))[0]``, as iteration ``j`` of the
synchronous loop. Checkpoints hold the train state, the task's position after the last
trained batch and the next rollout index; on resume the queue starts empty and the first
broadcast is forced (reason ``'resume'``). Resume is exact in the synchronous schedule with
``queue_size=1`` and ``weight_sync_interval=1``; otherwise the rollouts that were queued are
sampled again by the restored parameters (and, with a longer interval, the controller's
count of unbroadcast updates starts again at 0).
"""

from __future__ import annotations

import dataclasses
import queue
import sys
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from novarl_jax.core.checks import check_int
from novarl_jax.sync import controller as wsc
from novarl_jax.sync.controller import WeightSyncController, admissible, staleness
from novarl_jax.sync.versioned import ParamStore, VersionedParams
from novarl_jax.trainer.build import build_run
from novarl_jax.trainer.config import ConfigError, RunSpec, updates_per_step, validate_config
from novarl_jax.trainer.loop import Session, Trainer, iteration_keys, per_device_throughput
from novarl_jax.trainer.state import TrainState
from novarl_jax.trainer.stop import StopRequested

WORKER_THREAD_PREFIX = "novarl-rollout-"


def rollouts_in_progress() -> list[str]:
    """Names of this process's rollout worker threads still running: a process must not
    exit through Python's shutdown while one is (it aborts); see :meth:`_ThreadedFeed.close`.
    """
    return [
        t.name
        for t in threading.enumerate()
        if t.name.startswith(WORKER_THREAD_PREFIX) and t.is_alive()
    ]


# A wait for a rollout this long is said in the log, then each time it has doubled: a stuck
# reward function or worker is otherwise a silent hang.
FIRST_WAIT_NOTE_S = 60.0


class _WaitNotes:
    """Called while the trainer waits for step ``step``'s rollout: logs a line when the wait
    reaches ``FIRST_WAIT_NOTE_S`` seconds, then twice, four times, ... as long."""

    def __init__(
        self,
        log: Callable[[str], Any],
        step: int,
        clock: Callable[[], float],
        sampling: Callable[[], list[str]],
    ):
        self._log, self._step, self._clock, self._sampling = log, step, clock, sampling
        self._start = clock()
        self._next = FIRST_WAIT_NOTE_S

    def __call__(self) -> None:
        waited = self._clock() - self._start
        if waited >= self._next:
            self._next *= 2
            busy = ", ".join(self._sampling()) or "none"
            self._log(
                f"step {self._step}: waiting {waited:.0f} s so far for a rollout (worker "
                f"threads sampling: {busy}; compiling, or a slow or stuck sampler or reward "
                f"function)"
            )


# The published parameters must outlive the train state: the update step donates its buffers.
_copy_tree = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


class Rollout(NamedTuple):
    """One rollout batch as a worker produced it.

    Attributes:
        index: j, the rollout's position in the run (its key is that of iteration j).
        worker: the worker that sampled it.
        version: the policy version that sampled it (every row of ``trajectory`` records it).
        trajectory: the :class:`~novarl_jax.rollout.engine.Trajectory`, R rows.
        info: its :class:`~novarl_jax.rollout.engine.RolloutInfo`.
        stats: the rollout's own metrics (DAPO dynamic sampling).
        gen_s: seconds the worker spent sampling it.
    """

    index: int
    worker: int
    version: int
    trajectory: Any
    info: Any
    stats: dict
    gen_s: float


class _PolicyView(NamedTuple):
    # What the synchronous rollout reads from a train state.
    params: dict
    policy_version: int


class AsyncTrainer(Trainer):
    """A :class:`Trainer` whose iterations train on rollouts sampled elsewhere.

    :meth:`sample` (any thread) is the synchronous loop's rollout, run with received
    parameters; :meth:`learn` (the trainer's thread) is the synchronous loop's iteration, run
    on a given rollout.
    """

    def __init__(self, run, workdir: str, mesh: Any = None):
        super().__init__(run, workdir, mesh=mesh)
        self._given: Rollout | None = None

    def sample(
        self, params: VersionedParams, key_data: jax.typing.ArrayLike, index: int, worker: int = 0
    ) -> Rollout:
        """Rollout ``index`` sampled with ``params``.

        Args:
            params: the policy parameters a worker received, with their version.
            key_data: the run's raw key data (``TrainState.key``), uint32.
            index: j; the rollout uses iteration j's rollout key.
            worker: recorded in the result.

        Returns:
            A :class:`Rollout`.
        """
        k_rollout, _ = iteration_keys(jax.random.wrap_key_data(key_data), index)
        start = time.perf_counter()
        view = _PolicyView(params={"policy": params.params}, policy_version=params.version)
        traj, info, stats = Trainer._rollout(self, view, k_rollout)
        jax.block_until_ready(traj.response_tokens)
        return Rollout(
            index, worker, params.version, traj, info, stats, time.perf_counter() - start
        )

    def learn(
        self, state: TrainState, reference: Any, rollout: Rollout, step: int
    ) -> tuple[TrainState, dict, Any]:
        """Trains iteration ``step`` on ``rollout``: ``(state, metrics, (trajectory, info))``
        as :meth:`Trainer.iteration` returns them."""
        self._given = rollout
        try:
            state, metrics, trained = self.iteration(state, reference, step)
        finally:
            self._given = None
        metrics["timing_s/gen"] = rollout.gen_s
        return state, metrics, trained

    def _rollout(self, state, key):
        del state, key  # the rollout was sampled by a worker, with its own key
        if self._given is None:
            raise RuntimeError(
                "AsyncTrainer trains on given rollouts: call learn(), not iteration()"
            )
        return self._given.trajectory, self._given.info, self._given.stats


class _SerializedTask:
    """A task called by one thread at a time (tasks need not be thread-safe)."""

    def __init__(self, task: Any):
        self._task = self.__wrapped__ = task  # messages name the task, not the wrapper
        self._lock = threading.Lock()

    def sample_prompts(self, key, batch_size):
        with self._lock:
            return self._task.sample_prompts(key, batch_size)

    def score(self, prompts, completions, metadata):
        with self._lock:
            return self._task.score(prompts, completions, metadata)

    def get_state(self) -> dict:
        with self._lock:
            return self._task.get_state()

    def set_state(self, state: dict) -> None:
        with self._lock:
            self._task.set_state(state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)


ProduceFn = Callable[[int, int], Rollout]  # (worker, index) -> rollout


class _InlineFeed:
    """The deterministic schedule: before each take, the workers in turn top the queue up.

    No rollout at or past ``limit`` is sampled (the run needs no more); :meth:`extend` raises
    the limit when a rollout is dropped.
    """

    def __init__(
        self, produce: ProduceFn, *, queue_size: int, num_workers: int, first_index: int,
        limit: int,
    ):  # fmt: skip
        self._produce = produce
        self._size = queue_size
        self._workers = num_workers
        self._index = first_index
        self._limit = limit
        self._queue: list[Rollout] = []

    def start(self) -> None:
        pass

    def extend(self, count: int) -> None:
        self._limit += count

    def get(self, on_wait: Callable[[], Any]) -> Rollout:
        del on_wait  # nothing is ever waited for
        while len(self._queue) < self._size and self._index < self._limit:
            self._queue.append(self._produce(self._index % self._workers, self._index))
            self._index += 1
        if not self._queue:
            raise RuntimeError(f"no rollout left to take: rollout {self._limit} is past the run")
        return self._queue.pop(0)

    def depth(self) -> int:
        return len(self._queue)

    def sampling(self) -> list[str]:
        return []  # it samples in the trainer's thread, which never waits

    def close(
        self, *, raise_errors: bool = False, interrupted: bool = False, stopped: bool = False
    ) -> None:
        del raise_errors, interrupted, stopped  # nothing runs in the background


class _ThreadedFeed:
    """Worker threads sampling ahead of the trainer, at most ``queue_size`` rollouts ahead.

    A worker reserves a place before it samples (not after), so a rollout is sampled with the
    parameters current when a place frees up, and rollouts queued plus in progress never
    exceed ``queue_size``. No rollout at or past ``limit`` is started (the run needs no more;
    :meth:`extend` raises the limit when a rollout is dropped), so every rollout started is
    one the trainer takes. A worker's exception stops all workers and is raised by the next
    :meth:`get` (or by :meth:`close`). Blocking waits wake up every ``tick_s`` to notice a
    stop, so :meth:`close` joins as soon as the rollouts in progress finish.
    """

    def __init__(
        self,
        produce: ProduceFn,
        *,
        queue_size: int,
        num_workers: int,
        first_index: int,
        limit: int,
        retire: Callable[[int], Any],
        tick_s: float = 0.05,
        join_timeout_s: float = 300.0,
    ):
        self._produce = produce
        self._retire = retire
        self._places = threading.Semaphore(queue_size)
        self._queue: queue.SimpleQueue[Rollout] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._index = first_index
        self._limit = limit
        self._errors: list[tuple[int, BaseException]] = []
        self._busy: set[int] = set()  # workers inside a rollout
        self._tick = tick_s
        self._join_timeout = join_timeout_s
        self._threads = [
            threading.Thread(
                target=self._work, args=(w,), name=f"{WORKER_THREAD_PREFIX}{w}", daemon=True
            )
            for w in range(num_workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def extend(self, count: int) -> None:
        with self._lock:
            self._limit += count

    def _next_index(self) -> int | None:
        with self._lock:
            if self._index >= self._limit:
                return None
            index = self._index
            self._index += 1
            return index

    def _work(self, worker: int) -> None:
        try:
            while not self._stop.is_set():
                if self._places.acquire(timeout=self._tick):
                    index = self._next_index()
                    if index is None:  # nothing more to sample unless a rollout is dropped
                        self._places.release()
                        # Holding no parameters, it asks for no staleness broadcast.
                        self._retire(worker)
                        self._stop.wait(self._tick)
                        continue
                    with self._lock:
                        self._busy.add(worker)
                    try:
                        rollout = self._produce(worker, index)
                    finally:
                        with self._lock:
                            self._busy.discard(worker)
                    self._queue.put(rollout)
        except BaseException as error:  # noqa: BLE001 - handed to the trainer's thread
            with self._lock:
                self._errors.append((worker, error))
            self._stop.set()
        finally:
            self._retire(worker)

    def _raise_worker_error(self) -> None:
        with self._lock:
            failed = self._errors[:1]
        if failed:
            worker, error = failed[0]
            error.add_note(f"raised in rollout worker {worker} ({WORKER_THREAD_PREFIX}{worker})")
            raise error

    def get(self, on_wait: Callable[[], Any]) -> Rollout:
        while True:
            self._raise_worker_error()
            try:
                rollout = self._queue.get(timeout=self._tick)
            except queue.Empty:
                on_wait()
                continue
            self._places.release()
            return rollout

    def depth(self) -> int:
        return self._queue.qsize()

    def sampling(self) -> list[str]:
        """Names of the worker threads inside a rollout now."""
        with self._lock:
            return [f"{WORKER_THREAD_PREFIX}{w}" for w in sorted(self._busy)]

    def _join_until(self, deadline: float) -> None:
        for thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout=max(deadline - time.monotonic(), 0.0))

    def close(
        self, *, raise_errors: bool = False, interrupted: bool = False, stopped: bool = False
    ) -> None:
        """Stops the workers and waits for the rollouts in progress; ``raise_errors`` raises a
        worker's exception that no :meth:`get` raised.

        After Ctrl-C (``interrupted``) or SIGTERM (``stopped``) it still waits, saying so on
        stderr: a worker left inside a rollout when Python exits is torn down mid-call, and
        the process aborts. A second Ctrl-C stops the wait (the command line then exits at
        once, see :func:`rollouts_in_progress`); a second SIGTERM ends the process.
        """
        self._stop.set()
        deadline = time.monotonic() + self._join_timeout
        # Idle workers notice the stop within a tick; one still alive after that is sampling.
        self._join_until(min(deadline, time.monotonic() + 2 * self._tick))
        busy = [t.name for t in self._threads if t.is_alive()]
        if busy and (interrupted or stopped):
            how, again = ("interrupted", "Ctrl-C") if interrupted else ("stopping", "SIGTERM")
            print(
                f"novarl_jax: {how}; waiting for the rollouts in progress in {busy} to "
                f"finish ({again} again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
        self._join_until(deadline)
        stuck = [t.name for t in self._threads if t.is_alive()]
        if stuck:
            warnings.warn(
                f"rollout workers {stuck} did not stop within {self._join_timeout:.0f} s "
                "(a rollout is still running); they are daemon threads",
                RuntimeWarning,
                stacklevel=2,
            )
        if raise_errors:
            self._raise_worker_error()


class _Broadcaster:
    """Publishes copies of the trainer's policy when the controller says so; tallies metrics."""

    def __init__(self, controller: WeightSyncController, store: ParamStore):
        self.controller = controller
        self.store = store
        self._reported = controller.counts()

    def poll(self, state: TrainState, *, restarting: bool = False) -> str | None:
        """Asks the controller; ``restarting``: a worker that holds nothing may start again
        (a dropped rollout is to be replaced), so the latest broadcast, which it would sample
        with, counts as a held version too."""

        def publish(version: int) -> None:
            self.store.publish(version, _copy_tree(state.params["policy"]))

        held = list(self.store.worker_versions().values())
        if restarting and (latest := self.store.latest()) is not None:
            held.append(latest.version)
        return self.controller.maybe_broadcast(int(state.policy_version), held, publish)

    def step_metrics(self) -> dict:
        """Broadcasts since the previous call, by reason."""
        counts = self.controller.counts()
        new = {reason: counts[reason] - self._reported[reason] for reason in wsc.REASONS}
        self._reported = counts
        metrics = {f"sync/broadcasts/{reason}": float(n) for reason, n in new.items()}
        metrics["sync/broadcasts"] = float(sum(new.values()))
        metrics["sync/broadcast_version"] = float(self.controller.state.last_version)
        return metrics


def _lags(config: Any, queue_size: int, synchronous: bool) -> tuple[int, int]:
    """Versions a rollout sampled ahead of the trainer lags by when trained, when no update
    is skipped: (every such rollout at least, a rollout at most with one worker).

    The threaded schedule samples a rollout while the trainer runs the previous step's U
    updates, or up to ``queue_size`` steps ahead; the deterministic one ``queue_size - 1``
    steps ahead. A poll can leave ``p`` updates unbroadcast: whole steps of U updates, fewer
    than ``weight_sync_interval`` and than ``weight_sync_max_staleness`` (a worker lagging by
    the bound gets a broadcast).
    """
    updates = updates_per_step(config)
    exp = config.experiment
    below = min(exp.weight_sync_interval, exp.weight_sync_max_staleness)
    pending = updates * (-(-below // updates) - 1)
    if synchronous:
        return (queue_size - 1) * updates, (queue_size - 1) * updates + pending
    return updates, queue_size * updates + pending


def staleness_warning(config: Any, queue_size: int, synchronous: bool) -> str | None:
    """Why rollouts sampled ahead will be dropped, when ``weight_sync_max_staleness`` is
    below the lag they reach (:func:`_lags`); else None."""
    least_lag, most_lag = _lags(config, queue_size, synchronous)
    bound = config.experiment.weight_sync_max_staleness
    if bound < least_lag:
        ahead = "queue_size - 1 steps" if synchronous else "one step"
        return (
            f"experiment.weight_sync_max_staleness={bound} is below the {least_lag} versions "
            f"every rollout sampled ahead of the trainer lags by ({ahead} of train.epochs x "
            f"train.minibatches updates): such rollouts will be dropped and sampled again; set "
            f"it >= {least_lag} to overlap sampling with training (docs/async.md)"
        )
    if bound < most_lag:
        ahead = queue_size - 1 if synchronous else queue_size
        return (
            f"experiment.weight_sync_max_staleness={bound} is below the {most_lag} versions a "
            f"rollout sampled {ahead} step(s) ahead of the trainer can lag by ({queue_size} "
            f"sampled ahead, train.epochs x train.minibatches updates per step, broadcasts "
            f"every weight_sync_interval updates): such rollouts will be dropped and sampled "
            f"again; set it >= {most_lag} to drop none while no update is skipped (docs/async.md)"
        )
    return None


def _take_fresh(feed, version: int, max_staleness: int, on_wait, on_drop) -> tuple[Rollout, int]:
    """The next rollout no staler than ``max_staleness``, and the rows dropped before it (a
    dropped rollout lets the feed sample one more, after ``on_drop()``)."""
    dropped = 0
    while True:
        rollout = feed.get(on_wait)
        versions = np.asarray(rollout.trajectory.policy_version)
        if admissible(version, versions, max_staleness):
            return rollout, dropped
        dropped += versions.size
        on_drop()
        feed.extend(1)


def correction_warning(config: Any, queue_size: int, synchronous: bool) -> str | None:
    """Why batches sampled by an older policy will train uncorrected: the rollouts can lag
    (:func:`_lags`, within the bound) and the algorithm's ``tis_cap`` is not set; else None.
    The loss's ratio is taken against the trainer's own scoring of the batch, so only the
    truncated importance weight ``min(pi_old / pi_behavior, tis_cap)`` accounts for the
    policy that sampled it."""
    algorithm = config.experiment.algorithm
    _, most_lag = _lags(config, queue_size, synchronous)
    lag = min(most_lag, config.experiment.weight_sync_max_staleness)
    if lag == 0 or config[algorithm].tis_cap is not None:
        return None
    return (
        f"batches sampled up to {lag} version{'s' if lag > 1 else ''} behind the trainer "
        f"train with no correction "
        f"for the policy that sampled them: the ratio is taken against the trainer's own "
        f"scoring of each batch; set {algorithm}.tis_cap (2.0 is common) to weight each "
        f"token by min(pi_old / pi_behavior, tis_cap) (docs/async.md)"
    )


def check_async_startup(spec: RunSpec) -> list[str]:
    """What an asynchronous run refuses before it starts, beyond the config's own checks;
    returns the warnings it will give at start (:func:`staleness_warning` and
    :func:`correction_warning`, for the command line's workers and queue).

    Raises:
        ConfigError: ``experiment.weight_sync_timeout_s`` > 0 in a multi-process run.
    """
    exp = spec.config.experiment
    if jax.process_count() > 1 and exp.weight_sync_timeout_s > 0:
        raise ConfigError(
            "experiment.weight_sync_timeout_s",
            f"{exp.weight_sync_timeout_s} s: a timeout broadcast follows each process's own "
            "clock, so the processes of a multi-process run could sample with different "
            "versions; set it to 0 there (weight_sync_interval and weight_sync_max_staleness "
            "decide the same way everywhere)",
        )
    synchronous = jax.process_count() > 1  # as the command line runs it
    queue_size = exp.rollout_queue_size or exp.rollout_workers
    return _warnings(spec.config, queue_size, synchronous)


def _warnings(config: Any, queue_size: int, synchronous: bool) -> list[str]:
    return [
        warning
        for check in (staleness_warning, correction_warning)
        if (warning := check(config, queue_size, synchronous))
    ]


def train_async(
    config,
    workdir: str,
    *,
    spec: RunSpec | None = None,
    mesh: Any = None,
    log: Callable[[str], Any] | None = None,
    run: Any = None,
    num_workers: int | None = None,
    queue_size: int | None = None,
    synchronous: bool = False,
    clock: Callable[[], float] = time.monotonic,
    allow_config_change: bool = False,
) -> dict:
    """Trains to ``experiment.steps`` steps with asynchronous rollouts, resuming from
    ``workdir`` if it has a checkpoint. Writes what :func:`~novarl_jax.trainer.loop.train`
    writes, plus ``sync/*`` metrics per step: ``staleness_max``/``staleness_mean`` (trainer
    version minus sample version over the trained rows), ``dropped_samples`` (rows dropped as
    too stale before this step), ``broadcasts`` and ``broadcasts/<reason>`` (since the previous
    step), ``broadcast_version``, ``queue_depth``; and ``timing_s/wait`` (trainer idle time).

    Weight-sync cadence comes from ``experiment.weight_sync_interval``,
    ``experiment.weight_sync_max_staleness`` and ``experiment.weight_sync_timeout_s``.

    Args:
        config: the run's ConfigDict.
        workdir: output directory (created if missing).
        spec: an already validated spec (validated here otherwise).
        mesh: the device mesh; default: the layout's mesh over the first world_size devices.
        log: a callable taking one line of text (default: print on process 0).
        run: the run's objects already built from ``spec`` (built here otherwise).
        num_workers: rollout workers (threads, or turns in the synchronous schedule); None =
            ``experiment.rollout_workers``.
        queue_size: rollouts sampled ahead of the trainer at most (queued or in progress);
            None = ``experiment.rollout_queue_size``; 0 = ``num_workers``, as in the config.
        synchronous: run the deterministic schedule, without threads.
        clock: seconds, for ``weight_sync_timeout_s``.
        allow_config_change: as :func:`~novarl_jax.trainer.loop.train`.

    Returns:
        The last step's metrics, plus ``'resumed_from'`` (a step or None) and ``'state'``.

    Raises:
        StopRequested: SIGTERM asked the run to stop (as :func:`~novarl_jax.trainer.loop.train`).
        ValueError: a bad argument, naming it.
        ConfigError: a bad config value (before anything compiles).
        TrainingError: too many consecutive non-finite updates.
        Exception: whatever a rollout worker raised (with a note naming the worker).

    Example:
        >>> from configs import ppo_async
        >>> train_async(ppo_async.get_config(), "/tmp/ppo_async", num_workers=1)  # doctest: +SKIP
    """
    spec = spec or validate_config(config)
    exp = spec.config.experiment
    num_workers = exp.rollout_workers if num_workers is None else num_workers
    num_workers = check_int("num_workers", num_workers, 1)
    wsc.check_clock(clock)
    queue_size = exp.rollout_queue_size if queue_size is None else queue_size
    queue_size = check_int("queue_size", queue_size, 0) or num_workers
    if not synchronous and jax.process_count() > 1:
        raise ValueError(
            "synchronous must be True in a multi-process run: every process must issue the "
            "same rollout programs in the same order"
        )
    check_async_startup(spec)
    run = run or build_run(spec)
    shared_task = num_workers > 1 and not synchronous
    if shared_task:
        run = dataclasses.replace(run, task=_SerializedTask(run.task))
    metrics: dict = {}
    dropped_total = 0
    with Session(
        config,
        workdir,
        spec=spec,
        mesh=mesh,
        log=log,
        run=run,
        trainer_cls=AsyncTrainer,
        allow_config_change=allow_config_change,
        asynchronous=True,
    ) as session:
        trainer, state = session.trainer, session.state
        for warning in _warnings(spec.config, queue_size, synchronous):
            session.log(f"warning: {warning}")
        next_index = session.first_index
        controller = WeightSyncController.from_config(
            config,
            clock=clock,
            reason=wsc.INITIAL if session.resumed_from is None else wsc.RESUME,
        )
        store = ParamStore()
        broadcaster = _Broadcaster(controller, store)
        broadcaster.poll(state)  # the forced first broadcast
        key_data = np.asarray(state.key)  # a host copy: updates donate the state's buffers

        def produce(worker: int, index: int) -> Rollout:
            return trainer.sample(store.acquire(worker), key_data, index, worker)

        # Rollouts the remaining steps need (a dropped one adds one): none is sampled in vain.
        feed_args = dict(
            queue_size=queue_size,
            num_workers=num_workers,
            first_index=next_index,
            limit=next_index + session.total - session.start,
        )
        if synchronous:
            feed = _InlineFeed(produce, **feed_args)
        else:
            feed = _ThreadedFeed(produce, retire=store.release, **feed_args)
        interrupted = stopped = finished = False
        try:
            if session.start < session.total:
                feed.start()
            for i in range(session.start, session.total):
                version = int(state.policy_version)
                wait_start = time.perf_counter()
                note = _WaitNotes(session.log, i + 1, time.monotonic, feed.sampling)

                def waiting(state=state, note=note) -> None:
                    broadcaster.poll(state)
                    note()
                    session.stop_between_steps(state)  # SIGTERM: the last step is the stop

                rollout, dropped = _take_fresh(
                    feed,
                    version,
                    controller.max_staleness,
                    waiting,
                    # A worker that retired may sample the replacement: bound it too.
                    lambda state=state: broadcaster.poll(state, restarting=True),
                )
                wait_s = time.perf_counter() - wait_start
                lag = staleness(version, rollout.trajectory.policy_version)
                learn_start = time.perf_counter()
                state, metrics, trained = trainer.learn(state, session.reference, rollout, i)
                # Tokens per second of the step's wall time (the wait for the rollout and the
                # training), as the synchronous loop's covers its sampling and training.
                step_s = wait_s + time.perf_counter() - learn_start
                metrics["timing_s/step"] = step_s
                metrics["perf/throughput"] = per_device_throughput(
                    metrics["perf/total_num_tokens"], step_s, trainer.mesh
                )
                broadcaster.poll(state)
                dropped_total += dropped
                next_index = max(next_index, rollout.index + 1)
                metrics.update(broadcaster.step_metrics())
                metrics.update(
                    {
                        "sync/staleness_max": float(lag.max()),
                        "sync/staleness_mean": float(lag.mean()),
                        "sync/dropped_samples": float(dropped),
                        "sync/queue_depth": float(feed.depth()),
                        "timing_s/wait": wait_s,
                    }
                )
                # Threaded workers finish out of order, so the trained batch's position can lie
                # behind an earlier one's; the task's own position never moves back (it also
                # covers the prompts of rollouts not trained yet, skipped on resume).
                task_state = run.task.get_state() if shared_task else trained[1].task_state
                host = {"task_state": task_state, "rollout_index": next_index}
                metrics = session.record(i, state, metrics, host, trained)
            finished = True
        except KeyboardInterrupt:
            interrupted = True
            raise
        except StopRequested:
            stopped = True
            raise
        finally:
            feed.close(raise_errors=finished, interrupted=interrupted, stopped=stopped)
    # Counted by this process from its start: after a resume, not the whole run's.
    since = "" if session.resumed_from is None else f" since the resume at step {session.start}"
    summary = (
        f"{controller.state.broadcasts} broadcasts and {dropped_total} stale samples dropped"
        f"{since}, "
    )
    return session.finish(state, metrics, summary)
