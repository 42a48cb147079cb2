"""One run per workdir (a lock the OS releases with the process), and a model's directory is
never taken for a workdir."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from quiet_train import train_quietly
from test_export import _config
from tiny_grpo import tiny_grpo_config

from novarl_jax.trainer.config import ConfigError
from novarl_jax.trainer.workdir import (
    LOCK_FILE,
    SHARED_CHECK_FILE,
    LockUnsupported,
    WorkdirInUseError,
    foreign_config,
    lock_workdir,
    release,
    sees_token,
    workdir_in_use,
    write_token,
)


def test_a_second_run_on_a_held_workdir_stops_before_writing_anything(tmp_path):
    held = lock_workdir(str(tmp_path))
    try:
        with pytest.raises(WorkdirInUseError) as info:
            train_quietly(_config(steps=1), tmp_path)
        assert str(info.value) == (
            f"--workdir: {tmp_path} is in use by another run (pid {os.getpid()}, holding "
            f"{tmp_path / LOCK_FILE}); wait for it to finish, or train in another directory"
        )
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no metrics, config or checkpoint
        assert str(workdir_in_use(str(tmp_path))) == str(info.value)  # the CLI's early probe
    finally:
        release(held)
    out = train_quietly(_config(steps=1), tmp_path)
    assert out["resumed_from"] is None and (tmp_path / "metrics.jsonl").exists()
    release(lock_workdir(str(tmp_path)))  # the finished run let go of it
    assert workdir_in_use(str(tmp_path)) is None
    assert workdir_in_use(str(tmp_path / "nowhere")) is None and not (tmp_path / "nowhere").exists()


def test_a_model_directory_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"^--workdir: .* is not a run's config, which a run"):
        train_quietly(_config(steps=1), tmp_path)
    assert os.listdir(tmp_path) == ["config.json"]  # not even a lock file
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "architectures": ["LlamaForCausalLM"]
    }


def test_a_workdir_that_cannot_be_created_names_the_flag(tmp_path, monkeypatch):
    import errno

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(ConfigError) as info:
        train_quietly(_config(steps=1), tmp_path / "run")
    assert str(info.value) == (
        f"--workdir: cannot write {tmp_path / 'run'}: Read-only file system; give a directory "
        "this process can create and write"
    )


def test_the_lock_file_names_only_its_current_holder(tmp_path):
    release(lock_workdir(str(tmp_path)))  # an earlier run of this process wrote its pid
    holder = _hold_in_a_child(tmp_path)
    try:
        with pytest.raises(WorkdirInUseError, match=rf"\(pid {holder.pid}, holding"):
            lock_workdir(str(tmp_path))
        assert (tmp_path / LOCK_FILE).read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()


def test_a_session_that_fails_to_open_or_closes_lets_go_of_the_workdir(tmp_path):
    """Held by a live reference (a notebook's saved traceback, a session kept in a variable)
    the workdir must still be free for the next run of the same process."""
    from novarl_jax.trainer.loop import Session
    from novarl_jax.trainer.saved_config import ConfigChangedError

    train_quietly(_config(steps=1), tmp_path)
    changed = _config(steps=1)
    changed.optim.learning_rate *= 2
    with pytest.raises(ConfigChangedError) as failed:  # raised inside Session.__init__
        Session(changed, str(tmp_path), log=lambda _: None)
    assert failed.value.__traceback__ is not None  # the failed session's frame is alive
    assert workdir_in_use(str(tmp_path)) is None
    session = Session(_config(steps=2), str(tmp_path), log=lambda _: None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=[session._lock.fileno()])  # fmt: skip
    try:
        assert workdir_in_use(str(tmp_path)) is not None
        session.close()
        assert workdir_in_use(str(tmp_path)) is None  # although the child has the descriptor
    finally:
        child.kill()
        child.wait()


def test_a_pathlib_workdir_trains(tmp_path):
    from novarl_jax.trainer.loop import train

    train(_config(steps=1), tmp_path / "run", log=lambda _: None)  # as notebooks pass it
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_forked_child_does_not_keep_the_lock_after_release(tmp_path):
    """A reward function's worker pool forks with the lock's descriptor open: closing alone
    left the lock held, and the same process could not train on its workdir again."""
    held = lock_workdir(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             pass_fds=[held.fileno()])  # fmt: skip
    try:
        release(held)
        release(lock_workdir(str(tmp_path)))
    finally:
        child.kill()
        child.wait()


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(LockUnsupported, match=r"cannot lock .*\.lock: No locks available"):
        lock_workdir(str(tmp_path / "direct"))
    assert workdir_in_use(str(tmp_path / "direct")) is None
    lines = []
    train_quietly(_config(steps=1), tmp_path / "run", log=lines.append)
    assert (
        f"warning: cannot lock {tmp_path / 'run' / LOCK_FILE}: No locks available; a second "
        "run on this workdir would not be refused" in lines
    )
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def _hold_in_a_child(workdir):
    """A child process that holds ``workdir``'s lock until killed."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from novarl_jax.trainer.workdir import lock_workdir
            held = lock_workdir({str(workdir)!r})  # kept: closing it releases the lock
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _hold_in_a_child(tmp_path)
    try:
        with pytest.raises(WorkdirInUseError, match=rf"\(pid {holder.pid}, holding"):
            lock_workdir(str(tmp_path))
    finally:
        holder.kill()
        holder.wait()
    release(lock_workdir(str(tmp_path)))


def test_foreign_config_accepts_a_runs_own_and_a_damaged_record(tmp_path):
    assert foreign_config(str(tmp_path)) is None  # none there
    (tmp_path / "config.json").write_text(json.dumps({"experiment": {"steps": 3}}))
    assert foreign_config(str(tmp_path)) is None
    (tmp_path / "config.json").write_text('{"experiment": ')  # the resume names it
    assert foreign_config(str(tmp_path)) is None
    (tmp_path / "config.json").write_text("[1, 2]")
    assert "is not a run's config" in foreign_config(str(tmp_path))


@pytest.mark.parametrize("name", ["config.json", "metrics.jsonl", "samples.jsonl"])
def test_a_directory_where_a_run_keeps_a_file_is_refused_naming_it(tmp_path, name):
    """A traceback (metrics.jsonl), or advice to free space naming a temporary file
    (config.json), before."""
    (tmp_path / name).mkdir()
    assert foreign_config(str(tmp_path)) == (
        f"{tmp_path / name} is a directory, where a run keeps its {name} file; move it away"
    )
    with pytest.raises(ConfigError, match=rf"^--workdir: {tmp_path / name} is a directory"):
        train_quietly(tiny_grpo_config(), tmp_path)


@pytest.mark.parametrize("name", ["checkpoints", "plots", "tensorboard"])
def test_a_file_where_a_run_keeps_a_directory_is_refused_naming_it(tmp_path, name):
    """checkpoints/ as a file failed after the start-up table (and --dry_run passed it);
    plots/ as a file failed at the end of the run."""
    (tmp_path / name).write_text("")
    assert foreign_config(str(tmp_path)) == (
        f"{tmp_path / name} is a file, where a run keeps its {name}/ directory; move it away"
    )


@pytest.mark.parametrize("kind", ["broken link", "fifo"])
def test_a_special_file_where_a_run_keeps_a_file_is_refused_naming_it(tmp_path, kind):
    entry = tmp_path / "metrics.jsonl"
    if kind == "fifo":
        os.mkfifo(entry)  # opening it to append would block
    else:
        entry.symlink_to(tmp_path / "gone")
    assert foreign_config(str(tmp_path)) == (
        f"{entry} is a broken link or a special file, where a run keeps its metrics.jsonl "
        "file; move it away"
    )


def test_a_workdir_that_cannot_be_entered_is_refused(tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, m: real_access(p, m) and not (p == str(tmp_path) and m & os.X_OK)
    )
    assert foreign_config(str(tmp_path)).endswith("is not writable by this user; train in "
                                                  "another directory")  # fmt: skip


def test_each_token_is_fresh_and_read_back_only_as_written(tmp_path):
    tokens = {write_token(str(tmp_path)) for _ in range(8)}
    assert len(tokens) == 8 and all(1 <= t < 2**31 - 1 for t in tokens)
    assert all(sees_token(str(tmp_path), t) for t in tokens)
    (tmp_path / f"{SHARED_CHECK_FILE}-5").write_text("6\n")  # another's, or cut short
    assert not sees_token(str(tmp_path), 5)


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    # (Permission bits do not stop root: the check asks os.access, as a user's run would.)
    import os

    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: p != str(tmp_path) and real_access(p, m))
    assert foreign_config(str(tmp_path)) == (
        f"{tmp_path} is not writable by this user; train in another directory"
    )
    assert foreign_config(str(tmp_path / "a" / "b")) == (
        f"{tmp_path / 'a' / 'b'} is not writable by this user (its nearest existing parent "
        f"{tmp_path} is not); train in another directory"
    )
    monkeypatch.undo()
    assert foreign_config(str(tmp_path / "a" / "b")) is None
    monkeypatch.chdir(tmp_path)
    assert foreign_config(os.path.join("runs", "copy")) is None  # relative, not there yet


def test_a_mesh_that_is_not_the_configs_layout_is_refused(tmp_path):
    """A mesh given to train() decides every weight's sharding: another layout (or other
    axis names) would train unsharded while the workdir records the config's layout."""
    import jax

    from novarl_jax.trainer.config import validate_config
    from novarl_jax.trainer.export import export_policy
    from novarl_jax.trainer.loop import check_mesh, train

    config = tiny_grpo_config(prompts_per_step=2)
    config.experiment.world_size, config.experiment.expert_parallel_size = 4, 2
    spec = validate_config(config)
    devices = jax.devices()[:4]
    check_mesh(spec, spec.layout.make_mesh(devices))  # its own layout
    wrong = [
        (jax.make_mesh((4, 1, 1, 1), ("dp", "pp", "ep", "tp"), devices=devices),
         "experiment.expert_parallel_size", "{'dp': 4, 'pp': 1, 'ep': 1, 'tp': 1}"),
        (jax.make_mesh((2, 2), ("data", "model"), devices=devices),
         "mesh", "{'data': 2, 'model': 2}"),
        (jax.make_mesh((8, 1, 1, 1), ("dp", "pp", "ep", "tp"), devices=jax.devices()),
         "experiment.world_size", "{'dp': 8, 'pp': 1, 'ep': 1, 'tp': 1}"),
    ]  # fmt: skip
    for mesh, key, shown in wrong:
        with pytest.raises(ConfigError) as info:
            train(config, str(tmp_path / "run"), mesh=mesh, log=lambda _: None)
        assert info.value.key == key
        assert str(info.value).startswith(
            f"{key}: the mesh given has axes {shown}, not the config's layout "
            "{'dp': 2, 'pp': 1, 'ep': 2, 'tp': 1}; pass mesh=None"
        )
    assert not (tmp_path / "run" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="the mesh given has axes"):
        export_policy(config, str(tmp_path / "run"), str(tmp_path / "hf"), mesh=wrong[0][0])
