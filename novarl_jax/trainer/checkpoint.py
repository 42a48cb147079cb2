"""Checkpoints with orbax: the train state plus a JSON record of host-side state.

A checkpoint step directory holds two items: ``state`` (the :class:`TrainState` pytree, saved
with ``StandardSave``; restored onto the *current* mesh's shardings, so a checkpoint written
under one layout restores under another) and ``host`` (JSON: the task's dataset position, the
finished iteration, the count of non-finite updates in a row, the seed the run started with
and, in asynchronous runs, the next rollout's index; and :func:`state_checksums` of the
state and a checksum of the record itself, which a restore compares, so that damaged bytes
that still decode are caught). Before
restoring, the stored arrays' names and shapes are compared with the run's state, and a
checkpoint of another model or setup is refused with the first arrays that differ
(:class:`CheckpointMismatchError`). orbax writes
each step into a temporary directory and renames it when complete, so a process killed mid-save
leaves the previous checkpoint restorable; the half-written temporary directory is removed
before the next run's first save (not by a process that only reads, such as an export). Old
checkpoints are removed the same way: orbax first renames a step directory into
``todelete/`` (atomic), and its files are deleted from there, so a process killed while
deleting never leaves a half-deleted step that looks complete.

A save that cannot be written (the directory is gone or a file, no permission, a full disk
or quota) raises :class:`CheckpointWriteError` from :meth:`Checkpointer.save`,
:meth:`~Checkpointer.wait` or :meth:`~Checkpointer.close` (whichever first sees it, for an
asynchronous save), naming the directory, the step and the cause; the checkpoints written
before it are left as they were. Ctrl-C while a save is being started takes effect once it
has started (so closing waits for it and keeps it), not part way through.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import signal
import sys
import threading
import warnings
import zlib
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from novarl_jax.trainer.saved_config import finished_steps

TRASH = "todelete"
_UNFINISHED = ".orbax-checkpoint-tmp"  # orbax's suffix for a step directory being written


def first_non_finite(tree: Any) -> str | None:
    """The path of the first floating-point leaf of ``tree`` holding a NaN or inf, or None.

    One jitted reduction over every leaf (:func:`_per_leaf`)."""
    leaves = [
        (path, x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.floating)
    ]
    if not leaves:
        return None
    flags = _per_leaf(_all_finite, [x for _, x in leaves])
    if flags.all():
        return None
    return _path_name(leaves[int(np.argmin(flags))][0])


def _all_finite(x: jax.Array) -> jax.Array:
    return jnp.all(jnp.isfinite(x))


def _per_leaf(reduce: Any, arrays: list) -> np.ndarray:
    """``reduce`` (array -> scalar) of every array, in one jitted program whose results are
    replicated (sharded arrays included), so every process of a multi-process run reads
    them. The program is built once per ``reduce`` and mesh (and compiled once per tree)."""
    sharding = getattr(arrays[0], "sharding", None)
    replicated = (
        jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        if isinstance(sharding, jax.sharding.NamedSharding)
        else None
    )
    return np.asarray(jax.device_get(_per_leaf_program(reduce, replicated)(arrays)))


@functools.lru_cache(maxsize=32)
def _per_leaf_program(reduce: Any, replicated: Any) -> Any:
    return jax.jit(lambda xs: jnp.stack([reduce(x) for x in xs]), out_shardings=replicated)


_CHECKSUMS = "checksums"  # the host record's key: state_checksums of the saved state
_RECORD = "<host record>"  # in the checksums: that of the rest of the host record


def _record_checksum(host: dict) -> int:
    """A checksum of a host record as JSON holds it (what a restore reads back: integer keys
    as strings, tuples as lists), keys sorted."""
    return zlib.crc32(json.dumps(json.loads(json.dumps(host)), sort_keys=True).encode())


def state_checksums(tree: Any) -> dict[str, int]:
    """A 32-bit checksum of the bits of every array leaf of ``tree``, by leaf path.

    Each leaf's words (as unsigned 32-bit integers; 16- and 8-bit types widened) are summed
    with odd weights ``2 * i + 1`` of their linear index ``i``, modulo 2**32: a changed word,
    or two unequal words swapped, changes the sum. The index is built from per-axis iotas,
    so a sharded leaf is read where it lies (no gather), and the same bits give the same sum
    on any layout. One jitted pass (:func:`_per_leaf`)."""
    leaves = [
        (path, jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
        if hasattr(x, "dtype")
    ]
    if not leaves:
        return {}
    sums = _per_leaf(_weighted_word_sum, [x for _, x in leaves])
    return {_path_name(path): int(v) for (path, _), v in zip(leaves, sums, strict=True)}


def _weighted_word_sum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    elif x.dtype.itemsize >= 4:  # a 64-bit value is two words (a trailing axis of 2)
        words = jax.lax.bitcast_convert_type(x, jnp.uint32)
    else:
        unsigned = {2: jnp.uint16, 1: jnp.uint8}[x.dtype.itemsize]
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    index = jnp.zeros(words.shape, jnp.uint32)
    for axis, size in enumerate(words.shape):
        index = index * jnp.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, words.shape, axis)
    return jnp.sum(words * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


def quiet_orbax_echoes() -> None:
    """Leaves orbax's echoes of a failed checkpoint read or write out of the console.

    When a read or write fails, orbax's reads or writes of the other arrays finish after it
    gave up and print dozens to hundreds of tracebacks (an event loop closed, coroutines
    collected unfinished, futures whose exception nobody retrieved, writes never awaited)
    around the one line the checkpointer raises. Only those are dropped: a closed-loop error
    whose traceback runs through any code but asyncio's (every error of a caller's own code
    does), a coroutine or future not of orbax, still reaches the console. Installed once per
    process, by the first :class:`Checkpointer`."""
    global _ECHOES_QUIET
    if _ECHOES_QUIET:
        return
    _ECHOES_QUIET = True
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def on_unraisable(info: Any) -> None:
        if not _an_echo(info.exc_value, info.exc_traceback, info.object):
            unraisable(info)

    def on_exception(kind: Any, error: Any, traceback: Any) -> None:
        if not _an_echo(error, traceback):
            excepthook(kind, error, traceback)

    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception
    logging.getLogger("asyncio").addFilter(_not_an_orbax_future)
    warnings.filterwarnings(
        "ignore", r"coroutine 'async_serialize.*' was never awaited", RuntimeWarning
    )


_ECHOES_QUIET = False
_ORBAX_CODE = f"{os.sep}orbax{os.sep}checkpoint{os.sep}"


def _frames(traceback: Any) -> list[str]:
    files = []
    while traceback is not None:
        files.append(traceback.tb_frame.f_code.co_filename)
        traceback = traceback.tb_next
    return files


def _an_echo(error: Any, traceback: Any, obj: Any = None) -> bool:
    code = getattr(obj, "cr_code", None)
    if code is not None and _ORBAX_CODE in code.co_filename:
        return True  # one of orbax's reads or writes, collected unfinished
    if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
        return False
    # A callback scheduled on orbax's closed loop from its reader or writer threads:
    # asyncio's frames alone, none of any caller.
    files = _frames(traceback)
    return bool(files) and all(f"{os.sep}asyncio{os.sep}" in f for f in files)


def _not_an_orbax_future(record: logging.LogRecord) -> bool:
    """False for asyncio's report of an orbax future (a task, a gathering) whose exception
    nobody retrieved: its traceback runs through orbax's code, or, for one of tensorstore's
    writes (which only orbax issues here; a full disk fails them all at once), it has no
    Python frames and its message carries the tensorstore spec."""
    if "exception was never retrieved" not in record.getMessage():
        return True
    error, traceback = record.exc_info[1:] if record.exc_info else (None, None)
    if "tensorstore_spec=" in str(error):
        return False
    return not any(_ORBAX_CODE in f for f in _frames(traceback))


class Checkpointer:
    """Saves every ``interval`` steps, keeps the last ``keep``, restores the latest.

    Args:
        directory: where step directories go (created if missing).
        interval: save when ``step % interval == 0`` (and on ``force``), an integer >= 1.
        keep: how many recent checkpoints to keep, an integer >= 1 (None: all of them).
        async_save: write in a background thread while training goes on.

    Raises:
        ValueError: ``interval`` or ``keep`` below 1 (``keep=0`` would delete every
            checkpoint it writes).
        CheckpointWriteError: ``directory`` is a file, or cannot be created.
    """

    def __init__(
        self,
        directory: str,
        *,
        interval: int = 10,
        keep: int | None = 3,
        async_save: bool = True,
    ):
        for name, value in (("interval", interval), ("keep", keep)):
            if value is None and name == "keep":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.directory = os.path.abspath(directory)
        self.interval = interval
        quiet_orbax_echoes()
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointWriteError(
                f"{self.directory}: is a file, not a directory, so no checkpoint can be "
                "written there; move it away or train in a new --workdir"
            )
        self._trash = os.path.join(self.directory, TRASH)
        self._empty_trash()
        self._saved = False  # whether this checkpointer has started a save
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=interval,
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
            todelete_subdir=TRASH,
            # A save's directories are made before save() returns, so a directory that cannot
            # be made fails there. Made in the background (orbax's default), a failure leaves
            # the save's other writer threads waiting for a "directory created" signal that
            # never comes; they are not daemon threads, so the process cannot exit until
            # orbax's coordination timeout (300 s) runs out.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "host")
            )
        except OSError as e:
            raise CheckpointWriteError(
                f"{self.directory}: the checkpoint directory cannot be created ({_cause(e)})"
            ) from e
        self._pending: int | None = None  # the step of a save not yet known to be on disk
        self._failure: CheckpointWriteError | None = None  # the failed save, once raised

    def _empty_trash(self) -> None:
        # Steps in the trash were renamed there whole: deleting them loses nothing.
        if os.path.isdir(self._trash):
            for name in os.listdir(self._trash):
                shutil.rmtree(os.path.join(self._trash, name), ignore_errors=True)

    def _remove_unfinished(self) -> None:
        # A save killed part way leaves its step under orbax's temporary name, as large as a
        # checkpoint and never listed as one. Removed before this checkpointer's first save
        # (not on opening: an export may read the checkpoints of a run that is saving), by the
        # first process only, which makes a save's directories. Errors are ignored: a leftover
        # costs disk space, not correctness.
        if jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if _UNFINISHED in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, host: dict, *, force: bool = False) -> bool:
        """Saves when ``step % interval == 0`` or ``force`` (asynchronously when enabled);
        returns whether a save was started.

        Raises:
            CheckpointWriteError: this save, or the asynchronous one before it, failed.
        """
        if step % self.interval and not force:
            return False  # orbax would also save a first step off the interval
        self.wait()  # orbax waits for the previous save too: name its failure as its own
        self._empty_trash()
        if not self._saved:
            self._remove_unfinished()
            self._saved = True
        self._pending = step
        # What the restore checks the arrays against: damaged bytes that still decode to
        # finite numbers would otherwise resume silently (and train on them).
        try:
            checksums = {**state_checksums(state), _RECORD: _record_checksum(host)}
            host = {**host, _CHECKSUMS: checksums}
            with _interrupts_deferred():
                started = self._manager.save(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardSave(state), host=ocp.args.JsonSave(host)
                    ),
                    force=True,
                )
        except Exception as e:  # noqa: BLE001 - OSError, tensorstore and orbax errors alike
            raise self._write_error(e) from e
        return started

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores ``step`` (default: latest) onto the shardings of ``abstract_state``.

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` with ``sharding`` set
        (see :func:`abstract_like`): arrays come back placed and resharded for it.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        self.check_fits(abstract_state, step)
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), host=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - orbax, tensorstore and JSON errors alike
            raise self.unreadable(step, e) from e
        bad = first_non_finite(restored["state"])
        if bad is not None:  # training never saves one: damaged bytes that still decoded
            raise self.unreadable(step, ValueError(f"{bad} holds NaN or infinite values"))
        host, saved = self._checked_host(step, restored["host"])
        if isinstance(saved, dict):
            now = state_checksums(restored["state"])
            if changed := [p for p, v in now.items() if p in saved and saved[p] != v]:
                more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
                raise self.unreadable(
                    step, ValueError(f"{changed[0]}{more} differs from what was saved (checksum)")
                )
        return restored["state"], host

    def _checked_host(self, step: int, record: Any) -> tuple[dict, Any]:
        """The host record less its checksums, checked against the one saved for it, and
        the checksums (None in a checkpoint written before they were)."""
        if not isinstance(record, dict):
            raise self.unreadable(step, ValueError("its host record is not a JSON object"))
        host = dict(record)
        saved = host.pop(_CHECKSUMS, None)
        if (
            isinstance(saved, dict)
            and _RECORD in saved
            and saved[_RECORD] != _record_checksum(host)
        ):
            raise self.unreadable(
                step, ValueError("its host record differs from what was saved (checksum)")
            )
        return host, saved

    def unreadable(self, step: int, error: BaseException) -> CheckpointUnreadableError:
        """The one-line error for a step that cannot be read, with the way around it."""
        older = [s for s in self.all_steps() if s < step]
        advice = (
            f"move {os.path.join(self.directory, str(step))} out of {self.directory} to "
            f"resume from step {older[-1]} (older checkpoints: {older})"
            if older
            else "no older checkpoint is kept; train in a new --workdir"
        )
        return CheckpointUnreadableError(
            f"{os.path.join(self.directory, str(step))}: checkpoint could not be read "
            f"({_one_line(error)}); it may be damaged: {advice}"
        )

    def restore_host(self, step: int | None = None) -> dict:
        """The JSON record of ``step`` (default: latest) alone, without the arrays.

        Raises:
            CheckpointUnreadableError: no such step, or its record cannot be read.
        """
        step = self.latest_step() if step is None else step
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(host=ocp.args.JsonRestore())
            )
        except Exception as e:  # noqa: BLE001 - orbax and JSON errors alike
            raise self.unreadable(step, e) from e
        return self._checked_host(step, restored["host"])[0]

    def check_fits(self, abstract_state: Any, step: int | None = None) -> None:
        """Raises CheckpointMismatchError unless ``step`` (default: the latest) holds
        ``abstract_state``'s arrays, from the checkpoint's metadata alone (what a restore
        checks first, and ``--dry_run`` checks without restoring)."""
        step = self.latest_step() if step is None else step
        path = os.path.join(self.directory, str(step), "state")
        handler = ocp.StandardCheckpointHandler()
        try:
            metadata = handler.metadata(epath.Path(path))
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports
            return
        finally:
            handler.close()
        stored = {
            _path_name(p): tuple(leaf.shape)
            for p, leaf in jax.tree_util.tree_leaves_with_path(metadata)
        }
        wanted, keys = {}, set()
        for p, leaf in jax.tree_util.tree_leaves_with_path(abstract_state):
            if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.extended):
                keys.add(_path_name(p))  # PRNG keys: stored as their raw data
            else:
                wanted[_path_name(p)] = tuple(leaf.shape)
        problems = [
            f"{name}: the checkpoint has {stored[name]}, this run {shape}"
            for name, shape in wanted.items()
            if name in stored and stored[name] != shape
        ]
        problems += [f"{name}: not in the checkpoint" for name in wanted if name not in stored]
        problems += [
            f"{name}: not in this run" for name in stored if name not in wanted and name not in keys
        ]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise CheckpointMismatchError(
                f"{path} was written for another model or run setup: "
                + "; ".join(problems[:3])
                + more
            )

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is on disk.

        Raises:
            CheckpointWriteError: the save failed (again on each call: the checkpointer
                writes nothing more after a failed save).
        """
        if self._failure is not None:
            raise self._failure
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - OSError, tensorstore and orbax errors alike
            raise self._write_error(e) from e
        self._pending = None

    def close(self) -> None:
        """Waits for a pending save, then releases orbax's resources.

        Raises:
            CheckpointWriteError: the pending save failed (not raised again when ``save`` or
                ``wait`` has raised it already).
        """
        reported = self._failure is not None
        try:
            self.wait()
        except CheckpointWriteError:
            if not reported:
                raise
            return  # orbax's close would wait on the failed save and raise it again
        self._manager.close()
        self._empty_trash()  # the step the last save replaced

    def _write_error(self, error: BaseException) -> CheckpointWriteError:
        """The one-line error for a failed save of ``self._pending``, remembered."""
        # The finished steps on disk (orbax no longer lists those it meant to rotate out once
        # this save finished; they are still there): a failed save's step is not among them.
        earlier = [
            s for s in finished_steps(self.directory) if self._pending is None or s < self._pending
        ]
        step = "" if self._pending is None else f" of step {self._pending}"
        kept = (
            f"the last checkpoint (step {earlier[-1]}) in {self.directory} is intact"
            if earlier
            else f"no earlier checkpoint is in {self.directory}"
        )
        self._failure = CheckpointWriteError(
            f"{self.directory}: the checkpoint{step} could not be written ({_cause(error)}); {kept}"
        )
        self._pending = None
        return self._failure


class CheckpointUnreadableError(ValueError):
    """A checkpoint step directory is there but cannot be read (damaged or incomplete)."""


class CheckpointMismatchError(ValueError):
    """A checkpoint's arrays do not fit the state of the run restoring it."""


class CheckpointWriteError(ValueError):
    """A checkpoint cannot be written: its directory is a file or cannot be made, or a save
    failed (no permission, a full disk or quota)."""


def _cause(error: BaseException) -> str:
    """``OSError: [Errno 28] No space left on device: '...'``: the first OS error in the chain
    that ``error`` was raised from (orbax wraps them), else ``error``; one line."""
    chain, inner = [], error
    while inner is not None and all(inner is not e for e in chain):
        chain.append(inner)
        inner = inner.__cause__ or inner.__context__
    for inner in chain:
        if isinstance(inner, OSError):
            return _one_line(inner)
    for inner in chain:
        # tensorstore reports an OS error inside a long message that ends in
        # [os_error_code='28']: the OS's own words say it in one line.
        code = re.search(r"\[os_error_code='?(\d+)'?\]", str(inner))
        if code:
            number = int(code.group(1))
            return f"OSError: [Errno {number}] {os.strerror(number)} (from {type(error).__name__})"
    return _one_line(error)


# Where tensorstore's messages turn into dumps of its specs (kilobytes of JSON).
_DUMP_MARKERS = (" [tensorstore_spec", "<bound method", "See full TensorStore details")
_MAX_CAUSE = 300


def _one_line(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    for marker in _DUMP_MARKERS:
        if marker in text:
            text = text.split(marker)[0].rstrip(" ;:,")
    if len(text) > _MAX_CAUSE:
        text = text[:_MAX_CAUSE].rstrip() + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _path_name(path: tuple) -> str:
    """``params/policy/layers/attn/q_proj`` for a pytree key path (dict keys, attributes)."""
    parts = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                parts.append(str(getattr(entry, attr)))
                break
    return "/".join(parts)


@contextlib.contextmanager
def _interrupts_deferred() -> Iterator[None]:
    """Holds back SIGINT (Ctrl-C) inside the block and delivers it after: a save interrupted
    while orbax starts it (copying the state off the devices, making its directories,
    starting its threads) would be abandoned half-made, losing the steps since the last."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                raise KeyboardInterrupt


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) describing ``tree``, the target of a restore."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
        tree,
    )
