"""notebooks/: each notebook runs top to bottom in a clean kernel, and is stored without outputs.

A notebook runs in its fast configuration (``FULL_RUN = False`` in its first code cell, as
committed), with ``notebooks/`` as its working directory (as Jupyter starts it) and
``ADAMJAX_NOTEBOOK_WORKDIR`` pointing at a temporary folder for everything it writes. A cell that
raises fails the test with the cell's traceback.
"""

import json
import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("adam_explained.ipynb", "mnist_flax.ipynb", "keras_to_jax.ipynb")
CELL_TIMEOUT_S = 900


def test_every_notebook_is_listed():
  found = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))
  assert found == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_without_outputs(name):
  notebook = json.loads((NOTEBOOK_DIR / name).read_text())
  for index, cell in enumerate(notebook["cells"]):
    if cell["cell_type"] != "code":
      continue
    assert cell.get("outputs") == [], f"{name}: cell {index} has outputs in git"
    assert cell.get("execution_count") is None, f"{name}: cell {index} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_fast_configuration_is_committed(name):
  notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  first_code = next(c for c in notebook.cells if c.cell_type == "code")
  assert "FULL_RUN = False" in first_code.source, (
    f"{name}: the first code cell must set FULL_RUN = False (the fast configuration)"
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch):
  notebook = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
  monkeypatch.setenv("ADAMJAX_NOTEBOOK_WORKDIR", str(tmp_path))
  # Jupyter's own inline backend draws the figures into the outputs, headless; a backend
  # chosen for the test process (Agg) would draw nothing.
  monkeypatch.delenv("MPLBACKEND", raising=False)
  monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
  # The kernel must not inherit the test process's Keras backend choice; each notebook says its own.
  monkeypatch.delenv("KERAS_BACKEND", raising=False)
  before = sorted(os.listdir(NOTEBOOK_DIR))
  client = NotebookClient(
    notebook,
    timeout=CELL_TIMEOUT_S,
    kernel_name="python3",
    resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
  )
  client.execute()  # Raises CellExecutionError, with the cell's traceback, if a cell fails.
  # Everything a notebook writes goes under ADAMJAX_NOTEBOOK_WORKDIR, nothing beside it.
  assert sorted(os.listdir(NOTEBOOK_DIR)) == before
