"""Deployment report: teacher vs student, as checkpoint and as exported artefacts (``cdl export``): parameters, file
size, batch-1 latency and batch-``--batch`` throughput on CPU or CUDA.

    # two trained runs (run folders or checkpoint files)
    python benchmarks/deploy.py --teacher runs/cifar100/coda/vit_b --student runs/cifar100/coda/b_to_s/version_0
    # random-weight models of real size (no trained checkpoint needed), e.g. on the GPU machine
    python benchmarks/deploy.py --random vit_base/vit_small --device cuda
    # tiny models (demo widths 96/48, 32 px) on CPU
    python benchmarks/deploy.py --random tiny --device cpu

Rows, per side (teacher, student):
* ``checkpoint``: the model rebuilt from its checkpoint (`PromptLearner.load_for_inference`, no teacher) and called as
  the library does, ``model(images)`` under ``no_grad`` (on CUDA through its CUDA graphs, ``cuda_graphs`` default).
  Its file is the training checkpoint, which holds the trainable state (and optimizer state for a real run) but *not*
  the frozen backbone, which is rebuilt from its timm name / weights file.
* ``pt2``: the `torch.export` program of the inference forward (``ExportedProgram.module()``), exported on the
  benchmark device; the file holds every weight.
* ``onnx``: the ONNX export (opset 18) run by onnxruntime (CUDA execution provider on CUDA if onnxruntime has it, else
  the row says why it was skipped).
All in fp32, eval mode, inputs random ``[0, 1]`` images at the model's size. After ``--warmup`` calls of each size,
``--steps`` rounds, each calling every row once at batch 1 and once at ``--batch`` (interleaved, so a shared machine's
load affects all rows alike), every call synchronised and timed alone: latency = the median batch-1 time,
throughput = ``--batch`` / the median batch time. ``--random``: a CODA-Prompt teacher (pool 100, length 8,
layers 0-4) and a KDP student with CODA-Prompt, 10 tasks x 10 classes (``tiny``: pool 30, layers 0-3, 5 tasks x 4
classes), random weights, written as checkpoints (no optimizer state) and read back.
Prints the machine, one JSON line per row and a Markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from cdl_lightning.export import export_onnx, export_pt2, onnxruntime_available
from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.models.inference import InferenceGraph, resolve_checkpoint
from cdl_lightning.nn import KDP, BackboneConfig, CodaPrompt

RANDOM_BACKBONES = {
    "tiny_l": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=3)),
    "tiny": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=48, depth=4, num_heads=3)),
    "vit_small": ("vit_small_patch16_224.augreg_in21k_ft_in1k", None),
    "vit_base": ("vit_base_patch16_224.augreg_in21k_ft_in1k", None),
    "vit_large": ("vit_large_patch16_224.augreg_in21k_ft_in1k", None),
}
"""``--random`` backbones (random weights); ``tiny`` as a pair means ``tiny_l/tiny`` (the demo's widths 96 / 48)."""


@dataclass
class Row:
    side: str
    form: str
    model: str
    parameters: int
    file_mib: float | None = None
    latency_ms: float | None = None
    img_per_s: float | None = None
    batch: int = 64
    device: str = "cpu"
    note: str = ""


def random_checkpoint(side: str, key: str, directory: Path) -> Path:
    """A random-weight CODA teacher (``side='teacher'``) or KDP student with CODA, saved as a checkpoint."""
    name, kwargs = RANDOM_BACKBONES[key]
    tiny = kwargs is not None
    backbone = BackboneConfig(name=name, model_kwargs=kwargs)
    prompt = functools.partial(CodaPrompt, pool_size=30 if tiny else 100, length=8,
                               layers=(0, 1, 2, 3) if tiny else (0, 1, 2, 3, 4))
    task_sizes = [4] * 5 if tiny else [10] * 10
    if side == "teacher":
        model: PromptLearner = PromptLearner(backbone=backbone, prompt=prompt, task_sizes=task_sizes)
    else:
        model = Distiller(method=KDP(), inference_only=True, backbone=backbone, prompt=prompt, task_sizes=task_sizes)
    model.opened_task = len(task_sizes) - 1  # as after the last task: logits over every class
    checkpoint = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    model.on_save_checkpoint(checkpoint)  # drops the frozen backbone, adds the task bookkeeping
    path = directory / f"{side}.ckpt"
    torch.save(checkpoint, path)
    return path


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Runner:
    """One thing to time: ``call`` on a batch-1 input ``one`` and a ``--batch`` input ``many``; fills ``row``."""

    row: Row
    call: Callable[[Tensor], object]
    one: Tensor
    many: Tensor
    device: torch.device


def measure_all(runners: list[Runner], warmup: int, steps: int) -> None:
    """Time every runner, interleaved (round ``i`` calls each runner once per size), so a shared machine's load
    drifts over all rows alike: latency = median batch-1 time (ms), throughput = batch / median batch time."""
    with torch.no_grad():
        for runner in runners:
            for _ in range(warmup):
                runner.call(runner.one)
                runner.call(runner.many)
            synchronize(runner.device)
        times: dict[int, tuple[list[float], list[float]]] = {id(r): ([], []) for r in runners}
        for _ in range(steps):
            for runner in runners:
                for images, record in zip((runner.one, runner.many), times[id(runner)]):
                    start = time.perf_counter()
                    runner.call(images)
                    synchronize(runner.device)
                    record.append(time.perf_counter() - start)
    for runner in runners:
        latencies, batch_times = times[id(runner)]
        runner.row.latency_ms = 1000 * statistics.median(latencies)
        runner.row.img_per_s = runner.many.shape[0] / statistics.median(batch_times)


def prepare_side(side: str, checkpoint: Path, args: argparse.Namespace, device: torch.device, out: Path
                 ) -> tuple[list[Runner], list[Row]]:
    """The runners of one side (checkpoint model, exported program, ONNX session) and rows of what was skipped."""
    model = PromptLearner.load_for_inference(checkpoint, map_location=device)
    graph = InferenceGraph(model).eval()
    params = sum(p.numel() for p in graph.parameters())
    vit = model.classifier.backbone
    label = f"{type(model).__name__} {model.backbone_config.name} (width {vit.embed_dim}, depth {vit.depth})"
    height, width = graph.input_size
    generator = torch.Generator().manual_seed(0)

    def make(batch: int, on: torch.device = device) -> Tensor:
        return torch.rand(batch, 3, height, width, generator=generator).to(on)

    base = dict(side=side, model=label, parameters=params, batch=args.batch, device=str(device))
    runners, skipped = [], []
    if "checkpoint" in args.forms:
        row = Row(form="checkpoint", file_mib=checkpoint.stat().st_size / 2**20,
                  note="file: trainable state only (backbone rebuilt)", **base)
        runners.append(Runner(row, model, make(1), make(args.batch), device))
    if "pt2" in args.forms:
        path = out / f"{side}.pt2"
        with torch.no_grad():
            export_pt2(graph, path, make(2))
        module = torch.export.load(str(path)).module()
        row = Row(form="pt2", file_mib=path.stat().st_size / 2**20, note="torch.export", **base)
        runners.append(Runner(row, module, make(1), make(args.batch), device))
    if "onnx" in args.forms:
        runner = prepare_onnx(side, graph, make, args, device, out, base)
        (runners if isinstance(runner, Runner) else skipped).append(runner)
    return runners, skipped


def prepare_onnx(side: str, graph: InferenceGraph, make: Callable, args: argparse.Namespace, device: torch.device,
                 out: Path, base: dict) -> Runner | Row:
    if not onnxruntime_available():
        return Row(form="onnx", note="not run: onnxruntime is not installed", **base)
    import onnxruntime

    providers = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return Row(form="onnx", note="not run: this onnxruntime has no CUDA execution provider", **base)
        providers.insert(0, "CUDAExecutionProvider")
    path = out / f"{side}.onnx"
    cpu = torch.device("cpu")
    try:
        with torch.no_grad():
            export_onnx(graph.to(cpu), path, make(2, cpu))
    except ImportError as err:
        return Row(form="onnx", note=f"not run: {err}", **base)
    finally:
        graph.to(device)
    options = onnxruntime.SessionOptions()
    if device.type == "cpu":
        options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=providers)

    def call(images: Tensor) -> object:
        return session.run(["logits"], {"images": images.numpy()})

    row = Row(form="onnx", file_mib=path.stat().st_size / 2**20,
              note=f"onnxruntime {onnxruntime.__version__} {providers[0]}", **base)
    return Runner(row, call, make(1, cpu), make(args.batch, cpu), cpu)


def emit(row: Row) -> None:
    print(json.dumps({"bench": "cdl-deploy", **asdict(row)}), flush=True)


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def print_table(rows: list[Row], device: torch.device) -> None:
    print(f"\nmachine: {machine(device)}; fp32, batch-1 latency = median, throughput at batch {rows[0].batch}\n")
    print("| side | form | model | parameters | file MiB | batch-1 latency ms | img/s | note |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        size = f"{r.file_mib:.2f}" if r.file_mib is not None else "-"
        latency = f"{r.latency_ms:.2f}" if r.latency_ms is not None else "-"
        speed = f"{r.img_per_s:,.0f}" if r.img_per_s is not None else "-"
        print(f"| {r.side} | {r.form} | {r.model} | {r.parameters / 1e6:.2f} M | {size} | {latency} | {speed} | "
              f"{r.note} |")


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", help="teacher run folder or checkpoint")
    parser.add_argument("--student", help="student run folder or checkpoint")
    parser.add_argument("--random", help="TEACHER/STUDENT random backbones instead of runs, from "
                        f"{sorted(RANDOM_BACKBONES)} (e.g. vit_base/vit_small), or 'tiny' (= tiny_l/tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    forms = ["checkpoint", "pt2", "onnx"]
    parser.add_argument("--forms", nargs="+", choices=forms, default=forms, help="what to measure (default: all)")
    parser.add_argument("--batch", type=int, default=64, help="throughput batch size")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's)")
    parser.add_argument("--out", help="folder for the exported files (default: a temporary folder)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if (args.random is None) == (args.teacher is None and args.student is None):
        parser.error("give --teacher/--student run folders or --random TEACHER/STUDENT")
    warnings.filterwarnings("ignore")
    print(f"# {machine(device)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        out.mkdir(parents=True, exist_ok=True)
        if args.random:
            pair = "tiny_l/tiny" if args.random == "tiny" else args.random
            keys = pair.split("/")
            if len(keys) != 2 or any(k not in RANDOM_BACKBONES for k in keys):
                parser.error(f"--random wants TEACHER/STUDENT from {sorted(RANDOM_BACKBONES)}, got {args.random!r}")
            sides = {side: random_checkpoint(side, key, out) for side, key in zip(("teacher", "student"), keys)}
        else:
            sides = {side: resolve_checkpoint(path) for side, path in (("teacher", args.teacher),
                                                                        ("student", args.student)) if path}
        runners, rows = [], []
        for side, ckpt in sides.items():
            side_runners, skipped = prepare_side(side, ckpt, args, device, out)
            runners += side_runners
            rows += skipped
        measure_all(runners, args.warmup, args.steps)
    order = {(side, form): i for i, (side, form) in enumerate(
        (side, form) for side in ("teacher", "student") for form in ("checkpoint", "pt2", "onnx"))}
    rows = sorted([r.row for r in runners] + rows, key=lambda r: order[(r.side, r.form)])
    for row in rows:
        emit(row)
    print_table(rows, device)
    return rows


if __name__ == "__main__":
    main()
