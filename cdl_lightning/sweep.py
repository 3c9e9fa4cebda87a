"""``cdl sweep SWEEP.yaml``: a grid of CDL runs (learners x methods x seeds) and the paper-style table.

A sweep file names, per learner, a teacher config and a student config, the distillation methods (each a config
added to the student's, e.g. ``configs/methods/kdp.yaml``) and the seeds. Each teacher runs once per (learner, seed)
and every student of that learner and seed distils from it. Runs go to ``OUT/LEARNER/seedS/teacher`` and
``OUT/LEARNER/seedS/METHOD``; every run is ``cdl fit`` in a subprocess with its exact command recorded.

- Resumable: a run whose ``metrics.json`` has its last task's row (``final.task == num_tasks - 1``) is finished and
  skipped; an unfinished run with a ``checkpoints/last.ckpt`` resumes from it (``--ckpt_path``). Kill the sweep and
  run the same command again.
- Parallel: ``--gpus 0,1,2,3`` runs one run per GPU (``CUDA_VISIBLE_DEVICES``; an id listed twice runs two runs at
  once on that GPU; ``--runs-per-gpu N`` runs N on each listed GPU); without it, one run at a time.
- Slices: ``--seeds 1,2`` and ``--learners coda`` run part of the same grid (the same run folders).
- Time limits: ``--stop-after SECONDS`` starts no run after that long (the runs in flight finish), prints what is
  left and exits with status 3, so a time-limited job (a SLURM allocation, a lent GPU) stops between runs instead of
  killing one mid-way; the same command continues.
- Output: ``OUT/runs.csv`` and ``OUT/runs.json`` (every run: learner, method, seed, status, final average accuracy,
  forgetting, wall time, command) and ``OUT/table.md`` (mean ± std over seeds of final average accuracy and
  forgetting, learner x method, the teacher as the first column; with several seeds, each method's difference to
  ``none`` and KDP's to KD, marked as beyond the seeds' spread or not), updated after every run, printed at the end.

The sweep file (paths relative to the working directory, like every path in the configs)::

    out: runs/sweeps/cifar100
    seeds: [0, 1, 2]
    learners:
      coda: {teacher: configs/cifar100/coda/vit_b.yaml, student: configs/cifar100/coda/b_to_s.yaml}
    methods: [none, kd, kdp]            # configs/methods/NAME.yaml, or a mapping {name: config path}
    methods_dir: configs/methods        # where bare method names are looked up (default)
    overrides: []                       # CLI arguments added to every run (e.g. [--trainer.precision, bf16-mixed])
    teacher_overrides: []               # ... to the teacher runs only
    student_overrides: []               # ... to the student runs only
    seed_args: [--seed_everything, --data.seed]   # each gets the run's seed

``cdl sweep SWEEP.yaml --dry-run`` prints the commands without running them; ``--table-only`` rewrites the table
from the runs on disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cdl_lightning.compare import load_metrics

__all__ = ["SweepRun", "load_sweep", "plan", "run_finished", "run_sweep", "summarise", "main"]

NOT_STARTED = "not started (--stop-after)"
"""Status of a run that ``--stop-after`` kept from starting (a later call of the same command runs it)."""
_KEYS = {"out", "seeds", "learners", "methods", "methods_dir", "overrides", "teacher_overrides", "student_overrides",
         "seed_args"}


@dataclass
class SweepRun:
    """One ``cdl fit`` of the grid.

    Attributes:
        learner: Learner name (key of ``learners``).
        method: ``"teacher"`` for the teacher run, else the method name.
        seed: The run's seed.
        run_dir: Its log folder (``metrics.json``, ``checkpoints/last.ckpt``).
        args: ``cdl`` arguments (after ``cdl``), without any ``--ckpt_path``.
        depends_on: Run folder of the teacher a student needs finished first (``None`` for teachers).
        diagonal: Mean of the diagonal ``R[t, t]`` (accuracy on a task right after training it), in %.
        diagonal_vs_chance: Smallest ``R[t, t] / chance_t`` over the tasks, with ``chance_t = 100 / (classes seen
            after task t)`` (class-incremental: a prediction picks among every class seen so far); ``NaN`` when
            ``metrics.json`` has no ``task_sizes``.
    """

    learner: str
    method: str
    seed: int
    run_dir: str
    args: list[str]
    depends_on: str | None = None
    status: str = "pending"
    avg_acc: float = math.nan
    forgetting: float = math.nan
    diagonal: float = math.nan
    diagonal_vs_chance: float = math.nan
    wall_s: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def command(self) -> str:
        """The shell command that (re)produces this run from the working directory."""
        return shlex.join(["cdl", *self.args])


def _list(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError(f"sweep: {key} must be a list of CLI arguments, got {value!r}")
    return [str(v) for v in value]


def load_sweep(path: str) -> dict[str, Any]:
    """Read and check a sweep file; raises ``ValueError`` naming the bad key (before any run starts)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"sweep file {path!r} does not exist")
    spec = yaml.safe_load(file.read_text()) or {}
    if not isinstance(spec, dict):
        raise ValueError(f"sweep file {path!r} must be a mapping with keys {sorted(_KEYS)}")
    unknown = set(spec) - _KEYS
    if unknown:
        raise ValueError(f"sweep file {path!r}: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
    for key in ("out", "seeds", "learners"):
        if key not in spec:
            raise ValueError(f"sweep file {path!r} lacks {key!r}")
    seeds = spec["seeds"]
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise ValueError(f"sweep: seeds must be a non-empty list of integers, got {seeds!r}")
    learners = spec["learners"]
    if not isinstance(learners, dict) or not learners:
        raise ValueError("sweep: learners must map a name to {teacher: CONFIG, student: CONFIG}")
    for name, entry in learners.items():
        if not isinstance(entry, dict) or not {"teacher", "student"} <= set(entry):
            raise ValueError(f"sweep: learner {name!r} needs a teacher and a student config, got {entry!r}")
        for role in ("teacher", "student"):
            for config in [entry[role]] if isinstance(entry[role], str) else entry[role]:
                if not Path(config).is_file():
                    raise FileNotFoundError(f"sweep: {role} config {config!r} of learner {name!r} does not exist "
                                            "(paths are relative to the working directory)")
    methods = spec.get("methods", ["none"])
    methods_dir = Path(spec.get("methods_dir", "configs/methods"))
    if isinstance(methods, list):
        methods = {str(m): str(methods_dir / f"{m}.yaml") for m in methods}
    if not isinstance(methods, dict) or not methods:
        raise ValueError(f"sweep: methods must be a list of names or a mapping name -> config, got {methods!r}")
    for name, config in methods.items():
        if name == "teacher":
            raise ValueError("sweep: 'teacher' is reserved for the teacher runs; rename that method")
        if not Path(config).is_file():
            raise FileNotFoundError(f"sweep: config {config!r} of method {name!r} does not exist")
    return {**spec, "methods": methods, "overrides": _list(spec.get("overrides"), "overrides"),
            "teacher_overrides": _list(spec.get("teacher_overrides"), "teacher_overrides"),
            "student_overrides": _list(spec.get("student_overrides"), "student_overrides"),
            "seed_args": _list(spec.get("seed_args", ["--seed_everything", "--data.seed"]), "seed_args")}


def _configs(value: str | list[str]) -> list[str]:
    return [a for c in ([value] if isinstance(value, str) else value) for a in ("--config", c)]


def _logger(run_dir: Path) -> list[str]:
    return ["--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger", "--trainer.logger.save_dir",
            str(run_dir.parent), "--trainer.logger.name", run_dir.name, "--trainer.logger.version", ""]


def plan(spec: dict[str, Any]) -> list[SweepRun]:
    """Every run of the sweep, teachers first; students point ``teacher_checkpoint`` at their teacher's last.ckpt."""
    out = Path(spec["out"])
    runs: list[SweepRun] = []
    for learner, entry in spec["learners"].items():
        for seed in spec["seeds"]:
            base = out / learner / f"seed{seed}"
            seeding = [a for key in spec["seed_args"] for a in (key, str(seed))]
            teacher_dir = base / "teacher"
            runs.append(SweepRun(learner, "teacher", seed, str(teacher_dir), [
                "fit", *_configs(entry["teacher"]), *spec["overrides"], *spec["teacher_overrides"], *seeding,
                *_logger(teacher_dir)]))
            for method, config in spec["methods"].items():
                run_dir = base / method
                runs.append(SweepRun(learner, method, seed, str(run_dir), [
                    "fit", *_configs(entry["student"]), "--config", config, *spec["overrides"],
                    *spec["student_overrides"], *seeding, *_logger(run_dir),
                    "--model.init_args.teacher_checkpoint", str(teacher_dir / "checkpoints" / "last.ckpt")],
                    depends_on=str(teacher_dir)))
    return runs


def _metrics(run_dir: str) -> dict[str, Any] | None:
    """The run's ``metrics.json``, or ``None`` when it has none (yet) or it does not parse."""
    try:
        return load_metrics(run_dir)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _finished(metrics: dict[str, Any] | None) -> bool:
    return metrics is not None and metrics.get("final", {}).get("task") == metrics.get("num_tasks", 0) - 1


def run_finished(run_dir: str) -> bool:
    """True when the run's ``metrics.json`` holds its last task's row."""
    return _finished(_metrics(run_dir))


def diagonal_summary(metrics: dict[str, Any]) -> tuple[float, float]:
    """``(mean diagonal in %, smallest diagonal / chance)`` of a finished run's ``metrics.json`` (see `SweepRun`)."""
    matrix = metrics["accuracy_matrix"]
    diagonal = [math.nan if matrix[t][t] is None else float(matrix[t][t]) for t in range(len(matrix))]
    sizes = metrics.get("task_sizes")
    ratio = math.nan
    if sizes and len(sizes) == len(diagonal):
        seen = [sum(sizes[: t + 1]) for t in range(len(sizes))]
        ratio = _nan_min(value * classes / 100.0 for value, classes in zip(diagonal, seen))
    return _mean_std(diagonal)[0], ratio


def _nan_min(values: Any) -> float:
    """The smallest value that is not NaN (NaN when there is none)."""
    return min((v for v in values if not math.isnan(v)), default=math.nan)


def _read_result(run: SweepRun) -> None:
    metrics = _metrics(run.run_dir)
    if _finished(metrics):
        final = metrics["final"]
        run.avg_acc, run.forgetting = float(final["avg_acc"]), float(final["forgetting"])
        run.diagonal, run.diagonal_vs_chance = diagonal_summary(metrics)
        if run.status == "pending":  # (--table-only: nothing ran in this process)
            run.status = "done"
    elif run.status == "pending" and metrics is not None:
        run.status = f"unfinished ({metrics.get('status', 'partial')})"
    marker = Path(run.run_dir) / "sweep_run.json"
    if marker.is_file():
        run.wall_s = json.loads(marker.read_text()).get("wall_s", math.nan)


def _execute(run: SweepRun, device: str | None) -> None:
    """Run (or resume) one run in a subprocess; its output goes to ``RUN_DIR/sweep.log``."""
    run_dir = Path(run.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    args = list(run.args)
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        args += ["--ckpt_path", str(last)]
        run.status = "resumed"
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    start = time.perf_counter()
    with open(run_dir / "sweep.log", "a") as log:
        log.write(f"$ {shlex.join(['cdl', *args])}\n")
        log.flush()
        code = subprocess.call([sys.executable, "-m", "cdl_lightning.cli", *args], stdout=log, stderr=subprocess.STDOUT,
                               env=env)
    wall = time.perf_counter() - start
    if code != 0 or not run_finished(run.run_dir):
        run.status = f"failed (exit {code}, see {run_dir / 'sweep.log'})"
        return
    run.status = "done" if run.status != "resumed" else "resumed, done"
    previous = json.loads((run_dir / "sweep_run.json").read_text()) if (run_dir / "sweep_run.json").is_file() else {}
    run.wall_s = wall + float(previous.get("wall_s", 0.0))
    (run_dir / "sweep_run.json").write_text(json.dumps({"command": run.command, "wall_s": run.wall_s,
                                                        "device": device, "resumed_with": args[len(run.args):]}))


def run_sweep(spec: dict[str, Any], gpus: list[str] | None = None, dry_run: bool = False,
              echo: Any = print, stop_after: float | None = None) -> list[SweepRun]:
    """Run every unfinished run of ``spec``, ``len(gpus)`` at a time (one per GPU) or one at a time; a student waits
    for its teacher. ``stop_after`` (seconds): start no run after that much time (the runs in flight finish; the others
    keep status ``"not started (--stop-after)"`` for a later call). Returns all runs with their status and results."""
    runs = plan(spec)
    todo: list[SweepRun] = []
    for run in runs:
        if run_finished(run.run_dir):
            run.status = "skipped (finished)"
        else:
            todo.append(run)
    if dry_run:
        for run in todo:
            echo(run.command)
        return runs
    slots = list(gpus) if gpus else [None]
    free, lock, wake, report = list(slots), threading.Lock(), threading.Event(), threading.Lock()
    running: dict[str, threading.Thread] = {}

    def work(run: SweepRun, device: str | None) -> None:
        try:
            _execute(run, device)
            with report:  # the table and runs.csv/json follow the sweep: a killed sweep leaves them current
                summarise(spec, runs)
        finally:
            with lock:
                free.append(device)
                running.pop(run.run_dir, None)
            wake.set()

    pending = list(todo)
    started = time.perf_counter()
    while pending or running:
        with lock:
            if stop_after is not None and pending and time.perf_counter() - started > stop_after:
                for run in pending:
                    run.status = NOT_STARTED
                echo(f"[sweep] --stop-after {stop_after:g} s reached: {len(pending)} runs not started")
                pending.clear()
            for run in list(pending):
                if not free:
                    break
                teacher_ok = run.depends_on is None or run_finished(run.depends_on)
                teacher_failed = run.depends_on is not None and any(
                    r.run_dir == run.depends_on and r.status.startswith("failed") for r in runs)
                if teacher_failed:
                    run.status = "failed (its teacher failed)"
                    pending.remove(run)
                elif teacher_ok:
                    pending.remove(run)
                    device = free.pop(0)
                    echo(f"[sweep] {run.learner} {run.method} seed {run.seed}"
                         f"{f' on GPU {device}' if device is not None else ''}: {run.command}")
                    thread = threading.Thread(target=work, args=(run, device), daemon=True)
                    running[run.run_dir] = thread
                    thread.start()
            idle = pending and not running and not free
        if idle:
            raise RuntimeError("sweep: no run can start (internal scheduling error)")
        if pending or running:
            wake.wait(timeout=1.0)
            wake.clear()
    return runs


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def summarise(spec: dict[str, Any], runs: list[SweepRun]) -> dict[str, Any]:
    """Read every run's result from disk, write ``runs.csv``, ``runs.json`` and ``table.md`` under ``out``; return
    ``{"table": {learner: {method: {"avg_acc": [mean, std], "forgetting": [mean, std], "seeds": n}}}, "markdown"}``.

    Std is the sample standard deviation over the seeds that finished (0 for one seed)."""
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    for run in runs:
        _read_result(run)
    columns = ["teacher", *spec["methods"]]
    table: dict[str, dict[str, Any]] = {}
    for learner in spec["learners"]:
        table[learner] = {}
        for method in columns:
            chosen = [r for r in runs if r.learner == learner and r.method == method and not math.isnan(r.avg_acc)]
            table[learner][method] = {"avg_acc": list(_mean_std([r.avg_acc for r in chosen])),
                                      "forgetting": list(_mean_std([r.forgetting for r in chosen])),
                                      "diagonal": list(_mean_std([r.diagonal for r in chosen])),
                                      "diagonal_vs_chance": _nan_min(r.diagonal_vs_chance for r in chosen),
                                      "seeds": len(chosen)}

    def cell(entry: dict[str, Any], key: str) -> str:
        mean, std = entry[key]
        return "" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}" + (
            f" ({entry['seeds']}/{len(spec['seeds'])})" if entry["seeds"] < len(spec["seeds"]) else "")

    def diagonal(entry: dict[str, Any]) -> str:
        ratio = entry["diagonal_vs_chance"]
        return cell(entry, "diagonal") + ("" if math.isnan(ratio) else f" [{ratio:.1f}x]")

    def block(title: str, headers: list[str], row: Callable[[str], list[str]]) -> list[str]:
        """A titled markdown table, one row per learner."""
        return [title, "", "| learner | " + " | ".join(headers) + " |", "|---|" + "---|" * len(headers),
                *(f"| {learner} | " + " | ".join(row(learner)) + " |" for learner in table), ""]

    seeds = f"mean ± std over seeds {spec['seeds']}"
    lines = []
    for key, title in (("avg_acc", "Final average accuracy (%)"), ("forgetting", "Forgetting (%)")):
        lines += block(f"{title}, {seeds}", columns,
                       lambda learner, key=key: [cell(table[learner][m], key) for m in columns])
    lines += block("Mean diagonal accuracy (%, accuracy on each task right after learning it), mean ± std over seeds; "
                   "in brackets the smallest ratio of a diagonal entry to chance (100 / classes seen) over tasks and "
                   "seeds", columns, lambda learner: [diagonal(table[learner][m]) for m in columns])
    pairs = [(m, "none") for m in columns if m != "none" and "none" in columns]
    pairs += [("kdp", "kd")] if {"kdp", "kd"} <= set(columns) else []

    def difference(learner: str, a: str, b: str) -> str:
        (mean_a, std_a), (mean_b, std_b) = table[learner][a]["avg_acc"], table[learner][b]["avg_acc"]
        diff = mean_a - mean_b
        verdict = "yes" if abs(diff) > std_a + std_b else "within the spread"
        return "" if math.isnan(diff) else f"{diff:+.2f} ({verdict})"

    if pairs and len(spec["seeds"]) > 1:
        lines += block("Differences of final average accuracy (points); 'yes' when |difference| > the sum of the two "
                       "stds", [f"{a} - {b}" for a, b in pairs],
                       lambda learner: [difference(learner, a, b) for a, b in pairs])
    markdown = "\n".join(lines)
    (out / "table.md").write_text(markdown)
    records = [{"learner": r.learner, "method": r.method, "seed": r.seed, "status": r.status, "avg_acc": r.avg_acc,
                "forgetting": r.forgetting, "diagonal": r.diagonal, "diagonal_vs_chance": r.diagonal_vs_chance,
                "wall_s": r.wall_s, "run_dir": r.run_dir, "command": r.command}
               for r in runs]
    (out / "runs.json").write_text(json.dumps({"table": table, "runs": records}, indent=1))
    with open(out / "runs.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return {"table": table, "markdown": markdown, "runs": [asdict(r) for r in runs]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdl sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", help="sweep file (YAML)")
    parser.add_argument("--gpus", help="comma-separated GPU ids, one run per GPU (default: one run at a time)")
    parser.add_argument("--runs-per-gpu", type=int, default=1, metavar="N",
                        help="runs at a time on each GPU of --gpus (small models leave a GPU idle with one run)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands of the unfinished runs")
    parser.add_argument("--table-only", action="store_true", help="only rewrite the table from the runs on disk")
    parser.add_argument("--out", help="run folder root instead of the sweep file's `out` (e.g. gathered results)")
    parser.add_argument("--seeds", help="comma-separated seeds instead of the sweep file's (a slice of the same grid)")
    parser.add_argument("--learners", help="comma-separated learners of the sweep file to run (default: all)")
    parser.add_argument("--stop-after", type=float, metavar="SECONDS",
                        help="start no run after SECONDS (runs in flight finish): for a time-limited job; run the "
                             "same command again to continue (exit status 3 while runs are left)")
    args = parser.parse_args(argv)
    if args.stop_after is not None and args.stop_after < 0:
        parser.error(f"--stop-after needs SECONDS >= 0, got {args.stop_after:g}")
    spec = load_sweep(args.sweep)
    if args.out:
        spec["out"] = args.out
    if args.seeds:
        try:
            spec["seeds"] = [int(seed) for seed in args.seeds.split(",") if seed.strip()]
        except ValueError:
            parser.error(f"--seeds takes comma-separated integers, got {args.seeds!r}")
    if args.learners:
        keep = [name.strip() for name in args.learners.split(",") if name.strip()]
        unknown = sorted(set(keep) - set(spec["learners"]))
        if unknown:
            parser.error(f"--learners: {unknown} not in the sweep file's learners {sorted(spec['learners'])}")
        spec["learners"] = {name: spec["learners"][name] for name in keep}
    if args.runs_per_gpu < 1:
        parser.error(f"--runs-per-gpu needs N >= 1, got {args.runs_per_gpu}")
    if args.runs_per_gpu > 1 and not args.gpus:
        parser.error("--runs-per-gpu needs --gpus (the GPUs to put the runs on)")
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
    if gpus:
        gpus = gpus * args.runs_per_gpu  # 0,1 x 2 -> 0,1,0,1: the first runs spread over the GPUs
    start = time.perf_counter()
    runs = plan(spec) if args.table_only else run_sweep(spec, gpus, dry_run=args.dry_run, stop_after=args.stop_after)
    if args.dry_run:
        return
    result = summarise(spec, runs)
    print(result["markdown"])
    failed = [r for r in runs if r.status.startswith("failed")]
    print(f"[sweep] {len(runs)} runs ({sum(r.status.startswith('skipped') for r in runs)} skipped as finished, "
          f"{len(failed)} failed) in {time.perf_counter() - start:.0f} s; table: {Path(spec['out']) / 'table.md'}")
    for run in failed:
        print(f"[sweep] FAILED {run.learner} {run.method} seed {run.seed}: {run.status}")
    left = [r for r in runs if r.status == NOT_STARTED]
    if left:
        print(f"[sweep] {len(left)} runs not started (--stop-after); run the same command again to continue")
    if failed:
        raise SystemExit(1)
    if left:
        raise SystemExit(3)
