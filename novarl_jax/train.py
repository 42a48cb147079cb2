"""Command line: python -m novarl_jax.train --config=configs/moe.py [overrides]

Overrides come as --config.experiment.algorithm=ppo or in the NovaRL quickstart's Hydra
style, experiment.algorithm=ppo; key=None sets a key that may be None (e.g.
experiment.capacity_factor=None for dropless routing), and of a key given twice the last
counts. Every key, its default and its meaning: novarl_jax/trainer/config.py
(default_config). The whole config is validated before anything compiles (keys, types and
layout before JAX starts, then what the run's objects check: task, tokenizer, checkpoint,
batch splits); a bad key or value exits with status 2 and one line naming the key.
--dry_run does all of that, prints the checklist and stops. On a CPU-only machine the
layout's experiment.world_size devices are made as fake XLA CPU devices, so any layout runs
on a laptop. Ctrl-C stops a run with one line naming the last step it finished and its last
checkpoint (exit status 130).
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from novarl_jax import cli_overrides as cli
from novarl_jax.cli_messages import (
    accelerator_installed,
    backend_error_message,
    interrupted_message,
    last_checkpoint,
    training_mark,
    write_failed_message,
)
from novarl_jax.compilation_cache import use_compilation_cache

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    None,
    "Path to a config file with get_config(), e.g. configs/moe.py.",
    lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, print the checklist and exit without training."
)
_EXPORT = flags.DEFINE_string(
    "export",
    None,
    "Instead of training, write the policy of the --workdir's latest checkpoint to this "
    "directory as a Hugging Face model (config.json + safetensors).",
)
_EXPORT_STEP = flags.DEFINE_integer(
    "export_step", None, "With --export: the checkpoint step to export (default: the latest)."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run.", lower_bound=1
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, N).", lower_bound=0
)
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "Collectives for multi-process CPU runs, e.g. 'gloo'."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume or export even when the config differs from the one the workdir's run started "
    "with (the changes are listed; the workdir's config.json is replaced once the resumed "
    "run's first checkpoint lands). A change of the tokenizer's ids is refused regardless.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Start jax.distributed with the settings JAX reads from the cluster (a Cloud TPU VM "
    "slice, a SLURM job): coordinator, process count and index. launch/slurm.sbatch and "
    "launch/tpu_vm.sh pass it (launch/local_processes.sh gives --num_processes and "
    "--process_id instead).",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache: a rerun or a resume of the same run "
    "loads its compiled programs instead of compiling them again. Default: "
    "$JAX_COMPILATION_CACHE_DIR if set, else ~/.cache/novarl_jax/xla; an empty value turns "
    "the cache off.",
)


# After a checkpoint that does not fit the run's state.
_MISMATCH_ADVICE = "resume with the run's own config, or train in a new --workdir"


def _fail(message: str) -> None:
    print(f"novarl_jax.train: error: {message}", file=sys.stderr)
    jax = sys.modules.get("jax")
    if jax is not None and jax.distributed.is_initialized():
        # One process of a multi-process run failing alone: jax.distributed's shutdown at
        # exit would wait for the others, which wait for it in their next collective. Leaving
        # at once breaks their collective, so the whole job ends.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    _exit(2)


def _exit(status: int) -> None:
    """Ends the process with ``status``: through Python's shutdown, unless a rollout worker
    thread is still inside a call (one stuck past the wait for it, or left by a second
    Ctrl-C), which that shutdown would tear down mid-call and abort; then at once."""
    async_loop = sys.modules.get("novarl_jax.trainer.async_loop")
    if async_loop is not None and async_loop.rollouts_in_progress():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


_NONE_KEYS: list[str] = []
_TASK_OPTION_OVERRIDES: list[tuple[str, str]] = []


def _parse_flags(argv: list[str]) -> list[str]:
    if cli.config_path(argv) is None and any(a.startswith("--config.") for a in argv):
        _fail("--config is required, e.g. --config=configs/moe.py" + _mode_hint(argv))
    problem = cli.config_file_problem(argv) or cli.key_under_a_value(argv, _NONE_KEYS)
    if problem:
        _fail(problem)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # config_flags warns in its own words: we say it here
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(cli.flag_error_message(argv, str(e)))
    except (AttributeError, KeyError) as e:  # config_flags: an override of a missing key
        module = getattr(e, "obj", None)  # the config file is loaded as 'config_config'
        if getattr(e, "name", None) == "get_config" and getattr(module, "__name__", "") == (
            "config_config"
        ):
            _fail(f"--config: {cli.config_path(argv)} defines no get_config()")
        _fail(cli.missing_key_message(argv, e, _NONE_KEYS))
    except Exception as e:  # noqa: BLE001 - config files can raise anything; report one line
        _fail(cli.config_file_error(argv, e))
    finally:
        absl_logger.setLevel(level)
    if flags.FLAGS.config is None:
        if cli.config_path(argv) is not None:
            _fail(f"--config: {cli.config_path(argv)}: get_config() returned None (no return?)")
        _fail("--config is required, e.g. --config=configs/moe.py" + _mode_hint(argv))
    load_error = getattr(flags.FLAGS.config, "_error", None)  # config_flags' _ErrorConfig
    if isinstance(load_error, OSError):
        lines = [line.strip() for line in str(load_error).splitlines() if line.strip()]
        _fail(f"--config: {lines[-1] if lines else type(load_error).__name__}")
    try:
        cli.apply_task_options(flags.FLAGS.config, _TASK_OPTION_OVERRIDES)
        cli.apply_none_keys(flags.FLAGS.config, _NONE_KEYS)
    except cli.OverrideError as e:
        _fail(str(e))
    if len(rest) > 1:
        _fail(
            f"unexpected arguments {rest[1:]}; overrides look like experiment.key=value"
            + _mode_hint(rest[1:])
        )
    _expand_home(flags.FLAGS.config)
    return rest


def _mode_hint(args: list[str]) -> str:
    """For the quickstart's ``scripts/train.py mode=moe_demo``: the config file is the mode."""
    if any(arg.startswith("mode=") for arg in args):
        return (
            " (the quickstart's mode=moe_demo is --config=configs/moe.py here: the config file "
            "chooses the demo)"
        )
    return ""


# Paths a shell leaves as '~/...' after an '=' (--workdir=~/run, task.path=~/data.jsonl).
_PATH_KEYS = ("task.path", "eval.path", "model.tokenizer", "model.init_from")


def _expand_home(config) -> None:
    """Expands a leading ``~`` in the path flags and the config's path keys, as a shell would
    have before a space (``--workdir ~/run``) but does not after an ``=``."""
    for name in ("workdir", "export"):
        value = getattr(flags.FLAGS, name)
        if value and value.startswith("~"):
            setattr(flags.FLAGS, name, os.path.expanduser(value))
    for key in _PATH_KEYS:
        section, _, leaf = key.partition(".")
        holder = config.get(section) if hasattr(config, "get") else None
        value = holder.get(leaf) if hasattr(holder, "get") else None
        if isinstance(value, str) and value.startswith("~"):
            holder[leaf] = os.path.expanduser(value)


def _start_backend() -> None:
    """Starts JAX's backend; a failure exits with one line (see backend_error_message)."""
    import jax

    try:
        jax.devices()
    except (RuntimeError, AssertionError) as e:
        platforms = jax.config.jax_platforms or os.environ.get("JAX_PLATFORMS", "")
        _fail(backend_error_message(platforms, e))


def ensure_cpu_devices(world_size: int) -> None:
    """Creates ``world_size`` fake CPU devices when JAX will run on the CPU.

    Must run before JAX is imported. Does nothing when an accelerator backend is installed
    and not disabled by ``JAX_PLATFORMS=cpu``, or when enough fake devices are already set.
    """
    if "jax" in sys.modules:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms not in ("", "cpu") or (platforms == "" and accelerator_installed()):
        return
    from novarl_jax.core.distributed import set_cpu_devices

    set_cpu_devices(world_size)


def not_a_checkpoint_thread_error(record: logging.LogRecord) -> bool:
    """Drops the errors orbax's save threads log (a full disk gives hundreds of lines of
    tracebacks): the checkpointer reports a failed save itself, in one line."""
    from_orbax = f"{os.sep}orbax{os.sep}" in (record.pathname or "")
    return not (from_orbax and record.levelno == logging.ERROR)


def main(argv: list[str]) -> None:
    from novarl_jax.trainer.stop import StopWatch

    # SIGTERM from here on (start-up and compilation included) stops the run after a step.
    with StopWatch():
        _main(argv)


def _main(argv: list[str]) -> None:
    del argv
    # JAX and orbax log routine events at INFO under absl; keep the console for the run.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("absl").addFilter(not_a_checkpoint_thread_error)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from novarl_jax.trainer.config import ConfigError, validate_config
    from novarl_jax.trainer.workdir import url_path

    if _EXPORT_STEP.value is not None and not _EXPORT.value:
        _fail("--export_step needs --export=DIR")
    if _PROCESS_ID.value is not None:
        if _NUM_PROCESSES.value is None:
            _fail("--process_id needs --num_processes=N (the processes of a multi-process run)")
        if _PROCESS_ID.value >= _NUM_PROCESSES.value:
            _fail(
                f"--process_id={_PROCESS_ID.value}: must be below --num_processes="
                f"{_NUM_PROCESSES.value}"
            )
    for flag, path in (("--workdir", _WORKDIR.value), ("--export", _EXPORT.value)):
        if path == "":  # e.g. --workdir=$DIR with DIR unset
            default = " (leave the flag out for runs/<config name>)" if flag == "--workdir" else ""
            _fail(f"{flag}: is empty; give a directory{default}")
        if path and (url := url_path(path)):
            _fail(f"{flag}: {url}")
        if path and (blocker := cli.file_in_the_way(path)):
            what = path if blocker == os.path.abspath(path) else f"{path}: {blocker}"
            _fail(f"{flag}: {what} is a file, not a directory")
    if _DRY_RUN.value and _EXPORT.value:
        _fail("--dry_run checks a training run; --export writes a model: pass one of them")
    try:
        spec = validate_config(_CONFIG.value)
    except ConfigError as e:
        _fail(str(e))
    processes = _NUM_PROCESSES.value or 1
    if _DISTRIBUTED.value and _NUM_PROCESSES.value is None:
        processes = 1  # unknown until JAX reads the cluster; the mesh checks the devices
    if spec.layout.world_size % processes:
        _fail(
            f"experiment.world_size: {spec.layout.world_size} devices do not split over "
            f"--num_processes={processes}"
        )
    ensure_cpu_devices(spec.layout.world_size // processes)
    try:
        use_compilation_cache(_COMPILATION_CACHE.value)
    except ValueError as e:
        _fail(str(e))
    if not accelerator_installed():
        # XLA:CPU allocates every buffer of every call: keep freed host memory for reuse
        # instead of page-faulting fresh pages each step (before JAX starts its threads).
        from novarl_jax.core.distributed import reuse_host_memory

        reuse_host_memory()
    if processes > 1 or _COORDINATOR.value or _DISTRIBUTED.value:
        from novarl_jax.core.distributed import initialize_multihost

        try:
            initialize_multihost(
                _COORDINATOR.value,
                _NUM_PROCESSES.value,
                _PROCESS_ID.value,
                cpu_collectives=_CPU_COLLECTIVES.value,
            )
        except (ValueError, RuntimeError) as e:
            first = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
            where = (
                "--distributed: JAX found no cluster to read (a Cloud TPU VM slice or a SLURM job)"
                if _DISTRIBUTED.value and not _COORDINATOR.value
                else "jax.distributed.initialize"
            )
            _fail(
                f"{where}: {first}; elsewhere pass --coordinator_address, --num_processes and "
                "--process_id"
            )

    import jax

    _start_backend()
    from novarl_jax.rollout.rewards import RewardFunctionError
    from novarl_jax.rollout.tasks import TaskError
    from novarl_jax.trainer.async_loop import rollouts_in_progress
    from novarl_jax.trainer.checklist import print_checklist
    from novarl_jax.trainer.checkpoint import (
        CheckpointMismatchError,
        CheckpointUnreadableError,
        CheckpointWriteError,
    )
    from novarl_jax.trainer.loop import TrainingError, default_mesh, train
    from novarl_jax.trainer.stop import StopRequested

    world, count = spec.layout.world_size, len(jax.devices())
    try:
        # One process: the first world_size devices, as train() takes them (e.g. a larger
        # fake CPU device count in XLA_FLAGS). Several: each must bring its share.
        mesh = default_mesh(spec) if jax.process_count() == 1 else spec.layout.make_mesh()
    except ValueError as e:
        problem = str(e)
        if count != world and jax.process_count() == 1:
            problem = (
                f"layout {spec.layout.describe()} needs {world} devices, but JAX sees {count} "
                f"{jax.default_backend()} devices; set experiment.world_size={count}, or run "
                f"this layout on {world} fake CPU devices with JAX_PLATFORMS=cpu"
            )
        elif count != world:  # every process's devices make the mesh
            processes = jax.process_count()
            problem = (
                f"layout {spec.layout.describe()} needs {world} devices, but the {processes} "
                f"processes of this run have {count} ({jax.local_device_count()} each); a "
                f"multi-process run uses all of them: set experiment.world_size={count}"
            )
        _fail(f"experiment.world_size: {problem}")

    workdir = _WORKDIR.value or os.path.join("runs", _config_name())
    if _EXPORT.value:
        _export(spec, workdir, mesh)
        return
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.config import ignored_settings
    from novarl_jax.trainer.loop import check_startup
    from novarl_jax.trainer.saved_config import check_start_config, has_checkpoint
    from novarl_jax.trainer.workdir import foreign_config, workdir_in_use

    if problem := foreign_config(workdir):
        _fail(f"--workdir: {problem}")
    # Found before building anything; the run takes the lock (for all processes: it is
    # probed here only in a single-process run, where no other process of the run can hold it).
    if jax.process_count() == 1 and (busy := workdir_in_use(workdir)):
        _fail(str(busy))

    try:
        # The run's own checks (task, tokenizer, checkpoint, batch splits, prompts that fit,
        # a resume's config) before the table.
        run = build_run(spec)
        prompts = check_startup(run, mesh)
        if _DRY_RUN.value and jax.process_index() == 0:  # a real run gives them as it starts
            for warning in [*ignored_settings(spec.config), *prompts]:
                print(f"warning: {warning}")
        if spec.config.experiment.async_rollouts:
            from novarl_jax.trainer.async_loop import check_async_startup

            warnings = check_async_startup(spec)
            if _DRY_RUN.value and jax.process_index() == 0:
                for warning in warnings:  # a real run gives them as it starts
                    print(f"warning: {warning}")
        # A real run's session lists the changes when it starts; a dry run lists them here.
        show = _DRY_RUN.value and jax.process_index() == 0
        say = print if show else (lambda _: None)
        resuming = has_checkpoint(workdir)
        changes = check_start_config(
            workdir, _CONFIG.value, resuming=resuming, allow_change=_ALLOW_CONFIG_CHANGE.value,
            log=say, model=run.model.policy, tokenizer=run.tokenizer,
            stops=run.sampling.stops(run.tokenizer),
        )  # fmt: skip
        if resuming and _DRY_RUN.value:  # the position the resume would restore
            from novarl_jax.trainer.checkpoint import Checkpointer
            from novarl_jax.trainer.loop import Trainer, mismatch_note, restore_task_position

            checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"))
            host = checkpointer.restore_host()
            # The shapes a restore checks first, from the checkpoint's metadata.
            try:
                checkpointer.check_fits(Trainer(run, workdir, mesh=mesh).abstract_state())
            except CheckpointMismatchError as e:
                step, steps = checkpointer.latest_step(), checkpointer.all_steps()
                note = mismatch_note(workdir, changes, step, steps)
                raise CheckpointMismatchError(f"{e}{note}") from None
            changed = [key for key, _, _ in changes]
            restore_task_position(run.task, host, spec.config, changed, say)
    except (ConfigError, CheckpointUnreadableError) as e:
        _fail(str(e))
    except CheckpointMismatchError as e:
        _fail(f"{e}; {_MISMATCH_ADVICE}")
    except TaskError as e:  # a task of one's own, drawing the first prompts
        _fail(f"task.name: {e}")
    if jax.process_index() == 0:
        print_checklist(spec, mesh, run=run)
    if _DRY_RUN.value:
        print("dry run: the config is valid; nothing was trained")
        return
    before = training_mark(workdir) if jax.process_index() == 0 else None
    try:
        # With experiment.async_rollouts, train() runs train_async (threads unless several
        # processes, which must issue the same programs in the same order).
        train(
            _CONFIG.value,
            workdir,
            spec=spec,
            mesh=mesh,
            run=run,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        )
    except KeyboardInterrupt:
        print(f"novarl_jax.train: {interrupted_message(workdir, before)}", file=sys.stderr)
        _exit(130)  # at once when a second Ctrl-C cut the wait for the rollouts short
    except StopRequested as e:
        if jax.process_index() == 0:
            print(
                f"novarl_jax.train: {e}; {last_checkpoint(workdir)}; rerun the same command to "
                "resume from it",
                file=sys.stderr,
            )
        _exit(143)  # 128 + SIGTERM, as if the signal had ended the process
    except CheckpointMismatchError as e:
        _fail(f"{e}; {_MISMATCH_ADVICE}")
    except (ConfigError, TrainingError, CheckpointUnreadableError, CheckpointWriteError) as e:
        _fail(str(e))
    except (RewardFunctionError, TaskError) as e:
        key = "task.reward_fn: " if spec.config.task.reward_fn else ""
        key = "task.name: " if isinstance(e, TaskError) else key
        then = "resume" if has_checkpoint(workdir) else "start again"
        _fail(f"{key}{e}; {last_checkpoint(workdir)}: fix it and rerun to {then}")
    except OSError as e:  # metrics, samples, config.json or plots that cannot be written
        _fail(write_failed_message(e, workdir))
    if rollouts_in_progress():  # a rollout stuck past the wait for it at the end of the run
        _exit(0)


def _export(spec, workdir: str, mesh) -> None:
    from novarl_jax.trainer.config import ConfigError
    from novarl_jax.trainer.export import ExportError, export_policy

    try:
        written = export_policy(
            _CONFIG.value,
            workdir,
            _EXPORT.value,
            step=_EXPORT_STEP.value,
            spec=spec,
            mesh=mesh,
            allow_config_change=_ALLOW_CONFIG_CHANGE.value,
        )
    except (ConfigError, ExportError) as e:
        _fail(str(e))
    critic = f"; critic: {written['critic']}" if written["critic"] else ""
    print(f"exported step {written['step']} of {workdir}: policy: {written['policy']}{critic}")
    if written["capacity_factor"] is not None:
        print(
            f"note: the policy was trained with capacity_factor={written['capacity_factor']:g} "
            "(choices past an expert's capacity dropped); transformers' Mixtral drops none, so "
            "its outputs differ from the run's wherever the run dropped a choice"
        )


def _config_name() -> str:
    path = cli.config_path(sys.argv) or "run"
    return os.path.splitext(os.path.basename(path))[0]


def run() -> None:
    """Console entry point."""
    # config_flags reads sys.argv itself to find the --config.* overrides, so rewrite it.
    try:
        sys.argv, none_keys, task_options = cli.translate_argv(sys.argv)
    except cli.OverrideError as e:
        _fail(str(e))
    _NONE_KEYS[:] = none_keys
    _TASK_OPTION_OVERRIDES[:] = task_options
    try:
        app.run(main, flags_parser=_parse_flags)
    except KeyboardInterrupt:  # during training main says where the run stopped
        print("novarl_jax.train: interrupted before training started", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run()
