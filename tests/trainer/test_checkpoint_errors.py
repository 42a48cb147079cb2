"""A checkpoint that cannot be written stops the run with one line, and nothing hangs."""

import errno
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest
from orbax.checkpoint._src.handlers import json_checkpoint_handler

from novarl_jax.trainer.checkpoint import Checkpointer, CheckpointWriteError

# Saves step 1, then replaces the checkpoint directory with a file, so that making step 2's
# directory fails (as a vanished mount or a directory made unwritable would), and exits.
WRITER = textwrap.dedent(
    """
    import os, shutil, sys
    import jax.numpy as jnp
    from novarl_jax.trainer.checkpoint import Checkpointer, CheckpointWriteError

    directory, async_save = sys.argv[1], sys.argv[2] == "async"
    ckpt = Checkpointer(directory, interval=1, async_save=async_save)
    ckpt.save(1, {"w": jnp.ones(3)}, {"iteration": 1})
    ckpt.wait()
    shutil.rmtree(directory)
    open(directory, "w").close()
    try:
        ckpt.save(2, {"w": jnp.ones(3)}, {"iteration": 2})
        ckpt.close()
    except CheckpointWriteError as e:
        print(e, flush=True)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_process_whose_save_fails_exits(tmp_path, mode):
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), mode],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        cwd=pathlib.Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        out, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("the process did not exit after a failed checkpoint save")
    assert proc.returncode == 3, err
    # Step 1 went with the directory: the message says what is there, not what was.
    assert out.splitlines() == [
        f"{directory}: the checkpoint of step 2 could not be written (NotADirectoryError: "
        f"[Errno 20] Not a directory: '{directory}/2.orbax-checkpoint-tmp'); no earlier "
        f"checkpoint is in {directory}"
    ]


def test_a_checkpoint_path_that_is_a_file_is_refused_at_once(tmp_path):
    path = tmp_path / "checkpoints"
    path.touch()
    with pytest.raises(CheckpointWriteError, match=rf"^{path}: is a file, not a directory"):
        Checkpointer(str(path))
    assert path.is_file()  # left as it was


def _fail_json_writes(monkeypatch):
    """Makes the background write of a step's ``host`` record fail as on a full disk."""

    async def no_space(self, item, directory):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(directory))

    monkeypatch.setattr(json_checkpoint_handler.JsonCheckpointHandler, "_save_fn", no_space)


@pytest.mark.parametrize("async_save", [True, False])
def test_a_failed_write_is_one_line_and_keeps_the_last_checkpoint(
    tmp_path, monkeypatch, async_save
):
    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=async_save)
    assert ckpt.save(1, {"w": jnp.full(4, 1.0)}, {"iteration": 1})
    ckpt.wait()
    _fail_json_writes(monkeypatch)
    match = (
        rf"^{tmp_path}: the checkpoint of step 2 could not be written \(OSError: \[Errno 28\] "
        rf"No space left on device: '.*'\); the last checkpoint \(step 1\) in {tmp_path} is "
        r"intact$"
    )
    with pytest.raises(CheckpointWriteError, match=match) as failed:
        ckpt.save(2, {"w": jnp.full(4, 2.0)}, {"iteration": 2})
        ckpt.wait()  # an asynchronous save's error comes here
    assert "\n" not in str(failed.value)
    monkeypatch.undo()
    # Nothing more is written once a save failed: a run does not go on without checkpoints.
    with pytest.raises(CheckpointWriteError, match=match):
        ckpt.save(3, {"w": jnp.full(4, 3.0)}, {"iteration": 3})
    ckpt.close()  # the error was raised already: close does not raise it again

    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=False)
    assert ckpt.all_steps() == [1]
    like = {"w": jax.ShapeDtypeStruct((4,), jnp.float32)}
    state, host = ckpt.restore(like)
    assert host == {"iteration": 1} and float(state["w"][0]) == 1.0
    # A resumed run writes step 2 over what the failed save left.
    assert ckpt.save(2, {"w": jnp.full(4, 2.0)}, {"iteration": 2})
    state, host = ckpt.restore(like)
    assert host == {"iteration": 2} and float(state["w"][0]) == 2.0
    ckpt.close()


def test_close_raises_the_failure_of_a_pending_save_once(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), interval=1, async_save=True)
    _fail_json_writes(monkeypatch)
    assert ckpt.save(1, {"w": jnp.ones(2)}, {"iteration": 1})  # written in the background
    with pytest.raises(
        CheckpointWriteError, match=r"step 1 could not be written .*; no earlier checkpoint"
    ):
        ckpt.close()
    ckpt.close()


def test_ctrl_c_while_a_save_starts_keeps_that_save(tmp_path):
    """SIGINT arriving while orbax starts a save is delivered once the save has started, so
    closing waits for it: before, it abandoned the save half-made."""
    import signal

    ckpt = Checkpointer(str(tmp_path), interval=1, keep=1, async_save=True)
    ckpt.save(1, {"w": jnp.ones(2)}, {"iteration": 1})
    manager_save = ckpt._manager.save

    def interrupted_save(*args, **kwargs):
        # Raised on this (the main) thread, so it lands here, in the middle of starting the
        # save: os.kill may hand it to another thread, which can run after the save has begun.
        signal.raise_signal(signal.SIGINT)
        return manager_save(*args, **kwargs)

    ckpt._manager.save = interrupted_save
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(2, {"w": jnp.full(2, 2.0)}, {"iteration": 2})
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    ckpt.close()
    assert ckpt.all_steps() == [2]
    # The step the last save replaced is gone from the trash too, not left for the next run.
    assert os.listdir(tmp_path / "todelete") == []
    state, host = Checkpointer(str(tmp_path)).restore(
        {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    )
    assert host == {"iteration": 2} and float(state["w"][0]) == 2.0


def test_an_os_error_inside_a_tensorstore_message_is_named_in_the_os_words():
    from novarl_jax.trainer.checkpoint import _cause

    long = (
        'RESOURCE_EXHAUSTED: Error writing "opt_state.mu" in OCDBT database at local file '
        '"/ckpt/4.orbax-checkpoint-tmp/": Failed to write 3089 bytes to file 6: No space left '
        "on device [os_error_code='28']"
    )
    try:
        try:
            raise ValueError(long)
        except ValueError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as e:
        assert _cause(e) == "OSError: [Errno 28] No space left on device (from RuntimeError)"
    assert (
        _cause(OSError(13, "Permission denied")) == "PermissionError: [Errno 13] Permission denied"
    )


def test_a_failed_write_names_the_latest_kept_step(tmp_path, monkeypatch):
    ckpt = Checkpointer(str(tmp_path), interval=1, keep=3, async_save=False)
    for s in (1, 2, 3):
        ckpt.save(s, {"w": jnp.ones(2)}, {"iteration": s})
    _fail_json_writes(monkeypatch)
    with pytest.raises(
        CheckpointWriteError, match=rf"the last checkpoint \(step 3\) in {tmp_path} is intact$"
    ):
        ckpt.save(4, {"w": jnp.ones(2)}, {"iteration": 4})
    monkeypatch.undo()
    ckpt.close()
    assert (tmp_path / "3").is_dir()


# keep=1: step 1 is saved, then step 2 fails part way for a file-size limit (a full disk).
FULL_DISK = textwrap.dedent(
    """
    import resource, signal, sys
    import jax
    from novarl_jax.trainer.checkpoint import Checkpointer, CheckpointWriteError

    ckpt = Checkpointer(sys.argv[1], interval=1, keep=1, async_save=True)
    ckpt.save(1, {"w": jax.numpy.ones((8, 8))}, {"iteration": 1})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))
    try:
        ckpt.save(2, {"w": jax.random.normal(jax.random.key(0), (512, 512))}, {"iteration": 2})
        ckpt.close()
    except CheckpointWriteError as e:
        print(e, flush=True)
    """
)


def test_with_one_checkpoint_kept_a_failed_save_names_the_one_still_there(tmp_path):
    """Once step 2's save started, orbax no longer listed step 1 (it would go when step 2
    landed): the message said no checkpoint was written while step 1 was intact on disk."""
    directory = tmp_path / "ckpt"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(directory)], capture_output=True, text=True,
        env=env, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[2],
    )  # fmt: skip
    assert proc.stdout.splitlines() == [
        f"{directory}: the checkpoint of step 2 could not be written (OSError: [Errno 27] File "
        f"too large (from ValueError)); the last checkpoint (step 1) in {directory} is intact"
    ], proc.stderr[-2000:]
    assert (directory / "1").is_dir()
