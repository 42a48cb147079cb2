"""One run per workdir (a lock the OS releases with the process), and a model's directory is
never taken for a workdir."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
from quiet_train import train_quietly
from tiny_grpo import tiny_grpo_config

from novarl_jax.trainer.config import ConfigError
from novarl_jax.trainer.workdir import (
    LOCK_FILE,
    WorkdirInUseError,
    foreign_config,
    lock_workdir,
    release,
)


def _config():
    c = tiny_grpo_config(prompts_per_step=2)
    c.experiment.steps = 1
    c.checkpoint.async_save = False
    c.logging.plot = False
    return c


def test_a_second_run_on_a_held_workdir_stops_before_writing_anything(tmp_path):
    held = lock_workdir(str(tmp_path))
    try:
        with pytest.raises(WorkdirInUseError) as info:
            train_quietly(_config(), tmp_path)
        assert str(info.value) == (
            f"--workdir: {tmp_path} is in use by another run (pid {os.getpid()}, holding "
            f"{tmp_path / LOCK_FILE}); wait for it to finish, or train in another directory"
        )
        assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # no metrics, config or checkpoint
    finally:
        release(held)
    out = train_quietly(_config(), tmp_path)
    assert out["resumed_from"] is None and (tmp_path / "metrics.jsonl").exists()
    release(lock_workdir(str(tmp_path)))  # the finished run let go of it


def test_a_run_refused_at_start_lets_go_of_the_lock(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(ConfigError, match=r"^--workdir: .* is not a run's config, which a run"):
        train_quietly(_config(), tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {
        "architectures": ["LlamaForCausalLM"]
    }
    release(lock_workdir(str(tmp_path)))


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from novarl_jax.trainer.workdir import lock_workdir
            held = lock_workdir({str(tmp_path)!r})  # kept: closing it releases the lock
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
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
