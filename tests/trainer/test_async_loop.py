"""The asynchronous loop: the deterministic schedule against the synchronous loop and against
hand-computed staleness/broadcast tables; the threaded schedule's bound, shutdown and errors.

Tiny runs: GRPO, 2 prompts x 4 samples = 8 rows per step, 1 epoch x 2 minibatches = 2
updates per step (so versions advance by 2 per step).
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base, jsonl, ppo_async
from novarl_jax.rollout.engine import RolloutEngine
from novarl_jax.sync import REASONS, WeightSyncController
from novarl_jax.trainer import async_loop
from novarl_jax.trainer.async_loop import WORKER_THREAD_PREFIX, train_async
from novarl_jax.trainer.checkpoint import Checkpointer
from novarl_jax.trainer.config import ConfigError, validate_config
from novarl_jax.trainer.loop import train
from novarl_jax.trainer.metrics import read_metrics

ROWS, UPDATES = 8, 2
VOLATILE = ("timing_s/", "perf/")


def _config(steps, interval=1, max_staleness=1, timeout_s=0.0, world_size=1):
    c = base.get_config()
    c.experiment.steps = steps
    c.experiment.world_size = world_size
    c.experiment.weight_sync_interval = interval
    c.experiment.weight_sync_max_staleness = max_staleness
    c.experiment.weight_sync_timeout_s = timeout_s
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.train.epochs = 1
    c.train.minibatches = 2
    c.checkpoint.interval = 2
    c.checkpoint.async_save = False
    c.logging.plot = False
    c.logging.progress = False
    return c


def _mesh(config):
    return validate_config(config).layout.make_mesh(jax.devices()[: config.experiment.world_size])


def _run_async(config, workdir, **kwargs):
    lines = []
    out = train_async(config, str(workdir), mesh=_mesh(config), log=lines.append, **kwargs)
    return out, read_metrics(workdir), lines


def _stable(rows, drop_sync=True):
    return [
        {
            k: v
            for k, v in r.items()
            if not k.startswith(VOLATILE) and not (drop_sync and k.startswith("sync/"))
        }
        for r in rows
    ]


def _worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith(WORKER_THREAD_PREFIX)]


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def sync_reference(tmp_path_factory):
    """The synchronous loop, 4 steps: metrics rows and final state."""
    config = _config(4)
    workdir = tmp_path_factory.mktemp("sync")
    out = train(config, str(workdir), mesh=_mesh(config), log=lambda line: None)
    return read_metrics(workdir), out["state"]


def test_synchronous_schedule_reproduces_the_sync_loop(tmp_path, sync_reference):
    """Holds by construction: with queue_size=1 each rollout is sampled right after the
    previous step's broadcast (interval=1 broadcasts every update), so rollout i uses the
    trainer's parameters and the key of iteration i, and iteration i's training code is the
    synchronous loop's own."""
    rows, state = sync_reference
    out, async_rows, _ = _run_async(_config(4), tmp_path, synchronous=True)
    assert _stable(async_rows) == _stable(rows)
    _assert_same_params(out["state"], state)
    assert [r["sync/staleness_max"] for r in async_rows] == [0.0] * 4
    assert [r["sync/broadcasts"] for r in async_rows] == [2.0, 1.0, 1.0, 1.0]
    assert [r["sync/broadcast_version"] for r in async_rows] == [2.0, 4.0, 6.0, 8.0]
    assert async_rows[0]["sync/broadcasts/initial"] == 1.0
    assert sum(r["sync/broadcasts/interval"] for r in async_rows) == 4.0
    # Every key of the synchronous loop is there, with the sync/ keys added.
    assert set(rows[0]) < set(async_rows[0])


def test_resume_is_exact_and_forces_a_broadcast(tmp_path, sync_reference):
    rows, state = sync_reference
    first, _, _ = _run_async(_config(2), tmp_path, synchronous=True)
    assert first["resumed_from"] is None
    second, async_rows, lines = _run_async(_config(4), tmp_path, synchronous=True)
    assert second["resumed_from"] == 2
    assert any(line.startswith("resumed from") for line in lines)
    assert [r["step"] for r in async_rows] == [1, 2, 3, 4]
    assert _stable(async_rows) == _stable(rows)
    _assert_same_params(second["state"], state)
    # The resumed run's first broadcast is forced, with reason 'resume', at version 4.
    assert async_rows[2]["sync/broadcasts/resume"] == 1.0
    assert async_rows[2]["sync/broadcasts/initial"] == 0.0
    # The end line's counts are this start's, and say so.
    assert "stale samples dropped since the resume at step 2, " in lines[-1]


def _clock():
    now = [0.0]

    def tick():
        now[0] += 1.0
        return now[0]

    return tick


# Hand-computed schedules (U = 2 updates per step). With queue_size=2 the queue holds one
# rollout beyond the one taken, sampled before the previous step's update:
# (a) interval 2: every step is broadcast; rollouts after the first are one step (2
#     versions) old, within max_staleness=2.
# (b) interval 3, max_staleness 1: the worker lags by 2 after each step -> 'staleness'
#     broadcast; the queued rollout (2 versions old) is dropped (8 rows) and the next one,
#     sampled with the new broadcast, is trained fresh.
# (c) queue 1, a clock advancing 1 s per reading, timeout 1 s: every step's poll times out.
SCHEDULES = {
    "interval": (
        dict(interval=2, max_staleness=2),
        dict(queue_size=2),
        dict(
            staleness=[0, 2, 2],
            dropped=[0, 0, 0],
            reasons=dict(initial=[1, 0, 0], interval=[1, 1, 1]),
        ),
    ),
    "staleness": (
        dict(interval=3, max_staleness=1),
        dict(queue_size=2),
        dict(
            staleness=[0, 0, 0],
            dropped=[0, ROWS, ROWS],
            reasons=dict(initial=[1, 0, 0], staleness=[1, 1, 1]),
        ),
    ),
    "timeout": (
        dict(interval=100, max_staleness=100, timeout_s=1.0),
        dict(queue_size=1, clock=_clock),
        dict(
            staleness=[0, 0, 0],
            dropped=[0, 0, 0],
            reasons=dict(initial=[1, 0, 0], timeout=[1, 1, 1]),
        ),
    ),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_synchronous_schedule_by_hand(tmp_path, name):
    cadence, kwargs, expected = SCHEDULES[name]
    kwargs = {k: v() if k == "clock" else v for k, v in kwargs.items()}
    out, rows, lines = _run_async(_config(3, **cadence), tmp_path, synchronous=True, **kwargs)
    column = lambda key: [r[key] for r in rows]
    assert column("sync/staleness_max") == expected["staleness"]
    assert column("sync/staleness_mean") == expected["staleness"]
    assert column("sync/dropped_samples") == expected["dropped"]
    for reason in REASONS:
        assert column(f"sync/broadcasts/{reason}") == expected["reasons"].get(reason, [0, 0, 0])
    assert column("sync/broadcasts") == [
        sum(x) for x in zip(*(column(f"sync/broadcasts/{r}") for r in REASONS), strict=True)
    ]
    assert column("sync/broadcast_version") == [2, 4, 6]
    assert column("train/policy_version") == [2, 4, 6]
    assert int(out["state"].policy_version) == 6
    dropped = sum(expected["dropped"])
    assert lines[-1].startswith("done: 3 steps") and f"{dropped} stale samples dropped" in lines[-1]
    # (b)'s bound is below the U = 2 versions every queued rollout lags by: the run says so.
    warned = [line for line in lines if line.startswith("warning: experiment.weight_sync_max")]
    assert len(warned) == (name == "staleness")


def test_threaded_one_worker_is_one_step_behind(tmp_path):
    """One worker, one place: a rollout is sampled when the trainer takes the previous one,
    so it is exactly one step (U versions) old when trained, whatever the timing."""
    config = _config(5, interval=1, max_staleness=UPDATES)
    out, rows, lines = _run_async(config, tmp_path)
    assert [r["sync/staleness_max"] for r in rows] == [0.0] + [float(UPDATES)] * 4
    assert [r["sync/dropped_samples"] for r in rows] == [0.0] * 5
    assert int(out["state"].policy_version) == 5 * UPDATES
    assert all(np.isfinite(r["actor/pg_loss"]) for r in rows)
    assert _worker_threads() == []
    assert not [line for line in lines if line.startswith("warning: experiment.weight_sync")]
    # Throughput is over the step's wall time, the wait for the rollout included.
    for r in rows:
        assert r["timing_s/step"] >= r["timing_s/wait"] + r["timing_s/update"]
        assert r["perf/throughput"] == pytest.approx(
            r["perf/total_num_tokens"] / r["timing_s/step"]
        )
        assert r["perf/total_num_tokens"] > 0


def test_threaded_workers_sample_no_rollout_the_run_does_not_train(tmp_path, monkeypatch):
    calls = []
    original = RolloutEngine.rollout

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutEngine, "rollout", counted)
    config = _config(4, interval=1, max_staleness=100, world_size=2)
    _, rows, _ = _run_async(config, tmp_path, num_workers=2)
    assert [r["sync/dropped_samples"] for r in rows] == [0.0] * 4
    assert len(calls) == 4  # not 4 + one per worker sampled past the last step


def test_train_runs_an_async_config_with_its_workers_and_queue(tmp_path, monkeypatch):
    """loop.train honours experiment.async_rollouts, and train_async's defaults are the
    config's experiment.rollout_workers and experiment.rollout_queue_size."""
    feeds = []
    original = async_loop._ThreadedFeed.__init__

    def recorded(self, produce, **kwargs):
        feeds.append((kwargs["num_workers"], kwargs["queue_size"]))
        original(self, produce, **kwargs)

    monkeypatch.setattr(async_loop._ThreadedFeed, "__init__", recorded)
    config = _config(2, interval=1, max_staleness=100, world_size=2)
    config.experiment.update(async_rollouts=True, rollout_workers=2, rollout_queue_size=3)
    train(config, str(tmp_path / "a"), mesh=_mesh(config), log=lambda _: None)
    rows = read_metrics(tmp_path / "a")
    assert feeds == [(2, 3)]
    assert [r["step"] for r in rows] == [1, 2] and all("sync/staleness_max" in r for r in rows)
    config.experiment.rollout_queue_size = 0  # one per worker
    train_async(config, str(tmp_path / "b"), mesh=_mesh(config), log=lambda _: None)
    assert feeds[1] == (2, 2)
    train_async(config, str(tmp_path / "c"), mesh=_mesh(config), log=lambda _: None,
                num_workers=1, queue_size=1)  # fmt: skip
    assert feeds[2] == (1, 1)


def _rollout(index, worker):
    """A rollout with nothing in it, for the feed alone."""
    return async_loop.Rollout(index, worker, 0, None, None, {}, 0.0)


def test_a_worker_error_no_take_raised_is_raised_on_close():
    taken = threading.Event()

    def produce(worker, index):
        if index == 1:
            taken.wait(10)  # fails after the trainer took rollout 0
            raise ValueError("reward server unreachable")
        return _rollout(index, worker)

    feed = async_loop._ThreadedFeed(
        produce, queue_size=2, num_workers=1, first_index=0, limit=2, retire=lambda w: None
    )
    feed.start()
    assert feed.get(lambda: None).index == 0
    taken.set()
    feed._threads[0].join(timeout=10)
    with pytest.raises(ValueError, match="reward server unreachable") as excinfo:
        feed.close(raise_errors=True)
    assert "raised in rollout worker 0" in "".join(excinfo.value.__notes__)


def test_a_worker_with_nothing_left_to_sample_holds_no_parameters():
    retired = threading.Event()
    feed = async_loop._ThreadedFeed(
        lambda worker, index: _rollout(index, worker),
        queue_size=1, num_workers=1, first_index=0, limit=1, retire=lambda w: retired.set(),
    )  # fmt: skip
    feed.start()
    assert feed.get(lambda: None).index == 0
    assert retired.wait(10)  # before the run ends: no staleness broadcast on its account
    # The trainer dropped rollout 0: the worker that retired takes its place back and samples
    # the replacement (a place kept by the retired worker would leave none to sample it).
    feed.extend(1)
    deadline = time.monotonic() + 10

    def on_wait():
        assert time.monotonic() < deadline, "no worker samples the replacement rollout"

    assert feed.get(on_wait).index == 1
    feed.close()


def test_a_retired_worker_sampling_a_replacement_starts_within_the_bound(tmp_path):
    """One worker, two places, 2 steps: rollouts 0 and 1 both sample version 0, and the worker
    then retires (nothing left to start). Step 1 drops rollout 1 (staleness U > 1); the
    replacement must start from the trainer's version, broadcast when the drop lets the
    retired worker start again, not from version 0 again (dropped again)."""
    config = _config(2, interval=100, max_staleness=1)
    _, rows, _ = _run_async(config, tmp_path, queue_size=2)
    assert [r["sync/dropped_samples"] for r in rows] == [0.0, 8.0]  # rollout 1 only
    assert [r["sync/staleness_max"] for r in rows] == [0.0, 0.0]
    assert rows[1]["sync/broadcasts/staleness"] >= 1  # before the replacement was sampled


def test_the_latest_broadcast_counts_only_for_a_worker_about_to_start_again():
    """No worker holds parameters (they retired): a poll broadcasts nothing (none would be
    used at the end of a run), unless a dropped rollout lets one start again."""
    import types

    from novarl_jax.sync import ParamStore

    store = ParamStore()
    broadcaster = async_loop._Broadcaster(WeightSyncController(100, 1, 0.0), store)
    state = lambda version: types.SimpleNamespace(  # noqa: E731
        policy_version=jnp.int32(version), params={"policy": {"w": jnp.ones(2)}}
    )
    assert broadcaster.poll(state(0)) == "initial"
    assert broadcaster.poll(state(2)) is None  # nobody would sample with it
    assert store.latest().version == 0
    assert broadcaster.poll(state(2), restarting=True) == "staleness"
    assert store.latest().version == 2


def test_closing_after_ctrl_c_waits_for_the_rollout_in_progress(capsys):
    # Python's shutdown tears down a worker left inside a rollout, and the process aborts.
    started = threading.Event()

    def produce(worker, index):
        started.set()
        time.sleep(0.5)
        return _rollout(index, worker)

    feed = async_loop._ThreadedFeed(
        produce, queue_size=1, num_workers=2, first_index=0, limit=5, retire=lambda w: None
    )
    feed.start()
    assert started.wait(10)
    feed.close(interrupted=True)
    assert not any(t.is_alive() for t in feed._threads)
    assert async_loop.rollouts_in_progress() == []
    err = capsys.readouterr().err
    assert err.startswith("novarl_jax: interrupted; waiting for the rollouts in progress in [")
    assert err.endswith("to finish (Ctrl-C again to stop at once)\n")
    # So does a stop on SIGTERM.
    started.clear()
    feed = async_loop._ThreadedFeed(
        produce, queue_size=1, num_workers=1, first_index=0, limit=5, retire=lambda w: None
    )
    feed.start()
    assert started.wait(10)
    assert feed.sampling() == [f"{async_loop.WORKER_THREAD_PREFIX}0"]
    feed.close(stopped=True)
    assert capsys.readouterr().err == (
        f"novarl_jax: stopping; waiting for the rollouts in progress in "
        f"['{async_loop.WORKER_THREAD_PREFIX}0'] to finish (SIGTERM again to stop at once)\n"
    )
    # Idle workers (the queue full, nothing sampling) stop without a word.
    feed = async_loop._ThreadedFeed(
        lambda w, i: _rollout(i, w), queue_size=1, num_workers=1, first_index=0, limit=1,
        retire=lambda w: None,
    )  # fmt: skip
    feed.start()
    assert feed.get(lambda: None).index == 0
    feed.close(interrupted=True)
    assert not feed._threads[0].is_alive() and capsys.readouterr().err == ""


def test_the_lags_that_decide_the_start_up_warnings():
    config = _config(1, interval=1)  # U = 2
    assert async_loop._lags(config, 1, synchronous=False) == (2, 2)
    assert async_loop._lags(config, 2, synchronous=False) == (2, 4)
    assert async_loop._lags(config, 3, synchronous=True) == (4, 4)
    config = _config(1, interval=5, max_staleness=100)  # a poll can leave 2 steps unbroadcast
    assert async_loop._lags(config, 1, synchronous=False) == (2, 6)
    assert async_loop._lags(config, 1, synchronous=True) == (0, 4)
    # A worker lagging by the bound gets a broadcast: no more than 1 step (< 3) is left.
    config = _config(1, interval=5, max_staleness=3)
    assert async_loop._lags(config, 1, synchronous=False) == (2, 4)
    assert async_loop._lags(config, 1, synchronous=True) == (0, 2)


def test_no_warning_where_the_staleness_broadcast_keeps_every_rollout(tmp_path):
    config = _config(4, interval=5, max_staleness=3)
    config.grpo.tis_cap = 2.0
    out, rows, lines = _run_async(config, tmp_path, synchronous=True, queue_size=1)
    assert not [line for line in lines if line.startswith("warning:")]
    assert [r["sync/dropped_samples"] for r in rows] == [0.0] * 4


def test_batches_that_can_lag_without_tis_cap_are_warned_about():
    config = _config(1, interval=5, max_staleness=3)  # lags: threaded up to 4, inline 2
    warning = async_loop.correction_warning(config, 1, synchronous=False)
    assert warning == (
        "batches sampled up to 3 versions behind the trainer train with no correction for "
        "the policy that sampled them: the ratio is taken against the trainer's own scoring "
        "of each batch; set grpo.tis_cap (2.0 is common) to weight each token by "
        "min(pi_old / pi_behavior, tis_cap) (docs/async.md)"
    )  # the bound, 3, caps the lag
    assert async_loop.correction_warning(config, 1, synchronous=True).startswith(
        "batches sampled up to 2 versions behind"
    )
    # Inline, one place, a broadcast after every step: each batch is the trainer's own.
    on_policy = _config(1, interval=1, max_staleness=3)
    assert async_loop._lags(on_policy, 1, synchronous=True) == (0, 0)
    assert async_loop.correction_warning(on_policy, 1, synchronous=True) is None
    config.grpo.tis_cap = 2.0
    assert async_loop.correction_warning(config, 1, synchronous=False) is None
    config.experiment.algorithm = "ppo"  # the algorithm's own tis_cap
    assert "set ppo.tis_cap" in async_loop.correction_warning(config, 1, synchronous=False)


def test_threaded_bound_holds_with_two_workers(tmp_path, monkeypatch):
    """Two workers, two places, max_staleness = U, and a trainer slower than the workers:
    a rollout sampled while the trainer is two steps behind is two steps (2U) old when
    taken, and must be dropped, never trained (which rollouts these are depends on timing)."""
    original = async_loop.AsyncTrainer.learn

    def slow(self, *args):
        time.sleep(0.1)
        return original(self, *args)

    monkeypatch.setattr(async_loop.AsyncTrainer, "learn", slow)
    config = _config(6, interval=1, max_staleness=UPDATES, world_size=2)
    out, rows, lines = _run_async(config, tmp_path, num_workers=2)
    # Rollouts sampled two steps ahead lag by 2U > the bound: the run says so at start.
    assert any("below the 4 versions a rollout sampled 2 step(s) ahead" in line for line in lines)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(0 <= r["sync/staleness_max"] <= UPDATES for r in rows)
    dropped = sum(r["sync/dropped_samples"] for r in rows)
    assert f"{dropped:.0f} stale samples dropped" in lines[-1]
    assert all(r["sync/queue_depth"] <= 2 for r in rows)
    assert int(out["state"].policy_version) == 6 * UPDATES
    assert _worker_threads() == []


def test_worker_error_reaches_the_caller_and_threads_stop(tmp_path, monkeypatch):
    calls = []
    original = RolloutEngine.rollout

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise ValueError("reward server unreachable")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RolloutEngine, "rollout", failing)
    with pytest.raises(ValueError, match="reward server unreachable") as excinfo:
        _run_async(_config(6, max_staleness=UPDATES), tmp_path)
    assert excinfo.value.__notes__ == ["raised in rollout worker 0 (novarl-rollout-0)"]  # once
    assert _worker_threads() == []
    # Rollouts 0 and 1 were trained; rollout 2 failed while step 2 trained.
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_trainer_error_stops_the_workers(tmp_path, monkeypatch):
    original = async_loop.AsyncTrainer.learn

    def failing(self, state, reference, rollout, step):
        if step == 1:
            raise RuntimeError("trainer failed")
        return original(self, state, reference, rollout, step)

    monkeypatch.setattr(async_loop.AsyncTrainer, "learn", failing)
    with pytest.raises(RuntimeError, match="trainer failed"):
        _run_async(_config(4), tmp_path, num_workers=2)
    assert _worker_threads() == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_workers=0), "num_workers must be an integer >= 1, got 0"),
        (dict(num_workers=True), "num_workers must be an integer >= 1, got True"),
        (dict(queue_size=-1), "queue_size must be an integer >= 0, got -1"),
        (dict(queue_size=1.0), "queue_size must be an integer >= 0, got 1.0"),
        (dict(clock=None), "clock must be a callable returning seconds"),
    ],
)
def test_bad_arguments_name_themselves(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_async(_config(1), str(tmp_path), **kwargs)
    assert list(tmp_path.iterdir()) == []  # refused before the workdir was touched


def test_published_copy_survives_donation_and_keeps_sharding(devices):
    mesh = jax.sharding.Mesh(np.array(devices).reshape(8), ("dp",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("dp"))
    params = {"w": jax.device_put(jnp.arange(16.0), sharding)}
    copy = async_loop._copy_tree(params)
    jax.jit(lambda p: jax.tree.map(lambda x: x + 1, p), donate_argnums=0)(params)
    assert params["w"].is_deleted()
    assert copy["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(copy["w"]), np.arange(16.0))


def test_ppo_async_config_has_the_quickstart_cadence():
    config = ppo_async.get_config()
    validate_config(config)
    assert config.experiment.algorithm == "ppo"
    assert WeightSyncController.from_config(config).state[:3] == (4, 6, 30.0)
    # 2 epochs x 2 minibatches: a batch one step behind (4 versions) is within the bound.
    assert config.train.epochs * config.train.minibatches == 4
    # Such a batch is corrected for the policy that sampled it.
    assert config.ppo.tis_cap == 2.0
    assert async_loop.check_async_startup(validate_config(config)) == []


def test_a_timeout_is_refused_in_a_multi_process_run(tmp_path, monkeypatch):
    # Each process would read its own clock: the processes could sample different versions.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ConfigError, match="experiment.weight_sync_timeout_s: 1.0 s: a timeout"):
        train_async(_config(1, timeout_s=1.0), str(tmp_path), synchronous=True)


def test_resume_after_out_of_order_workers_trains_no_prompt_twice(tmp_path, monkeypatch):
    """Two threaded workers on a JSONL task; the batch whose prompts were drawn first is
    trained second. The checkpointed position must not move back to it, or a resumed run
    would train the other batch's prompts again."""
    first_drawn, other_done, first_queued = (threading.Event() for _ in range(3))
    original_sample, original_learn = async_loop.AsyncTrainer.sample, async_loop.AsyncTrainer.learn
    trained, indices = [], []

    # Keyed on the rollout index, not the worker: workers take indices as they come.
    def sample(self, params, key_data, index, worker=0):
        if index == 0:  # draws first, is queued second
            rollout = original_sample(self, params, key_data, index, worker)
            first_drawn.set()
            assert other_done.wait(60)
            time.sleep(0.2)  # rollout 1 reaches the queue first
            first_queued.set()
            return rollout
        if index == 1:
            assert first_drawn.wait(60)
            rollout = original_sample(self, params, key_data, index, worker)
            other_done.set()
            return rollout
        assert first_queued.wait(60)
        time.sleep(0.2)  # rollout 0 is queued before any later one
        return original_sample(self, params, key_data, index, worker)

    def learn(self, state, reference, rollout, step):
        trained.append({m["example_index"] for m in rollout.info.metadata})
        indices.append(rollout.index)
        return original_learn(self, state, reference, rollout, step)

    monkeypatch.setattr(async_loop.AsyncTrainer, "sample", sample)
    monkeypatch.setattr(async_loop.AsyncTrainer, "learn", learn)

    def config(steps):
        c = _config(steps, max_staleness=100)
        c.task = jsonl.get_config().task
        c.rollout.max_prompt_length, c.rollout.max_new_tokens = 48, 4
        c.model.max_position_embeddings = 64
        c.checkpoint.interval = 1
        return c

    _run_async(config(2), tmp_path, num_workers=2, queue_size=2)
    assert len(trained) == 2 and not trained[0] & trained[1]
    # Rollout 1 was trained before rollout 0; the next rollout to sample is still 2 (going
    # back to 1 would sample rollout 1's key again after a resume).
    assert indices == [1, 0]
    host = Checkpointer(str(tmp_path / "checkpoints"), async_save=False).restore_host(2)
    assert host["rollout_index"] == 2
    _run_async(config(3), tmp_path, synchronous=True)  # resumes at step 3
    assert len(trained) == 3
    assert not trained[2] & (trained[0] | trained[1]), trained


def test_checklist_shows_the_weight_sync_cadence():
    from novarl_jax.trainer.checklist import checklist_rows

    def rows(config):
        return {(s, i): v for s, i, v in checklist_rows(validate_config(config))}

    assert rows(base.get_config())[("weight sync", "rollouts")].startswith("synchronous")
    config = ppo_async.get_config()
    config.experiment.rollout_workers = 2
    got = rows(config)
    assert got[("weight sync", "rollouts")] == "asynchronous: 2 workers, 2 sampled ahead"
    assert got[("weight sync", "broadcast")] == (
        "every 1 step(s) (4 update(s) asked, 4 per step), when a worker lags 6, or after 30 s"
    )
    config.experiment.weight_sync_interval = 5  # the trainer asks after every step
    assert rows(config)[("weight sync", "broadcast")].startswith("every 2 step(s) (5 update(s)")
    assert got[("weight sync", "staleness bound")] == "6 versions (a step is 4 updates)"
