"""metrics.jsonl's reader and truncation on odd lines, and the W&B run's id and steps."""

import sys
import types

import pytest

from novarl_jax.trainer.metrics import (
    JsonLines,
    MetricsWriter,
    read_metrics,
    steps_written,
    wandb_run_id,
)


def test_truncating_keeps_a_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n[2]\n{"step": 3}\n')
    JsonLines(str(path)).truncate_after(1)
    assert path.read_text() == '{"step": 1}\n[2]\n'


def test_bytes_that_are_not_utf8_are_damage_like_any_other(tmp_path):
    """A torn last line of such bytes stopped a resume with a UnicodeDecodeError."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1}\n\xff\xfe kept\n{"step": 2}\n\xff\xfe torn')
    assert steps_written(str(path)) == 2
    JsonLines(str(path)).truncate_after(1)
    assert path.read_bytes() == b'{"step": 1}\n\xff\xfe kept\n'  # byte for byte


def test_rows_without_a_numeric_step_are_kept_by_truncation_and_named_by_the_reader(tmp_path):
    """A row with a text step crashed a resume's truncation; a row that is no object crashed
    the plot at the end of a run that had trained."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": "x"}\n{"step": true}\n{"step": NaN}\n{"step": 3}\n')
    JsonLines(str(path)).truncate_after(1)  # NaN compared with no step, so it was dropped
    assert path.read_text() == '{"step": 1}\n{"step": "x"}\n{"step": true}\n{"step": NaN}\n'
    for bad in ('{"step": "x"}', "[1, 2]", '{"loss": 1.0}', '{"step": Infinity}'):
        path.write_text(f'{{"step": 1}}\n{bad}\n{{"step": 2}}\n')
        with pytest.raises(ValueError) as info:
            read_metrics(tmp_path)
        assert str(info.value) == (
            f"{path}:2: not a metrics row (a JSON object with a numeric 'step'); remove that line"
        )


def test_wandb_points_carry_the_step(tmp_path, monkeypatch):
    calls = []
    run = types.SimpleNamespace(log=lambda d, **kw: calls.append(kw), finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: run))
    writer = MetricsWriter(str(tmp_path), wandb=True)
    writer.write(5, {"x": 1.0})
    writer.close()
    assert calls == [{"step": 5}]


def test_a_relative_workdir_names_the_same_wandb_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert wandb_run_id("copy") == wandb_run_id(str(tmp_path / "copy"))
    assert wandb_run_id("copy/").startswith("copy-")


def test_blank_lines_in_metrics_are_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n\n{"step": 2}\n')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]


def test_steps_written_counts_distinct_steps_of_metrics_rows(tmp_path):
    # A step redone after a restart appears twice; rows without a step are no metrics rows.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"note": 1}\n{"step": 2}\n{"step": 2}\nnot json\n{"step": 3}\n')
    assert steps_written(str(path)) == 2
    path.write_text('{"note": 1}\n{"step": true}\n')
    assert steps_written(str(path)) == 0
    assert steps_written(str(tmp_path / "missing.jsonl")) == 0
