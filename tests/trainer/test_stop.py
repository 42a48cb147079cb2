"""SIGTERM stops a run after the step in progress, checkpointed there; the rerun resumes."""

import os
import signal

import jax
import numpy as np
import pytest
from quiet_train import train_quietly

from configs import base
from novarl_jax.trainer import loop
from novarl_jax.trainer.checkpoint import Checkpointer
from novarl_jax.trainer.metrics import read_metrics
from novarl_jax.trainer.stop import StopRequested, StopWatch


def _config(steps=4):
    c = base.get_config()
    c.experiment.steps = steps
    c.rollout.prompts_per_step = 2
    c.rollout.max_new_tokens = 4
    c.checkpoint.interval = 100  # only the stop and the last step are saved
    c.checkpoint.async_save = True
    c.logging.progress = False
    c.logging.plot = False
    return c


def _sigterm_during(step_to_signal, monkeypatch):
    iteration = loop.Trainer.iteration

    def signalled(self, state, reference, i):
        if i + 1 == step_to_signal:
            signal.raise_signal(signal.SIGTERM)  # arrives in the middle of the step
        return iteration(self, state, reference, i)

    monkeypatch.setattr(loop.Trainer, "iteration", signalled)


def test_sigterm_checkpoints_the_step_and_the_rerun_resumes_exactly(tmp_path, monkeypatch):
    straight = train_quietly(_config(), tmp_path / "straight")
    previous = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _sigterm_during(2, m)
        with pytest.raises(StopRequested, match="stopped by SIGTERM after step 2") as info:
            train_quietly(_config(), tmp_path / "stopped")
    assert info.value.step == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is gone with the run
    ckpt = Checkpointer(str(tmp_path / "stopped" / "checkpoints"))
    assert ckpt.all_steps() == [2]  # off the interval: saved for the stop, complete
    ckpt.close()
    assert [r["step"] for r in read_metrics(tmp_path / "stopped")] == [1, 2]
    resumed = train_quietly(_config(), tmp_path / "stopped")
    assert resumed["resumed_from"] == 2
    for a, b in zip(
        jax.tree.leaves(resumed["state"].params), jax.tree.leaves(straight["state"].params),
        strict=True,
    ):  # fmt: skip
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_during_the_last_step_just_finishes(tmp_path, monkeypatch):
    _sigterm_during(2, monkeypatch)
    out = train_quietly(_config(steps=2), tmp_path)
    assert int(out["state"].policy_version) > 0 and out["resumed_from"] is None


def test_a_second_sigterm_ends_the_process_at_once(monkeypatch):
    ended = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: ended.append(sig))
    with StopWatch() as watch:
        assert not watch.requested()
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)
        assert watch.requested() and ended == []
        handler(signal.SIGTERM, None)
        assert ended == [signal.SIGTERM]  # re-sent with the previous handler back in place
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_an_ignored_sigterm_stays_ignored():
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with StopWatch() as watch:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert not watch.requested()
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_an_async_run_stops_and_resumes_too(tmp_path, monkeypatch):
    from novarl_jax.trainer import async_loop

    learn = async_loop.AsyncTrainer.learn

    def signalled(self, state, reference, rollout, i):
        if i + 1 == 2:
            signal.raise_signal(signal.SIGTERM)
        return learn(self, state, reference, rollout, i)

    config = _config()
    config.experiment.async_rollouts = True
    with monkeypatch.context() as m:
        m.setattr(async_loop.AsyncTrainer, "learn", signalled)
        with pytest.raises(StopRequested, match="after step 2"):
            train_quietly(config, tmp_path)  # the worker's rollout in progress is joined
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert train_quietly(config, tmp_path)["resumed_from"] == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_nested_watches_share_one_handler_and_mark(monkeypatch):
    """The command line's watch holds the handler; a signal before the session opens still
    stops the session; the next run starts unmarked."""
    previous = signal.getsignal(signal.SIGTERM)
    with StopWatch() as outer:
        handler = signal.getsignal(signal.SIGTERM)
        handler(signal.SIGTERM, None)  # during start-up
        with StopWatch() as inner:
            assert inner.requested() and outer.requested()
        assert signal.getsignal(signal.SIGTERM) is handler  # the outer watch still holds it
    assert signal.getsignal(signal.SIGTERM) is previous
    with StopWatch() as fresh:
        assert not fresh.requested()


def test_a_second_sigterm_puts_back_the_handler_the_run_started_with(monkeypatch):
    ended = []
    monkeypatch.setattr(os, "kill", lambda pid, sig: ended.append(sig))

    def own_handler(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        with StopWatch():
            handler = signal.getsignal(signal.SIGTERM)
            handler(signal.SIGTERM, None)
            handler(signal.SIGTERM, None)
            assert ended == [signal.SIGTERM]
            assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_watch_opened_off_the_main_thread_leaves_the_handler_alone():
    import threading

    previous = signal.getsignal(signal.SIGTERM)
    outcome = []

    def run():
        try:
            with StopWatch() as watch:
                outcome.append(watch.requested())
        except Exception as e:  # noqa: BLE001 - reported below
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert outcome == [False]
    assert signal.getsignal(signal.SIGTERM) is previous


def test_an_async_run_waiting_for_a_rollout_stops_there(tmp_path, monkeypatch):
    # Step 3's rollout is slow (a reward function, say): the stop does not wait for it.
    import threading
    import time

    from novarl_jax.trainer import async_loop

    recorded, record = threading.Event(), loop.Session.record
    sample = async_loop.AsyncTrainer.sample

    def record_step(self, i, *args, **kwargs):
        out = record(self, i, *args, **kwargs)
        if i + 1 == 2:
            recorded.set()
        return out

    def slow(self, params, key_data, index, worker=0):
        if index == 2:
            assert recorded.wait(60)  # the trainer now waits for this rollout
            signal.raise_signal(signal.SIGTERM)
            time.sleep(2.0)
        return sample(self, params, key_data, index, worker)

    config = _config()
    config.experiment.async_rollouts = True
    with monkeypatch.context() as m:
        m.setattr(loop.Session, "record", record_step)
        m.setattr(async_loop.AsyncTrainer, "sample", slow)
        with pytest.raises(StopRequested, match="after step 2$"):
            train_quietly(config, tmp_path)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert Checkpointer(str(tmp_path / "checkpoints"), async_save=False).all_steps() == [2]
    assert train_quietly(config, tmp_path)["resumed_from"] == 2
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]
