"""WeightSyncController: hand-made event sequences, validation, and invariants (hypothesis)."""

import collections

import hypothesis.strategies as st
import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings

from novarl_jax.sync import WeightSyncController, admissible, staleness
from novarl_jax.sync import controller as wsc


def _broadcast(state, now, version):
    due, reason = wsc.should_broadcast(state, now, version, {})
    assert due, reason
    return wsc.record_broadcast(state, now, version), reason


def test_initial_broadcast_then_up_to_date():
    state = wsc.init(4, 6, 30.0)
    assert state.forced == "initial" and state.last_version is None
    # The first broadcast happens whatever the clock and workers say.
    assert wsc.should_broadcast(state, 123.0, 0, [0]) == (True, "initial")
    state = wsc.record_broadcast(state, 123.0, 0)
    assert (state.last_version, state.last_time, state.forced, state.broadcasts) == (
        0,
        123.0,
        None,
        1,
    )
    assert wsc.should_broadcast(state, 1e9, 0, [0]) == (False, "up_to_date")


def test_interval():
    state, _ = _broadcast(wsc.init(4, 100), 0.0, 0)
    decisions = [wsc.should_broadcast(state, 0.0, v, [0]) for v in range(1, 6)]
    assert decisions == [(False, "not_due")] * 3 + [(True, "interval")] * 2
    state = wsc.record_broadcast(state, 0.0, 4)
    assert wsc.should_broadcast(state, 0.0, 7, [4]) == (False, "not_due")
    assert wsc.should_broadcast(state, 0.0, 8, [4]) == (True, "interval")


def test_staleness_uses_the_most_lagging_worker():
    state, _ = _broadcast(wsc.init(10, 3), 0.0, 0)
    assert wsc.should_broadcast(state, 0.0, 2, {"a": 0, "b": 2}) == (False, "not_due")
    assert wsc.should_broadcast(state, 0.0, 3, {"a": 0, "b": 3}) == (True, "staleness")
    assert wsc.should_broadcast(state, 0.0, 3, {"a": 1, "b": 3}) == (False, "not_due")
    assert wsc.should_broadcast(state, 0.0, 3, {}) == (False, "not_due")  # no workers
    # A worker lagging behind a broadcast it has not picked up yet: nothing new to send.
    state = wsc.record_broadcast(state, 0.0, 5)
    assert wsc.should_broadcast(state, 0.0, 5, {"a": 0}) == (False, "up_to_date")
    assert wsc.should_broadcast(state, 0.0, 6, {"a": 0}) == (True, "staleness")


def test_timeout_with_an_injected_clock():
    state, _ = _broadcast(wsc.init(100, 100, 30.0), 10.0, 0)
    assert wsc.should_broadcast(state, 39.9, 1, [0]) == (False, "not_due")
    assert wsc.should_broadcast(state, 40.0, 1, [0]) == (True, "timeout")
    # Never on timeout alone: with no pending updates there is nothing to send.
    assert wsc.should_broadcast(state, 1e6, 0, [0]) == (False, "up_to_date")
    state = wsc.record_broadcast(state, 40.0, 1)
    assert wsc.should_broadcast(state, 69.0, 2, [1]) == (False, "not_due")
    assert wsc.should_broadcast(state, 70.0, 2, [1]) == (True, "timeout")


def test_timeout_zero_is_off():
    state, _ = _broadcast(wsc.init(100, 100, 0.0), 0.0, 0)
    assert wsc.should_broadcast(state, 1e12, 1, [0]) == (False, "not_due")


def test_forced_reasons():
    state = wsc.init(100, 100, reason="resume")
    state, reason = _broadcast(state, 0.0, 7)
    assert reason == "resume"
    # A restart with nothing new is served by the latest broadcast...
    state = wsc.request_broadcast(state, "worker_restart")
    assert wsc.should_broadcast(state, 0.0, 7, [7]) == (False, "up_to_date")
    # ...and the next update is broadcast at once, whatever the cadence.
    assert wsc.should_broadcast(state, 0.0, 8, [7]) == (True, "worker_restart")
    state = wsc.record_broadcast(state, 0.0, 8)
    assert state.forced is None
    assert wsc.should_broadcast(state, 0.0, 9, [8]) == (False, "not_due")
    # The first pending forced reason names the broadcast.
    state = wsc.request_broadcast(wsc.request_broadcast(state, "resume"), "worker_restart")
    assert wsc.should_broadcast(state, 0.0, 9, [8]) == (True, "resume")


def test_reason_order_when_several_fire():
    base = wsc.record_broadcast(wsc.init(2, 2, 1.0), 0.0, 0)
    everything = (5.0, 4, [0])  # interval, staleness and timeout all fire
    forced = wsc.request_broadcast(base, "worker_restart")
    assert wsc.should_broadcast(forced, *everything) == (True, "worker_restart")
    assert wsc.should_broadcast(base, *everything) == (True, "interval")
    lagging = wsc.record_broadcast(wsc.init(5, 2, 1.0), 0.0, 0)
    assert wsc.should_broadcast(lagging, 5.0, 2, [0]) == (True, "staleness")
    assert wsc.should_broadcast(lagging, 5.0, 1, [1]) == (True, "timeout")


def test_versions_must_increase():
    state, _ = _broadcast(wsc.init(1, 1), 0.0, 3)
    for version in (3, 2):
        with pytest.raises(ValueError, match=f"version must increase: got {version} after"):
            wsc.record_broadcast(state, 0.0, version)
    with pytest.raises(ValueError, match="trainer_version=2 is older than the last broadcast"):
        wsc.should_broadcast(state, 0.0, 2, [])
    with pytest.raises(ValueError, match="newer than trainer_version=3"):
        wsc.should_broadcast(state, 0.0, 3, [4])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(interval=0), "interval must be an integer >= 1, got 0"),
        (dict(interval=1.5), "interval must be an integer >= 1, got 1.5"),
        (dict(interval=True), "interval must be an integer >= 1, got True"),
        (dict(max_staleness=0), "max_staleness must be an integer >= 1, got 0"),
        (dict(timeout_s=-1.0), "timeout_s must be a finite number >= 0"),
        (dict(timeout_s=float("nan")), "timeout_s must be a finite number >= 0"),
        (dict(timeout_s="30"), "timeout_s must be a finite number >= 0"),
        (dict(reason="interval"), "reason must be one of"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, message):
    args = {**dict(interval=4, max_staleness=6, timeout_s=30.0), **kwargs}
    reason = args.pop("reason", "initial")
    with pytest.raises(ValueError, match=message):
        wsc.init(**args, reason=reason)
    with pytest.raises(ValueError, match=message):
        WeightSyncController(**args, reason=reason)


def test_a_clock_that_is_not_one_is_refused_before_anything_is_published():
    with pytest.raises(ValueError, match="clock must be a callable returning seconds"):
        WeightSyncController(1, 1, clock=None)
    published = []
    for clock, message in [
        (lambda: "now", "the clock's reading must be a number of seconds, got 'now'"),
        (lambda: float("nan"), "the clock's reading must be finite, got nan"),
    ]:
        controller = WeightSyncController(1, 1, 30.0, clock=clock)
        with pytest.raises(ValueError, match=message):
            controller.maybe_broadcast(0, {}, published.append)
    assert published == []  # a broadcast it could not record is not made either
    controller = WeightSyncController(1, 1)
    with pytest.raises(ValueError, match="now must be a number of seconds, got True"):
        controller.maybe_broadcast(0, {}, published.append, now=True)
    assert controller.maybe_broadcast(0, {}, published.append, now=np.float32(2.5)) == "initial"
    assert published == [0] and controller.state.last_time == 2.5


def test_invalid_versions_and_reasons():
    state = wsc.init(1, 1)
    with pytest.raises(ValueError, match="trainer_version must be an integer >= 0, got -1"):
        wsc.should_broadcast(state, 0.0, -1, [])
    with pytest.raises(ValueError, match=r"worker_versions\[0\] must be an integer >= 0, got 'x'"):
        wsc.should_broadcast(state, 0.0, 1, ["x"])
    with pytest.raises(ValueError, match=r"worker_versions\['b'\] must be an integer >= 0, got -1"):
        wsc.should_broadcast(state, 0.0, 1, {"a": 0, "b": -1})
    with pytest.raises(ValueError, match="reason must be one of"):
        wsc.request_broadcast(state, "timeout")
    controller = WeightSyncController(1, 1)
    with pytest.raises(ValueError, match="reason must be one of"):
        controller.record_broadcast(0, "because")


def _experiment(**overrides):
    config = ml_collections.ConfigDict()
    config.experiment = dict(
        weight_sync_interval=4, weight_sync_max_staleness=6, weight_sync_timeout_s=30.0
    )
    config.experiment.update(overrides)
    return config


def test_from_config_names_the_config_key():
    controller = WeightSyncController.from_config(_experiment())
    assert controller.state[:3] == (4, 6, 30.0)
    with pytest.raises(ValueError, match="experiment.weight_sync_max_staleness must be"):
        WeightSyncController.from_config(_experiment(weight_sync_max_staleness=0))
    with pytest.raises(ValueError, match="experiment.weight_sync_timeout_s must be"):
        WeightSyncController.from_config(_experiment(weight_sync_timeout_s=-2.0))


def test_wrapper_uses_its_clock_and_counts_reasons():
    now = [0.0]
    published = []
    controller = WeightSyncController(4, 6, 30.0, clock=lambda: now[0])
    with pytest.raises(ValueError, match=r"^publish_fn must be callable, got None$"):
        controller.maybe_broadcast(0, {}, None)  # was a TypeError, and only when one was due
    assert controller.maybe_broadcast(0, {}, published.append) == "initial"
    for version in (1, 2, 3):
        assert controller.maybe_broadcast(version, {"w": 0}, published.append) is None
    now[0] = 31.0
    assert controller.maybe_broadcast(3, {"w": 0}, published.append) == "timeout"
    assert controller.maybe_broadcast(7, {"w": 3}, published.append) == "interval"
    assert controller.maybe_broadcast(9, {"w": 3}, published.append) == "staleness"
    controller.request_broadcast()
    assert controller.maybe_broadcast(10, {"w": 9}, published.append) == "worker_restart"
    assert published == [0, 3, 7, 9, 10]
    assert controller.state.last_time == 31.0 and controller.state.broadcasts == 5
    counts = controller.counts()
    assert counts == dict(initial=1, resume=0, worker_restart=1, interval=1, staleness=1, timeout=1)
    assert controller.should_broadcast(10, {"w": 10}, now=1e9) == (False, "up_to_date")


def test_staleness_and_admissible():
    np.testing.assert_array_equal(staleness(7, np.array([7, 5, 1])), [0, 2, 6])
    assert admissible(7, [7, 5, 1], 6)
    assert not admissible(7, [7, 5, 0], 6)
    assert admissible(7, [], 0)
    # NumPy integers and (JAX) int32 arrays, as Trajectory.policy_version is, are fine.
    assert admissible(np.int64(7), np.array([7, 5], np.int32), np.int64(2))
    assert admissible(7, 5, 2)


@pytest.mark.parametrize(
    "args, message",
    [
        ((3, [5], 0), r"sample_versions include 5, newer than trainer_version=3"),
        ((3, [3], -1), "max_staleness must be an integer >= 0, got -1"),
        ((3, [3], None), "max_staleness must be an integer >= 0, got None"),
        ((3, [3], 1.5), "max_staleness must be an integer >= 0, got 1.5"),
        ((3, [1.9], 1), "sample_versions must be integers .* got dtype float64"),
        ((3, [1, None], 1), "sample_versions must be integers .* got dtype object"),
        ((3, [True], 1), "sample_versions must be integers .* got dtype bool"),
        ((3, "12", 1), "sample_versions must be an array or sequence of integer versions"),
        ((3, [[1], [2, 3]], 1), "sample_versions must be an array of integers, got a ragged"),
        ((3, [-1], 1), "sample_versions must be >= 0, got -1"),
        ((3.9, [2], 1), "trainer_version must be an integer >= 0, got 3.9"),
        ((-1, [0], 1), "trainer_version must be an integer >= 0, got -1"),
    ],
)
def test_admissible_and_staleness_validate_versions(args, message):
    with pytest.raises(ValueError, match=message):
        admissible(*args)
    if "max_staleness" not in message:
        with pytest.raises(ValueError, match=message):
            staleness(*args[:2])


# -- Invariants over random event sequences ------------------------------------------------
#
# A small simulation of the async loop driven by the pure core: the trainer applies updates
# and polls after each event; workers start rollouts with the latest broadcast and finish
# them into a FIFO queue; the trainer consumes from the queue, dropping inadmissible batches.

_EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 4)),
        st.tuples(st.just("tick"), st.floats(0.0, 20.0)),
        st.tuples(st.just("start"), st.integers(0, 2)),
        st.tuples(st.just("finish"), st.integers(0, 2)),
        st.tuples(st.just("consume"), st.just(0)),
        st.tuples(st.just("restart"), st.integers(0, 2)),
    ),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(
    events=_EVENTS,
    interval=st.integers(1, 6),
    max_staleness=st.integers(1, 8),
    timeout_s=st.sampled_from([0.0, 5.0, 30.0]),
)
def test_invariants_over_random_event_sequences(events, interval, max_staleness, timeout_s):
    state = wsc.init(interval, max_staleness, timeout_s)
    now, trainer = 0.0, 0
    latest = None
    worker_version = {}  # version each worker holds
    in_flight = {}  # worker -> version of the rollout it is generating
    queue = collections.deque()
    trained, broadcasts = [], []

    def poll():
        nonlocal state, latest
        pending_before = None if state.last_version is None else trainer - state.last_version
        due, reason = wsc.should_broadcast(state, now, trainer, worker_version)
        if due:
            # Never without something new, except the very first broadcast.
            assert pending_before is None or pending_before > 0, reason
            state = wsc.record_broadcast(state, now, trainer)
            latest = trainer
            broadcasts.append(trainer)
        pending = trainer - state.last_version
        # After every poll: fewer than `interval` updates are unbroadcast, ...
        assert pending < interval
        # ... no worker lags by max_staleness with something new to send, ...
        lags = [trainer - v for v in worker_version.values()]
        assert pending == 0 or not lags or max(lags) < max_staleness
        # ... and no pending update is older than the timeout.
        assert pending == 0 or timeout_s == 0 or now - state.last_time < timeout_s

    poll()
    for kind, arg in events:
        if kind == "update":
            trainer += arg
        elif kind == "tick":
            now += arg
        elif kind == "start" and arg not in in_flight:
            worker_version[arg] = latest
            in_flight[arg] = latest
        elif kind == "finish" and arg in in_flight:
            queue.append(in_flight.pop(arg))
        elif kind == "consume":
            while queue:
                version = queue.popleft()
                if admissible(trainer, [version], max_staleness):
                    trained.append(trainer - version)
                    break
        elif kind == "restart":
            worker_version.pop(arg, None)
            in_flight.pop(arg, None)
            state = wsc.request_broadcast(state, "worker_restart")
        poll()
    assert all(0 <= lag <= max_staleness for lag in trained)
    assert broadcasts == sorted(set(broadcasts)) and broadcasts[0] == 0
    assert state.broadcasts == len(broadcasts)


def test_a_sample_one_version_newer_than_the_trainer_is_refused():
    with pytest.raises(ValueError, match="newer than trainer_version=3"):
        staleness(3, [4])


def test_an_infinite_timeout_is_refused():
    with pytest.raises(ValueError, match="timeout_s must be a finite number"):
        wsc.init(1, 1, float("inf"))


def test_a_failed_publish_is_not_recorded_as_a_broadcast():
    c = WeightSyncController(1, 1)

    def boom(version):
        raise OSError("publish failed")

    with pytest.raises(OSError):
        c.maybe_broadcast(0, {}, boom)
    assert c.state.broadcasts == 0 and c.state.last_version is None
    assert c.should_broadcast(0, {}) == (True, "initial")


def test_an_explicit_now_is_the_broadcast_time():
    readings = []

    def clock():
        readings.append(1)
        return 1000.0

    c = WeightSyncController(100, 100, 30.0, clock=clock)
    assert c.maybe_broadcast(0, {}, lambda v: None, now=5.0) == "initial"
    assert c.state.last_time == 5.0 and readings == []
    assert c.should_broadcast(1, {}, now=34.9) == (False, "not_due")
    assert c.should_broadcast(1, {}, now=35.0) == (True, "timeout")


def test_from_config_names_the_interval_key():
    config = ml_collections.ConfigDict()
    config.experiment = dict(
        weight_sync_interval=0, weight_sync_max_staleness=6, weight_sync_timeout_s=30.0
    )
    with pytest.raises(ValueError, match="experiment.weight_sync_interval must be"):
        WeightSyncController.from_config(config)


def test_the_docs_example_of_the_controller_runs_as_written():
    import pathlib
    import re

    doc = pathlib.Path(__file__).resolve().parents[2] / "docs" / "async.md"
    section = doc.read_text().split("## The controller on its own", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, str(doc), "exec"), scope)
    assert (scope["due"], scope["reason"]) == (True, "initial")
    assert scope["held"].version == 0 and scope["held"].params == {"w": [0.0, 1.0]}
    assert scope["controller"].counts()["initial"] == 1
