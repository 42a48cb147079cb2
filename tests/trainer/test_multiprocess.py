"""Two processes with 4 fake CPU devices each train as one 8-device job (the local launcher,
jax.distributed over gloo) and give what one process with 8 devices gives."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest
from quiet_train import train_quietly

from configs import moe

# The subprocesses' own time limits (up to ~14 minutes in all) must fire first: they kill
# the jobs they started, which the test-wide limit (setup.cfg) would leave running.
pytestmark = pytest.mark.timeout(1800)

ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERRIDES = {
    "experiment.steps": 2,
    "experiment.pipeline_parallel_size": 1,
    "logging.plot": False,
    "logging.samples": 2,
    "eval.interval": 2,
    "eval.prompts": 4,
}
VOLATILE = ("timing_s/", "perf/")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rows(path):
    return [json.loads(line) for line in open(path)]


@pytest.mark.slow
def test_two_processes_train_as_one_job(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PORT"] = str(_free_port())
    env["PYTHON"] = sys.executable  # the interpreter running the tests, whatever PATH says
    args = [f"{k}={v}" for k, v in OVERRIDES.items()]
    result = subprocess.run(
        ["bash", "launch/local_processes.sh", "2", "4", "--config=configs/moe.py",
         f"--workdir={tmp_path / 'two'}", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps" in result.stdout

    config = moe.get_config()
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        config[section][name] = value
    train_quietly(config, tmp_path / "one")

    two, one = (_rows(tmp_path / d / "metrics.jsonl") for d in ("two", "one"))
    assert [r["step"] for r in two] == [1, 2] and "val/score/mean" in two[-1]
    for a, b in zip(two, one, strict=True):
        assert set(a) == set(b)
        for name, value in a.items():
            if name.startswith(VOLATILE) or not isinstance(value, float):
                continue
            assert value == pytest.approx(b[name], rel=1e-4, abs=1e-6), name
    # The same prompts, completions and scores, written once.
    samples = [_rows(tmp_path / d / "samples.jsonl") for d in ("two", "one")]
    assert samples[0] == samples[1] and len(samples[0]) == 2 * 2 + 2  # 2 steps, 1 evaluation
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == ["2"]


def _dry_run_on_two_processes(devices_each, config, workdir):
    """``--dry_run`` of ``config`` with world_size=2 on two local processes."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PORT"] = str(_free_port())
    env["PYTHON"] = sys.executable
    return subprocess.run(
        ["bash", "launch/local_processes.sh", "2", str(devices_each), f"--config={config}",
         f"--workdir={workdir}", "experiment.world_size=2", "--dry_run"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_dry_run_refuses_what_the_multi_process_run_refuses(tmp_path):
    # A timeout broadcast would follow each process's own clock: refused before any training,
    # by the dry run too.
    result = _dry_run_on_two_processes(1, "configs/ppo_async.py", tmp_path)
    assert result.returncode != 0
    assert "experiment.weight_sync_timeout_s: 30.0 s: a timeout broadcast" in result.stderr
    assert "dry run: the config is valid" not in result.stdout


def test_a_world_size_short_of_the_processes_devices_is_refused_naming_their_count(tmp_path):
    result = _dry_run_on_two_processes(4, "configs/copy.py", tmp_path)
    assert result.returncode == 2
    assert (
        "novarl_jax.train: error: experiment.world_size: layout {'dp': 2, 'tp': 1, 'pp': 1, "
        "'ep': 1, 'world': 2} needs 2 devices, but the 2 processes of this run have 8 (4 each); "
        "a multi-process run uses all of them: set experiment.world_size=8"
    ) in result.stderr


def _two_hosts(tmp_path):
    """Two processes of one job, each in a working directory of its own (host0, host1) with
    ``--workdir=run`` there: two hosts' own disks. Returns their statuses and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    port = _free_port()
    procs = []
    for i in range(2):
        (tmp_path / f"host{i}").mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "novarl_jax.train", f"--config={ROOT / 'configs/copy.py'}",
             "--workdir=run", "experiment.world_size=2", "experiment.steps=1",
             f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
             "--cpu_collectives=gloo"],
            cwd=tmp_path / f"host{i}", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        ))  # fmt: skip
    try:
        errors = [p.communicate(timeout=300)[1] for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return [p.returncode for p in procs], errors


def test_a_workdir_each_process_has_its_own_copy_of_is_refused_at_start(tmp_path):
    """Two hosts with a relative --workdir on their own disks stalled for good in the first
    checkpoint's save."""
    codes, errors = _two_hosts(tmp_path)
    assert codes == [2, 2], errors
    for err in errors:
        assert (
            "novarl_jax.train: error: --workdir: run is not one directory for every process: "
            "process 1 cannot read what process 0 wrote there (each host's own disk?)"
        ) in err
    assert sorted(os.listdir(tmp_path / "host0" / "run")) == [".lock"]  # nothing trained, no token
    # The main process refusing the workdir (another run holds it) stops the other one too,
    # each with its own line and status.
    from novarl_jax.trainer.workdir import lock_workdir, release

    held = lock_workdir(str(tmp_path / "host0" / "run"))
    try:
        codes, errors = _two_hosts(tmp_path)
    finally:
        release(held)
    assert codes == [2, 2], errors
    assert f"--workdir: run is in use by another run (pid {os.getpid()}, holding" in errors[0]
    assert errors[1].endswith(
        "novarl_jax.train: error: --workdir: the main process refused it (see its error)\n"
    )


def test_the_launcher_prints_its_usage():
    for args in ([], ["--help"], ["2"], ["0", "4", "--config=configs/copy.py"]):
        result = subprocess.run(
            ["bash", "launch/local_processes.sh", *args], cwd=ROOT, capture_output=True, text=True
        )
        assert result.returncode == 2 and result.stderr.startswith("usage: "), args


def test_the_tpu_vm_launcher_needs_a_workdir_and_quotes_its_arguments(tmp_path):
    gcloud = tmp_path / "gcloud"  # prints its arguments, one per line
    gcloud.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    gcloud.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}

    def launch(*args):
        return subprocess.run(["bash", "launch/tpu_vm.sh", "tpu1", "zone1", *args], cwd=ROOT,
                              env=env, capture_output=True, text=True)  # fmt: skip

    result = launch("--config=configs/moe.py", "experiment.steps=3")
    assert result.returncode == 2 and "pass --workdir=DIR on a file system every" in result.stderr
    result = launch("--config=configs/moe.py", "--workdir=/mnt/shared/run", "model.bos_token=<s> x")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == (
        "cd novarl_jax && python3 -m pip install -q -e '.[tpu]' && python3 -m novarl_jax.train "
        "--distributed --config=configs/moe.py --workdir=/mnt/shared/run "
        "model.bos_token=\\<s\\>\\ x"
    )
    # A clone under the worker's home written as ~/...: the remote shell starts there, and a
    # quoted ~ would not expand.
    for repo_dir, cd in (("~/code/nv", "code/nv"), ("~", "."), ("/opt/my nv", "/opt/my\\ nv")):
        env["REPO_DIR"] = repo_dir
        result = launch("--workdir=/mnt/shared/run")
        assert result.stdout.splitlines()[-1].startswith(f"cd {cd} && "), result.stdout


def _launch(workdir, *overrides):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PORT"] = str(_free_port())
    env["PYTHON"] = sys.executable
    return subprocess.Popen(
        ["bash", "launch/local_processes.sh", "2", "4", "--config=configs/copy.py",
         f"--workdir={workdir}", "experiment.world_size=8", "experiment.steps=1000",
         "checkpoint.interval=1000", "logging.progress=False", "logging.plot=False",
         *overrides],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip


def _sigterm_one_process(proc, when):
    """SIGTERM to process 1 once ``when()`` holds; the launcher's stderr and status."""
    import signal
    import time

    try:
        deadline = time.monotonic() + 300
        while not when():
            assert proc.poll() is None and time.monotonic() < deadline, "the job did not start"
            time.sleep(0.1)
        children = subprocess.run(  # the launcher's processes, not its polling sleep
            ["pgrep", "-P", str(proc.pid), "-f", "novarl_jax.train"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert len(children) == 2
        os.kill(int(children[1]), signal.SIGTERM)  # process 1 only, as a preemption would
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return err, proc.returncode


@pytest.mark.slow
def test_sigterm_to_one_process_stops_the_job_at_a_checkpoint(tmp_path):
    """Every process stops after the same step, saved; also when the signal comes while a
    resumed job starts up (before its first step)."""
    metrics = tmp_path / "metrics.jsonl"
    proc = _launch(tmp_path)
    err, code = _sigterm_one_process(proc, lambda: metrics.exists() and len(_rows(metrics)) >= 2)
    assert code == 143, err[-2000:]
    step = _rows(metrics)[-1]["step"]
    assert 2 <= step < 1000
    assert f"stopped by SIGTERM after step {step}; the last checkpoint is step {step}" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [str(step)]

    proc = _launch(tmp_path)
    started = []

    def resumed():  # process 0 says so once it has restored, before compiling the step
        started.append(proc.stdout.readline())
        return "resumed from" in started[-1]

    err, code = _sigterm_one_process(proc, resumed)
    assert code == 143, err[-2000:]
    assert [r["step"] for r in _rows(metrics)] == list(range(1, step + 2))
    assert f"stopped by SIGTERM after step {step + 1}" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        str(step), str(step + 1)
    ]  # fmt: skip


_FAKE_TRAIN = """#!/usr/bin/env bash
# Stands in for `python -m novarl_jax.train ... --process_id=N`: process 1 fails after a moment
# (with FAIL set); process 0 trains until SIGTERM, then stops as the trainer does (143).
for a in "$@"; do [[ "$a" == --process_id=* ]] && id="${a#--process_id=}"; done
if [[ "$id" == 1 && -n "$FAIL" ]]; then sleep 0.5; exit 2; fi
if [[ "$id" == 1 ]]; then exec sleep 60; fi  # dies of SIGTERM (143)
trap 'echo TERM >> "$LOG"; exit 143' TERM
while :; do sleep 0.05; done
"""


@pytest.mark.parametrize("signalled", [False, True])
def test_the_launcher_stops_the_job_when_a_process_fails_or_it_is_signalled(tmp_path, signalled):
    import signal
    import time

    fake = tmp_path / "fake_train.sh"
    fake.write_text(_FAKE_TRAIN)
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON=str(fake), LOG=str(tmp_path / "log"))
    env["FAIL"] = "" if signalled else "1"
    proc = subprocess.Popen(
        ["bash", "launch/local_processes.sh", "2", "1", "--config=configs/copy.py"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if signalled:
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
    try:
        proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    # Failing: process 1's status, process 0 stopped with one SIGTERM. Signalled: SIGTERM once
    # to each, and a clean stop's 143.
    assert proc.returncode == (143 if signalled else 2)
    assert (tmp_path / "log").read_text() == "TERM\n"
