"""The command line: checklist on the 8-fake-device mesh, overrides, one-line errors."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

# Each command has its own 300 s limit, which kills it; a test runs several, so the
# test-wide limit (setup.cfg) must not fire first and leave one running.
pytestmark = pytest.mark.timeout(1800)

ROOT = pathlib.Path(__file__).resolve().parents[1]
QUICKSTART = [
    "experiment.world_size=8",
    "experiment.tensor_parallel_size=2",
    "experiment.pipeline_parallel_size=2",
    "experiment.expert_parallel_size=2",
    "experiment.num_experts=4",
    "experiment.algorithm=grpo",
]


def _cli_env(env=None):
    """This process's environment for a command-line run on CPU: the CLI sets its own flags."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in ("XLA_FLAGS",)}
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(*args, cwd=ROOT, env=None):
    return subprocess.run(
        [sys.executable, "-m", "novarl_jax.train", *args],
        cwd=cwd, env=_cli_env(env), capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _rows(stdout):
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip("│|").split("│")]
        if len(cells) == 3 and cells[1]:
            rows[cells[1]] = cells[2]
    return rows


@pytest.mark.parametrize("overrides", [[], QUICKSTART, ["--config.experiment.algorithm=grpo"]])
def test_checklist_on_fake_devices(overrides, tmp_path):
    result = _run("--config=configs/moe.py", f"--workdir={tmp_path}", "--dry_run", *overrides)
    rows = _rows(result.stdout)
    assert rows["world size"] == "8", result.stdout + result.stderr
    assert (rows["DP (data parallel)"], rows["TP (tensor parallel)"]) == ("1", "2")
    assert (rows["PP (pipeline parallel)"], rows["EP (expert parallel)"]) == ("2", "2")
    assert rows["mesh"] == "(dp=1, pp=2, ep=2, tp=2) on 8 cpu devices"
    assert rows["experts (E)"] == "4" and rows["top-k (K)"] == "2"
    # The update routes one pipeline microbatch at a time: 8 prompts x 4 samples / 2
    # minibatches / 4 microbatches = 4 rows x 24 tokens over dp*ep = 2 shards = 48 tokens
    # per group; capacity = ceil(48 * 2 * 1.25 / 4) = 30.
    assert (
        rows["positions per group (update)"] == "48"
        and rows["capacity per expert (C, at most)"] == "30"
    )
    assert rows["aux / z loss coef"] == "0.01 / 0.001"
    assert rows["algorithm"] == "grpo"


def test_overrides_change_the_plan():
    result = _run(
        "--config=configs/moe.py", "--dry_run", "experiment.world_size=16",
        "experiment.algorithm=ppo",
        "experiment.capacity_factor=None", "ppo.critic=separate",
        "model.router_aux_loss_coef=0.5", "model.router_z_loss_coef=0",
    )  # fmt: skip
    rows = _rows(result.stdout)
    assert rows["DP (data parallel)"] == "2", result.stderr
    assert rows["mesh"] == "(dp=2, pp=2, ep=2, tp=2) on 16 cpu devices"
    assert rows["capacity factor"] == "dropless"
    assert rows["aux / z loss coef"] == "0.5 / 0"
    assert rows["algorithm"] == "ppo"
    assert rows["critic"] == "separate model (the policy's + value head)"


def test_export_step_needs_export():
    result = _run("--config=configs/copy.py", "--export_step=3")
    assert result.returncode == 2
    assert result.stderr.strip() == "novarl_jax.train: error: --export_step needs --export=DIR"


@pytest.mark.parametrize("form", ["--config=PATH", "--config PATH"])
def test_config_file_runs_from_another_directory(form, tmp_path):
    path = str(ROOT / "configs" / "moe.py")
    args = [f"--config={path}"] if form == "--config=PATH" else ["--config", path]
    result = _run(*args, "--dry_run", cwd=tmp_path)
    assert _rows(result.stdout).get("world size") == "8", result.stderr


@pytest.mark.parametrize(
    "argv", [["--config=configs/moe.py"], ["--config", "configs/moe.py:arg"], ["--dry_run"]]
)
def test_default_workdir_is_named_after_the_config(argv, monkeypatch):
    from novarl_jax import train

    monkeypatch.setattr(sys, "argv", ["novarl_jax.train", *argv])
    assert train._config_name() == ("run" if argv == ["--dry_run"] else "moe")


@pytest.mark.parametrize(
    "args,message",
    [
        (["experiment.foo=1"], "experiment.foo: unknown key; valid keys under 'experiment'"),
        (
            ["nosection.key=1"],
            "nosection: unknown key; valid sections: checkpoint, dapo, eval, experiment",
        ),
        (["experiment.world_size=abc"], "experiment.world_size: expected an integer, got 'abc'"),
        (["experiment.world_size=6"], "experiment.world_size: total_world_size=6 is not divisible"),
        (["experiment.algorithm=dqn"], "experiment.algorithm: 'dqn' is not one of"),
        (["experiment.seed=None"], "experiment.seed: must not be None"),
        (["experiment.num_experts=5"], "experiment.num_experts: 5 experts do not split"),
        (["stray"], "unexpected arguments ['stray']"),
        # Checked when the run's objects are built: still before the checklist.
        (["experiment.algorithm=ppo", "ppo.critic=bogus"], "ppo.critic: 'bogus' is not one of"),
        (["train.micro_batches=3"], "train.micro_batches"),
        # Misspellings that ml_collections answers with a "Did you mean" hint.
        (["experiment.stepz=3"], "experiment.stepz: unknown key; valid keys under 'experiment'"),
        (["experimnt.steps=3"], "experimnt: unknown key; valid sections: checkpoint, dapo"),
        (["experiment.steps.foo=3"], "experiment.steps: is a value, not a section"),
        # task.options are the task constructor's keywords: one it does not take is named
        # with the ones it does.
        (
            ["task.options.bogus=1"],
            "task.options.bogus: task 'reverse' has no option 'bogus'; "
            "its options: symbols, min_length, max_length",
        ),
    ],
)
def test_errors_are_one_line_naming_the_key(args, message):
    result = _run("--config=configs/moe.py", *args)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert message in lines[0]
    assert not result.stdout.strip()  # no checklist for a config that cannot run


@pytest.mark.parametrize(
    "flag,message",
    [
        ("--config", "--config: configs/nonexist.py: no such file"),
        ("--workdir", "--workdir: {file} is a file, not a directory"),
        ("--export", "--export: {file} is a file, not a directory"),
        ("--compilation_cache", "--compilation_cache: {file} is a file, not a directory"),
    ],
)
def test_bad_paths_are_one_line(flag, message, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    args = ["--config=configs/copy.py", f"--workdir={tmp_path}", "--dry_run"]
    if flag == "--config":
        args[0] = "--config=configs/nonexist.py"
    else:
        args.append(f"{flag}={file}")
    result = _run(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"novarl_jax.train: error: {message.format(file=file)}"], result.stderr
    assert not result.stdout.strip()


def test_task_options_take_names_the_config_file_does_not_set():
    # configs/base.py sets no task.options: both override forms add the constructor's keywords.
    result = _run(
        "--config=configs/base.py", "--dry_run", "task.name=copy", "task.options.max_length=3",
        "--config.task.options.symbols=ab",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: the config is valid" in result.stdout
    # The values reach the task: a bad one is the task's error, naming the option.
    result = _run("--config=configs/base.py", "--dry_run", "task.options.max_length=abc")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(
        "novarl_jax.train: error: task.options.max_length: max_length must be an integer"
    )


def test_distributed_reads_the_cluster():
    # Outside a cluster: one line, naming what to pass instead.
    result = _run("--config=configs/copy.py", "--dry_run", "--distributed")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--distributed: JAX found no cluster" in lines[0], result.stderr
    assert "--coordinator_address" in lines[0]
    # A one-task SLURM job: JAX reads the coordinator and the process index from it.
    slurm = dict(
        SLURM_JOB_ID="7", SLURM_NTASKS="1", SLURM_STEP_NUM_TASKS="1", SLURM_PROCID="0",
        SLURM_LOCALID="0", SLURM_NODELIST="localhost", SLURM_STEP_NODELIST="localhost",
    )  # fmt: skip
    result = _run("--config=configs/copy.py", "--dry_run", "--distributed", env=slurm)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "dry run: the config is valid" in result.stdout


def test_missing_config_flag():
    result = _run()
    assert result.returncode == 2
    assert "--config is required" in result.stderr


QUICKSTART_PP1 = [
    a.replace("pipeline_parallel_size=2", "pipeline_parallel_size=1") for a in QUICKSTART
]


@pytest.mark.slow
def test_quickstart_command_trains_end_to_end(tmp_path):
    cache = tmp_path.parent / f"{tmp_path.name}_xla"
    result = _run(
        "--config=configs/moe.py", f"--workdir={tmp_path}", *QUICKSTART_PP1,
        "experiment.steps=2", "checkpoint.interval=1", f"--compilation_cache={cache}",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list(cache.iterdir())) >= 2  # the rollout's and the update's programs at least
    rows = _rows(result.stdout)
    assert rows["mesh"] == "(dp=2, pp=1, ep=2, tp=2) on 8 cpu devices"
    assert "step 2/2" in result.stdout and "done: 2 steps" in result.stdout
    import json

    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    for name in (
        "critic/score/mean",
        "actor/pg_loss",
        "actor/entropy",
        "actor/grad_norm",
        "moe/dropped_fraction",
        "moe/expert_load_max",
        "perf/throughput",
    ):
        assert all(np.isfinite(m[name]) for m in metrics), name
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
    assert (tmp_path / "plots" / "training.png").stat().st_size > 1000


def test_compilation_cache_dir(monkeypatch):
    from novarl_jax.compilation_cache import compilation_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    home = os.path.expanduser("~")
    assert compilation_cache_dir(None) == os.path.join(home, ".cache", "novarl_jax", "xla")
    assert compilation_cache_dir("") is None  # turned off
    assert compilation_cache_dir("~/c") == os.path.join(home, "c")
    assert compilation_cache_dir("rel") == os.path.abspath("rel")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/from_env")
    assert compilation_cache_dir(None) == "/tmp/from_env"
    assert compilation_cache_dir("") is None


def test_a_cache_directory_that_cannot_be_made_is_refused_or_left_off(monkeypatch):
    import jax

    from novarl_jax.compilation_cache import use_compilation_cache

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    before = jax.config.jax_compilation_cache_dir
    try:
        # Given explicitly: refused (JAX used to warn on every compile and cache nothing).
        with pytest.raises(ValueError, match=r"^--compilation_cache: /proc/novarl_c: cannot be"):
            use_compilation_cache("/proc/novarl_c")
        monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/proc/novarl_env")
        with pytest.raises(ValueError, match=r"^JAX_COMPILATION_CACHE_DIR: /proc/novarl_env: "):
            use_compilation_cache(None)
        monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
        # The default place: the run goes on, without a cache.
        monkeypatch.setenv("HOME", "/proc/novarl_home")
        use_compilation_cache(None)
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_ctrl_c_ends_an_asynchronous_run_cleanly(tmp_path):
    # Ctrl-C once two rollout workers are sampling: the run waits for their rollouts and exits
    # with status 130. It used to leave them running into Python's shutdown, which tore them
    # down inside a rollout and aborted the process (SIGABRT).
    import signal
    import time

    args = [
        "--config=configs/base.py", f"--workdir={tmp_path}", "experiment.steps=100000",
        "experiment.world_size=2", "experiment.async_rollouts=True",
        "experiment.rollout_workers=2", "experiment.weight_sync_max_staleness=100",
        "rollout.prompts_per_step=2", "rollout.max_new_tokens=4", "train.minibatches=2",
        "logging.plot=False", "logging.progress=False", "checkpoint.interval=1000",
    ]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "novarl_jax.train", *args], cwd=ROOT, env=_cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Fatal Python error" not in err
    assert "novarl_jax.train: interrupted after step " in err, err[-3000:]
