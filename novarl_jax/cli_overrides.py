"""Command-line overrides of a config: Hydra-style arguments, ``key=None``, free-form task
options, and one-line messages for the errors ml_collections' config flags raise.

Pure helpers of :mod:`novarl_jax.train`; nothing here reads flags or exits.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from typing import Any

# `experiment.world_size=8` (Hydra style) -> `--config.experiment.world_size=8`.
HYDRA_OVERRIDE = re.compile(r"^\+?([A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)+)=(.*)$", re.DOTALL)
CONFIG_OVERRIDE = re.compile(r"^--config\.([\w.]+)=(.*)$", re.DOTALL)
# `--config.experiment.steps 5`: absl's space-separated form of the same flag.
_CONFIG_FLAG_ALONE = re.compile(r"^--config\.[\w.]+$")
NONE_WORDS = ("None", "none", "null", "~")
# The free-form section whose keys are the task constructor's keyword arguments.
TASK_OPTIONS = "task.options"
# config_flags: `Attribute <class 'int'>.foo does not exist ...` (a key under a value).
_UNDER_A_VALUE = re.compile(r"Attribute <class '[\w.]+'>\.(\w+) does not exist")
_QUOTED_NAME = re.compile(r"""['"]([A-Za-z_]\w*)['"]""")


class OverrideError(ValueError):
    """An override that cannot apply; the message is the one line to print."""


def translate_argv(argv: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """Rewrites Hydra-style ``a.b=v`` arguments (and ``--config.a.b v``) as
    ``--config.a.b=v`` flags (placed last); of a key given more than once, the last counts.
    A boolean key given alone (``--config.train.share_prompts``) is True.

    Returns the new argv, the keys set to None (``key=None``), which config_flags cannot
    parse for typed fields, and the ``task.options.<name>=<value>`` overrides as (name,
    value) pairs, which config_flags cannot add when the config file does not set the name;
    both are applied after parsing instead (:func:`apply_none_keys`,
    :func:`apply_task_options`).

    Raises:
        OverrideError: a ``--config.KEY`` of a value that no value follows.
    """
    flags_part, overrides, none_keys, task_options = [argv[0]], [], [], []
    args, given = [], {}
    switches = _bool_keys()
    rest = list(argv[1:])
    while rest:
        arg = rest.pop(0)
        match = HYDRA_OVERRIDE.match(arg)
        if match and not arg.startswith("-"):
            arg = f"--config.{match.group(1)}={match.group(2)}"
        elif _CONFIG_FLAG_ALONE.match(arg):
            key, value = arg[len("--config.") :], rest[0] if rest else None
            if key in switches and (value or "").lower() not in ("true", "false"):
                arg += "=True"  # a bare boolean flag, as absl reads it
            elif (
                value is not None and not value.startswith("--") and not HYDRA_OVERRIDE.match(value)
            ):
                arg = f"{arg}={rest.pop(0)}"
            else:  # absl would take the next flag or override as its value
                raise OverrideError(f"{key}: needs a value; write --config.{key}=VALUE")
        args.append(arg)
        if override := CONFIG_OVERRIDE.match(arg):
            given[override.group(1)] = len(args) - 1
    for i, arg in enumerate(args):
        override = CONFIG_OVERRIDE.match(arg)
        if override and given[override.group(1)] != i:
            continue  # set again later
        if override and override.group(1).startswith(TASK_OPTIONS + "."):
            task_options.append((override.group(1)[len(TASK_OPTIONS) + 1 :], override.group(2)))
        elif override and override.group(2) in NONE_WORDS:
            none_keys.append(override.group(1))
        elif override:
            overrides.append(arg)
        else:
            flags_part.append(arg)
    # Config files may import their siblings (`from configs import base`): make the folder
    # that holds the config's package importable.
    path = config_path(flags_part)
    if path:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    return flags_part + overrides, none_keys, task_options


def _bool_keys() -> set[str]:
    """The config schema's boolean keys."""
    from novarl_jax.trainer.config import _flatten, default_config

    return {key for key, value in _flatten(default_config()).items() if isinstance(value, bool)}


def _unknown_override(argv: list[str], name: str, none_keys: list[str]) -> str | None:
    """The (prefix of the) override key that has the missing part ``name``, for messages."""
    keys = [m.group(1) for a in argv if (m := CONFIG_OVERRIDE.match(a))] + none_keys
    for key in keys:
        parts = key.split(".")
        if name in parts:
            return ".".join(parts[: parts.index(name) + 1])
    return None


def key_under_a_value(argv: list[str], none_keys: list[str]) -> str | None:
    """One line for an override that reaches below a value of the config schema
    (``experiment.steps.x=1``, ``model.head_dim.x=None``), else None.

    config_flags reports those by the value's type, variously (a TypeError on a string, a
    ValueError on a None field, ...); the schema (:func:`~novarl_jax.trainer.config.
    default_config`) says which keys are sections.
    """
    import ml_collections

    from novarl_jax.trainer.config import default_config

    schema = default_config()
    keys = [m.group(1) for a in argv if (m := CONFIG_OVERRIDE.match(a))] + none_keys
    for key in keys:
        node, parts = schema, key.split(".")
        for depth, part in enumerate(parts[:-1]):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                break  # an unknown key: its own message comes later
            node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                value_key = ".".join(parts[: depth + 1])
                return f"{value_key}: is a value, not a section; it has no key {parts[depth + 1]!r}"
    return None


def missing_key_message(argv: list[str], error: Exception, none_keys: list[str]) -> str:
    """One line for config_flags' error on an override of a key the config does not have.

    ml_collections wraps the KeyError in an AttributeError and appends a "Did you mean"
    hint, so the missing name is the first quoted identifier of the innermost message.
    """
    from novarl_jax.trainer.config import unknown_key_error

    outer, error = error, _innermost(error)
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    under_value = _UNDER_A_VALUE.search(text)
    match = under_value or _QUOTED_NAME.search(text)
    key = _unknown_override(argv, match.group(1), none_keys) if match else None
    if key and under_value:
        value_key = key.rpartition(".")[0]
        return f"{value_key}: is a value, not a section; it has no key {match.group(1)!r}"
    if key:
        return str(unknown_key_error(key))
    return config_file_error(argv, outer)  # raised by the config file itself


def config_file_error(argv: list[str], error: BaseException) -> str:
    """``--config: PATH:LINE: Type: message`` for an error a config file raised while it was
    loaded (LINE: its last frame in the file, when the traceback has one)."""
    import traceback

    path = config_path(argv) or ""
    where = path
    for frame in traceback.extract_tb(error.__traceback__):
        if path and os.path.abspath(frame.filename) == os.path.abspath(path):
            where = f"{path}:{frame.lineno}"
    inner = _innermost(error)
    text = inner.args[0] if len(inner.args) == 1 and isinstance(inner.args[0], str) else str(inner)
    text = "; ".join(line.strip() for line in text.splitlines() if line.strip())
    if isinstance(inner, TypeError) and (cast := _cast_message(text)):
        return f"--config: {where}: {cast}"
    return f"--config: {where}: {type(inner).__name__}: {text}".rstrip(": ")


def _innermost(error: BaseException) -> BaseException:
    """The exception inside ``error``'s wrappers (ml_collections wraps a missing key's
    KeyError as the first argument of another exception)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return error


def config_path(argv: list[str]) -> str | None:
    """The file of the last ``--config=PATH[:ARGS]`` (or ``--config PATH``) in argv, if any."""
    value = config_value(argv)
    return None if value is None else value.split(":", 1)[0]


def config_value(argv: list[str]) -> str | None:
    """The value of the last ``--config=PATH[:ARGS]`` (or ``--config PATH``) in argv, if any."""
    value = None
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
    return value


# A frame line of a traceback, and ``get_config`` called with an argument it does not take.
_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+)')
_NO_ARGUMENT = re.compile(r"get_config\(\) takes 0 positional arguments but 1 was given")


def flag_error_message(argv: list[str], text: str) -> str:
    """One line for absl's error on a flag's value.

    config_flags reports an error of the config file as "Error whilst parsing config
    file:" followed by the traceback: the line names the error (the traceback's last line)
    and where it was raised in the config file, or, for ``--config=PATH:ARG`` with a
    ``get_config()`` that takes no argument, says so.
    """
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return "invalid flag value"
    if "Error whilst parsing config file" not in lines[0] or len(lines) < 2:
        return _override_value_message(lines[0])
    value = config_value(argv) or ""
    path, colon, arg = value.partition(":")
    error = lines[-1].strip()
    if colon and _NO_ARGUMENT.search(error):
        return (
            f"--config={value}: the config takes no ':' argument (the get_config() of {path} "
            f"takes none); drop ':{arg}' and set values with overrides such as "
            "experiment.steps=10"
        )
    where = path
    for line in lines:
        frame = _FRAME.match(line)
        if frame and path and os.path.abspath(frame.group(1)) == os.path.abspath(path):
            where = f"{path}:{frame.group(2)}"
    if error.startswith("TypeError: "):
        error = _cast_message(error.removeprefix("TypeError: ")) or error
    return f"--config: {where}: {error}"


# absl's text for an override whose value does not parse as the key's type.
_BAD_OVERRIDE_VALUE = re.compile(r"^flag --(config\.)?([\w.]+)=(.*?): (.*)$", re.DOTALL)
_EXPECTED = (
    ("for int()", "an integer"),
    ("to float", "a number"),
    ("Non-boolean argument", "True or False"),
)


def _override_value_message(line: str) -> str:
    """``experiment.steps: expected an integer, got '8.0'`` for absl's ``flag
    --config.experiment.steps=8.0: invalid literal for int() ...`` (``--export_step: ...``
    for a flag of the command line's own); other lines as they are."""
    match = _BAD_OVERRIDE_VALUE.match(line)
    if not match:
        return line
    override, key, value, error = match.groups()
    key = key if override else f"--{key}"
    for marker, expected in _EXPECTED:
        if marker in error:
            return f"{key}: expected {expected}, got {value!r}"
    if "as a ConfigDict" in error:  # experiment=3
        return f"{key}: is a section, not a value; set its keys ({key}.<name>=...)"
    return f"{key}: {error}"


# ml_collections' TypeError for a config file that assigns a value of another type.
_CAST = re.compile(
    r"^Could not override field '(\w+)' \(reference\)\. (.*) is of original type "
    r"<class '([\w.]+)'> and cannot be casted to type <class '([\w.]+)'>$",
    re.DOTALL,
)


def _cast_message(text: str) -> str | None:
    """``field 'steps' takes int values, got str: 5`` for ml_collections' "Could not override
    field 'steps' (reference). 5 is of original type <class 'str'> and cannot be casted to
    type <class 'int'>"; None for other texts."""
    match = _CAST.match(text)
    if not match:
        return None
    name, value, given, wanted = match.groups()
    given, wanted = given.rpartition(".")[2], wanted.rpartition(".")[2]
    if wanted == "ConfigDict":
        return f"{name!r} is a section, not a value; set its keys ({name}.<name> = ...)"
    return f"field {name!r} takes {wanted} values, got {given}: {value}"


def config_file_problem(argv: list[str]) -> str | None:
    """One line when --config names no file (config_flags defers that error), else None."""
    path = config_path(argv)
    if path is None or os.path.isfile(path):
        return None
    if os.path.isdir(path):
        return f"--config: {path}: is a directory, not a config file"
    return f"--config: {path}: no such file"


def _option_value(text: str, current: Any) -> Any:
    """A ``task.options`` override's value: a Python literal when it parses as one; for an
    option the file sets to a string, the text itself, or the string literal it is when
    quoted (``symbols=123`` and ``symbols='"123"'`` are both the string ``123``, and a quoted
    ``\\n`` is a newline either way)."""
    if text in NONE_WORDS:
        return None
    if isinstance(current, str):  # a string option stays a string (e.g. symbols=123)
        quoted = len(text) >= 2 and text[0] == text[-1] and text[0] in "'\""
        if not quoted:
            return text
        try:  # read as the literal it is without the file's option: escapes as there
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        return value if isinstance(value, str) else text[1:-1]
    if text.lower() in ("true", "false"):  # as the config's own bool flags take them
        return text.lower() == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def apply_task_options(config: Any, overrides: list[tuple[str, str]]) -> None:
    """Sets ``task.options.<name>=<value>`` overrides, adding names the file does not set.

    Raises:
        OverrideError: the config has no task.options section, or a name is not a keyword.
    """
    import ml_collections

    if not overrides:
        return
    try:
        options = config.task.options
        if not isinstance(options, ml_collections.ConfigDict):
            raise AttributeError(TASK_OPTIONS)
    except (AttributeError, KeyError):
        raise OverrideError(
            f"{TASK_OPTIONS}: the config has no such section; start from configs/base.py"
        ) from None
    for name, text in overrides:
        if not re.fullmatch(r"[A-Za-z_]\w*", name):
            raise OverrideError(
                f"{TASK_OPTIONS}.{name}: task options are keyword arguments; set "
                f"{TASK_OPTIONS}.<name>=<value>"
            )
        value = _option_value(text, options.get(name))
        with options.unlocked():
            if name in options:
                del options[name]  # free-form: the new value may have another type
            options[name] = value


def apply_none_keys(config: Any, keys: list[str]) -> None:
    """Sets each ``key=None`` override.

    Raises:
        OverrideError: an unknown key, or one that must not be None (the message names it).
    """
    from novarl_jax.trainer.config import ConfigError, unknown_key_error

    for key in keys:
        node, _, leaf = key.rpartition(".")
        try:
            parent = config
            for part in filter(None, node.split(".")):
                parent = getattr(parent, part)
            if leaf not in parent:
                raise AttributeError(leaf)
            parent[leaf] = None
        except (AttributeError, KeyError):
            raise OverrideError(str(unknown_key_error(key))) from None
        except ConfigError as e:
            raise OverrideError(str(e)) from None


def file_in_the_way(path: str) -> str | None:
    """``path`` or the ancestor of it that exists and is not a directory, else None."""
    from novarl_jax.trainer.workdir import existing_ancestor

    path = existing_ancestor(path)
    return None if path is None or os.path.isdir(path) else path
