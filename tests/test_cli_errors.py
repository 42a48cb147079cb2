"""The command line's answers to what goes wrong around a run: a compilation cache left by
plain JAX, Ctrl-C, a backend JAX cannot start, a config file's own error.

Most tests call the command line's functions in this process (``main`` runs in well under a
second on the 8 fake devices when ``train`` is replaced); one starts it as a subprocess.
"""

import json
import os
import pathlib
import re
import subprocess
import sys
import zlib

import jax
import pytest
from absl import flags

from novarl_jax import cli_messages, compilation_cache
from novarl_jax import cli_overrides as cli
from novarl_jax import train as cli_train
from novarl_jax.core import distributed
from novarl_jax.trainer import loop
from novarl_jax.trainer.saved_config import check_resume_config, write_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
COPY_ON_8 = ["--config=configs/copy.py", "experiment.world_size=8"]


@pytest.fixture
def run_cli(monkeypatch, capsys):
    """Runs the command line in this process: returns (exit status, stdout, stderr)."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "path", list(sys.path))  # translate_argv adds the configs' root
    # Process-wide settings a real run makes: leave this test process's own.
    monkeypatch.setattr(cli_train, "use_compilation_cache", lambda flag: None)
    monkeypatch.setattr(distributed, "reuse_host_memory", lambda: False)

    def call(*args):
        argv, none_keys, task_options = cli.translate_argv(["novarl_jax.train", *args])
        monkeypatch.setattr(sys, "argv", argv)
        monkeypatch.setattr(cli_train, "_NONE_KEYS", none_keys)
        monkeypatch.setattr(cli_train, "_TASK_OPTION_OVERRIDES", task_options)
        code = 0
        try:
            cli_train._parse_flags(argv)
            cli_train.main(argv[:1])
        except SystemExit as e:
            code = e.code
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt went through the command line")
        finally:
            # config_flags defines a flag per override while parsing: drop them with the values.
            for name in [n for n in flags.FLAGS if n.startswith("config.")]:
                delattr(flags.FLAGS, name)
            flags.FLAGS.unparse_flags()
        out, err = capsys.readouterr()
        return code, out, err

    return call


# --- the persistent compilation cache ------------------------------------------------------


@pytest.fixture
def restore_cache_config():
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_compilation_cache_max_size",
    )
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_a_given_cache_size_is_kept(tmp_path, restore_cache_config, monkeypatch):
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")  # no bound, as asked
    compilation_cache.use_compilation_cache(str(tmp_path))
    assert jax.config.jax_compilation_cache_max_size == -1
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE")
    compilation_cache.use_compilation_cache(str(tmp_path))
    assert jax.config.jax_compilation_cache_max_size == 4 << 30


def test_cache_entries_without_atime_are_repaired(tmp_path, restore_cache_config, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_MAX_SIZE", raising=False)
    from jax._src.lru_cache import LRUCache

    cache = tmp_path / "xla"
    cache.mkdir()
    entry = zlib.compress(b"\0\0\0\1" + os.urandom(1000))  # an executable and its time
    (cache / "plain-cache").write_bytes(entry)  # written by JAX without a size limit
    os.utime(cache / "plain-cache", ns=(1_000_000_000, 2_000_000_000))
    (cache / "cut-cache").write_bytes(entry[:20])  # a write cut off part way
    (cache / "k-cache").write_text("x\n")  # not JAX's: kept
    (cache / "kept-cache").write_bytes(entry)
    (cache / "kept-atime").write_bytes((5).to_bytes(8, "little"))

    compilation_cache.use_compilation_cache(str(cache))

    assert jax.config.jax_compilation_cache_dir == str(cache)
    assert jax.config.jax_compilation_cache_max_size == 4 << 30
    # JAX's size-limited cache writes (it read each entry's -atime file to pick what to
    # evict), evicting the least recently used entry.
    lru = LRUCache(str(cache), max_size=len(entry) * 2 + 10)
    lru.put("new", entry)
    assert lru.get("new") == entry
    names = sorted(p.name for p in cache.iterdir() if p.name != ".lockfile")
    assert names == ["k-atime", "k-cache", "new-atime", "new-cache", "plain-atime", "plain-cache"]
    # JAX's format: the last use in ns as 8 little-endian bytes (here the entry's mtime).
    assert int.from_bytes((cache / "plain-atime").read_bytes(), "little") == 2_000_000_000
    assert lru.get("plain") == entry
    assert compilation_cache.repair_compilation_cache(str(cache)) == (0, 0)  # nothing left to do


def test_cache_repair_leaves_a_locked_cache_alone(tmp_path):
    import filelock

    (tmp_path / "a-cache").write_bytes(zlib.compress(b"x" * 10))
    with filelock.FileLock(str(tmp_path / ".lockfile")):
        assert compilation_cache.repair_compilation_cache(str(tmp_path), lock_timeout_s=0.01) == (
            0,
            0,
        )
    assert compilation_cache.repair_compilation_cache(str(tmp_path / "missing")) == (0, 0)
    assert compilation_cache.repair_compilation_cache(str(tmp_path)) == (1, 0)


def test_an_unbounded_cache_is_left_as_plain_jax_wrote_it(
    tmp_path, restore_cache_config, monkeypatch
):
    # JAX's unlimited cache reads no -atime files: nothing to repair.
    monkeypatch.setenv("JAX_COMPILATION_CACHE_MAX_SIZE", "-1")
    jax.config.update("jax_compilation_cache_max_size", -1)
    (tmp_path / "plain-cache").write_bytes(zlib.compress(b"\0\0\0\1" + os.urandom(100)))
    compilation_cache.use_compilation_cache(str(tmp_path))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path)
    assert jax.config.jax_compilation_cache_max_size == -1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain-cache"]


def test_a_given_directory_that_cannot_be_written_is_an_error(
    tmp_path, restore_cache_config, monkeypatch
):
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(ValueError) as info:
        compilation_cache.use_compilation_cache(str(tmp_path / "xla"))
    assert str(info.value) == f"--compilation_cache: {tmp_path / 'xla'}: is not writable"


def test_a_zstd_entry_is_kept_when_it_cannot_be_checked(tmp_path, monkeypatch):
    # Without a zstd decompressor the entry may be whole: it is kept and given its -atime.
    for name in ("zstandard", "compression", "compression.zstd"):
        monkeypatch.setitem(sys.modules, name, None)
    entry = b"\x28\xb5\x2f\xfd" + os.urandom(100)
    (tmp_path / "z-cache").write_bytes(entry)
    assert compilation_cache.repair_compilation_cache(str(tmp_path)) == (1, 0)
    assert (tmp_path / "z-cache").read_bytes() == entry
    assert (tmp_path / "z-atime").is_file()


# --- Ctrl-C ----------------------------------------------------------------------------------


def _rows(workdir, steps):
    with open(workdir / "metrics.jsonl", "a") as f:
        for step in steps:
            f.write(json.dumps({"step": step, "critic/score/mean": 0.5}) + "\n")


def _interrupting_train(trained, checkpoints, error=KeyboardInterrupt):
    """A train() that finishes the ``trained`` steps, checkpoints some, then raises ``error``
    (default: Ctrl-C)."""

    def fake_train(config, workdir, **kwargs):
        workdir = pathlib.Path(workdir)
        _rows(workdir, trained)
        for step in checkpoints:
            (workdir / "checkpoints" / str(step)).mkdir(parents=True)
        raise error

    return fake_train


def test_ctrl_c_says_where_the_run_stopped(run_cli, tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "train", _interrupting_train([1, 2, 3], [1, 2]))
    code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 130
    assert err.strip() == (
        f"novarl_jax.train: interrupted after step 3; the last checkpoint is step 2 in "
        f"{tmp_path}; rerun the same command to resume from it"
    )
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    "error, status, message",
    [
        (KeyboardInterrupt, 130, "novarl_jax.train: interrupted after step 2;"),
        (loop.TrainingError("non-finite loss"), 2, "novarl_jax.train: error: non-finite loss"),
        (None, 0, ""),  # finished, but a rollout stuck past the wait for it
    ],
)
def test_the_command_line_ends_the_process_itself_while_a_rollout_worker_runs(
    run_cli, tmp_path, monkeypatch, error, status, message
):
    # The first Ctrl-C waits for the asynchronous rollouts in progress; a second one cuts
    # that short (and the wait at the end of a run ends after a deadline). Python's shutdown
    # would tear the still running workers down mid-call and abort, so the command line ends
    # the process itself, with the status it would have had.
    import threading

    from novarl_jax.trainer.async_loop import WORKER_THREAD_PREFIX

    release = threading.Event()
    fake_train = _interrupting_train([1, 2], [], error) if error else lambda c, w, **kw: None

    def train_with_a_worker_left(config, workdir, **kwargs):
        name = f"{WORKER_THREAD_PREFIX}0"
        threading.Thread(target=release.wait, args=(30,), name=name, daemon=True).start()
        fake_train(config, workdir, **kwargs)

    exits = []

    def fake_exit(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(loop, "train", train_with_a_worker_left)
    monkeypatch.setattr(cli_train.os, "_exit", fake_exit)
    try:
        code, _, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    finally:
        release.set()
    assert (code, exits) == (status, [status])
    assert err.strip().startswith(message)


_BROKEN_TASK = """
from novarl_jax.rollout.tasks import CopyTask


class Broken(CopyTask):
    def sample_prompts(self, key, batch_size):
        table = {}
        return table["prompts"], []
"""


@pytest.mark.parametrize("when", ["start", "training"])
def test_a_task_of_ones_own_that_raises_is_one_line(run_cli, tmp_path, monkeypatch, when):
    (tmp_path / "broken_task.py").write_text(_BROKEN_TASK)
    monkeypatch.syspath_prepend(str(tmp_path))
    if when == "training":  # the start-up check passes; a later rollout raises
        from novarl_jax.rollout.tasks import TaskError

        def failing_train(config, workdir, **kwargs):
            raise TaskError("task 'broken_task:Broken' sample_prompts() raised KeyError: 'x'")

        monkeypatch.setattr(loop, "train", failing_train)
        monkeypatch.setattr(loop, "check_startup", lambda run, mesh=None: None)
    code, out, err = run_cli(
        *COPY_ON_8, "task.name=broken_task:Broken", f"--workdir={tmp_path / 'w'}"
    )
    assert code == 2 and "Traceback" not in out + err
    if when == "start":
        assert err.strip() == (
            "novarl_jax.train: error: task.name: task 'broken_task:Broken' sample_prompts() "
            f"raised KeyError: 'prompts' (at {tmp_path / 'broken_task.py'}:8)"
        )
    else:
        assert err.strip().endswith(
            "task.name: task 'broken_task:Broken' sample_prompts() raised KeyError: 'x'; no "
            f"checkpoint in {tmp_path / 'w'} yet: fix it and rerun to start again"
        )


_ODD_TASKS = """
from novarl_jax.rollout.tasks import CopyTask


class OutsideItsAlphabet(CopyTask):
    def sample_prompts(self, key, batch_size):
        prompts, metadata = super().sample_prompts(key, batch_size)
        return [p + "#" for p in prompts], metadata


class OneShort(CopyTask):
    def sample_prompts(self, key, batch_size):
        prompts, metadata = super().sample_prompts(key, batch_size)
        return prompts[1:], metadata[1:]


class NotAString(CopyTask):
    def sample_prompts(self, key, batch_size):
        prompts, metadata = super().sample_prompts(key, batch_size)
        return [12] + prompts[1:], metadata
"""


@pytest.mark.parametrize(
    "task, message",
    [
        ("OutsideItsAlphabet", r"its prompt \d cannot be encoded: character '#' is not in the "
         "alphabet"),
        ("OneShort", "returned 1 prompts and 1 metadata for batch_size=2"),
        ("NotAString", r"its prompts cannot be encoded: texts must be strings, but texts\[0\] "
         "is int: 12"),
    ],
)  # fmt: skip
def test_prompts_a_task_of_ones_own_gets_wrong_are_one_line(
    run_cli, tmp_path, monkeypatch, task, message
):
    (tmp_path / "odd_tasks.py").write_text(_ODD_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run_cli(
        *COPY_ON_8, f"task.name=odd_tasks:{task}", "rollout.prompts_per_step=2", "--dry_run"
    )
    assert code == 2 and "Traceback" not in out + err
    assert err.strip().startswith(f"novarl_jax.train: error: task.name: task 'odd_tasks:{task}'")
    assert re.search(message, err)


def test_sigterm_says_where_the_run_stopped(run_cli, tmp_path, monkeypatch):
    from novarl_jax.trainer.stop import StopRequested

    monkeypatch.setattr(loop, "train", _interrupting_train([1, 2, 3], [3], StopRequested(3)))
    code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 143
    assert err.strip() == (
        f"novarl_jax.train: stopped by SIGTERM after step 3; the last checkpoint is step 3 in "
        f"{tmp_path}; rerun the same command to resume from it"
    )
    assert "Traceback" not in out + err


@pytest.mark.parametrize("resumed", [False, True])
def test_ctrl_c_before_a_step_finished(run_cli, tmp_path, monkeypatch, resumed):
    # A rerun after a run stopped at step 5 with its last checkpoint at step 4: step 5 of
    # the metrics file is not this run's, before or after the resume drops it.
    for step in (2, 4):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    _rows(tmp_path, [1, 2, 3, 4, 5])
    fake_train = _interrupting_train([], [])

    def resuming_train(config, workdir, **kwargs):
        (tmp_path / "metrics.jsonl").unlink()
        _rows(tmp_path, [1, 2, 3, 4])
        fake_train(config, workdir, **kwargs)

    monkeypatch.setattr(loop, "train", resuming_train if resumed else fake_train)
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 130
    assert err.strip() == (
        "novarl_jax.train: interrupted before this run finished a step; the last checkpoint "
        f"is step 4 in {tmp_path}; rerun the same command to resume from it"
    )
    # Nothing saved at all.
    message = cli_messages.interrupted_message(str(tmp_path / "new"), (None, 0))
    assert message == (
        "interrupted before this run finished a step; no checkpoint in "
        f"{tmp_path / 'new'} yet; rerun the same command to start again"
    )


@pytest.mark.parametrize("reward_fn", ["", "novarl_jax.rollout.rewards:exact_match_reward"])
def test_errors_raised_while_training_are_one_line(run_cli, tmp_path, monkeypatch, reward_fn):
    from novarl_jax.rollout.rewards import RewardFunctionError
    from novarl_jax.trainer.checkpoint import CheckpointWriteError

    for error, want in [
        (RewardFunctionError("reward function 'x' of task 'copy' raised KeyError: 'a'"),
         ("task.reward_fn: " if reward_fn else "") + "reward function 'x' of task 'copy'"),
        (CheckpointWriteError("/w/checkpoints: the checkpoint of step 2 could not be written"),
         "/w/checkpoints: the checkpoint of step 2 could not be written"),
    ]:  # fmt: skip

        def failing_train(config, workdir, error=error, **kwargs):
            raise error

        monkeypatch.setattr(loop, "train", failing_train)
        extra = [f"task.reward_fn={reward_fn}"] if reward_fn else []
        code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}", *extra)
        assert code == 2, err
        assert err.strip().startswith(f"novarl_jax.train: error: {want}"), err
        assert "Traceback" not in out + err
        if isinstance(error, RewardFunctionError):  # where to resume from once it is fixed
            assert err.strip().endswith(
                f"; no checkpoint in {tmp_path} yet: fix it and rerun to start again"
            ), err


def test_ctrl_c_before_training(monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["novarl_jax.train", *COPY_ON_8])
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(cli_train.app, "run", interrupted)
    with pytest.raises(SystemExit) as exit_:
        try:
            cli_train.run()
        except KeyboardInterrupt:
            pytest.fail("KeyboardInterrupt went through the command line")
    assert exit_.value.code == 130
    assert capsys.readouterr().err == "novarl_jax.train: interrupted before training started\n"


def test_resume_lists_a_changed_config_once(run_cli, tmp_path, monkeypatch):
    import ml_collections

    monkeypatch.syspath_prepend(str(ROOT))
    from configs import copy as copy_config

    saved = copy_config.get_config()
    saved.experiment.world_size, saved.experiment.steps = 8, 1
    write_config(str(tmp_path), saved)
    _checkpoint(tmp_path, {"iteration": 1, "task_state": {}}, monkeypatch)
    changed = "resuming with a changed config: experiment.steps 1 -> 3"

    def session_train(config, workdir, *, allow_config_change, **kwargs):
        # What the run's Session logs when it resumes.
        assert isinstance(config, ml_collections.ConfigDict)
        check_resume_config(workdir, config, allow_change=allow_config_change, log=print)

    monkeypatch.setattr(loop, "train", session_train)
    for extra in ([], ["--allow_config_change"]):
        code, out, err = run_cli(*COPY_ON_8, "experiment.steps=3", f"--workdir={tmp_path}", *extra)
        assert code == 0, err
        assert out.count("resuming with a changed config") == 1, out
        assert changed in out
    # A dry run trains nothing: the command line lists the changes itself.
    code, out, _ = run_cli(*COPY_ON_8, "experiment.steps=3", f"--workdir={tmp_path}", "--dry_run")
    assert code == 0 and out.count(changed) == 1


def test_the_dry_run_makes_the_starts_tokenizer_and_unkept_steps_checks(run_cli, tmp_path):
    """--dry_run runs a start's comparisons: the tokenizer's ids (refused even when changes
    are allowed) and, without a checkpoint, the steps metrics.jsonl holds."""
    from configs import copy as copy_config
    from novarl_jax.rollout.tokenizers import CharTokenizer

    saved = copy_config.get_config()
    saved.experiment.world_size, saved.experiment.steps = 8, 1
    alphabet = CharTokenizer(" :abcopy")  # the copy task's, as a run records it
    write_config(str(tmp_path), saved, tokenizer=alphabet)
    _checkpoint(tmp_path, {"iteration": 1, "task_state": {}})
    code, _, err = run_cli(
        *COPY_ON_8, "task.options.symbols=xbc", f"--workdir={tmp_path}", "--dry_run",
        "--allow_config_change",
    )  # fmt: skip
    assert code == 2 and "task.options.symbols: the tokenizer gives other ids" in err, err
    # No checkpoint, but a step in metrics.jsonl: another config is refused by name.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = run_cli(*COPY_ON_8, "optim.learning_rate=0.5", f"--workdir={tmp_path}",
                           "--dry_run")  # fmt: skip
    assert code == 2 and "holds 1 step that no checkpoint kept, which this start" in err, err
    code, out, _ = run_cli(*COPY_ON_8, "optim.learning_rate=0.5", f"--workdir={tmp_path}",
                           "--dry_run", "--allow_config_change")  # fmt: skip
    assert code == 0 and "redoing the logged steps with a changed config: experiment.st" in out


def test_a_dry_run_warns_of_the_other_algorithms_settings(run_cli, tmp_path):
    code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}", "--dry_run", "ppo.vf_coef=1.0")
    assert code == 0, err
    assert out.count("warning: ppo.vf_coef=1.0 is not used: experiment.algorithm='grpo'") == 1


# --- a backend JAX cannot start --------------------------------------------------------------


@pytest.mark.skipif(
    cli_messages.accelerator_installed() or cli_messages.nvidia_gpu_visible(),
    reason="JAX_PLATFORMS=cuda may start here",
)
def test_jax_platforms_without_its_backend_is_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cuda"
    result = subprocess.run(
        [sys.executable, "-m", "novarl_jax.train", "--config=configs/copy.py",
         f"--workdir={tmp_path}", "--dry_run", "--compilation_cache="],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        "novarl_jax.train: error: JAX_PLATFORMS=cuda: JAX could not start 'cuda' (no NVIDIA "
        "GPU is visible); installed: cpu only (no jax_cuda12_plugin, jax_cuda13_plugin or "
        "libtpu); unset JAX_PLATFORMS or set it to an installed backend (pip install -e "
        "'.[cuda12]' or '.[tpu]' adds one)"
    ]


def test_backend_error_names_the_backend_and_why(monkeypatch):
    monkeypatch.setattr(cli_messages.importlib.util, "find_spec", lambda name: None)
    error = RuntimeError(
        "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so: no such file "
        "(set JAX_PLATFORMS='' to automatically choose an available backend)"
    )
    message = cli_messages.backend_error_message("tpu", error)
    assert message.startswith(
        "JAX_PLATFORMS=tpu: JAX could not start 'tpu' (INTERNAL: Failed to open libtpu.so: no "
        "such file); installed: cpu only"
    )
    monkeypatch.setattr(
        cli_messages.importlib.util, "find_spec", lambda name: name == "jax_cuda12_plugin" or None
    )
    error = RuntimeError(
        "Unable to initialize backend 'cuda': no driver (you may need to uninstall the failing "
        "plugin package, or set JAX_PLATFORMS=cpu to skip this backend.)"
    )
    assert cli_messages.backend_error_message("", error) == (
        "JAX could not start its backend 'cuda' (no driver); installed: cpu, cuda "
        "(jax_cuda12_plugin); set JAX_PLATFORMS=cpu to run on the CPU"
    )


# --- errors of the config file ---------------------------------------------------------------


@pytest.mark.parametrize("suffix", [":foo", ":"])
def test_config_takes_no_argument(run_cli, suffix):
    code, out, err = run_cli(f"--config=configs/copy.py{suffix}", "--dry_run")
    assert code == 2 and not out
    assert err.splitlines() == [
        f"novarl_jax.train: error: --config=configs/copy.py{suffix}: the config takes no ':' "
        f"argument (the get_config() of configs/copy.py takes none); drop '{suffix}' and set "
        "values with overrides such as experiment.steps=10"
    ]


def test_config_file_error_names_the_line(run_cli, tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("def get_config():\n    raise ValueError('no such model size')\n")
    code, out, err = run_cli(f"--config={path}", "--dry_run")
    assert code == 2 and not out
    assert err.splitlines() == [
        f"novarl_jax.train: error: --config: {path}:2: ValueError: no such model size"
    ]


def test_task_option_words_true_and_false_are_bools():
    from novarl_jax import cli_overrides

    for text, value in (("false", False), ("False", False), ("TRUE", True), ("3", 3)):
        assert cli_overrides._option_value(text, None) is value or (
            cli_overrides._option_value(text, None) == value
        )
    assert cli_overrides._option_value("false", "abc") == "false"  # a string option stays one
    # The README's quoted form gives the same string whether or not the file sets the option.
    for current in ("abc", None):
        assert cli_overrides._option_value('"123"', current) == "123"
    assert cli_overrides._option_value("'123'", "abc") == "123"
    assert cli_overrides._option_value("123", "abc") == "123"
    assert cli_overrides._option_value("'12\"", "abc") == "'12\""  # quotes that do not pair
    assert cli_overrides._option_value("'x',{[1]:2},'y'", "abc") == "x',{[1]:2},'y"
    for current in ("abc", None):  # a quoted literal reads the same either way
        assert cli_overrides._option_value('"Q: {prompt}\\nA:"', current) == "Q: {prompt}\nA:"


def test_a_file_that_cannot_be_written_is_one_line(run_cli, tmp_path, monkeypatch):
    """A full disk or a workdir made read-only while training: one line naming the file, the
    cause and the checkpoint a rerun resumes from, not chained tracebacks."""
    import errno

    def full_disk(config, workdir, **kwargs):
        (pathlib.Path(workdir) / "checkpoints" / "2").mkdir(parents=True)
        path = str(pathlib.Path(workdir) / "metrics.jsonl")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(loop, "train", full_disk)
    code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 2
    assert err.strip() == (
        f"novarl_jax.train: error: cannot write {tmp_path}/metrics.jsonl: No space left on "
        f"device; the last checkpoint is step 2 in {tmp_path}; free the space or fix the "
        "permissions and rerun"
    )
    assert "Traceback" not in out + err


def test_a_failed_metrics_write_is_dropped_and_closing_does_not_fail_again(tmp_path):
    from novarl_jax.trainer.metrics import JsonLines

    lines = JsonLines(str(tmp_path / "rows.jsonl"))
    lines.write([{"step": 1}])

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            self.file.write(text)  # buffered: the flush is what fails

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):
            self.file.close()
            raise OSError(28, "No space left on device")

    lines._file = FullDisk(lines._file)
    with pytest.raises(OSError, match="No space left") as info:
        lines.write([{"step": 2}])
    assert info.value.filename == str(tmp_path / "rows.jsonl")  # the message can name it
    lines.close()  # nothing pending: no second error
    lines.write([{"step": 3}])  # space again: appends
    lines.close()
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert rows[0] == {"step": 1} and rows[-1] == {"step": 3}


def test_a_record_that_cannot_be_written_is_named(tmp_path, monkeypatch):
    """json.dump's write fails without a file name (a full disk): re-raised naming it."""
    from novarl_jax.trainer import saved_config
    from novarl_jax.trainer.config import default_config

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(saved_config.json, "dump", full)
    with pytest.raises(OSError) as info:
        saved_config.write_config(str(tmp_path), default_config())
    assert info.value.filename == str(tmp_path / "config.json.writing")
    assert "cannot write " + f"{tmp_path}/config.json.writing: No space left on device" in (
        cli_messages.write_failed_message(info.value, str(tmp_path))
    )
    assert not (tmp_path / "config.json.writing").exists()
    # The new record written, but config.json itself cannot be replaced (made immutable):
    # named, not the temporary file that was written fine, which goes.
    monkeypatch.undo()
    real_replace = os.replace

    def refused(src, dst):
        if str(dst).endswith("config.json"):
            raise OSError(1, "Operation not permitted", str(src), None, str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(saved_config.os, "replace", refused)
    with pytest.raises(OSError) as info:
        saved_config.write_config(str(tmp_path), default_config())
    assert cli_messages.write_failed_message(info.value, str(tmp_path)).startswith(
        f"cannot write {tmp_path}/config.json (replacing it with {tmp_path}/config.json.writing):"
        " Operation not permitted; no checkpoint in"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_orbax_thread_errors_are_left_to_the_checkpointers_one_line():
    import logging

    def record(path, level):
        return logging.LogRecord("absl", level, path, 1, "failed", None, None)

    orbax = os.path.join("site-packages", "orbax", "checkpoint", "future.py")
    assert not cli_train.not_a_checkpoint_thread_error(record(orbax, logging.ERROR))
    assert cli_train.not_a_checkpoint_thread_error(record(orbax, logging.WARNING))
    assert cli_train.not_a_checkpoint_thread_error(record(orbax, logging.CRITICAL))
    assert cli_train.not_a_checkpoint_thread_error(record("novarl_jax/x.py", logging.ERROR))


@pytest.mark.parametrize(
    "override,value_key,name",
    [
        ("experiment.steps.foo=None", "experiment.steps", "foo"),  # was a TypeError traceback
        ("model.head_dim.x=1", "model.head_dim", "x"),  # was config_flags' dataclass message
        ("experiment.algorithm.x=1", "experiment.algorithm", "x"),  # was a str index error
        ("rollout.stop_token_ids.x=1", "rollout.stop_token_ids", "x"),  # a tuple index error
        ("experiment.algorithm.x=None", "experiment.algorithm", "x"),  # named as unknown
    ],
)
def test_an_override_below_a_value_is_one_line(run_cli, override, value_key, name):
    code, out, err = run_cli("--config=configs/moe.py", "--dry_run", override)
    assert code == 2
    assert err.strip() == (
        f"novarl_jax.train: error: {value_key}: is a value, not a section; it has no key {name!r}"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        # -1 blamed experiment.world_size; 0 and a lone --process_id were ignored.
        (["--num_processes=-1"], "--num_processes: -1 is not a positive integer"),
        (["--num_processes=0"], "--num_processes: 0 is not a positive integer"),
        (["--process_id=5"], "--process_id needs --num_processes=N"),
        (["--num_processes=2", "--process_id=2"], "--process_id=2: must be below --num_pro"),
        # --dry_run used to export all the same.
        (["--export=/nonexistent/out"], "--dry_run checks a training run; --export writes"),
    ],
)
def test_process_and_mode_flags_are_checked(run_cli, args, message):
    code, _, err = run_cli("--config=configs/copy.py", "--dry_run", *args)
    assert code == 2 and err.startswith(f"novarl_jax.train: error: {message}"), err


def test_the_dry_run_gives_the_staleness_warning_a_run_would(run_cli):
    on_8 = ["--config=configs/ppo_async.py", "--dry_run", "experiment.world_size=8"]
    code, out, err = run_cli(*on_8, "experiment.weight_sync_max_staleness=1")
    assert code == 0, err
    assert "warning: experiment.weight_sync_max_staleness=1 is below the 4 versions" in out
    code, out, _ = run_cli(*on_8)
    assert code == 0 and "warning" not in out


@pytest.mark.parametrize(
    "override,message",
    [
        ("experiment.world_size=abc", "experiment.world_size: expected an integer, got 'abc'"),
        ("experiment.steps=8.0", "experiment.steps: expected an integer, got '8.0'"),
        ("optim.learning_rate=abc", "optim.learning_rate: expected a number, got 'abc'"),
        ("ppo.normalize_advantages=maybe",
         "ppo.normalize_advantages: expected True or False, got 'maybe'"),
        ("--export_step=abc", "--export_step: expected an integer, got 'abc'"),
        ("--dry_run=maybe", "--dry_run: expected True or False, got 'maybe'"),
    ],
)  # fmt: skip
def test_a_value_of_the_wrong_type_names_the_key_and_the_type(run_cli, override, message):
    code, _, err = run_cli("--config=configs/copy.py", "--dry_run", override)
    assert code == 2 and err.strip() == f"novarl_jax.train: error: {message}"


@pytest.mark.parametrize(
    "body,message",
    [
        ('def get_config():\n    return {"experiment": {}}\n',
         "--config: get_config() must return an ml_collections.ConfigDict"),
        ("X = 1\n", "--config: {path} defines no get_config()"),
        ("def get_config():\n    return None\n",
         "--config: {path}: get_config() returned None (no return?)"),
    ],
)  # fmt: skip
def test_a_config_file_that_gives_no_config_is_one_line(
    run_cli, tmp_path, monkeypatch, body, message
):
    # config_flags loads every file as the module 'config_config', into the module object
    # an earlier load in this process left (its get_config included).
    monkeypatch.delitem(sys.modules, "config_config", raising=False)
    path = tmp_path / "broken.py"
    path.write_text(body)
    code, _, err = run_cli(f"--config={path}", "--dry_run")
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "novarl_jax.train: error: " + message.format(path=path)
    ), err


def _checkpoint(workdir, host, monkeypatch=None, step=1):
    """A checkpoint of ``step`` in ``workdir`` with the JSON record ``host`` and a stand-in
    state (a token array). With ``monkeypatch``, a dry run's shape check, which would refuse
    that state, is left out."""
    import jax.numpy as jnp

    from novarl_jax.trainer.checkpoint import Checkpointer

    ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
    ckpt.save(step, {"w": jnp.ones(2)}, host, force=True)
    ckpt.close()
    if monkeypatch is not None:
        monkeypatch.setattr(Checkpointer, "check_fits", lambda self, state, step=None: None)


def test_the_dry_run_checks_the_checkpoints_shapes(run_cli, tmp_path):
    """A step the real run would refuse once compiled (another run's, copied in) passed the
    dry run: only the host record was read."""
    from configs import copy as copy_config

    saved = copy_config.get_config()
    saved.experiment.world_size, saved.experiment.steps = 8, 1
    write_config(str(tmp_path), saved)
    for step in (1, 2):
        _checkpoint(tmp_path, {"iteration": step, "task_state": {}}, step=step)
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}", "--dry_run")
    step = tmp_path / "checkpoints" / "2"
    assert code == 2 and err.startswith(
        f"novarl_jax.train: error: {step}/state was written for another model or run setup: "
    ), err
    assert err.strip().endswith(
        f"; if that step is not this run's (copied in?), move {step} out to resume from step 1; "
        "resume with the run's own config, or train in a new --workdir"
    )


def test_the_dry_run_checks_the_dataset_position_a_resume_would_restore(
    run_cli, tmp_path, monkeypatch
):
    """A JSONL file edited since the checkpoint: the dry run says so, as the run would."""
    position = {"epoch": 0, "index": 4, "seed": 0, "examples": 11, "digest": "0" * 16}
    _checkpoint(tmp_path, {"iteration": 1, "task_state": position}, monkeypatch)
    args = ["--config=configs/jsonl.py", "experiment.world_size=8", f"--workdir={tmp_path}"]
    code, _, err = run_cli(*args, "--dry_run")
    assert code == 2
    assert err.startswith(
        "novarl_jax.train: error: task.path: cannot resume the task's position: "
        f"{ROOT / 'tests/data/prompts_tiny.jsonl'} has changed since this position in it was "
        "saved (11 examples then, 12 now)"
    ), err


# --- overrides, flags and messages around them ------------------------------------------------


def test_every_none_word_sets_a_key_to_none():
    argv, none_keys, _ = cli.translate_argv(
        ["novarl_jax.train", "a.b=null", "a.c=~", "a.d=none", "a.e=None", "a.f=0"]
    )
    assert none_keys == ["a.b", "a.c", "a.d", "a.e"]
    assert argv[1:] == ["--config.a.f=0"]
    for word in ("null", "~", "none", "None"):  # for task options of any type
        assert cli._option_value(word, 3) is None and cli._option_value(word, "abc") is None


def test_a_deep_override_below_a_value_names_the_first_missing_key(run_cli):
    code, _, err = run_cli("--config=configs/copy.py", "--dry_run", "experiment.steps.a.b=1")
    assert code == 2
    assert err.strip() == (
        "novarl_jax.train: error: experiment.steps: is a value, not a section; it has no key 'a'"
    )


def test_a_config_that_is_a_directory_or_missing_is_one_line(run_cli):
    code, out, err = run_cli("--config=configs", "--dry_run")
    assert code == 2 and not out
    assert (
        err.strip()
        == "novarl_jax.train: error: --config: configs: is a directory, not a config file"
    )
    code, _, err = run_cli("--config=configs/nonexistent.py", "--dry_run")
    assert err.strip() == "novarl_jax.train: error: --config: configs/nonexistent.py: no such file"


def test_a_trailing_config_flag_has_no_value():
    assert cli.config_value(["novarl_jax.train", "--config"]) is None
    assert (
        cli.config_value(["novarl_jax.train", "--config", "configs/copy.py"]) == "configs/copy.py"
    )


@pytest.mark.parametrize(
    "override,message",
    [
        # A new value of another type than the file's: the task's own check, not ml_collections'.
        ("task.options.max_length=2.5",
         "task.options.max_length: max_length must be an integer >= 1, got 2.5"),
        ("--config.task.options.a.b=1",
         "task.options.a.b: task options are keyword arguments; set task.options.<name>=<value>"),
    ],
)  # fmt: skip
def test_a_task_option_the_task_refuses_is_one_line(run_cli, override, message):
    code, out, err = run_cli(*COPY_ON_8, "--dry_run", override)
    assert code == 2 and "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"novarl_jax.train: error: {message}"], err


def test_a_config_file_error_names_the_line_that_raised(run_cli, tmp_path):
    path = tmp_path / "deep.py"
    path.write_text(
        "def _size():\n    raise ValueError('x')\n\n\ndef get_config():\n    return _size()\n"
    )
    code, _, err = run_cli(f"--config={path}", "--dry_run")
    assert code == 2
    assert err.splitlines() == [f"novarl_jax.train: error: --config: {path}:2: ValueError: x"]


def test_cuda_or_gpu_asked_for_without_a_visible_gpu_says_so(monkeypatch):
    monkeypatch.setattr(cli_messages, "nvidia_gpu_visible", lambda: False)
    for platforms in ("gpu", "cuda", "cpu,gpu"):
        message = cli_messages.backend_error_message(platforms, AssertionError())
        assert f"could not start {platforms!r} (no NVIDIA GPU is visible)" in message
    message = cli_messages.backend_error_message("tpu", AssertionError())
    assert "could not start 'tpu' (AssertionError, no backend started)" in message


def test_ctrl_c_while_a_metrics_row_was_half_written(tmp_path):
    """A process stopped part way through writing a row: the last whole row is its step."""
    before = cli_messages.training_mark(str(tmp_path))
    _rows(tmp_path, [1, 2])
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "critic/sco')
    assert cli_messages.interrupted_message(str(tmp_path), before).startswith(
        "interrupted after step 2; no checkpoint in"
    )


def test_a_run_stopped_with_a_reward_error_after_a_checkpoint_resumes(
    run_cli, tmp_path, monkeypatch
):
    from novarl_jax.rollout.rewards import RewardFunctionError

    error = RewardFunctionError("reward function 'x' of task 'copy' raised KeyError: 'a'")
    monkeypatch.setattr(loop, "train", _interrupting_train([1, 2], [1, 2], error))
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 2
    assert err.strip().endswith(
        f"the last checkpoint is step 2 in {tmp_path}: fix it and rerun to resume"
    ), err


def test_a_checkpoint_of_another_setup_says_how_to_go_on(run_cli, tmp_path, monkeypatch):
    from novarl_jax.trainer.checkpoint import CheckpointMismatchError

    error = CheckpointMismatchError("/w/checkpoints/2/state was written for another model")
    monkeypatch.setattr(loop, "train", _interrupting_train([], [], error))
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}")
    assert code == 2
    assert err.strip() == (
        "novarl_jax.train: error: /w/checkpoints/2/state was written for another model; resume "
        "with the run's own config, or train in a new --workdir"
    )


def test_a_real_run_leaves_the_ignored_settings_warning_to_its_session(
    run_cli, tmp_path, monkeypatch
):
    monkeypatch.setattr(loop, "train", lambda config, workdir, **kwargs: None)
    code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}", "ppo.vf_coef=1.0")
    assert code == 0, err
    assert "warning: ppo.vf_coef" not in out


def test_a_workdir_below_a_file_names_the_file(run_cli, tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("")
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={blocker}/sub", "--dry_run")
    assert code == 2
    assert err.strip() == (
        f"novarl_jax.train: error: --workdir: {blocker}/sub: {blocker} is a file, not a directory"
    )
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={blocker}", "--dry_run")
    assert (
        err.strip() == f"novarl_jax.train: error: --workdir: {blocker} is a file, not a directory"
    )


@pytest.mark.parametrize("flag", ["--workdir", "--export"])
def test_an_empty_directory_flag_is_refused(run_cli, flag):
    """``--workdir=$OUT`` with OUT unset trained into runs/<config>; ``--export=$OUT`` trained
    instead of exporting."""
    code, _, err = run_cli(*COPY_ON_8, f"{flag}=")
    assert code == 2 and err.startswith(f"novarl_jax.train: error: {flag}: is empty; give a "), err


@pytest.mark.parametrize("flag", ["--workdir", "--export"])
def test_a_url_directory_flag_is_refused(run_cli, flag):
    """``--workdir=gs://bucket/run`` trained a step into ./gs:/bucket/run, then failed to
    write the checkpoint."""
    code, _, err = run_cli(*COPY_ON_8, f"{flag}=gs://bucket/run", "--dry_run")
    assert code == 2 and err.strip() == (
        f"novarl_jax.train: error: {flag}: gs://bucket/run is a URL; give a file system path "
        "(mount the bucket, e.g. with gcsfuse, and give a directory under the mount)"
    )
    assert not (ROOT / "gs:").exists()


def test_a_url_workdir_or_export_is_refused_by_the_library_too(tmp_path):
    from novarl_jax.trainer.config import ConfigError, default_config
    from novarl_jax.trainer.export import ExportError, export_policy
    from novarl_jax.trainer.loop import train

    config = default_config()
    with pytest.raises(ConfigError, match=r"^--workdir: gs://bucket/run is a URL; give a file"):
        train(config, "gs://bucket/run", log=lambda _: None)
    with pytest.raises(ExportError, match=r"^--export: s3://bucket/model is a URL; give a file"):
        export_policy(config, str(tmp_path), "s3://bucket/model")
    assert not os.path.exists("gs:") and not os.path.exists("s3:")


def test_a_workdir_holding_a_models_config_is_refused_before_it_is_overwritten(run_cli, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    code, _, err = run_cli(*COPY_ON_8, f"--workdir={model}", "--dry_run")
    assert code == 2
    assert err.strip() == (
        f"novarl_jax.train: error: --workdir: {model} holds a config.json that is a Hugging "
        "Face model's (model_type 'llama'), which a run would overwrite with its own; train in "
        "another directory"
    )
    assert json.loads((model / "config.json").read_text())["model_type"] == "llama"


def test_a_workdir_in_use_is_refused_before_the_run_is_built(run_cli, tmp_path, monkeypatch):
    from novarl_jax.trainer import build
    from novarl_jax.trainer.workdir import lock_workdir, release

    def unreachable(*args, **kwargs):
        raise AssertionError("the lock is probed before the run is built")

    held = lock_workdir(str(tmp_path))
    try:
        monkeypatch.setattr(build, "build_run", unreachable)
        code, out, err = run_cli(*COPY_ON_8, f"--workdir={tmp_path}", "--dry_run")
    finally:
        release(held)
    assert code == 2 and out == ""
    assert err.strip() == (
        f"novarl_jax.train: error: --workdir: {tmp_path} is in use by another run (pid "
        f"{os.getpid()}, holding {tmp_path}/.lock); wait for it to finish, or train in another "
        "directory"
    )


def test_devices_that_do_not_split_over_the_processes_are_one_line(run_cli, monkeypatch):
    def unreachable(*args, **kwargs):
        raise AssertionError("the device count is checked before any process connects")

    monkeypatch.setattr(distributed, "initialize_multihost", unreachable)
    code, _, err = run_cli(*COPY_ON_8, "--num_processes=3", "--process_id=0", "--dry_run")
    assert code == 2
    assert err.strip() == (
        "novarl_jax.train: error: experiment.world_size: 8 devices do not split over "
        "--num_processes=3"
    )


def test_a_coordinator_that_fails_is_named_as_such(run_cli, monkeypatch):
    def refused(*args, **kwargs):
        raise RuntimeError("connection refused.\nmore detail")

    monkeypatch.setattr(distributed, "initialize_multihost", refused)
    args = ["--coordinator_address=h:1", "--num_processes=2", "--process_id=0", "--dry_run"]
    for extra in ([], ["--distributed"]):
        code, _, err = run_cli(*COPY_ON_8, *args, *extra)
        assert code == 2
        assert err.strip() == (
            "novarl_jax.train: error: jax.distributed.initialize: connection refused; elsewhere "
            "pass --coordinator_address, --num_processes and --process_id"
        )
    code, _, err = run_cli(*COPY_ON_8, "--distributed", "--dry_run")
    assert err.strip().startswith(
        "novarl_jax.train: error: --distributed: JAX found no cluster to read"
    ), err


def test_the_last_of_a_key_given_twice_counts_none_or_not(run_cli):
    def capacity(*overrides):
        code, out, err = run_cli("--config=configs/moe.py", "--dry_run", *overrides)
        assert code == 0, err
        return next(line for line in out.splitlines() if "capacity factor" in line)

    assert "dropless" not in capacity(
        "experiment.capacity_factor=None", "--config.experiment.capacity_factor=2.0"
    )
    assert "dropless" in capacity("experiment.capacity_factor=2.0", "experiment.capacity_factor=~")


def test_the_space_separated_override_form_gets_the_same_messages(run_cli):
    code, _, err = run_cli("--config=configs/copy.py", "--dry_run", "--config.experimnt.steps", "5")
    assert code == 2 and err.startswith("novarl_jax.train: error: experimnt: unknown key"), err
    code, out, err = run_cli(
        "--config=configs/moe.py", "--dry_run", "--config.experiment.capacity_factor", "None"
    )
    assert code == 0 and "dropless" in out, err


def test_overrides_without_a_config_ask_for_it(run_cli):
    for override in ("experiment.steps=3", "--config.experiment.steps=3"):
        code, _, err = run_cli("--dry_run", override)
        assert code == 2
        assert (
            err.strip()
            == "novarl_jax.train: error: --config is required, e.g. --config=configs/moe.py"
        )


def test_a_config_files_own_key_error_names_its_line(run_cli, tmp_path):
    path = tmp_path / "typo.py"
    path.write_text(
        "from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
        "    c.experimnt.steps = 3\n    return c\n"
    )
    code, _, err = run_cli(f"--config={path}", "--dry_run")
    assert code == 2 and err.startswith(
        f"novarl_jax.train: error: --config: {path}:6: KeyError: 'experimnt'"
    ), err
    path.write_text("def get_config():\n    raise RuntimeError('boom')\n")
    code, _, err = run_cli(f"--config={path}", "--dry_run")
    assert err.strip() == f"novarl_jax.train: error: --config: {path}:2: RuntimeError: boom"


def test_a_home_directory_after_an_equals_sign_is_expanded(run_cli, tmp_path, monkeypatch):
    # A shell leaves '~' alone after '=': --workdir=~/x made a directory named '~'.
    monkeypatch.setenv("HOME", str(tmp_path))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}')
    code, _, err = run_cli(*COPY_ON_8, "--workdir=~/model", "--dry_run")
    assert code == 2 and f"--workdir: {model} holds a config.json" in err, err
    code, _, err = run_cli(
        "--config=configs/jsonl.py",
        "experiment.world_size=8",
        "task.path=~/data.jsonl",
        "--dry_run",
    )
    assert code == 2 and f"JSONL file '{tmp_path}/data.jsonl' does not exist" in err, err


@pytest.mark.parametrize(
    "override,message,end",
    [
        ("experiment.stesp=3", "experiment.stesp: unknown key; valid keys under 'experiment': ",
         "; did you mean 'steps'?"),
        ("experimnt.steps=3", "experimnt: unknown key; valid sections: ",
         "; did you mean 'experiment'?"),
        ("--config.optim=None", "optim: is a section, not a value; set its keys, e.g. optim.b1=",
         "..."),
    ],
)  # fmt: skip
def test_a_misspelt_key_gets_the_closest_valid_one(run_cli, override, message, end):
    code, _, err = run_cli("--config=configs/copy.py", "--dry_run", override)
    assert code == 2 and err.startswith(f"novarl_jax.train: error: {message}"), err
    assert err.strip().endswith(end)


def test_more_fake_cpu_devices_than_the_layout_needs_serve_and_fewer_say_what_to_set(run_cli):
    # XLA_FLAGS asked for more CPU devices than experiment.world_size (this process has 8).
    code, out, err = run_cli("--config=configs/copy.py", "experiment.world_size=4", "--dry_run")
    assert code == 0 and "on 4 cpu devices" in out, err
    code, _, err = run_cli("--config=configs/copy.py", "experiment.world_size=16", "--dry_run")
    assert code == 2 and err.startswith(
        "novarl_jax.train: error: experiment.world_size: layout {'dp': 16, 'tp': 1, 'pp': 1, "
        "'ep': 1, 'world': 16} needs 16 devices, but JAX sees 8 cpu devices; set "
        "experiment.world_size=8"
    ), err


def test_a_bare_boolean_flag_takes_no_value_and_counts_in_order():
    def parsed(*args):
        argv, _, _ = cli.translate_argv(["novarl_jax.train", "--config=configs/copy.py", *args])
        return argv[2:]

    # The override after a bare boolean flag is an override, not the flag's value.
    assert parsed("--config.train.share_prompts", "experiment.steps=5") == [
        "--config.train.share_prompts=True",
        "--config.experiment.steps=5",
    ]
    assert parsed("--config.train.share_prompts=False", "--config.train.share_prompts") == [
        "--config.train.share_prompts=True"
    ]
    assert parsed("--config.experiment.seed", "-1") == ["--config.experiment.seed=-1"]
    assert parsed("--config.train.share_prompts", "false") == ["--config.train.share_prompts=false"]
    # A key of a value with no value after it: absl would take the next flag or override.
    for rest in ([], ["experiment.steps=3"], ["--dry_run"]):
        with pytest.raises(cli.OverrideError, match=r"^logging\.wandb_project: needs a value; "):
            parsed("--config.logging.wandb_project", *rest)


@pytest.mark.parametrize(
    "args",
    [
        ("mode=moe_demo",),
        ("mode=moe_demo", "experiment.world_size=8"),
        ("--config=configs/moe.py", "--dry_run", "mode=moe_demo"),
    ],
)
def test_the_quickstarts_mode_argument_points_to_the_config(run_cli, args):
    code, out, err = run_cli(*args)
    assert code == 2 and not out
    assert err.rstrip().endswith(
        "(the quickstart's mode=moe_demo is --config=configs/moe.py here: the config file "
        "chooses the demo)"
    )


@pytest.mark.parametrize(
    "line, message",
    [
        ("c.experiment.steps = '5'", "field 'steps' takes int values, got str: 5"),
        ("c.rollout.top_p = [0.9]", "field 'top_p' takes float values, got list: [0.9]"),
        ("c.experiment = 3", "'experiment' is a section, not a value; set its keys "
         "(experiment.<name> = ...)"),
    ],
)  # fmt: skip
def test_a_config_file_assigning_the_wrong_type_names_the_field_and_types(
    run_cli, tmp_path, line, message
):
    path = tmp_path / "typed.py"
    path.write_text(
        "from configs import base\n\n\ndef get_config():\n    c = base.get_config()\n"
        f"    {line}\n    return c\n"
    )
    code, _, err = run_cli(f"--config={path}", "--dry_run")
    assert code == 2 and err.strip() == f"novarl_jax.train: error: --config: {path}:6: {message}"


def test_an_override_of_a_whole_section_says_to_set_its_keys(run_cli):
    code, _, err = run_cli("--config=configs/copy.py", "--config.experiment=3", "--dry_run")
    assert code == 2 and err.strip() == (
        "novarl_jax.train: error: experiment: is a section, not a value; set its keys "
        "(experiment.<name>=...)"
    )
