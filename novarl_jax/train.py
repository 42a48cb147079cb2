"""Command line: ``python -m novarl_jax.train --config=configs/moe.py [overrides]``.

Overrides come as ``--config.experiment.algorithm=ppo`` or in the NovaRL quickstart's
Hydra style, ``experiment.algorithm=ppo``. The whole config is validated before anything
compiles (keys, types and layout before JAX starts, then what the run's objects check: task,
tokenizer, checkpoint, batch splits); a bad key or value exits with status 2 and one line
naming the key. On a CPU-only machine,
when ``experiment.world_size`` exceeds the visible devices, fake XLA CPU devices are created
so the layout runs on a laptop.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import os
import re
import sys

import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

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
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index in [0, N).")
_CPU_COLLECTIVES = flags.DEFINE_string(
    "cpu_collectives", None, "Collectives for multi-process CPU runs, e.g. 'gloo'."
)
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume even when the config differs from the one the workdir's run started with (the "
    "changed keys are listed and the workdir's config.json is replaced).",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Start jax.distributed with the settings JAX reads from the cluster (a Cloud TPU VM "
    "slice, a SLURM job): coordinator, process count and index. The launch/ scripts pass it.",
)

# `experiment.world_size=8` (Hydra style) -> `--config.experiment.world_size=8`.
_HYDRA_OVERRIDE = re.compile(r"^\+?([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)=(.*)$", re.DOTALL)


_NONE_WORDS = ("None", "none", "null", "~")
_CONFIG_OVERRIDE = re.compile(r"^--config\.([\w.]+)=(.*)$", re.DOTALL)
# The free-form section whose keys are the task constructor's keyword arguments.
_TASK_OPTIONS = "task.options"


def translate_argv(argv: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Rewrites Hydra-style ``a.b=v`` arguments as ``--config.a.b=v`` flags (placed last).

    Returns the new argv, the keys set to None (``key=None``), which config_flags cannot
    parse for typed fields, and the ``task.options.<name>=<value>`` overrides as (name,
    value) pairs, which config_flags cannot add when the config file does not set the name;
    both are applied after parsing instead.
    """
    flags_part, overrides, none_keys, task_options = [argv[0]], [], [], []
    for arg in argv[1:]:
        match = _HYDRA_OVERRIDE.match(arg)
        if match and not arg.startswith("-"):
            arg = f"--config.{match.group(1)}={match.group(2)}"
        override = _CONFIG_OVERRIDE.match(arg)
        if override and override.group(1).startswith(_TASK_OPTIONS + "."):
            task_options.append((override.group(1)[len(_TASK_OPTIONS) + 1 :], override.group(2)))
        elif override and override.group(2) in _NONE_WORDS:
            none_keys.append(override.group(1))
        elif override:
            overrides.append(arg)
        else:
            flags_part.append(arg)
    # Config files may import their siblings (`from configs import base`): make the folder
    # that holds the config's package importable.
    for arg in flags_part:
        if arg.startswith("--config="):
            path = os.path.abspath(arg.split("=", 1)[1])
            sys.path.insert(0, os.path.dirname(os.path.dirname(path)))
    return flags_part + overrides, none_keys, task_options


def _fail(message: str) -> None:
    print(f"novarl_jax.train: error: {message}", file=sys.stderr)
    sys.exit(2)


_NONE_KEYS: list[str] = []
_TASK_OPTION_OVERRIDES: list[tuple[str, str]] = []


def _unknown_override(argv: list[str], name: str) -> str | None:
    """The (prefix of the) override key that has the missing part ``name``, for messages."""
    keys = [m.group(1) for a in argv if (m := _CONFIG_OVERRIDE.match(a))] + _NONE_KEYS
    for key in keys:
        parts = key.split(".")
        if name in parts:
            return ".".join(parts[: parts.index(name) + 1])
    return None


# config_flags: `Attribute <class 'int'>.foo does not exist ...` (a key under a value).
_UNDER_A_VALUE = re.compile(r"Attribute <class '[\w.]+'>\.(\w+) does not exist")
_QUOTED_NAME = re.compile(r"""['"]([A-Za-z_]\w*)['"]""")


def _missing_key_message(argv: list[str], error: Exception) -> str:
    """One line for config_flags' error on an override of a key the config does not have.

    ml_collections wraps the KeyError in an AttributeError and appends a "Did you mean"
    hint, so the missing name is the first quoted identifier of the innermost message.
    """
    from novarl_jax.trainer.config import unknown_key_error

    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    under_value = _UNDER_A_VALUE.search(text)
    match = under_value or _QUOTED_NAME.search(text)
    key = _unknown_override(argv, match.group(1)) if match else None
    if key and under_value:
        value_key = key.rpartition(".")[0]
        return f"{value_key}: is a value, not a section; it has no key {match.group(1)!r}"
    if key:
        return str(unknown_key_error(key))
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


def _config_path(argv: list[str]) -> str | None:
    """The file of the last ``--config=PATH[:ARGS]`` (or ``--config PATH``) in argv, if any."""
    path = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            path = arg.split("=", 1)[1].split(":", 1)[0]
        elif arg == "--config" and i + 1 < len(argv):
            path = argv[i + 1].split(":", 1)[0]
    return path


def _check_config_file(argv: list[str]) -> None:
    """Fails with one line when --config names no file (config_flags defers that error)."""
    path = _config_path(argv)
    if path is None or os.path.isfile(path):
        return
    if os.path.isdir(path):
        _fail(f"--config: {path}: is a directory, not a config file")
    _fail(f"--config: {path}: no such file")


def _option_value(text: str, current):
    """A ``task.options`` override's value: a Python literal when it parses as one."""
    if text in _NONE_WORDS:
        return None
    if isinstance(current, str):
        return text  # a string option stays a string (e.g. symbols=123)
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _apply_task_options(config) -> None:
    """Sets the ``task.options.<name>=<value>`` overrides, adding names the file does not set."""
    options = config.task.options
    for name, text in _TASK_OPTION_OVERRIDES:
        key = f"{_TASK_OPTIONS}.{name}"
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            _fail(f"{key}: task options are keyword arguments; set {_TASK_OPTIONS}.<name>=<value>")
        value = _option_value(text, options.get(name))
        with options.unlocked():
            if name in options:
                del options[name]  # free-form: the new value may have another type
            options[name] = value


def _parse_flags(argv: list[str]) -> list[str]:
    from novarl_jax.trainer.config import ConfigError, unknown_key_error

    _check_config_file(argv)
    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e).splitlines()[0])
    except (AttributeError, KeyError) as e:  # config_flags: an override of a missing key
        _fail(_missing_key_message(argv, e))
    except Exception as e:  # noqa: BLE001 - config files can raise anything; report one line
        _fail(f"--config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if flags.FLAGS.config is None:
        _fail("--config is required, e.g. --config=configs/moe.py")
    load_error = getattr(flags.FLAGS.config, "_error", None)  # config_flags' _ErrorConfig
    if isinstance(load_error, OSError):
        lines = [line.strip() for line in str(load_error).splitlines() if line.strip()]
        _fail(f"--config: {lines[-1] if lines else type(load_error).__name__}")
    if _TASK_OPTION_OVERRIDES:
        try:
            if not isinstance(flags.FLAGS.config.task.options, ml_collections.ConfigDict):
                raise AttributeError(_TASK_OPTIONS)
        except (AttributeError, KeyError):
            _fail(f"{_TASK_OPTIONS}: the config has no such section; start from configs/base.py")
        _apply_task_options(flags.FLAGS.config)
    for key in _NONE_KEYS:
        node, _, leaf = key.rpartition(".")
        try:
            parent = flags.FLAGS.config
            for part in filter(None, node.split(".")):
                parent = getattr(parent, part)
            if leaf not in parent:
                raise AttributeError(leaf)
            parent[leaf] = None
        except (AttributeError, KeyError):
            _fail(str(unknown_key_error(key)))
        except ConfigError as e:
            _fail(str(e))
    if len(rest) > 1:
        _fail(f"unexpected arguments {rest[1:]}; overrides look like experiment.key=value")
    return rest


def _file_in_the_way(path: str) -> str | None:
    """``path`` or the ancestor of it that exists and is not a directory, else None."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _accelerator_installed() -> bool:
    return any(
        importlib.util.find_spec(m) is not None
        for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "libtpu")
    )


def ensure_cpu_devices(world_size: int) -> None:
    """Creates ``world_size`` fake CPU devices when JAX will run on the CPU.

    Must run before JAX is imported. Does nothing when an accelerator backend is installed
    and not disabled by ``JAX_PLATFORMS=cpu``, or when enough fake devices are already set.
    """
    if "jax" in sys.modules:
        return
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms not in ("", "cpu") or (platforms == "" and _accelerator_installed()):
        return
    from novarl_jax.core.distributed import cpu_xla_flags

    os.environ["XLA_FLAGS"] = cpu_xla_flags(world_size, os.environ.get("XLA_FLAGS", ""))


def main(argv: list[str]) -> None:
    del argv
    # JAX and orbax log routine events at INFO under absl; keep the console for the run.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    from novarl_jax.trainer.config import ConfigError, validate_config

    if _EXPORT_STEP.value is not None and not _EXPORT.value:
        _fail("--export_step needs --export=DIR")
    for flag, path in (("--workdir", _WORKDIR.value), ("--export", _EXPORT.value)):
        if path and (blocker := _file_in_the_way(path)):
            what = path if blocker == os.path.abspath(path) else f"{path}: {blocker}"
            _fail(f"{flag}: {what} is a file, not a directory")
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
    if not _accelerator_installed():
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

    from novarl_jax.trainer.checklist import print_checklist
    from novarl_jax.trainer.checkpoint import CheckpointMismatchError
    from novarl_jax.trainer.loop import TrainingError, train

    try:
        mesh = spec.layout.make_mesh()
    except ValueError as e:
        _fail(f"experiment.world_size: {e}")
    import jax

    workdir = _WORKDIR.value or os.path.join("runs", _config_name())
    if _EXPORT.value:
        _export(spec, workdir, mesh)
        return
    from novarl_jax.trainer.build import build_run
    from novarl_jax.trainer.loop import check_startup
    from novarl_jax.trainer.saved_config import check_resume_config, has_checkpoint

    try:
        # The run's own checks (task, tokenizer, checkpoint, batch splits, prompts that fit,
        # a resume's config) before the table.
        run = build_run(spec)
        check_startup(run, mesh)
        if has_checkpoint(workdir) and not _ALLOW_CONFIG_CHANGE.value:
            check_resume_config(workdir, _CONFIG.value)
    except ConfigError as e:
        _fail(str(e))
    if jax.process_index() == 0:
        print_checklist(spec, mesh, run=run)
    if _DRY_RUN.value:
        print("dry run: the config is valid; nothing was trained")
        return
    try:
        exp = spec.config.experiment
        if exp.async_rollouts:
            from novarl_jax.trainer.async_loop import train_async

            train_async(
                _CONFIG.value,
                workdir,
                spec=spec,
                mesh=mesh,
                run=run,
                num_workers=exp.rollout_workers,
                queue_size=exp.rollout_queue_size or None,
                # Several processes must issue the same programs in the same order: no threads.
                synchronous=jax.process_count() > 1,
                allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            )
        else:
            train(
                _CONFIG.value,
                workdir,
                spec=spec,
                mesh=mesh,
                run=run,
                allow_config_change=_ALLOW_CONFIG_CHANGE.value,
            )
    except (ConfigError, TrainingError) as e:
        _fail(str(e))
    except CheckpointMismatchError as e:
        _fail(f"{e}; resume with the run's own config, or train in a new --workdir")


def _export(spec, workdir: str, mesh) -> None:
    from novarl_jax.trainer.config import ConfigError
    from novarl_jax.trainer.export import ExportError, export_policy

    try:
        written = export_policy(
            _CONFIG.value, workdir, _EXPORT.value, step=_EXPORT_STEP.value, spec=spec, mesh=mesh
        )
    except (ConfigError, ExportError) as e:
        _fail(str(e))
    critic = f"; critic: {written['critic']}" if written["critic"] else ""
    print(f"exported step {written['step']} of {workdir}: policy: {written['policy']}{critic}")


def _config_name() -> str:
    path = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "run")
    return os.path.splitext(os.path.basename(path))[0]


def run() -> None:
    """Console entry point."""
    # config_flags reads sys.argv itself to find the --config.* overrides, so rewrite it.
    sys.argv, none_keys, task_options = translate_argv(sys.argv)
    _NONE_KEYS[:] = none_keys
    _TASK_OPTION_OVERRIDES[:] = task_options
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    run()
