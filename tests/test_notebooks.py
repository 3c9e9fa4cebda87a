"""The notebooks of `notebooks/` run top to bottom (nbclient, a real kernel) from an empty working directory, draw their
figures, print their final numbers and leave no file behind; the committed files are saved with their outputs.

Cells are found by tag: every code cell tagged ``plot`` must display an ``image/png``; every code cell tagged ``final``
must print its final numbers (percentages, checked to lie in [0, 100] where they are accuracies).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# What each notebook's ``final`` cells must print: a row label followed by the final average accuracy (%).
FINAL_ACCURACY = {
    "01_quickstart.ipynb": [r"teacher\s+([\d.]+)", r"KDP student\s+([\d.]+)", r"plain student\s+([\d.]+)"],
    "02_custom_method.ipynb": [
        r"\nKDP\s+([\d.]+)",
        r"MSE-KDP\s+([\d.]+)",
        r"annealed KDP\s+([\d.]+)",
        r"plain\s+([\d.]+)",
    ],
    "03_callbacks_in_your_project.ipynb": [r"fine-tuning\s+([\d.]+)", r"replay \(10 / class\)\s+([\d.]+)"],
}


def tagged(notebook, tag: str) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code" and tag in cell.metadata.get("tags", [])]


def stdout(cell) -> str:
    return "".join(out.get("text", "") for out in cell.outputs if out.output_type == "stream" and out.name == "stdout")


def has_png(cell) -> bool:
    return any("image/png" in out.get("data", {}) for out in cell.outputs)


def errors(notebook) -> list[str]:
    return [
        f"{out.ename}: {out.evalue}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.outputs
        if out.output_type == "error"
    ]


def check_outputs(notebook, name: str) -> None:
    """Figures in every ``plot`` cell, final accuracies in the ``final`` cells, no error output anywhere."""
    assert not errors(notebook), errors(notebook)
    plots, finals = tagged(notebook, "plot"), tagged(notebook, "final")
    assert plots and finals, f"{name}: tag the plotting cells 'plot' and the final-numbers cell 'final'"
    for cell in plots:
        assert has_png(cell), f"{name}: plotting cell without an image/png output:\n{cell.source[:200]}"
    printed = "\n" + "\n".join(stdout(cell) for cell in finals)
    for pattern in FINAL_ACCURACY.get(name, [r"(\d+\.\d)"]):
        match = re.search(pattern, printed)
        assert match, f"{name}: {pattern!r} not printed by the 'final' cells:\n{printed}"
        assert 0.0 <= float(match.group(1)) <= 100.0, match.group(0)


def test_every_notebook_has_expectations():
    assert NOTEBOOKS, f"no notebook in {NOTEBOOK_DIR}"
    assert {path.name for path in NOTEBOOKS} == set(FINAL_ACCURACY)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_saved_with_outputs(path: Path):
    """The committed notebook shows its figures and numbers on a repository page: executed in order, outputs kept."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    counts = [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"]
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: not executed top to bottom in one run: {counts}"
    check_outputs(notebook, path.name)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run from an empty working directory (no repository-relative path may be needed); temporary outputs go to the
    kernel's TMPDIR, and nothing is left in the working directory."""
    workdir, tmpdir = tmp_path / "cwd", tmp_path / "tmp"
    workdir.mkdir()
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))  # inherited by the kernel: its tempfile folders land under tmp_path
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(workdir)}}
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: {elapsed:.1f} s")
    check_outputs(notebook, path.name)
    assert not list(workdir.iterdir()), f"{path.name} wrote into its working directory: {list(workdir.iterdir())}"
