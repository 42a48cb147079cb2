"""The config a workdir's checkpoints were trained with (``WORKDIR/config.json``).

Rerunning a command resumes from the workdir's last checkpoint. A resume with a config that
trains something else (another task, learning rate or algorithm) would mix two runs in one
set of checkpoints and metrics without a trace, so every start writes its config to
``config.json`` and a resume first compares against the one the previous start wrote (so
does a start without a checkpoint that would replace steps ``metrics.jsonl`` holds; a
resume allowed a change replaces the record only once its first checkpoint lands). Keys
that say how far, where or how the same run goes on may change: ``experiment.steps``, the
parallel layout (a checkpoint restores onto another mesh), rollout worker threads,
gradient-accumulation splits, gradient checkpointing, checkpointing, logging and validation
(:data:`MAY_CHANGE`).
For an MoE policy the layout and the splits still move the numbers a little: routing groups
(and so capacity drops) and the router losses' per-forward means follow how the batch is
split (``docs/layout_invariance.md``). A decaying learning rate with ``optim.decay_steps=0``
lasts the whole run, so there a new ``experiment.steps`` would change the schedule: that is
refused as a change of ``optim.decay_steps`` (whose old length the message gives). Any other
difference stops the run before anything compiles, naming the keys, unless the change is
allowed explicitly (``--allow_config_change``).
Every change is logged when the run resumes.

The policy's architecture is recorded beside it (``WORKDIR/model_config.json``, in
``config.json`` form for transformers) and compared the same way: with ``model.init_from``
the architecture comes from that checkpoint's own ``config.json``, which the run's config only
names, so an edit there (a new ``rope_theta``) would otherwise resume or export the trained
weights under another model without a word.

So are the tokenizer's ids (``WORKDIR/tokenizer_vocab.json``): a tokenizer.json edited in
place, or a task whose alphabet changed at the same size, gives the trained policy other
tokens under the ids it learned. A resume or an export that moves any recorded token to
another id (or drops it) is refused, even with ``--allow_config_change``; new tokens may be
added. Special-token keys (``model.bos_token``, ...) are compared through the ids they name.

The ids that end a completion are recorded in config.json too (under :data:`RECORD_KEY`):
with ``rollout.stop_token_ids=()`` they come from the tokenizer and a ``model.init_from``
checkpoint's generation_config.json, outside the config. Keys that name files
(:data:`PATH_KEYS`) are compared as paths.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterator
from typing import IO, Any

from novarl_jax.trainer.config import ConfigError, decay_updates, default_config

FILE_NAME = "config.json"
RECORD_KEY = "_how_read"  # in config.json beside the config's own sections (write_config)
MODEL_FILE = "model_config.json"  # the policy's architecture (ModelConfig.to_hf_config())
TOKENIZER_FILE = "tokenizer_vocab.json"  # the tokenizer's ids (tokenizer_record())
# A tokenizer's special ids (as tokenizer_record writes them) and the keys naming them.
_SPECIAL_TOKEN_OF = {"pad_id": "pad_token", "bos_id": "bos_token", "eos_id": "eos_token"}
_SPECIAL_IDS = tuple(_SPECIAL_TOKEN_OF)
_SPECIAL_TOKEN_KEYS = tuple(f"model.{name}" for name in _SPECIAL_TOKEN_OF.values())
_RESUME_ADVICE = "resume with that config, train in a new --workdir, or pass --allow_config_change"

# Keys (or sections, ending in '.') a resumed run may change without being told to.
MAY_CHANGE = (
    "experiment.steps",
    "experiment.world_size",
    "experiment.tensor_parallel_size",
    "experiment.pipeline_parallel_size",
    "experiment.expert_parallel_size",
    "experiment.num_microbatches",
    "experiment.rollout_workers",
    "experiment.rollout_queue_size",
    "train.micro_batches",
    "train.gradient_checkpointing",
    "checkpoint.",
    "logging.",
    "eval.",
)


class ConfigChangedError(ConfigError):
    """A resumed run's config differs from the workdir's in keys that change the run."""


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _plain(config: Any) -> dict[str, Any]:
    """The config as the JSON file holds it (tuples as lists, other objects as strings)."""
    tree = config.to_dict() if hasattr(config, "to_dict") else config
    return json.loads(json.dumps(tree, default=_describe, sort_keys=True))


def _describe(value: Any) -> str:
    """A JSON string for a config value JSON has no type for, the same in every process: a
    function as ``module:name`` (as a reward is named in a config), another object as its
    text less any memory address (``<... at 0x7f...>`` differs between runs)."""
    module, name = getattr(value, "__module__", None), getattr(value, "__qualname__", None)
    if callable(value) and module and name:
        return f"{module}:{name}"
    return re.sub(r" at 0x[0-9a-fA-F]+", "", str(value))


# Keys that name files: the same file named relatively (from the directory a run is started
# in) or absolutely is no change.
PATH_KEYS = ("task.path", "eval.path", "model.tokenizer", "model.init_from")


def config_changes(saved: dict, config: Any, *, defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """``(key, saved value, new value)`` for every key that differs (missing = None).

    With ``defaults`` (a config tree), a key the saved record lacks counts as holding its
    default there: a workdir written before that key existed trained with its default.
    The record's :data:`RECORD_KEY` is not a config key and is left out. The files of
    :data:`PATH_KEYS` are compared as paths from the working directory.
    """
    saved = {k: v for k, v in saved.items() if k != RECORD_KEY}
    old, new = _flat(saved), _flat(_plain(config))
    if defaults is not None:
        old = {**_flat(_plain(defaults)), **old}
    return [
        (key, old.get(key), new.get(key))
        for key in sorted(set(old) | set(new))
        if old.get(key) != new.get(key) and not _equivalent(key, old.get(key), new.get(key))
    ]


def _equivalent(key: str, old: Any, new: Any) -> bool:
    """Whether two different values of ``key`` mean the same run: one file by two paths, or
    seeds equal modulo 2**32 (random keys keep a seed's low 32 bits, and a run started with
    a seed outside ``[0, 2**32)``, as earlier versions accepted, resumes with the one that
    names its stream now)."""
    if key == "experiment.seed":
        ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (old, new))
        return ints and old % 2**32 == new % 2**32
    return _same_file(key, old, new)


def _same_file(key: str, old: Any, new: Any) -> bool:
    paths = (old, new)
    if key not in PATH_KEYS or not all(isinstance(p, str) and p for p in paths):
        return False
    return os.path.realpath(old) == os.path.realpath(new)


def _decay_length(flat: dict[str, Any], *, after_warmup: bool = True) -> int | None:
    """The learning-rate decay's length in updates of a flat config (None if unknown).

    ``after_warmup=False``: as a config.json written before ``optim.decay_steps=0`` left the
    warmup out of the decay (the decay then lasted all the run's updates, after the warmup).
    """
    try:
        decay_steps = int(flat["optim.decay_steps"] or 0)
        updates = int(flat["experiment.steps"]) * int(flat["train.epochs"])
        updates *= int(flat["train.minibatches"])
        warmup = int(flat.get("optim.warmup_steps") or 0) if after_warmup else 0
        return decay_updates(decay_steps, updates, warmup)
    except (KeyError, TypeError, ValueError):
        return None


def checkpoint_steps(workdir: str) -> list[int]:
    """The finished checkpoint steps in ``workdir``, in increasing order (orbax names a step's
    directory when it is complete). Reads directory names only, without JAX or orbax."""
    return finished_steps(os.path.join(workdir, "checkpoints"))


def finished_steps(directory: str) -> list[int]:
    """The finished steps in a checkpoints ``directory`` (those orbax has named by the step
    alone), in increasing order."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(directory, n))
    )


def has_checkpoint(workdir: str) -> bool:
    """Whether ``workdir`` holds a finished checkpoint step (a rerun resumes from it)."""
    return bool(checkpoint_steps(workdir))


def may_change(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in MAY_CHANGE)


def tokenizer_record(tokenizer: Any) -> dict | None:
    """What a workdir records of a run's tokenizer: its class, special ids and every token's
    id; None for a tokenizer without ``vocabulary()``."""
    vocabulary = getattr(tokenizer, "vocabulary", None)
    if not callable(vocabulary):
        return None
    return {
        "tokenizer": type(tokenizer).__name__,
        "special_ids": {name: getattr(tokenizer, name, None) for name in _SPECIAL_IDS},
        "vocabulary": vocabulary(),
    }


def write_config(
    workdir: str, config: Any, model: Any = None, tokenizer: Any = None, stops: Any = None
) -> str:
    """Writes ``config`` to ``workdir/config.json`` and, when given, the policy's ModelConfig
    ``model`` to ``workdir/model_config.json`` and the ids of ``tokenizer`` to
    ``workdir/tokenizer_vocab.json`` (each atomically); returns the first path.

    config.json also holds :data:`RECORD_KEY`: how this version reads what the config leaves
    implicit, so that a later version reading it differently can tell, and the ids that end
    a completion, ``stops``, when given."""
    if model is not None:
        _write_json(os.path.join(workdir, MODEL_FILE), model.to_hf_config())
    if (record := tokenizer_record(tokenizer)) is not None:
        _write_json(os.path.join(workdir, TOKENIZER_FILE), record)
    how = {"decay_after_warmup": True}
    if stops is not None:
        how["stop_ids"] = [int(s) for s in stops]
    record = {**_plain(config), RECORD_KEY: how}
    return _write_json(os.path.join(workdir, FILE_NAME), record)


def _write_json(path: str, tree: Any) -> str:
    with replacing(path, ".writing") as f:
        json.dump(_plain(tree), f, indent=2, sort_keys=True)
        f.write("\n")
    return path


@contextlib.contextmanager
def replacing(path: str, suffix: str, **open_args: Any) -> Iterator[IO[str]]:
    """A text file ``path + suffix`` to write ``path``'s new content into, moved onto
    ``path`` when the block ends: a crash leaves the old file or the new one, whole. A
    failure removes it (the old file stays) and re-raises, naming the file
    (:func:`file_named`)."""
    partial = path + suffix
    try:
        with file_named(partial), open(partial, "w", **open_args) as f:
            yield f
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


@contextlib.contextmanager
def file_named(path: str) -> Iterator[None]:
    """Re-raises an OSError that names no file (a failed ``write`` or ``flush``: a full
    disk) as one naming ``path``, so the message says which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror, path) from e
        raise


def _listing(changes: list[tuple[str, Any, Any]], limit: int | None = None) -> str:
    """``key old -> new, ...`` for ``changes``; past ``limit`` of them, ``(and N more)``."""
    shown = changes if limit is None else changes[:limit]
    listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in shown)
    left = len(changes) - len(shown)
    return f"{listed} (and {left} more)" if left else listed


def allowed_changes_note(changes: list[tuple[str, Any, Any]]) -> str:
    """For a checkpoint that does not fit a resume allowed a changed config: ``; ...`` naming
    the allowed changes (those outside :data:`MAY_CHANGE`), one of which may be the cause;
    empty when there are none. Some keys decide what the state holds: the model's sizes, or
    ``optim.max_grad_norm`` between 0 and a positive value (which adds or removes the
    clipping's part of the optimizer state)."""
    allowed = [c for c in changes if not may_change(c[0])]
    if not allowed:
        return ""
    return (
        f"; if one of the allowed config changes ({_listing(allowed, 4)}) changes what the "
        "state holds (a model size, optim.max_grad_norm to or from 0), undo it"
    )


def _read_json(path: str) -> dict:
    """A record this module wrote; a damaged one (a crash mid-write on a file system that
    reorders writes) raises ConfigError naming it."""
    try:
        with open(path) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(
            path,
            f"cannot be read ({e}); restore it, or delete it to resume without comparing "
            f"against it",
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(path, "does not hold a JSON object; restore it, or delete it")
    return saved


def _check_saved_types(saved: dict, path: str) -> None:
    """Raises ConfigError naming ``path`` and the key when a recorded value is not of its
    key's type (a hand edit, or damage): the comparisons would otherwise fail on it."""
    from novarl_jax.trainer.config import NULLABLE_KEYS

    defaults = _flat(_plain(default_config()))
    for key, value in _flat({k: v for k, v in saved.items() if k != RECORD_KEY}).items():
        if key not in defaults or isinstance(defaults[key], list):
            continue  # a free-form section's entry, or a key of another version
        default = defaults[key]
        if value is None:
            ok = key in NULLABLE_KEYS
        elif isinstance(default, bool) or isinstance(value, bool):
            ok = isinstance(value, bool) and isinstance(default, bool)
        elif isinstance(default, float) or key in NULLABLE_KEYS:
            ok = isinstance(value, int | float)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            kind = "a number or null" if key in NULLABLE_KEYS else type(default).__name__
            raise ConfigError(
                path,
                f"records {key}={value!r}, not a value of its type ({kind}): "
                f"the file was edited or damaged; restore it, or delete it to resume without "
                f"comparing against it",
            )


def model_changes(workdir: str, model: Any) -> list[tuple[str, Any, Any]]:
    """``(field, recorded, now)`` where the policy's architecture differs from the record.

    A record without a sliding window, of a model that now has one (from a checkpoint that
    has one, recorded before the window was kept: as Llama, or as Mixtral without it), is
    compared as written then: the window changes nothing within the model's length.
    """
    path = os.path.join(workdir, MODEL_FILE)
    if model is None or not os.path.exists(path):
        return []
    saved = _read_json(path)
    now = model.to_hf_config()
    recorded_type = saved.get("model_type")
    if model.sliding_window is not None and saved.get("sliding_window") is None:
        try:
            recorded_type = recorded_type if isinstance(recorded_type, str) else None
            now = model.replace(sliding_window=None).to_hf_config(recorded_type)
        except ValueError:  # a model type it cannot be written as: compare as it is
            pass
    return config_changes(saved, now)


def _tokenizer_changes(workdir: str, tokenizer: Any) -> tuple[list[tuple[str, Any, Any]], int]:
    """``(what, recorded id, id now)`` for every special id and recorded token whose id the
    tokenizer changed (None: no longer in its vocabulary), in the order of the recorded ids;
    and how many tokens the record holds."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    now = tokenizer_record(tokenizer)
    if now is None or not os.path.exists(path):
        return [], 0
    saved = _read_json(path)
    special, vocabulary = saved.get("special_ids"), saved.get("vocabulary")
    if not isinstance(special, dict) or not isinstance(vocabulary, dict):
        raise ConfigError(
            path, "does not hold a tokenizer record (special_ids, vocabulary); restore it, or "
            "delete it to resume without comparing against it"
        )  # fmt: skip
    changes = [
        (name, special.get(name), new)
        for name, new in now["special_ids"].items()
        if special.get(name) != new
    ]
    new_ids = now["vocabulary"]
    moved = [(t, old, new_ids.get(t)) for t, old in vocabulary.items() if new_ids.get(t) != old]
    moved.sort(key=lambda c: c[1] if isinstance(c[1], int) else -1)
    return changes + [(repr(t), old, new) for t, old, new in moved], len(vocabulary)


def _special_token_hint(moved: list[tuple[str, Any, Any]], config: Any) -> str:
    """Which special-token key to set back, when a special id is among the ``moved``."""
    keys = [f"model.{_SPECIAL_TOKEN_OF[what]}" for what, *_ in moved if what in _SPECIAL_TOKEN_OF]
    if not keys:
        return ""
    if keys == ["model.bos_token"] and config.model.bos_token == "auto":
        return (
            "; model.bos_token='auto' takes the BOS the tokenizer.json's post-processor adds: "
            "an empty model.bos_token (model.bos_token= on the command line) resumes without "
            "one, as the run trained"
        )
    return f", with the special tokens it was given: {', '.join(keys)}"


def _recorded_stops(saved: dict, record: Any, tokenizer: Any) -> list | None:
    """The ids a workdir's completions ended at: recorded, or for a config.json written
    before they were, what that version used (the listed ids, else the tokenizer's EOS);
    None when neither can be told."""
    if isinstance(record, dict) and isinstance(record.get("stop_ids"), list):
        return record["stop_ids"]
    if RECORD_KEY in saved and isinstance(record, dict) and "decay_after_warmup" in record:
        listed = _flat(saved).get("rollout.stop_token_ids")
        if listed and all(isinstance(i, int) for i in listed):
            return list(listed)
        if not listed and tokenizer is not None:
            return [tokenizer.eos_id]
    return None


def _tokenizer_key(
    config: Any, changes: list[tuple[str, Any, Any]], moved: list[tuple[str, Any, Any]]
) -> str:
    """The config key the tokenizer's ``moved`` ids are about: a special token's when only
    special ids moved, else the key that chose the run's tokenizer (``changes``: the config's
    changed keys, among them a task's)."""
    from novarl_jax.trainer.build import tokenizer_path  # JAX is loaded when a run is built

    if moved and all(what in _SPECIAL_TOKEN_OF for what, *_ in moved):
        return f"model.{_SPECIAL_TOKEN_OF[moved[0][0]]}"
    if config.model.tokenizer:
        return "model.tokenizer"
    if tokenizer_path(config):
        return "model.init_from"  # its tokenizer.json
    return next((key for key, *_ in changes if key.startswith("task.")), "task.name")


def check_start_config(
    workdir: str,
    config: Any,
    *,
    resuming: bool,
    allow_change: bool = False,
    log: Callable[[str], Any] = print,
    model: Any = None,
    tokenizer: Any = None,
    stops: Any = None,
) -> list[tuple[str, Any, Any]]:
    """The comparisons a start in ``workdir`` makes before anything trains: a resume's
    (:func:`check_resume_config`), and those of a start without a checkpoint whose
    ``metrics.jsonl`` holds steps it would redo (a run stopped before its first checkpoint,
    or whose checkpoints were removed), which must then be the same run. A fresh workdir
    compares nothing. Returns the changes; raises as :func:`check_resume_config`."""
    from novarl_jax.trainer.metrics import METRICS_FILE, steps_written  # imports this module

    unkept = 0 if resuming else steps_written(os.path.join(workdir, METRICS_FILE))
    if not resuming and not unkept:
        return []
    advice = _RESUME_ADVICE
    if unkept:
        _check_checkpoints_kept(workdir, config, unkept)
        advice = (
            f"its {METRICS_FILE} holds {unkept} step{'s' if unkept > 1 else ''} that no "
            f"checkpoint kept, which this start would replace: rerun with that config, train "
            f"in a new --workdir, or pass --allow_config_change"
        )
    return check_resume_config(
        workdir, config, allow_change=allow_change, log=log, advice=advice, model=model,
        tokenizer=tokenizer, stops=stops,
        verb="resuming" if resuming else "redoing the logged steps",
    )  # fmt: skip


def _check_checkpoints_kept(workdir: str, config: Any, logged: int) -> None:
    """Raises ConfigError when ``metrics.jsonl`` logs so many steps (``logged``) that the run
    must have kept a checkpoint, yet ``checkpoints/`` holds none: they were removed, or
    their volume is not mounted. A start from scratch would replace every logged row."""
    from novarl_jax.trainer.metrics import METRICS_FILE  # imports this module
    from novarl_jax.trainer.samples import FILE_NAME as SAMPLES_FILE

    interval = config.checkpoint.interval
    path = os.path.join(workdir, FILE_NAME)
    if os.path.exists(path):  # the interval the logged steps were trained with
        recorded = _flat(_read_json(path)).get("checkpoint.interval")
        if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded >= 1:
            interval = recorded
    # A save at step k completes before the one at 2k starts, and a failed one stops the
    # run: 2k logged steps mean the checkpoint of step k was written.
    if logged >= 2 * interval:
        raise ConfigError(
            "--workdir",
            f"{os.path.join(workdir, METRICS_FILE)} logs {logged} steps, but "
            f"{os.path.join(workdir, 'checkpoints')} holds no checkpoint, although the run "
            f"saved one every {interval} steps: were they removed, or is their volume not "
            f"mounted? Restore them to resume; to start again instead, move {METRICS_FILE} "
            f"and {SAMPLES_FILE} out of the workdir (a new start replaces their rows)",
        )


def check_resume_config(
    workdir: str,
    config: Any,
    *,
    allow_change: bool = False,
    log: Callable[[str], Any] = print,
    advice: str = _RESUME_ADVICE,
    model: Any = None,
    tokenizer: Any = None,
    stops: Any = None,
    verb: str = "resuming",
) -> list[tuple[str, Any, Any]]:
    """Compares a resumed run's ``config`` with ``workdir/config.json``, its policy's
    ModelConfig ``model`` (when given) with ``workdir/model_config.json``, the ids of its
    ``tokenizer`` (when given) with ``workdir/tokenizer_vocab.json``, and the ids that end its
    completions, ``stops`` (when given), with those config.json records: with
    ``rollout.stop_token_ids=()`` they come from the tokenizer and a ``model.init_from``
    checkpoint, which the config only names.

    Returns the changed keys (those in :data:`MAY_CHANGE` included; empty when the workdir
    has no config.json, as written before it existed). A key config.json lacks (one added to
    the config since it was written) counts as holding its default. ``advice`` ends the error
    message.

    Raises:
        ConfigChangedError: keys outside :data:`MAY_CHANGE` differ, or the architecture does,
            and ``allow_change`` is False; or the tokenizer gives a recorded token another id
            (whatever ``allow_change``). The message names them with both values.
    """
    path = os.path.join(workdir, FILE_NAME)
    if not os.path.exists(path):
        if checkpoint_steps(workdir):
            log(f"warning: {path} is missing: the config is not compared with the one the "
                "checkpoints were trained with")  # fmt: skip
        return []
    saved = _read_json(path)
    _check_saved_types(saved, path)
    record = saved.get(RECORD_KEY, {})
    changes = config_changes(saved, config, defaults=default_config())
    blocking = [c for c in changes if not may_change(c[0])]
    hint = ""
    recorded_stops = _recorded_stops(saved, record, tokenizer)
    if stops is not None and recorded_stops is not None:
        others = [c for c in blocking if c[0] != "rollout.stop_token_ids"]
        if recorded_stops == list(stops):  # the same ids, however the config names them
            blocking = others
        else:
            stop_change = ("rollout.stop_token_ids", f"ends at {recorded_stops}", f"ends at "
                           f"{list(stops)}")  # fmt: skip
            changes = [c for c in changes if c[0] != stop_change[0]] + [stop_change]
            blocking = [stop_change, *others]
            hint = (
                f"; completions ended at ids {recorded_stops} (with rollout.stop_token_ids=() "
                f"they come from EOS and a model.init_from checkpoint's generation_config.json,"
                f" which may have changed): set rollout.stop_token_ids="
                f"{tuple(recorded_stops)} to end them where the run did"
            )
    if tokenizer_record(tokenizer) is not None and os.path.exists(
        os.path.join(workdir, TOKENIZER_FILE)
    ):
        # Special tokens matter through the ids they name, which the tokenizer record
        # compares below ('' -> 'auto' BOS for a file that adds none changes nothing).
        blocking = [c for c in blocking if c[0] not in _SPECIAL_TOKEN_KEYS]
    plain = _flat(_plain(config))
    if plain.get("optim.schedule") != "constant":
        # With optim.decay_steps=0 the decay lasts the whole run, so experiment.steps moves
        # it; an explicit decay_steps equal to the old length keeps the same schedule.
        after_warmup = isinstance(record, dict) and bool(record.get("decay_after_warmup"))
        old_length = _decay_length(_flat(saved), after_warmup=after_warmup)
        new_length = _decay_length(plain)
        blocking = [c for c in blocking if c[0] != "optim.decay_steps"]
        if old_length != new_length:
            blocking.insert(0, ("optim.decay_steps", f"{old_length} updates",
                                f"{new_length} updates"))  # fmt: skip
            if old_length is not None:
                then = {**_flat(_plain(default_config())), **_flat(saved)}  # the old schedule's
                end = max(then["optim.warmup_steps"], 0) + old_length
                hint += (
                    f"; with optim.decay_steps=0 the learning rate decays over the whole run, "
                    f"so changing its length changes the schedule: set "
                    f"optim.decay_steps={old_length} to keep the one the checkpoint was "
                    f"trained on (its decay ends at update {end}; later updates train at "
                    f"optim.end_learning_rate={then['optim.end_learning_rate']})"
                )
    if blocking and not allow_change:
        listed = _listing(blocking, 4)
        raise ConfigChangedError(
            blocking[0][0],
            f"the run in {workdir} started with another config: {listed} (its config: "
            f"{path}){hint}; {advice}",
        )
    # After the config's own keys, which name what changed where the config changed it.
    arch = model_changes(workdir, model)
    if arch and not allow_change:
        listed = _listing(arch, 4)
        init_from = plain.get("model.init_from")
        cause = f"; {init_from}/config.json changed since the run started" if init_from else ""
        raise ConfigChangedError(
            "model.init_from" if init_from else "model",
            f"the policy differs from the one the run in {workdir} trained: {listed} "
            f"(its record: {os.path.join(workdir, MODEL_FILE)}){cause}; {advice}",
        )
    moved, recorded = _tokenizer_changes(workdir, tokenizer)
    if moved:
        record = os.path.join(workdir, TOKENIZER_FILE)
        raise ConfigChangedError(
            _tokenizer_key(config, changes, moved),
            f"the tokenizer gives other ids than the one the run in {workdir} trained with "
            f"({_listing(moved, 4)}; its record of {recorded} tokens: {record}), so the "
            f"trained policy would read them as other tokens; use the run's tokenizer (task "
            f"alphabet or tokenizer.json{_special_token_hint(moved, config)}), or delete "
            f"{record} to go on anyway",
        )
    if arch:
        log(f"{verb} with a changed model: {_listing(arch)}")
    if changes:
        log(f"{verb} with a changed config: {_listing(changes)}")
    return changes
