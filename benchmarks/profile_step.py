"""Where the time of one training step goes: torch.profiler over a few steps of a CODA learner or KDP distiller.

Prints, per step: wall-clock ms, GPU busy ms (sum of kernel times) and the number of kernels launched, then the top
operators by self CUDA time and by self CPU time. If GPU busy time is far below wall time the step is bound by the
CPU (Python and kernel-launch overhead), not by the GPU.

    python benchmarks/profile_step.py --case train-learner --arch S --precision bf16
    python benchmarks/profile_step.py --case train-distill --precision bf16
    python benchmarks/profile_step.py --tiny          # CPU smoke test of this script
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402  (the same model builders as the throughput benchmark)

from cdl_lightning.models import Distiller  # noqa: E402
from cdl_lightning.nn import KDP  # noqa: E402


def build(args: argparse.Namespace, s: tp.Settings, directory: str):
    if args.case == "train-learner":
        return tp.prepare(tp.learner(args.arch, args.arch, s), s)
    checkpoint = tp.write_teacher_checkpoint("B", "S", "own", directory, s)
    model = Distiller(method=KDP(), teacher_checkpoint=checkpoint, backbone=tp.backbone("S", s), prompt=tp.coda(s),
                      task_sizes=tp.TASK_SIZES, epochs_per_task=1)
    return tp.prepare(model, s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=("train-learner", "train-distill"), default="train-learner")
    parser.add_argument("--arch", choices=("S", "B", "L"), default="S")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--fp32-frozen-weights", action="store_true", help="cast_frozen_weights=False")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="cuda_graphs=False")
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    s = tp.Settings(device=device, tiny=args.tiny, warmup=3, steps=args.steps, compile=args.compile,
                    cast_weights=not args.fp32_frozen_weights, cuda_graphs=not args.no_cuda_graphs)
    with tempfile.TemporaryDirectory() as directory:
        model = build(args, s, directory)
        step = tp.train_step(model, tp.synthetic_batch(args.batch, s), args.precision, s)
        for i in range(s.warmup):
            step(i)
        tp.sync(s)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for i in range(args.steps):
                step(i)
            tp.sync(s)
            wall = (time.perf_counter() - start) * 1e3 / args.steps
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events) if device.type == "cuda" else 0.0
    kernels = sum(e.count for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    print(f"case={args.case} arch={args.arch} precision={args.precision} batch={args.batch} device={device} "
          f"compile={args.compile} cast_frozen_weights={s.cast_weights} cuda_graphs={s.cuda_graphs}")
    print(f"per step: wall {wall:.2f} ms (under the profiler), GPU busy {gpu_us / 1e3 / args.steps:.2f} ms, "
          f"{kernels / args.steps:.0f} kernels")
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=sort, row_limit=15, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
