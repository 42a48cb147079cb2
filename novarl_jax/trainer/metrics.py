"""Run logs: a flushed JSONL line per step, plus TensorBoard and W&B when enabled."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
from typing import Any

from novarl_jax.core.checks import real_value
from novarl_jax.trainer.saved_config import file_named, replacing


def _plain(value: Any) -> Any:
    """A JSON-friendly scalar (non-finite floats become strings JSON can hold)."""
    try:
        value = value.item()
    except AttributeError:
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


METRICS_FILE = "metrics.jsonl"  # under the workdir: a row per finished step


class JsonLines:
    """An append-only ``.jsonl`` file of rows keyed by ``step``, flushed after every write.

    :meth:`truncate_after` drops the rows of steps after a restored checkpoint, so a resumed
    run's file matches what an uninterrupted run writes.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = None

    def truncate_after(self, step: int) -> None:
        """Drops rows whose step is greater than ``step`` (used when resuming), and a last line
        cut off part way (a process killed while writing it: it is past the checkpoint)."""
        if not os.path.exists(self.path):
            return
        lines = _read_lines(self.path)
        kept = [
            line
            for _, line, row in _parse_lines(lines)
            # Damage before the last line is not this writer's to remove.
            if (row_step := _step_of(row)) is None or row_step <= step
        ]
        lines = [line for _, line in lines]
        # A whole last row whose newline was cut off would run into the next row written.
        kept = [line if line.endswith("\n") else line + "\n" for line in kept]
        if kept == lines:
            return
        with replacing(self.path, ".truncating", errors="surrogateescape") as f:
            f.writelines(kept)

    def write(self, rows: list[dict[str, Any]]) -> None:
        """Appends ``rows`` (JSON-able dicts; other values are written as strings)."""
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 - kept open for the run
        try:
            with file_named(self.path):
                for row in rows:
                    self._file.write(json.dumps(row, sort_keys=True, default=str) + "\n")
                self._file.flush()
        except OSError:
            # What did not reach the file is dropped, so closing does not fail on it again.
            # A resume truncates the file to its checkpoint (a torn last line included).
            self._discard()
            raise

    def _discard(self) -> None:
        file, self._file = self._file, None
        try:
            file.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MetricsWriter:
    """Writes ``metrics.jsonl`` under ``workdir`` and forwards to optional backends.

    On resume, lines for steps after the restored step are dropped first, so the file always
    matches the checkpointed run exactly.
    """

    def __init__(
        self,
        workdir: str,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "novarl_jax",
        run_config: dict | None = None,
    ):
        os.makedirs(workdir, exist_ok=True)
        self._lines = JsonLines(os.path.join(workdir, METRICS_FILE))
        self.path = self._lines.path
        self._tb = None
        self._tb_open: Any = None
        self._tb_purge: int | None = None
        self._wandb = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                raise RuntimeError(
                    "logging.tensorboard=True needs the tensorboard extra: "
                    'pip install -e ".[tensorboard]"'
                ) from e
            # Opened at the first write, so that a resume's purge step is in its first event.
            # tensorboardX writes from a thread of its own, and its flush() does not wait for
            # the points queued for that thread: flush_secs=1 has the thread write each point
            # to disk within a second (its default, 120 s, could lose two minutes of a killed
            # run).
            self._tb_open = functools.partial(
                SummaryWriter, os.path.join(workdir, "tensorboard"), flush_secs=1
            )
        if wandb:
            try:
                import wandb as wandb_lib
            except ImportError as e:
                raise RuntimeError(
                    'logging.wandb=True needs the wandb extra: pip install -e ".[wandb]"'
                ) from e
            self._wandb = wandb_lib.init(
                project=wandb_project,
                dir=workdir,
                config=run_config,
                resume="allow",
                id=wandb_run_id(workdir),
            )

    def truncate_after(self, step: int) -> None:
        """Drops lines for steps after ``step`` (used when resuming); TensorBoard is told to
        discard them too (W&B keeps its own history)."""
        self._lines.truncate_after(step)
        self._tb_purge = step + 1

    def _open_tensorboard(self) -> None:
        if self._tb is None and self._tb_open is not None:
            self._tb = self._tb_open(purge_step=self._tb_purge)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._lines.write([row])
        # From the values themselves: the JSON row spells NaN and inf as strings, and a
        # skipped update's non-finite loss must reach TensorBoard and W&B as well.
        numeric = {k: real_value(v) for k, v in metrics.items()}
        numeric = {k: v for k, v in numeric.items() if v is not None}
        self._open_tensorboard()
        if self._tb is not None:
            for name, value in numeric.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(numeric, step=step)

    def close(self) -> None:
        self._lines.close()
        if self._tb_purge is not None:
            # A resume that wrote no step still tells TensorBoard to forget the later ones.
            self._open_tensorboard()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def wandb_run_id(workdir: str) -> str:
    """The W&B run of ``workdir``: its name plus a hash of its absolute path, so a resumed
    run logs to the same W&B run and two workdirs of one name (``a/copy``, ``b/copy``) do
    not."""
    path = os.path.abspath(workdir)
    digest = hashlib.sha1(path.encode()).hexdigest()[:8]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", os.path.basename(path))[:48]
    return f"{name}-{digest}"


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of ``workdir/metrics.jsonl`` in order (a last line cut off part way, by a
    process killed while writing it, is left out).

    Raises:
        ValueError: a line before the last is not JSON (naming the file and line).
    """
    path = os.path.join(workdir, METRICS_FILE)
    rows = []
    for n, _, row in _parse_lines(_read_lines(path)):
        if isinstance(row, Exception):
            raise ValueError(f"{path}:{n}: not a JSON row ({row})") from None
        if _step_of(row) is None:
            raise ValueError(
                f"{path}:{n}: not a metrics row (a JSON object with a numeric 'step'); remove "
                "that line"
            )
        rows.append(row)
    return rows


def steps_written(path: str) -> int:
    """How many distinct steps the rows of a ``.jsonl`` file hold (0 when there is none)."""
    try:
        lines = _read_lines(path)
    except FileNotFoundError:
        return 0
    return len({step for _, _, row in _parse_lines(lines) if (step := _step_of(row)) is not None})


def _step_of(row: Any) -> float | None:
    """A parsed row's step, or None when it is no metrics row (damage, or another record)."""
    step = row.get("step") if isinstance(row, dict) else None
    real = isinstance(step, int | float) and not isinstance(step, bool) and math.isfinite(step)
    return step if real else None  # (json reads NaN and Infinity: a hand-edited row's)


def _read_lines(path: str) -> list[tuple[int, str]]:
    """The non-blank lines of a file with their 1-based numbers. Bytes that are not UTF-8
    (damage) are kept as they are (``surrogateescape``): such a line is no JSON row, and a
    file rewritten from these lines holds the same bytes."""
    with open(path, errors="surrogateescape") as f:
        return [(n, line) for n, line in enumerate(f, 1) if line.strip()]


def _parse_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str, Any]]:
    """``(number, line, row)`` for each line, ``row`` the parsed JSON or the decoding error; a
    last line that is not JSON is left out: a process killed while writing it cut it off."""
    parsed = []
    for i, (n, line) in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            row = e
        parsed.append((n, line, row))
    return parsed
