"""A process killed with SIGKILL while saving leaves the previous checkpoint restorable."""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from novarl_jax.trainer.checkpoint import Checkpointer

# Saves step s with every array filled with s; big enough that a save takes a while.
WRITER = textwrap.dedent(
    """
    import sys, jax.numpy as jnp
    from novarl_jax.trainer.checkpoint import Checkpointer

    ckpt = Checkpointer(sys.argv[1], interval=1, keep=2, async_save=True)
    for step in range(1, 1000):
        state = {"w": jnp.full((64, 1024, 1024), step, jnp.float32), "step": jnp.int32(step)}
        ckpt.save(step, state, {"iteration": step})
        if step == 1:
            ckpt.wait()
            print("first-save-done", flush=True)
    """
)


def _state_like():
    return {
        "w": jax.ShapeDtypeStruct((64, 1024, 1024), jnp.float32),
        "step": jax.ShapeDtypeStruct((), jnp.int32),
    }


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.3, 1.5])
def test_sigkill_during_save_keeps_last_checkpoint(tmp_path, delay):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory)],
        stdout=subprocess.PIPE, text=True, env=env,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "first-save-done"
        time.sleep(delay)  # somewhere inside a later (asynchronous) save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    ckpt = Checkpointer(str(directory), async_save=False)
    latest = ckpt.latest_step()
    assert latest is not None and latest >= 1
    state, host = ckpt.restore(_state_like())
    assert host == {"iteration": latest}
    assert int(state["step"]) == latest
    w = np.asarray(state["w"])
    assert w.min() == w.max() == latest  # complete, not a mix of two saves
    # The interrupted save left no step that claims to be complete but is not.
    for step in ckpt.all_steps():
        restored, _ = ckpt.restore(_state_like(), step=step)
        assert int(restored["step"]) == step
    ckpt.close()


def test_saves_follow_the_interval_from_the_first_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=3, keep=5, async_save=False)
    state = {"w": jnp.ones(2)}
    saved = [ckpt.save(step, state, {"iteration": step}) for step in (1, 2, 3, 4)]
    assert saved == [False, False, True, False]  # no save off the interval, the first included
    assert ckpt.save(5, state, {"iteration": 5}, force=True)  # the last step of a run
    assert ckpt.all_steps() == [3, 5]
    ckpt.close()


def test_keep_last_n_and_the_host_record_of_each_kept_step(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=False)
    for step in (1, 2, 3, 4):
        ckpt.save(step, {"w": jnp.full(2, float(step))}, {"iteration": step})
    assert ckpt.all_steps() == [2, 3, 4]
    ckpt.close()
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    assert ckpt.restore_host(2) == {"iteration": 2}
    assert ckpt.restore_host() == {"iteration": 4}
    ckpt.close()


def test_a_damaged_checkpoint_is_named_with_the_way_back_to_an_older_one(tmp_path):
    from novarl_jax.trainer.checkpoint import CheckpointUnreadableError

    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=False)
    for step in (1, 2, 3):
        ckpt.save(step, {"w": jnp.full(4, float(step))}, {"iteration": step})
    ckpt.close()
    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    # Damage the latest step from outside (a disk error, a stray rm): its host record.
    host = next((tmp_path / "3" / "host").iterdir())
    host.write_text("{not json")
    ckpt = Checkpointer(str(tmp_path), async_save=False)
    match = (
        rf"{tmp_path}/3: checkpoint could not be read \(.*\); it may be damaged: move "
        rf"{tmp_path}/3 out of {tmp_path} to resume from step 2 \(older checkpoints: \[1, 2\]\)"
    )
    with pytest.raises(CheckpointUnreadableError, match=match):
        ckpt.restore(like)
    state, host_state = ckpt.restore(like, step=2)  # the older ones are intact
    assert host_state == {"iteration": 2} and float(state["w"][0]) == 2.0
    ckpt.close()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep=0), r"keep must be an integer >= 1, got 0"),
        (dict(interval=0), r"interval must be an integer >= 1, got 0"),
        (dict(keep=2.5), r"keep must be an integer >= 1, got 2.5"),
    ],
)
def test_checkpointer_refuses_settings_that_would_lose_checkpoints(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        Checkpointer(str(tmp_path), **kwargs)
    Checkpointer(str(tmp_path), keep=None, async_save=False).close()  # keep them all


def test_a_save_killed_part_way_leaves_no_temporary_directory_behind(tmp_path):
    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=False)
    for step in (1, 2):
        ckpt.save(step, {"w": jnp.full(4, float(step))}, {"iteration": step})
    ckpt.close()
    # What a SIGKILL during step 9's save leaves: its files under orbax's temporary name.
    shutil.copytree(tmp_path / "2", tmp_path / "9.orbax-checkpoint-tmp")
    # A process that only reads (an export of a run that is saving) leaves it alone.
    reader = Checkpointer(str(tmp_path), async_save=False)
    assert reader.restore_host() == {"iteration": 2}
    reader.close()
    assert (tmp_path / "9.orbax-checkpoint-tmp").is_dir()
    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=False)
    assert ckpt.latest_step() == 2  # never taken for a checkpoint
    ckpt.save(3, {"w": jnp.full(4, 3.0)}, {"iteration": 3})
    ckpt.close()
    assert sorted(set(os.listdir(tmp_path)) - {"todelete"}) == ["1", "2", "3"]
