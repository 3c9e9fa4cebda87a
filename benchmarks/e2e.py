"""End-to-end speed of a real ``cdl fit``: where the wall time of a run goes, phase by phase.

Runs the real CLI (``cdl_lightning.cli.main``, in this process; under DDP `cdl_lightning.launch` starts each extra
rank as a plain ``cdl fit`` of the same options, without this script's timer) on an ``.npz`` pack, an image folder
or the built-in synthetic data, with a timing callback added to the
trainer. Rank 0 prints, per phase (the phases partition the wall time from process start to the end of ``fit``):

* ``startup``: process start (from ``/proc``) to the first training batch: imports, config, model and data building,
  trainer setup, the first loader;
* ``train``: from a training batch's start to the end of the epoch's batches (loading, steps, hooks, logging);
* ``validation``: the validation loops (evaluation, metrics, the table / heatmap the evaluation callback writes);
* ``checkpoint``: ``trainer.save_checkpoint`` calls (with ``--checkpoint.background true``: taking the copy and
  queueing it; the last write's wait lands in ``other``);
* ``other``: the rest (loaders rebuilt between epochs, epoch hooks, fit teardown).

Phase boundaries synchronise the GPU, so a phase holds the GPU work it launched; inside ``train`` the GPU is also
synchronised once per epoch, at the end of its ``STEADY_AFTER``-th batch. ``train`` also gives images per second (all
ranks) and, when a step rate is known, the fraction of it; ``steady`` gives the same for the training batches after
each epoch's first ``STEADY_AFTER`` (what a long epoch converges to: a task's first batches pay the graph captures of
its new shapes and snapshot, an epoch's first ones the loader's start). ``epochs`` records each epoch's train time and
images (and its steady part), ``epoch starts`` what each epoch's first batches cost beyond the steady rate: the run's
first epoch (compilation, first captures), the other tasks' first epochs, the later ones (`projection.py
--epoch-starts` projects with these). The step rate is either given
(``--step-rate``, e.g. from ``benchmarks/throughput.py``) or measured after the fit on rank 0 with throughput.py's
timing (``time_ms``: warm-up, then CUDA-event timed steps) on the fitted model itself (same model, batch size, image
size, precision, speed paths): ``training_step`` + ``backward`` + Adam step on one fixed random batch of the last task's
labels, i.e. without data loading or Lightning's loop. ``GPU busy`` is ``nvidia-smi``'s utilization (the fraction of
each sample period in which a kernel ran), sampled every 100 ms on the run's GPUs, averaged over the samples taken
during each phase (absent off CUDA or without ``nvidia-smi``).

Models (random ViT weights, no download): ``coda-b`` / ``coda-s`` = a CODA-Prompt learner (configs/base/coda.yaml) on
ViT-B/16 / ViT-S/16; ``kdp-b-s`` = a KDP student ViT-S/16 taught by ``--teacher`` (a ViT-B CODA teacher run's
``last.ckpt``, e.g. this script's ``coda-b`` run: its checkpoint is under ``--out``). ``--tiny``: a tiny ViT (32 px,
patch 8, width 32, depth 3) CODA learner on ``SyntheticShapes`` on CPU, 2 tasks x 1 epoch, in seconds: a smoke test for
CI; its numbers mean nothing. Any further ``cdl fit`` arguments follow ``--``.

    python benchmarks/e2e.py --npz data/tiny-imagenet-32.npz --model coda-b --num-tasks 10 --epochs-per-task 1
    python benchmarks/e2e.py --npz data/tiny-imagenet-32.npz --model kdp-b-s --teacher OUT/coda-b/.../last.ckpt
    python benchmarks/e2e.py --npz data/tiny-imagenet-32.npz --model coda-b --devices 2 --step-rate 2370
    python benchmarks/e2e.py --tiny
"""

from __future__ import annotations

import time

_IMPORT_TIME = time.time()  # before the heavy imports: the fallback process start when /proc is unavailable

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PHASES = ("startup", "train", "validation", "checkpoint", "other")
STEADY_AFTER = 5  # ``steady``: the training batches of an epoch after its first STEADY_AFTER
TIMM = {"b": "vit_base_patch16_224", "s": "vit_small_patch16_224"}
TINY_BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False,
                 "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}}


def process_start_time() -> float:
    """Wall-clock time this process started (Linux ``/proc``, to the clock tick), else the time this module was first
    imported. Measured against the uptime clock (``/proc/uptime``, 10 ms) rather than the boot time (``btime``, whole
    seconds, which would shift the start by up to a second)."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 (starttime) counted after the ")"-terminated command name
        now, uptime = time.time(), float(Path("/proc/uptime").read_text().split()[0])
        start = now - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
        return start if start <= _IMPORT_TIME + 1 else _IMPORT_TIME
    except (OSError, ValueError, IndexError):
        return _IMPORT_TIME


class GpuSampler:
    """``nvidia-smi`` utilization of ``gpus`` every ``interval_ms`` in a background process + reader thread; each
    sample is attributed to the phase current when it arrives (``phase()``)."""

    def __init__(self, gpus: list[int], phase: Any, interval_ms: int = 100) -> None:
        self.samples: dict[str, list[float]] = {}
        self.phase = phase
        self.process: subprocess.Popen | None = None
        exe = shutil.which("nvidia-smi")
        if exe is None or not gpus:
            return
        self.process = subprocess.Popen(  # noqa: S603
            [exe, "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits", f"--loop-ms={interval_ms}",
             f"--id={','.join(map(str, gpus))}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            try:
                util = float(line.split(",")[1])
            except (IndexError, ValueError):
                continue
            self.samples.setdefault(self.phase(), []).append(util)

    def stop(self) -> dict[str, float]:
        """Mean utilization (%) per phase."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        return {phase: round(sum(v) / len(v), 1) for phase, v in self.samples.items() if v}


def _timer_class() -> type:
    from lightning.pytorch import Callback

    class PhaseTimer(Callback):
        """Splits the wall time since process start into `PHASES` (a state machine switched by Lightning hooks;
        the GPU is synchronised at every switch) and counts the training images."""

        def __init__(self, start: float, sync_debug: bool = False) -> None:
            self.start, self.last = start, start
            self.sync_debug = sync_debug
            self.phase = "startup"
            self.seconds = dict.fromkeys(PHASES, 0.0)
            self.train_images = 0
            self.train_batches = 0
            self.steady_seconds = 0.0  # train time and images after each epoch's first STEADY_AFTER batches
            self.steady_images = 0
            self.steady_since: float | None = None
            self.epochs: list[dict[str, Any]] = []  # per training epoch: train seconds / images, and the steady part
            self.epoch_mark: tuple[float, int, float, int] | None = None  # those totals at the epoch's first batch
            self.first_batch_done: float | None = None
            self.checkpoints = 0  # `trainer.save_checkpoint` calls
            self.cuda = False
            self.device: Any = None
            self.sampler: GpuSampler | None = None

        def sync(self) -> None:
            """Wait for the GPU work launched so far (on CUDA)."""
            if self.cuda:
                import torch

                torch.cuda.synchronize(self.device)

        def switch(self, phase: str | None) -> None:
            self.sync()
            now = time.time()
            self.seconds[self.phase] += now - self.last
            if self.phase == "train" and self.steady_since is not None:  # in the epoch's steady part
                self.steady_seconds += now - max(self.steady_since, self.last)
            self.last = now
            if phase is not None:
                self.phase = phase
            if self.cuda and self.sync_debug:
                import torch

                torch.cuda.set_sync_debug_mode("warn" if self.phase == "train" else "default")

        def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
            self.device = trainer.strategy.root_device
            self.cuda = self.device.type == "cuda"
            save = trainer.save_checkpoint

            def timed_save(*args: Any, **kwargs: Any) -> Any:
                previous = self.phase
                self.switch("checkpoint")
                self.checkpoints += 1
                try:
                    return save(*args, **kwargs)
                finally:
                    self.switch(previous)

            trainer.save_checkpoint = timed_save
            if self.cuda and trainer.global_rank == 0:
                ids = [int(d) for d in getattr(trainer, "device_ids", [])]
                visible = os.environ.get("CUDA_VISIBLE_DEVICES")
                if visible:
                    physical = visible.split(",")
                    ids = [int(physical[i]) for i in ids if i < len(physical)]
                self.sampler = GpuSampler(ids or [self.device.index or 0], lambda: self.phase)

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.phase != "train":
                self.switch("train")
            if batch_idx == 0:
                self.epoch_mark = (self.seconds["train"], self.train_images, self.steady_seconds, self.steady_images)
            self.train_images += int(batch[0].shape[0])
            self.train_batches += 1

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self.first_batch_done is None:
                self.first_batch_done = time.time()
            if batch_idx + 1 == STEADY_AFTER:  # the steady part of this epoch starts when this batch's work is done
                self.sync()
                self.steady_since = time.time()
            elif self.steady_since is not None:
                self.steady_images += int(batch[0].shape[0])

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            self.switch("validation")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self.switch("other")

        def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
            if self.phase == "train":
                self.switch("other")
            self.steady_since = None
            if self.epoch_mark is not None:  # (validation, if any, ran before this hook and switched the phase)
                seconds, images, steady_seconds, steady_images = self.epoch_mark
                self.epochs.append({"epoch": trainer.current_epoch,
                                    "seconds": round(self.seconds["train"] - seconds, 4),
                                    "images": self.train_images - images,
                                    "steady_seconds": round(self.steady_seconds - steady_seconds, 4),
                                    "steady_images": self.steady_images - steady_images})
                self.epoch_mark = None

        def finish(self) -> dict[str, Any]:
            self.switch("other")
            busy = self.sampler.stop() if self.sampler is not None else {}
            return {"seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                    "wall": round(self.last - self.start, 3), "train_images": self.train_images,
                    "train_batches": self.train_batches, "gpu_busy": busy,
                    "steady": {"seconds": round(self.steady_seconds, 3), "images": self.steady_images},
                    "checkpoints": {"saves": self.checkpoints}, "epochs": self.epochs}

    return PhaseTimer


def _profiler_class() -> type:
    from lightning.pytorch import Callback

    class StepProfiler(Callback):
        """`torch.profiler` over training batches ``[at, at + steps)`` of the real loop (counted over the whole fit)
        with the step boundaries marked: where a step's wall time goes when the loop, not the model, is the limit.

        Prints per step the wall time, the GPU busy time (the union of kernel, copy and memset intervals) and the GPU
        idle time (wall minus busy), the calls that may synchronise (``cudaStreamSynchronize`` & co. are the ones
        that did; ``aten::item`` also counts reads of CPU tensors, ``cudaMemcpyAsync`` device-to-device copies), then
        the top host operators by self CPU time; writes a Chrome trace (``.json.gz``) when ``trace`` is given. A
        window reaching the epoch's last batch stops there (``cut_at_epoch_end``), before validation."""

        def __init__(self, at: int, steps: int, trace: str | None) -> None:
            self.at, self.steps, self.trace = at, steps, trace
            self.seen = 0
            self.profiler: Any = None
            self.marks: list[float] = []
            self.summary: dict[str, Any] = {}

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            if self.seen == self.at and trainer.global_rank == 0:
                activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
                self.profiler = profile(activities=activities)
                self.profiler.__enter__()
            if self.profiler is not None:
                self.marks.append(time.perf_counter())
                if len(self.marks) == self.steps + 1:
                    self._stop()
            self.seen += 1

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            total = trainer.num_training_batches
            if self.profiler is not None and isinstance(total, int) and batch_idx + 1 >= total:
                # the epoch's last batch: stop here, before validation, checkpoints and the epoch-end hooks (the
                # last step then lacks only the host time between steps)
                self.marks.append(time.perf_counter())
                self.summary["cut_at_epoch_end"] = True
                self._stop()

        def _stop(self) -> None:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            prof, self.profiler = self.profiler, None
            steps = len(self.marks) - 1
            per_step = max(steps, 1)
            wall_ms = (self.marks[-1] - self.marks[0]) * 1e3 / per_step
            events = prof.events()
            # device activity: kernels, copies and memsets (not the GPU-side spans of record_function annotations,
            # which cover whole steps)
            def device_work(e: Any) -> bool:
                kind = getattr(e, "activity_type", None)  # kineto's category (torch >= 2.8), as in the Chrome trace
                if kind is not None:
                    return kind in ("kernel", "gpu_memcpy", "gpu_memset")
                return (getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
                        and not getattr(e, "is_user_annotation", False))

            kernels = sorted((e.time_range.start, e.time_range.end) for e in events if device_work(e))
            union, end = 0.0, float("-inf")
            for a, b in kernels:  # microseconds; overlapping kernels (several streams) counted once
                if b > end:
                    union += b - max(a, end)
                    end = b
            syncs = Counter(e.name for e in events if e.name in (
                "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpyAsync",
                "cudaMemcpy", "aten::item", "aten::_local_scalar_dense"))
            gpu_ms = union / 1e3 / per_step
            self.summary = {
                **self.summary, "steps": steps, "wall_ms_per_step": round(wall_ms, 3),
                "gpu_busy_ms_per_step": round(gpu_ms, 3), "gpu_idle_ms_per_step": round(wall_ms - gpu_ms, 3),
                "kernels_per_step": round(len(kernels) / per_step, 1),
                "sync_related_calls_per_step": {k: round(v / per_step, 2) for k, v in syncs.items()},
            }
            print(f"profile of training batches {self.at}..{self.at + steps - 1}: {json.dumps(self.summary)}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
            if self.trace:
                prof.export_chrome_trace(self.trace)  # gzipped by torch (the name ends in .gz)

    return StepProfiler


def measure_step_rate(model: Any, trainer: Any, datamodule: Any, warmup: int, steps: int) -> float:
    """img/s of the fitted model's training step (throughput.py's ``time_ms``), on one random batch of the last
    task's labels at the data module's batch and image size, under the trainer's autocast."""
    import contextlib

    import torch

    sys.path.insert(0, str(REPO / "benchmarks"))
    from throughput import Settings, time_ms

    device = trainer.strategy.root_device
    s = Settings(device=device, tiny=device.type != "cuda", warmup=warmup, steps=steps, compile=False)
    model = model.to(device)  # the fit's teardown moved it to the CPU
    model.log = lambda *args, **kwargs: None  # no trainer loop around these steps
    model.train()
    start, stop = model.task_range(model.current_task)
    size, batch = datamodule.image_size, datamodule.batch_size
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device, generator=generator)
    targets = torch.randint(start, stop, (batch,), device=device, generator=generator)
    data = (images, targets, torch.zeros_like(targets))
    optimizer = model.configure_optimizers()["optimizer"]
    precision = str(trainer.precision)
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    def step(i: int) -> None:
        with autocast:
            loss = model.training_step(data, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return batch * 1e3 / time_ms(step, s)


def cli_args(args: argparse.Namespace, extra: list[str]) -> list[str]:
    """The ``cdl fit`` argument list of the chosen model and data."""
    out = Path(args.out)
    if args.tiny:
        base = ["--config", str(REPO / "configs/base/learner.yaml"), "--config", str(REPO / "configs/base/coda.yaml"),
                "--model.init_args.backbone", json.dumps(TINY_BACKBONE),
                "--model.init_args.prompt.init_args.pool_size", "20",
                "--model.init_args.prompt.init_args.layers", "[0, 1]",
                "--trainer.accelerator", "cpu", "--data.image_size", "32", "--data.num_workers", "0"]
    else:
        kind, _, arch = args.model.partition("-")
        configs = ["base/trainer.yaml", "base/learner.yaml" if kind == "coda" else "base/distiller.yaml",
                   "base/coda.yaml"] + (["methods/kdp.yaml"] if kind == "kdp" else [])
        student = arch.split("-")[-1]
        base = [a for c in configs for a in ("--config", str(REPO / "configs" / c))]
        vit = {"name": TIMM[student], "pretrained": False}
        if args.image_size != 224:
            vit["model_kwargs"] = {"img_size": args.image_size}
        base += ["--model.init_args.backbone", json.dumps(vit),
                 "--data.image_size", str(args.image_size), "--data.num_workers", str(args.num_workers),
                 "--trainer.precision", args.precision]
        if kind == "kdp":
            if not args.teacher:
                raise SystemExit("--model kdp-b-s needs --teacher (a ViT-B CODA teacher run's last.ckpt)")
            base += ["--model.init_args.teacher_checkpoint", args.teacher]
        if args.devices > 1:
            base += ["--trainer.strategy", "ddp"]
    if args.npz:
        source = ["--data.source", "cdl_lightning.data.NpzSource", "--data.source.path", args.npz]
    elif args.folder:
        source = ["--data.source", "cdl_lightning.data.ImageFolderSource", "--data.source.root", args.folder]
    else:
        source = ["--data.source", "cdl_lightning.data.SyntheticShapes"]
    name = "tiny" if args.tiny else args.model
    return ["fit", *base, *source, "--seed_everything", "0", "--trainer.devices", str(args.devices),
            "--data.num_tasks", str(args.num_tasks), "--data.epochs_per_task", str(args.epochs_per_task),
            "--data.batch_size", str(args.batch),
            "--trainer.enable_progress_bar", str(not args.no_progress_bar).lower(),
            "--trainer.logger", "lightning.pytorch.loggers.TensorBoardLogger",
            "--trainer.logger.save_dir", str(out), "--trainer.logger.name", name, "--trainer.logger.version", "",
            "--evaluation.output_dir", str(out / name), *extra]


def epoch_starts(epochs: list[dict[str, Any]], epochs_per_task: int) -> dict[str, Any] | None:
    """What each epoch's first ``STEADY_AFTER`` batches cost beyond the run's steady rate (seconds), by kind: the run's
    first epoch (compilation, first graph captures, the first loader), the other tasks' first epochs (a new task's
    shapes and snapshot) and the later epochs of a task (a loader's start, epoch hooks). ``None`` without a steady
    part. `projection.py --epoch-starts` projects with these."""
    steady_seconds = sum(e["steady_seconds"] for e in epochs)
    steady_images = sum(e["steady_images"] for e in epochs)
    if not epochs or steady_seconds <= 0 or steady_images <= 0:
        return None
    rate = steady_images / steady_seconds  # this process's steady img/s
    extra = [(e["seconds"] - e["steady_seconds"]) - (e["images"] - e["steady_images"]) / rate for e in epochs]
    task_first = [x for k, x in enumerate(extra) if k and k % epochs_per_task == 0]
    later = [x for k, x in enumerate(extra) if k % epochs_per_task]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {"run_first_s": round(extra[0], 4), "task_first_s": mean(task_first), "task_first_n": len(task_first),
            "later_s": mean(later), "later_n": len(later)}


def report(result: dict[str, Any], step_rate: float | None, world: int) -> dict[str, Any]:
    """Add rates and fractions; print the table and one JSON line."""
    seconds, wall = result["seconds"], result["wall"]
    train_s = seconds["train"]
    images = result["train_images"] * world  # every rank trains its shard of the same number of batches
    result["world_size"] = world
    result["train_images_all_ranks"] = images  # (``train_images`` is rank 0's count)
    def rate(n: int, s: float) -> float | None:
        return round(n / s, 1) if s > 0 else None

    def of_step_rate(img_per_s: float | None) -> float | None:
        return round(img_per_s / (step_rate * world), 3) if step_rate and img_per_s else None

    result["train_img_per_s"] = rate(images, train_s)
    result["step_img_per_s"] = round(step_rate, 1) if step_rate else None
    result["fraction_of_step_rate"] = of_step_rate(result["train_img_per_s"])
    result["whole_run_img_per_s"] = rate(images, wall)
    steady = result["steady"]
    steady["img_per_s"] = rate(steady["images"] * world, steady["seconds"])
    steady["fraction_of_step_rate"] = of_step_rate(steady["img_per_s"])
    busy = result["gpu_busy"]
    print(f"\n{'phase':<11} {'seconds':>9} {'% of wall':>9} {'GPU busy':>9}")
    for phase in PHASES:
        share = 100 * seconds[phase] / wall if wall else 0.0
        gpu = f"{busy[phase]:.0f}%" if phase in busy else "-"
        print(f"{phase:<11} {seconds[phase]:>9.2f} {share:>8.1f}% {gpu:>9}")
    print(f"{'wall':<11} {wall:>9.2f}")
    saves = result["checkpoints"]
    if saves["saves"]:
        size = f", the last {saves['last_mb']} MB" if "last_mb" in saves else ""
        print(f"checkpoints: {saves['saves']} saves in {seconds['checkpoint']:.2f} s = "
              f"{seconds['checkpoint'] / saves['saves']:.3f} s each{size}")
    fraction = result["fraction_of_step_rate"]
    step = f", step rate {step_rate:.0f} img/s per GPU -> fraction {fraction:.2f}" if fraction else ""
    print(f"train: {images} images on {world} process(es) in {train_s:.2f} s = {result['train_img_per_s']} "
          f"img/s{step}; whole run {result['whole_run_img_per_s']} img/s")
    if steady["img_per_s"]:
        fraction = steady["fraction_of_step_rate"]
        print(f"steady: {steady['images'] * world} images (each epoch after its first {STEADY_AFTER} batches) in "
              f"{steady['seconds']:.2f} s = {steady['img_per_s']} img/s"
              + (f" -> fraction {fraction:.2f} of the step rate" if fraction else ""))
    starts = epoch_starts(result.get("epochs", []), result.get("args", {}).get("epochs_per_task", 1))
    if starts is not None:
        result["epoch_starts"] = starts
        parts = [f"the run's first epoch {starts['run_first_s']:+.2f} s"]
        if starts["task_first_n"]:
            parts.append(f"each other task's first epoch {starts['task_first_s']:+.3f} s (mean of "
                         f"{starts['task_first_n']})")
        if starts["later_n"]:
            parts.append(f"each later epoch {starts['later_s']:+.3f} s (mean of {starts['later_n']})")
        print(f"epoch starts (each epoch's first {STEADY_AFTER} batches beyond the steady rate): " + "; ".join(parts))
    print(json.dumps({"bench": "cdl-e2e", **result}), flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny ViT on CPU, synthetic data, seconds (CI)")
    parser.add_argument("--npz", help="an NpzSource pack (e.g. data/tiny-imagenet-32.npz)")
    parser.add_argument("--folder", help="an ImageFolderSource root")
    parser.add_argument("--model", choices=("coda-b", "coda-s", "kdp-b-s"), default="coda-b")
    parser.add_argument("--teacher", help="kdp-b-s: the ViT-B CODA teacher run's last.ckpt")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--num-tasks", type=int, help="default 10 (tiny: 2)")
    parser.add_argument("--epochs-per-task", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1, help="GPUs (DDP when > 1)")
    parser.add_argument("--precision", default="bf16-mixed")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-progress-bar", action="store_true", help="disable the progress bar (the CLI's rich "
                        "bar is on by default, as in a real run)")
    parser.add_argument("--sync-debug", action="store_true", help="torch.cuda.set_sync_debug_mode('warn') during the "
                        "train phases: every host-device synchronisation in a step warns once per source line")
    parser.add_argument("--step-rate", type=float, help="the step benchmark's img/s per GPU (skips measuring it)")
    parser.add_argument("--no-step", action="store_true", help="do not measure the step rate after the fit")
    parser.add_argument("--step-warmup", type=int, default=10)
    parser.add_argument("--step-steps", type=int, default=30)
    parser.add_argument("--out", default="runs/e2e", help="run directory (logs, checkpoints, metrics)")
    parser.add_argument("--json", help="also write the result JSON here (rank 0)")
    parser.add_argument("--profile-steps", type=int, default=0, help="torch.profiler over this many training "
                        "batches of the real loop (rank 0): per-step wall / GPU kernel / GPU idle ms, top host ops")
    parser.add_argument("--profile-at", type=int, default=200, help="the first profiled training batch (counted "
                        "over the whole fit, after warm-up and graph captures)")
    parser.add_argument("--profile-trace", help="with --profile-steps: also write a Chrome trace here (.json.gz)")
    args = parser.parse_args(argv)
    if args.profile_trace and not args.profile_trace.endswith(".json.gz"):
        parser.error(f"--profile-trace {args.profile_trace!r}: the trace is written gzipped; give a FILE.json.gz")
    if args.profile_steps < 0 or args.profile_at < 0:
        parser.error("--profile-steps and --profile-at must be >= 0")
    if args.num_tasks is None:
        args.num_tasks = 2 if args.tiny else 10
    if args.tiny:
        args.batch, args.step_warmup, args.step_steps = min(args.batch, 16), 1, 2

    start = process_start_time()
    from cdl_lightning import cli

    timer = _timer_class()(start, args.sync_debug)
    profiler = None
    if args.profile_steps:
        profiler = _profiler_class()(args.profile_at, args.profile_steps, args.profile_trace)
    captured: dict[str, Any] = {}
    instantiate = cli.CDLCLI.instantiate_trainer

    def instantiate_with_timer(self: Any, **kwargs: Any) -> Any:
        trainer = instantiate(self, **kwargs)
        trainer.callbacks.insert(0, timer)
        if profiler is not None:
            trainer.callbacks.insert(1, profiler)
        captured["cli"], captured["trainer"] = self, trainer
        return trainer

    cli.CDLCLI.instantiate_trainer = instantiate_with_timer  # type: ignore[method-assign]
    cli.main(cli_args(args, extra))
    result = timer.finish()
    trainer = captured["trainer"]
    if trainer.global_rank != 0:
        return 0
    step_rate = args.step_rate
    if step_rate is None and not args.no_step and trainer.world_size == 1:
        try:
            step_rate = measure_step_rate(captured["cli"].model, trainer, captured["cli"].datamodule,
                                          args.step_warmup, args.step_steps)
        except Exception as err:  # the run's phases are still worth printing
            print(f"step rate not measured: {type(err).__name__}: {err}", file=sys.stderr)
    result["args"] = {k: v for k, v in vars(args).items() if v is not None}
    if trainer.strategy.root_device.type == "cuda":
        import torch

        result["gpu"] = torch.cuda.get_device_name(trainer.strategy.root_device)
    if profiler is not None and profiler.summary:
        result["profile"] = profiler.summary
    last = Path(getattr(trainer.checkpoint_callback, "last_model_path", "") or "")
    if last.is_file():
        result["checkpoints"]["last_mb"] = round(last.stat().st_size / 1e6, 2)
    result = report(result, step_rate, trainer.world_size)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
