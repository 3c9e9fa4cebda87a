"""Adam's state in a CODA-Prompt learner's checkpoint: bytes and ``torch.save`` / ``torch.load`` time, plain vs packed
as nonzero rows (`cdl_lightning.models.optimizer_state`).

How: `throughput.learner` builds the ViT-B/16 CODA-Prompt learner (pool 100, length 8, layers 0-4, 10 tasks of 10
classes) with random weights on the device; tasks ``0..--task`` are opened (each earlier one snapshotted, as at its
end), then ``--steps`` real training steps of task ``--task`` run on one random batch with that task's labels
(``training_step``, backward, Adam from ``configure_optimizers``). A checkpoint-like dict (the trainable state, Adam's
state, the packed snapshots, as `PromptLearner.on_save_checkpoint` writes them) is saved to a file ``--repeats``
times with Adam's state plain and packed (packing timed with the save), then loaded back (unpacking timed with the
load); medians are printed, and the packed state is checked to unpack bitwise. ``--tiny``: the tiny ViT of
``throughput.py --tiny`` (a smoke test; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import throughput as tp
import torch

from cdl_lightning.models.optimizer_state import pack_optimizer_states, unpack_optimizer_states
from cdl_lightning.models.snapshots import PACKED_KEY, pack_snapshots


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensor data in a nest of dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (dict, list, tuple)):
        return sum(tensor_bytes(item) for item in (obj.values() if isinstance(obj, dict) else obj))
    return 0


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def same_bits(a: dict, b: dict) -> bool:
    return all(torch.equal(a[i][k].reshape(-1).view(torch.uint8), v.reshape(-1).view(torch.uint8))
               for i, per_param in b.items() for k, v in per_param.items())


def trained_learner(task: int, steps: int, batch: int, s: tp.Settings) -> tuple[Any, torch.optim.Optimizer]:
    """The learner at task ``task`` after ``steps`` Adam steps on one random batch of that task's classes."""
    torch.manual_seed(0)
    model = tp.prepare(tp.learner("B", "B", s), s)  # task 0 opened
    for t in range(1, task + 1):
        model.open_task(t)  # snapshots task t - 1, draws task t's CODA slice
    optimizer = model.configure_optimizers()["optimizer"]
    start, stop = model.task_range(task)
    images = tp.synthetic_batch(batch, s)[0]
    targets = torch.randint(start, stop, (batch,), device=s.device)
    model.train()
    for i in range(steps):
        loss = model.training_step((images, targets, torch.full_like(targets, task)), i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model, optimizer


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", type=int, default=5, help="the task being trained (0-9)")
    parser.add_argument("--steps", type=int, default=3, help="Adam steps on that task")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="saves and loads timed per format (median)")
    parser.add_argument("--tiny", action="store_true", help="tiny ViT (smoke test)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="folder of the checkpoint files (default: a temporary one)")
    args = parser.parse_args(argv)
    s = tp.Settings(torch.device(args.device), args.tiny, warmup=0, steps=0, compile=False, cuda_graphs=False)
    model, optimizer = trained_learner(args.task, args.steps, args.batch, s)
    base = {"state_dict": model.trainable_state(), "cdl": {PACKED_KEY: pack_snapshots(model.task_snapshots)}}
    plain_states = [optimizer.state_dict()]
    packed_states = pack_optimizer_states(plain_states)
    assert same_bits(unpack_optimizer_states(packed_states)[0]["state"], plain_states[0]["state"])
    with tempfile.TemporaryDirectory() as scratch:
        folder = args.out or scratch
        plain_file, packed_file = os.path.join(folder, "plain.ckpt"), os.path.join(folder, "packed.ckpt")
        save_plain = median_seconds(lambda: torch.save({**base, "optimizer_states": plain_states}, plain_file),
                                    args.repeats)
        save_packed = median_seconds(lambda: torch.save(
            {**base, "optimizer_states": pack_optimizer_states(plain_states)}, packed_file), args.repeats)
        pack = median_seconds(lambda: pack_optimizer_states(plain_states), args.repeats)
        load_plain = median_seconds(lambda: torch.load(plain_file, weights_only=True), args.repeats)
        load_packed = median_seconds(lambda: unpack_optimizer_states(
            torch.load(packed_file, weights_only=True)["optimizer_states"]), args.repeats)
        sizes = os.path.getsize(plain_file), os.path.getsize(packed_file)
    result = {
        "bench": "cdl-checkpoint-size", "model": "tiny" if args.tiny else "ViT-B/16 CODA pool 100",
        "task": args.task, "steps": args.steps, "device": str(s.device), "cpu": cpu_name(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "adam_state_mb": {"plain": tensor_bytes(plain_states) / 1e6, "packed": tensor_bytes(packed_states) / 1e6},
        "file_mb": {"plain": sizes[0] / 1e6, "packed": sizes[1] / 1e6},
        "save_s": {"plain": save_plain, "packed (pack included)": save_packed, "pack alone": pack},
        "load_s": {"plain": load_plain, "packed (unpack included)": load_packed},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
