"""The asynchronous loop's feed and schedule: polls while the trainer waits, worker errors
(the first raised, once, and the others stopped), inline turns round the workers, the
multi-process start-up check and the rollout index after drops (also when the run goes on
synchronously)."""

import threading
import time

import jax
import pytest
from test_async_loop import UPDATES, _config, _mesh, _rollout, _run_async

from novarl_jax.trainer import async_loop
from novarl_jax.trainer.checkpoint import Checkpointer
from novarl_jax.trainer.config import validate_config
from novarl_jax.trainer.loop import Trainer, train


def test_the_trainer_polls_while_it_waits_for_a_rollout(tmp_path, monkeypatch):
    polls, after = [], {}
    orig_poll, orig_sample = async_loop._Broadcaster.poll, async_loop.AsyncTrainer.sample

    def poll(self, state):
        v = int(state.policy_version)
        polls.append(v)
        after.setdefault(v, threading.Event()).set()
        return orig_poll(self, state)

    def sample(self, params, key_data, index, worker=0):
        if index >= 1:  # the trainer has polled after step index-1 and now waits for this one
            assert after.setdefault(index * UPDATES, threading.Event()).wait(60)
            time.sleep(0.5)
        return orig_sample(self, params, key_data, index, worker)

    monkeypatch.setattr(async_loop._Broadcaster, "poll", poll)
    monkeypatch.setattr(async_loop.AsyncTrainer, "sample", sample)
    _run_async(_config(3, max_staleness=100), tmp_path)
    assert len(polls) > 1 + 3, polls  # waits poll (timeout broadcasts while idle)


def test_a_worker_error_stops_the_other_workers():
    started, raised = [], threading.Event()

    def produce(worker, index):
        if index == 0:
            raised.set()
            raise ValueError("boom")
        raised.wait(10)
        time.sleep(0.2)  # the failing worker has stopped the feed by now
        started.append(index)
        return _rollout(index, worker)

    feed = async_loop._ThreadedFeed(
        produce, queue_size=6, num_workers=2, first_index=0, limit=6, retire=lambda w: None
    )
    feed.start()
    time.sleep(1.5)
    assert len(started) <= 2, started  # left running, the other worker would take 1..5
    feed.close()


def test_the_first_worker_error_is_the_one_raised():
    both = threading.Barrier(2)

    def produce(worker, index):
        both.wait(10)  # both workers are sampling
        if index == 0:
            raise ValueError("first")
        time.sleep(0.3)
        raise ValueError("second")

    feed = async_loop._ThreadedFeed(
        produce, queue_size=2, num_workers=2, first_index=0, limit=2, retire=lambda w: None
    )
    feed.start()
    for t in feed._threads:
        t.join(10)
    with pytest.raises(ValueError, match="first"):
        feed.close(raise_errors=True)


def _record_samples(monkeypatch):
    """(index, worker) of each rollout the trainer samples, in order."""
    calls = []
    original = async_loop.AsyncTrainer.sample

    def sample(self, params, key_data, index, worker=0):
        calls.append((index, worker))
        return original(self, params, key_data, index, worker)

    monkeypatch.setattr(async_loop.AsyncTrainer, "sample", sample)
    return calls


def test_inline_turns_go_round_the_workers(tmp_path, monkeypatch):
    calls = _record_samples(monkeypatch)
    _run_async(
        _config(4, max_staleness=100), tmp_path, synchronous=True, num_workers=2, queue_size=2
    )
    assert [worker for _, worker in calls] == [0, 1, 0, 1]


def test_multi_process_runs_without_a_timeout_are_accepted(monkeypatch):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    async_loop.check_async_startup(validate_config(_config(1, timeout_s=0.0)))  # no raise


def test_a_queue_size_of_0_is_one_place_per_worker_as_in_the_config(tmp_path, monkeypatch):
    import numpy as np

    sizes = []
    original = async_loop._InlineFeed.__init__

    def init(self, produce, *, queue_size, **kwargs):
        sizes.append(queue_size)
        original(self, produce, queue_size=queue_size, **kwargs)

    monkeypatch.setattr(async_loop._InlineFeed, "__init__", init)
    config = _config(1, max_staleness=100)
    _run_async(config, tmp_path / "a", synchronous=True, num_workers=np.int64(2), queue_size=0)
    assert sizes == [2]


def test_a_resume_after_drops_continues_the_rollout_index(tmp_path, monkeypatch):
    calls = _record_samples(monkeypatch)
    cadence = dict(interval=3, max_staleness=1)
    _, rows, _ = _run_async(_config(2, **cadence), tmp_path, synchronous=True, queue_size=2)
    assert [r["sync/dropped_samples"] for r in rows] == [0, 8]
    assert [index for index, _ in calls] == [0, 1, 2]
    host = Checkpointer(str(tmp_path / "checkpoints"), async_save=False).restore_host(2)
    assert host["rollout_index"] == 3
    calls.clear()
    _run_async(_config(3, **cadence), tmp_path, synchronous=True, queue_size=2)
    assert calls[0][0] == 3  # rollout 2's key is not sampled again


def test_a_synchronous_resume_of_an_asynchronous_run_goes_on_after_its_rollouts(
    tmp_path, monkeypatch
):
    cadence = dict(interval=3, max_staleness=1)
    _run_async(_config(2, **cadence), tmp_path, synchronous=True, queue_size=2)  # rollouts 0..2
    indices = []
    original = Trainer.iteration

    def iteration(self, state, reference, i):
        indices.append(i)
        return original(self, state, reference, i)

    monkeypatch.setattr(Trainer, "iteration", iteration)
    checked, check_prompts = [], Trainer.check_prompts
    monkeypatch.setattr(
        Trainer, "check_prompts", lambda self, i=0: checked.append(i) or check_prompts(self, i)
    )
    config = _config(4, **cadence)
    config.experiment.async_rollouts = False
    train(
        config, str(tmp_path), mesh=_mesh(config), log=lambda line: None, allow_config_change=True
    )
    assert indices == [3, 4]  # rollout 2's key, trained at step 2, is not sampled again
    assert checked == [3]  # the start-up checks the prompts the first step samples
    host = Checkpointer(str(tmp_path / "checkpoints"), async_save=False).restore_host(4)
    assert host["rollout_index"] == 5


def test_a_long_wait_for_a_rollout_is_logged_as_it_doubles():
    now, lines = [0.0], []
    notes = async_loop._WaitNotes(lines.append, 3, lambda: now[0], lambda: ["w-1"])
    for now[0] in (10.0, 59.9, 60.0, 61.0, 119.0, 120.5, 200.0, 240.0):
        notes()
    waits = [line.split(" s so far")[0] for line in lines]
    assert waits == ["step 3: waiting 60", "step 3: waiting 120", "step 3: waiting 240"]


def test_the_wait_notes_name_the_worker_sampling(tmp_path, monkeypatch):
    original = async_loop.AsyncTrainer.sample

    def sample(self, params, key_data, index, worker=0):
        time.sleep(0.5)  # past the first note, whatever compiling takes
        return original(self, params, key_data, index, worker)

    monkeypatch.setattr(async_loop, "FIRST_WAIT_NOTE_S", 0.3)
    monkeypatch.setattr(async_loop.AsyncTrainer, "sample", sample)
    _, _, lines = _run_async(_config(1, max_staleness=100), tmp_path, queue_size=1)
    notes = [line for line in lines if "so far for a rollout" in line]
    assert notes and notes[0].startswith("step 1: waiting"), lines
    assert "sampling: novarl-rollout-0;" in notes[0], notes


def test_a_steps_generation_time_is_its_rollouts_sampling_time(tmp_path, monkeypatch):
    original = async_loop.AsyncTrainer.sample

    def sample(self, params, key_data, index, worker=0):
        return original(self, params, key_data, index, worker)._replace(gen_s=100.0 + index)

    monkeypatch.setattr(async_loop.AsyncTrainer, "sample", sample)
    _, rows, _ = _run_async(_config(2, max_staleness=100), tmp_path, synchronous=True)
    assert [r["timing_s/gen"] for r in rows] == [100.0, 101.0]
