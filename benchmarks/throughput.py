"""Throughput of cdl-lightning's CODA-Prompt learners and KDP distiller on synthetic 224 px batches.

Cases (a table row and a JSON line each; the JSON line is printed as soon as the case finishes):
* ``train-learner``: a CODA-Prompt (pool 100, length 8, layers 0-4) `PromptLearner` step on ViT-S/16 and ViT-B/16:
  ``training_step`` (no-grad query pass, prompted forward, loss), ``backward``, Adam ``step``, ``zero_grad``.
* ``infer``: ``model(images, task=0)`` under ``no_grad`` in eval mode (query pass included), at ``--batch``
  (throughput) and at batch 1 (latency: median of individually synchronised calls).
* ``train-distill``: a KDP `Distiller` student step including the frozen CODA teacher's no-grad forward; the teacher
  comes from a checkpoint written here (ViT-B -> ViT-S at ``--batch``, ViT-L -> ViT-B at ``--large-batch``).
How: the library's classes with random weights, on the device, ``open_task(0)``, Adam from ``configure_optimizers``;
one fixed random ``[0, 1]`` batch with task-0 labels (no data loading); ``--warmup`` untimed steps, then ``--steps``
timed with CUDA events. bf16 = under ``torch.autocast``, frozen Linear/Conv weights stored in bf16 as a bf16-mixed
trainer does (``cast_frozen_weights``; ``--fp32-frozen-weights`` keeps them fp32); fp32 = no autocast, default matmul
precision (printed). The gradient-free passes run from CUDA graphs as in training (``cuda_graphs``; off with
``--no-cuda-graphs``). ``--compile``: ``compile=True``, the frozen ViT passes through ``torch.compile`` (inductor),
compiled in the warm-up steps; with CUDA graphs (the default) the compiled gradient-free passes are captured into them,
with ``--no-cuda-graphs`` they run compiled, ungraphed. Not bitwise equal to eager (``check_fast_paths.py --compile``
measures the deviation). ``--patch-embed-gemm``: ``patch_embed_gemm=True``, every frozen ViT's patch-embedding
convolution run as reshape + one GEMM (opt-in, not bitwise: ``check_fast_paths.py --patch-embed-gemm`` measures the
deviation). ``--teacher-low-precision``: ``teacher_low_precision=True``, a distiller's frozen teacher run entirely in
bf16 outside autocast in the bf16 cases (opt-in, not bitwise: ``check_fast_paths.py --teacher-low-precision``).
A pass whose capture failed runs eagerly: its row then says so (``graphs fell back``).
Peak memory: ``torch.cuda.max_memory_allocated`` since a reset at the start of each case (weights included).
``--query reference``: teacher-side models take their student architecture's query as in the CDL reference (B -> S,
L -> B), shared by teacher and student in ``train-distill``. ``--tiny``: tiny ViTs (32 px, patch 8, depth 4, widths
32/64/96 for S/B/L; CODA pool 30, layers 0-3) on CPU, 2 timed steps: a smoke test, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import lightning
import timm
import torch
from torch import Tensor

from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.nn import KDP, BackboneConfig, CodaPrompt

TIMM_NAMES = {"S": "vit_small_patch16_224", "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}
TINY_WIDTHS = {"S": 32, "B": 64, "L": 96}
REFERENCE_QUERY = {"S": "S", "B": "S", "L": "B"}  # the reference's teacher takes its student architecture's query
TASK_SIZES = [10] * 10
CASES = ("train-learner", "infer", "train-distill")
# Quoted from the issue: the reference code measured by someone else on one H100, fp32, batch 64 (L->B: 32).
REFERENCE_FIGURES = {
    ("train-learner", "B", 64): "306 img/s, 209 ms/step, 11.4 GiB", ("infer", "S", 64): "1516 img/s",
    ("train-distill", "B->S", 64): "365 img/s, 176 ms/step, 19.2 GiB", ("train-distill", "L->B", 32): "115 img/s"}
Step = Callable[[int], None]


@dataclass
class Settings:
    device: torch.device
    tiny: bool
    warmup: int
    steps: int
    compile: bool
    cast_weights: bool = True
    cuda_graphs: bool = True
    graph_prompts: bool = False
    concurrent_teacher: bool = True
    patch_embed_gemm: bool = False
    compile_training_pass: bool = False
    teacher_low_precision: bool = False


@dataclass
class Result:
    case: str
    model: str
    precision: str
    batch: int
    img_per_s: float | None = None
    ms_per_step: float | None = None
    peak_gib: float | None = None
    reference_fp32: str | None = None
    error: str | None = None
    graphs_fell_back: str | None = None  # the graph runners whose capture failed (they ran eagerly), with the reason


def backbone(arch: str, s: Settings) -> BackboneConfig:
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": TINY_WIDTHS[arch], "depth": 4, "num_heads": 2}
    return BackboneConfig(name=TIMM_NAMES[arch], pretrained=False, model_kwargs=tiny if s.tiny else None)


def coda(s: Settings) -> Callable[..., CodaPrompt]:
    pool, layers = (30, (0, 1, 2, 3)) if s.tiny else (100, (0, 1, 2, 3, 4))  # tiny: pool <= key width 32, 4 blocks
    return functools.partial(CodaPrompt, pool_size=pool, length=8, layers=layers)


def learner(arch: str, query: str, s: Settings) -> PromptLearner:
    """A CODA `PromptLearner`; its prompt query comes from a ViT of architecture ``query``."""
    return PromptLearner(backbone=backbone(arch, s), prompt=coda(s), task_sizes=TASK_SIZES, epochs_per_task=1,
                         query_backbone=backbone(query, s) if query != arch else None)


def prepare(model: PromptLearner, s: Settings) -> PromptLearner:
    """Move to the device, open task 0, silence ``self.log`` (a warning-emitting no-op without a trainer), apply the
    ``cuda_graphs`` / ``patch_embed_gemm`` / ``compile`` settings."""
    model.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    model.fast_paths.cuda_graphs = s.cuda_graphs
    model.fast_paths.graph_prompts = s.graph_prompts
    model.fast_paths.side_stream = s.concurrent_teacher  # a distiller's `concurrent_teacher` (learners: no effect)
    model.fast_paths.patch_embed_gemm = s.patch_embed_gemm
    model.fast_paths.patch_embed_(model.frozen_vits())  # as a trainer's setup does (the teacher's ViTs too)
    model = model.to(s.device)
    model.open_task(0)
    if s.compile:
        # as `compile: true` in a config: every frozen ViT pass compiled; with `cuda_graphs` the gradient-free ones are
        # then captured (the training pass stays uncompiled where graphed). The previous models' compiled code goes:
        # dynamo keeps a few entries per code object (`Module._call_impl` is one for every ViT), then runs eagerly
        torch._dynamo.reset()
        model.fast_paths.compile = True
        model.fast_paths.compile_training_pass = s.compile_training_pass
        model.configure_model()
    return model


def write_teacher_checkpoint(teacher_arch: str, student_arch: str, query: str, directory: str, s: Settings) -> str:
    """A finished teacher run's checkpoint as Lightning would save it (``state_dict`` + ``hyper_parameters`` +
    the ``cdl`` entry written by ``PromptLearner.on_save_checkpoint``), with one snapshot per task."""
    teacher = learner(teacher_arch, student_arch if query == "reference" else teacher_arch, s)
    for task in range(len(TASK_SIZES)):
        teacher.open_task(task)
        teacher.snapshot_task(task)
    checkpoint = {"state_dict": teacher.state_dict(), "hyper_parameters": dict(teacher.hparams)}
    teacher.on_save_checkpoint(checkpoint)
    path = f"{directory}/teacher_{teacher_arch}_{query}.ckpt"
    torch.save(checkpoint, path)
    return path


def autocast(precision: str, s: Settings) -> contextlib.AbstractContextManager:
    return torch.autocast(s.device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def synthetic_batch(batch: int, s: Settings) -> tuple[Tensor, Tensor, Tensor]:
    size = 32 if s.tiny else 224
    images = torch.rand(batch, 3, size, size, device=s.device)
    targets = torch.randint(0, TASK_SIZES[0], (batch,), device=s.device)  # task 0's label range
    return images, targets, torch.zeros(batch, dtype=torch.long, device=s.device)


def sync(s: Settings) -> None:
    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def time_ms(step: Step, s: Settings, latency: bool = False) -> float:
    """Milliseconds per ``step(i)`` after ``s.warmup`` untimed calls: the mean over ``s.steps`` calls timed as one
    block (CUDA events; wall clock on CPU), or with ``latency`` the median of individually synchronised calls."""
    for i in range(s.warmup):
        step(i)
    sync(s)
    if latency or s.device.type != "cuda":
        times = []
        for i in range(s.steps):
            start = time.perf_counter()
            step(i)
            sync(s)
            times.append(time.perf_counter() - start)
        return 1e3 * (statistics.median(times) if latency else statistics.fmean(times))
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for i in range(s.steps):
        step(i)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / s.steps


def measure(result: Result, make_step: Callable[[], Step], s: Settings, latency: bool = False,
            model: PromptLearner | None = None) -> Result:
    """Time the step ``make_step()`` builds after a memory reset; record timing, peak memory or the error, and which
    of ``model``'s graph runners fell back to eager after a failed capture."""
    gc.collect()
    if s.device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(s.device)
    try:
        ms = time_ms(make_step(), s, latency)
        result.ms_per_step, result.img_per_s = round(ms, 2), round(result.batch * 1e3 / ms, 1)
        if s.device.type == "cuda":
            result.peak_gib = round(torch.cuda.max_memory_allocated(s.device) / 2**30, 2)
    except Exception as err:  # one failing case (e.g. out of memory) must not lose the others
        traceback.print_exc()
        result.error = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
    fell_back = {name: r.disabled_reason for name, r in (model.graph_runners if model else {}).items()
                 if r.disabled_reason}
    result.graphs_fell_back = "; ".join(f"{name}: {reason[:120]}" for name, reason in fell_back.items()) or None
    result.reference_fp32 = REFERENCE_FIGURES.get((result.case, result.model.split()[0], result.batch))
    print(json.dumps({"bench": "cdl-throughput", **asdict(result)}), flush=True)
    return result


def set_precision(model: PromptLearner, precision: str, s: Settings) -> None:
    """Frozen matmul weights in bf16 for bf16 cases (as a ``bf16-mixed`` trainer's setup does), else fp32."""
    model.cast_frozen_weights_(torch.bfloat16 if precision == "bf16" and s.cast_weights else torch.float32)
    if isinstance(model, Distiller) and s.teacher_low_precision:  # as a bf16-mixed trainer's setup does with the flag
        model.teacher_low_precision_(torch.bfloat16 if precision == "bf16" else None)
    model.fast_paths.reset()  # free the graphs of the previous case


def train_step(model: PromptLearner, batch: tuple[Tensor, Tensor, Tensor], precision: str, s: Settings) -> Step:
    """``training_step`` (query pass, teacher if any, student forward, loss) + backward + Adam step."""
    set_precision(model, precision, s)
    model.train()
    optimizer = model.configure_optimizers()["optimizer"]  # fresh Adam state per case

    def step(i: int) -> None:
        with autocast(precision, s):
            loss = model.training_step(batch, i)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def infer_step(model: PromptLearner, images: Tensor, precision: str, s: Settings) -> Step:
    """Inference logits of task 0's classes (query pass included)."""
    set_precision(model, precision, s)
    model.eval()

    def step(i: int) -> None:
        with torch.no_grad(), autocast(precision, s):
            model(images, task=0)
    return step


def learner_cases(args: argparse.Namespace, s: Settings) -> Iterator[Result]:
    """``train-learner`` and ``infer`` for ViT-S and ViT-B, one build per architecture and query architecture (so
    ViT-S, whose reference query is its own, is measured once)."""
    for arch in ("S", "B"):
        for query_arch in dict.fromkeys(REFERENCE_QUERY[arch] if q == "reference" else arch for q in args.query):
            label = f"{arch} (query {query_arch})"
            model = prepare(learner(arch, query_arch, s), s)
            for precision in args.precision:
                if "train-learner" in args.cases:
                    batch = synthetic_batch(args.batch, s)
                    yield measure(Result("train-learner", label, precision, args.batch),
                                  functools.partial(train_step, model, batch, precision, s), s, model=model)
                if "infer" in args.cases:
                    for size in (args.batch, 1):
                        images = synthetic_batch(size, s)[0]
                        yield measure(Result("infer", label, precision, size),
                                      functools.partial(infer_step, model, images, precision, s), s, size == 1,
                                      model=model)


def distill_cases(args: argparse.Namespace, s: Settings) -> Iterator[Result]:
    """``train-distill``: KDP students taught by CODA teachers from checkpoints written to a temporary directory."""
    pairs = {"b-s": ("B", "S", args.batch), "l-b": ("L", "B", args.large_batch)}
    with tempfile.TemporaryDirectory(prefix="cdl-bench-") as directory:
        for pair in args.pairs:
            teacher_arch, student_arch, size = pairs[pair]
            for query in args.query:
                path = write_teacher_checkpoint(teacher_arch, student_arch, query, directory, s)
                model = Distiller(method=KDP(), teacher_checkpoint=path, backbone=backbone(student_arch, s),
                                  prompt=coda(s), task_sizes=TASK_SIZES, epochs_per_task=1)
                model = prepare(model, s)
                label = f"{teacher_arch}->{student_arch} (query {'shared' if model.share_query else 'own'})"
                batch = synthetic_batch(size, s)
                for precision in args.precision:
                    yield measure(Result("train-distill", label, precision, size),
                                  functools.partial(train_step, model, batch, precision, s), s, model=model)


def print_environment(s: Settings, args: argparse.Namespace) -> None:
    env = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
           "lightning": lightning.__version__, "device": str(s.device), "precision": args.precision,
           "float32_matmul_precision": torch.get_float32_matmul_precision(), "compile": s.compile,
           "cast_frozen_weights": s.cast_weights, "cuda_graphs": s.cuda_graphs, "graph_prompts": s.graph_prompts,
           "concurrent_teacher": s.concurrent_teacher, "patch_embed_gemm": s.patch_embed_gemm,
           "compile_training_pass": s.compile_training_pass, "teacher_low_precision": s.teacher_low_precision,
           "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "tiny": s.tiny, "warmup": s.warmup, "steps": s.steps, "batch": args.batch, "large_batch": args.large_batch,
           "query": args.query, "cpu_threads": torch.get_num_threads(), "cuda": torch.version.cuda,
           "gpu": torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "none"}
    print("# environment\n" + "\n".join(f"  {key:<25} {value}" for key, value in env.items()))
    print(json.dumps({"bench": "cdl-throughput-env", **env}), flush=True)


def print_table(results: list[Result]) -> None:
    head = ("case", "model", "prec", "batch", "img/s", "ms/step", "peak GiB")
    rows = [(r.case, r.model, r.precision, str(r.batch), f"{r.img_per_s:.1f}" if r.img_per_s else "-",
             f"{r.ms_per_step:.2f}" if r.ms_per_step else "-", f"{r.peak_gib:.2f}" if r.peak_gib else "-",
             f"ERROR {r.error}" if r.error else f"GRAPHS FELL BACK TO EAGER ({r.graphs_fell_back})"
             if r.graphs_fell_back else (r.reference_fp32 or "")) for r in results]
    widths = [max(len(row[i]) for row in [head, *rows]) for i in range(len(head))]
    print("\n" + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))
          + " | reference figure (fp32, quoted from the issue: the reference code on one H100, NOT measured here)")
    print("-|-".join("-" * w for w in widths) + "-|-" + "-" * 40)
    for row in rows:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        print(" | ".join(cells) + " | " + row[-1])
    print("(infer at batch 1: latency, the median ms of individually synchronised calls)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--precision", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    parser.add_argument("--batch", type=int, default=64, help="batch of train-learner, infer and B->S distillation")
    parser.add_argument("--large-batch", type=int, default=32, help="batch of L->B distillation")
    parser.add_argument("--pairs", nargs="+", choices=("b-s", "l-b"), default=["b-s", "l-b"], help="distill pairs")
    parser.add_argument("--query", nargs="+", choices=("own", "reference"), default=["own"], help="own: query from "
                        "the own backbone (library default); reference: from the student's architecture (CDL code)")
    parser.add_argument("--warmup", type=int, help="untimed steps per case (default 10, tiny 1)")
    parser.add_argument("--steps", type=int, help="timed steps per case (default 30, tiny 2)")
    parser.add_argument("--compile", action="store_true", help="compile=True: torch.compile every frozen ViT pass "
                        "(prompted forward and query pass, the teacher's too); the gradient-free ones are then "
                        "captured into the CUDA graphs (with --no-cuda-graphs: compiled, ungraphed). Not bitwise")
    parser.add_argument("--compile-training-pass", action="store_true", help="with --compile: capture the compiled "
                        "prompted training pass (forward and backward) in the CUDA graphs instead of the plain one "
                        "(FastPaths.compile_training_pass; experimental)")
    parser.add_argument("--fp32-frozen-weights", action="store_true", help="bf16 cases: keep the frozen weights in "
                        "fp32 (autocast re-casts them every pass), i.e. cast_frozen_weights=False")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="run the gradient-free passes eagerly, i.e. "
                        "cuda_graphs=False")
    parser.add_argument("--graph-prompts", action="store_true", help="graph_prompts=True: the prompt pool's "
                        "training pass (assembly, forward and backward) from CUDA graphs too")
    parser.add_argument("--no-concurrent-teacher", action="store_true", help="train-distill: run the teacher's pass "
                        "before the student's on one CUDA stream, i.e. concurrent_teacher=False")
    parser.add_argument("--patch-embed-gemm", action="store_true", help="patch_embed_gemm=True: every frozen ViT's "
                        "patch-embedding convolution as reshape + one GEMM. Not bitwise (check_fast_paths.py "
                        "--patch-embed-gemm measures the deviation)")
    parser.add_argument("--teacher-low-precision", action="store_true", help="train-distill, bf16: "
                        "teacher_low_precision=True, the frozen teacher entirely in bf16 outside autocast. Not bitwise "
                        "(check_fast_paths.py --teacher-low-precision measures the deviation)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True (the "
                        "Trainer's `benchmark: true`): cuDNN times its algorithms for the patch-embedding convolution")
    parser.add_argument("--tiny", action="store_true", help="tiny ViTs at 32 px on CPU: a smoke test")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    args = parser.parse_args(argv)
    if args.compile_training_pass and not args.compile:
        parser.error("--compile-training-pass needs --compile")
    warnings.filterwarnings("ignore", message="Attribute 'method' is an instance of `nn.Module`")  # harmless
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("CUDA is not available: run on a GPU machine, or pass --tiny for the CPU smoke test")
    s = Settings(device, args.tiny, args.warmup if args.warmup is not None else (1 if args.tiny else 10),
                 args.steps if args.steps is not None else (2 if args.tiny else 30), args.compile,
                 not args.fp32_frozen_weights, not args.no_cuda_graphs, args.graph_prompts,
                 not args.no_concurrent_teacher, args.patch_embed_gemm, args.compile_training_pass,
                 args.teacher_low_precision)
    print_environment(s, args)
    start = time.perf_counter()
    results = list(learner_cases(args, s)) if {"train-learner", "infer"} & set(args.cases) else []
    if "train-distill" in args.cases:
        results += list(distill_cases(args, s))
    print_table(sorted(results, key=lambda r: CASES.index(r.case)))
    print(f"# total wall time {time.perf_counter() - start:.0f} s")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
