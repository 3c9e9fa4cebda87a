"""Project a measured real run (`e2e.py --json`) to the paper's protocol: 10 tasks x 20 epochs per task.

A `e2e.py` run of ``E`` epochs per task measured its phases: ``startup`` (process start to the first training batch),
``train``, ``validation`` (once per task, at its end), ``checkpoint`` (one save per epoch by default) and ``other``.
With ``P`` epochs per task instead, on the same data and tasks, ``startup`` and ``validation`` happen as often as
before, and everything else happens ``P / E`` times as often:

    projected = startup + validation + (train + checkpoint + other) * P / E

This overestimates: one-off costs of the run's first batches (compilation, the first graph captures) are scaled with
the rest. ``--steady`` prints the same with the training at the run's steady rate (each epoch's batches after its
first 5), which a long epoch converges to: an underestimate. ``--epoch-starts`` (runs of >= 2 epochs per task by an
`e2e.py` that records epochs) counts each epoch's start cost as often as the protocol has that kind of epoch: with
``T`` tasks, images ``N * P / E`` at the steady rate ``r``, plus what the measured first batches cost beyond it,

    train = N * P / E / r + first + (T - 1) * task_first + T * (P - 1) * later

(``first``: the run's first epoch; ``task_first``: the mean over the other tasks' first epochs; ``later``: the mean
over the other epochs). Every input is a measurement; the script computes, it does not measure.

    python benchmarks/projection.py TEACHER.json STUDENT.json            # the two stages of a CDL run
    python benchmarks/projection.py RUN.json --epochs-per-task 20 --goal-minutes 15
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

PAPER_EPOCHS_PER_TASK = 20


def project(result: dict[str, Any], epochs_per_task: int, steady: bool = False,
            epoch_starts: bool = False) -> dict[str, float]:
    """The phases of ``result`` (an `e2e.py` JSON) projected to ``epochs_per_task``; ``steady``: train at the
    run's steady rate; ``epoch_starts``: at the steady rate plus each epoch's measured start cost (module docstring).
    Returns seconds per phase, ``wall`` and ``train_fraction``."""
    seconds, measured = result["seconds"], result["args"]["epochs_per_task"]
    if measured < 1:
        raise ValueError(f"the run's epochs_per_task is {measured}; expected a measured run of at least one epoch")
    scale = epochs_per_task / measured
    train = seconds["train"] * scale
    if steady or epoch_starts:
        if not (result.get("steady") or {}).get("img_per_s"):
            raise ValueError("this run has no steady rate (e2e.py measures it from each epoch's batches after its "
                             "first 5); project without --steady / --epoch-starts")
        # (rank 0's images at its steady rate: `steady.img_per_s` counts every rank)
        train = result["train_images"] * result.get("world_size", 1) / result["steady"]["img_per_s"] * scale
    if epoch_starts:
        starts = result.get("epoch_starts")
        if not starts:
            raise ValueError("this run has no per-epoch record (an e2e.py from before 2026-12-08); project without "
                             "--epoch-starts")
        tasks = result["args"]["num_tasks"]
        if epochs_per_task > 1 and not starts["later_n"]:
            raise ValueError(f"a run of {measured} epoch(s) per task has no later epochs to measure their start by; "
                             "run e2e.py with --epochs-per-task 2 or more")
        if tasks > 1 and not starts["task_first_n"]:
            raise ValueError("the run has no second task to measure a task's first epoch by")
        train += (starts["run_first_s"] + (tasks - 1) * (starts["task_first_s"] or 0.0)
                  + tasks * (epochs_per_task - 1) * (starts["later_s"] or 0.0))
    out = {
        "startup": seconds["startup"],
        "validation": seconds["validation"],
        "train": train,
        "checkpoint": seconds["checkpoint"] * scale,
        "other": seconds["other"] * scale,
    }
    out["wall"] = sum(out.values())
    out["train_fraction"] = out["train"] / out["wall"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="e2e.py --json outputs, one per stage (teacher, student)")
    parser.add_argument("--epochs-per-task", type=int, default=PAPER_EPOCHS_PER_TASK)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--steady", action="store_true", help="train at each run's steady rate")
    mode.add_argument("--epoch-starts", action="store_true", help="train at the steady rate plus each epoch's "
                      "measured start cost, counted per kind of epoch (see above)")
    parser.add_argument("--goal-minutes", type=float, default=15.0, help="compare the total with this")
    args = parser.parse_args(argv)
    if args.epochs_per_task < 1:
        parser.error(f"--epochs-per-task must be >= 1, got {args.epochs_per_task}")
    stages = []
    for path in args.runs:
        if not path.is_file():
            parser.error(f"{path} does not exist: pass the JSON files e2e.py wrote with --json")
        result = json.loads(path.read_text())
        if result.get("bench", "cdl-e2e") != "cdl-e2e" or "seconds" not in result:
            parser.error(f"{path} is not an e2e.py result (no 'seconds' phases)")
        try:
            projected = project(result, args.epochs_per_task, args.steady, args.epoch_starts)
        except ValueError as error:
            parser.error(f"{path}: {error}")
        stages.append({"run": str(path), "model": result["args"].get("model"), "gpu": result.get("gpu"),
                       "measured_epochs_per_task": result["args"]["epochs_per_task"], **projected})
    total = sum(stage["wall"] for stage in stages)
    rate = ("steady train rate" if args.steady else "steady train rate + measured epoch starts" if args.epoch_starts
            else "measured train rate")
    print(f"projected to {args.epochs_per_task} epochs per task ({rate}):")
    print(f"{'run':10} {'from':>5} {'startup':>8} {'train':>8} {'valid.':>7} {'ckpt':>7} {'other':>7} {'wall s':>8} "
          f"{'train %':>8}  gpu")
    for stage in stages:
        print(f"{str(stage['model']):10} {stage['measured_epochs_per_task']:>3} ep {stage['startup']:8.1f} "
              f"{stage['train']:8.1f} {stage['validation']:7.1f} {stage['checkpoint']:7.1f} {stage['other']:7.1f} "
              f"{stage['wall']:8.1f} {100 * stage['train_fraction']:7.1f}%  {stage['gpu']}")
    verdict = "under" if total / 60 < args.goal_minutes else "over"
    print(f"total {total:.1f} s = {total / 60:.2f} min ({verdict} the {args.goal_minutes:g}-minute goal)")
    summary = {"bench": "cdl-projection", "epochs_per_task": args.epochs_per_task, "steady": args.steady,
               "epoch_starts": args.epoch_starts,
               "stages": stages, "total_s": total, "goal_minutes": args.goal_minutes}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
