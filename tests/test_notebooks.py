"""The notebooks, every cell executed, at a small budget.

Each notebook's first code cell is tagged ``parameters``: the budget a user runs (epochs, images per
class, ...). Here, papermill-style, a cell tagged ``injected-parameters`` is inserted after it with the
small values of :data:`SMALL`, so each notebook runs in under a minute (04 keeps its own budget, about
20 s); every cell still runs, and the notebooks' own assertions still hold. The kernel runs one torch
thread, like the rest of the suite (``tests/conftest.py``).
"""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# The small budget of each notebook: the names of its parameters cell, new values.
SMALL: dict[str, dict[str, object]] = {
    "01_quickstart.ipynb": {"EPOCHS": 4, "PER_CLASS": 3, "VAL_PER_CLASS": 3},  # RIFLE needs 4 epochs
    "02_transfer_depth.ipynb": {"EPOCHS": 4, "PER_CLASS": 3, "VAL_PER_CLASS": 3, "TEST_PER_CLASS": 3},
    "03_dtnh.ipynb": {"EPOCHS": 2, "PER_CLASS": 3, "VAL_PER_CLASS": 3},
    "04_transformers.ipynb": {},  # its full budget runs in about 20 s
    "05_choose_and_ensemble.ipynb": {"EPOCHS": 1, "PER_CLASS": 3, "VAL_PER_CLASS": 3, "TEST_PER_CLASS": 3},
    "06_text.ipynb": {"EPOCHS": 2, "PER_CLASS": 2, "VAL_PER_CLASS": 4, "MAX_LENGTH": 32},  # the real MiniLM
}
TIMEOUT = 600  # seconds per cell


def with_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> nbformat.NotebookNode:
    """``nb`` with a cell assigning ``values`` inserted after its ``parameters`` cell (which must define them);
    unchanged when ``values`` is empty."""
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"one cell tagged 'parameters' expected, found {len(tagged)}"
    defined = {}
    exec(nb.cells[tagged[0]].source, {}, defined)  # noqa: S102 - the notebook's own constant assignments
    unknown = set(values) - set(defined)
    assert not unknown, f"not in the parameters cell: {sorted(unknown)}"
    if not values:
        return nb
    injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()),
                                         metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(tagged[0] + 1, injected)
    return nb


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMALL))
def test_notebook_runs_every_cell_at_a_small_budget(name):
    path = NOTEBOOKS / name
    nb = with_parameters(nbformat.read(path, as_version=4), SMALL[name])
    client = NotebookClient(nb, timeout=TIMEOUT, kernel_name="python3")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    client.execute(cwd=str(path.parent), env=env)  # raises CellExecutionError on a failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), "a cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


def test_every_notebook_has_a_small_budget():
    assert sorted(SMALL) == sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
