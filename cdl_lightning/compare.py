"""``cdl compare RUN_DIR [RUN_DIR ...]``: accuracy matrices and final metrics of several runs, side by side."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cdl_lightning.metrics.functional import MATRIX_METRICS


def load_metrics(run_dir: str) -> dict[str, Any]:
    """Read ``metrics.json`` written by `ContinualEvaluation` in a run folder (or the file itself)."""
    path = Path(run_dir)
    file = path if path.is_file() else path / "metrics.json"
    if not file.is_file():
        raise FileNotFoundError(f"no metrics.json in {run_dir!r}: did that run finish a task (ContinualEvaluation "
                                "writes it at every task end)?")
    return json.loads(file.read_text())


def _fmt(value: Any) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def compare(run_dirs: list[str], names: list[str] | None = None, console: Console | None = None) -> list[dict]:
    """Print each run's accuracy matrix and a summary table of each run's final metrics (`MATRIX_METRICS`)."""
    console = console or Console(width=max(Console().width, 100))  # tables stay whole in logs and pipes
    names = names or [Path(d).name or d for d in run_dirs]
    results = [load_metrics(d) for d in run_dirs]
    for name, result in zip(names, results):
        matrix = result["accuracy_matrix"]
        table = Table(title=escape(f"{name}: accuracy matrix R[t, j] (%)"))  # not rich markup
        table.add_column("after task")
        for j in range(len(matrix)):
            table.add_column(f"task {j}", justify="right")
        for t, row in enumerate(matrix):
            table.add_row(str(t), *[_fmt(v) for v in row])
        console.print(table)
    summary = Table(title="final average accuracy / forgetting (%)")
    summary.add_column("run", justify="left")
    for metric in MATRIX_METRICS:
        summary.add_column(metric.column, justify="right")
    for name, result in zip(names, results):
        final = result["final"]
        summary.add_row(name, *[_fmt(final.get(metric.key)) for metric in MATRIX_METRICS])
    console.print(summary)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdl compare", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    parser.add_argument("--names", nargs="+", help="display names, one per run")
    args = parser.parse_args(argv)
    compare(args.runs, args.names)
