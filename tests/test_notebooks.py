"""Every notebook in notebooks/ executes top to bottom on the CPU."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.timeout(1800)  # nbclient's own per-cell limit fires first and stops the kernel
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    # From notebooks/ (Jupyter's working directory for it), with the repository's configs/
    # not on the path: the notebook finds them itself.
    monkeypatch.setenv("NOTEBOOK_STEPS", "3")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "{'dp': 1, 'tp': 2, 'pp': 2, 'ep': 2, 'world': 8}" in text
    assert "mean score" in text


def test_there_is_a_notebook():
    assert NOTEBOOKS
