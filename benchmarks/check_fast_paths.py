"""Check on a GPU that the speed paths change no numbers: frozen weights stored in bf16 (``cast_frozen_weights``),
CUDA graphs for the frozen passes and the prompted training pass (``cuda_graphs``), the prompt pool's training pass
from CUDA graphs (``graph_prompts``) and the teacher on a second CUDA stream (``concurrent_teacher``), against the
plain eager run with fp32 frozen weights.

1. ``step``: a ViT-B -> ViT-S KDP distiller (CODA teacher) at 224 px, ``--steps`` training steps under bf16 autocast
   (``training_step`` + backward + Adam), then eval logits: losses, learned parameters and logits are compared.
2. ``fit``: tiny ViTs through ``Trainer(accelerator="gpu", precision="bf16-mixed")``: a CODA teacher run, then a KDP
   student from it, with both paths on and both off: the accuracy matrices and learned parameters are compared (this
   goes through Lightning's setup, ``inference_mode`` validation and the task switches).

Prints what it compared and exits 1 on a mismatch. ``--tiny`` runs part 1 with tiny ViTs (any device).
``--graph-prompts`` adds ``graph_prompts`` (off by default) to the fast paths; ``--no-concurrent-teacher`` leaves
``concurrent_teacher`` out.

``--compile`` (opt-in, not bitwise): part 1 only, the fast paths with ``compile=True`` (the frozen ViT passes through
``torch.compile``, the compiled gradient-free passes captured into the CUDA graphs; ``--no-cuda-graphs``: compiled,
ungraphed) against the same eager run: prints the measured deviation (max |diff| and max |diff| / max |eager|) of the
query, the teacher's logits, the training losses, the learned parameters and the eval logits. It asserts no bound on
them; it exits 1 only if a graph runner fell back to eager (a failed capture, named) or, on CUDA, did not replay.

``--patch-embed-gemm`` (opt-in, not bitwise; combines with ``--compile``): the same measurement with the fast paths'
``patch_embed_gemm=True`` (every frozen ViT's patch-embedding convolution run as reshape + one GEMM, the teacher's
too) against the eager run with the convolution: the printed deviation is the GEMM's (the default fast paths are
bitwise under bf16, as the default check shows). Nothing is asserted on it either. That the fast paths stay bitwise
equal to an eager run that also uses the GEMM is ``tests/gpu/test_gpu_patch_embed_gemm.py``'s check.

``--teacher-low-precision`` (opt-in, not bitwise; combines with the others): the same measurement with the fast paths'
teacher run entirely in bf16 outside autocast (`Distiller.teacher_low_precision_`) against the eager run's autocast
teacher: the teacher's logits and, through the KD loss, the student's training. Nothing is asserted on it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

from cdl_lightning.callbacks import ContinualEvaluation  # noqa: E402
from cdl_lightning.data import ContinualDataModule, SyntheticShapes  # noqa: E402
from cdl_lightning.models import Distiller, PromptLearner  # noqa: E402
from cdl_lightning.nn import KDP, BackboneConfig, CodaPrompt  # noqa: E402


def compare(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.float(), b.float()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    same = torch.equal(a, b)
    print(f"  {name:<44} bitwise equal: {same!s:<5}  max |diff| {diff:.3g}")
    return diff <= 1e-3 * max(1.0, b.abs().max().item())


def deviation(name: str, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Print how far ``a`` (an opt-in fast path) is from ``b`` (eager): max |diff|, and relative to the largest |b|."""
    a, b = a.float(), b.float()
    diff = (a - b).abs().max().item() if a.numel() else 0.0
    scale = b.abs().max().item() if b.numel() else 0.0
    print(f"  {name:<44} bitwise equal: {torch.equal(a, b)!s:<5}  max |diff| {diff:.3g}  "
          f"max |diff| / max |eager| {diff / scale if scale else float('nan'):.3g}  (max |eager| {scale:.3g})")
    return True  # a measurement, not a check


def counters(model: PromptLearner) -> dict[str, tuple[int, int]]:
    """``{pass name: (captures, replays)}`` of a model's CUDA-graph runners."""
    return {name: (r.captures, r.replays) for name, r in model.graph_runners.items()}


def step_run(fast: bool, checkpoint: str, steps: int, s: tp.Settings) -> tuple[list[float], dict, dict, dict]:
    """``steps`` bf16 training steps, then eval logits, the query and the teacher's logits of the first batch; the
    fast paths (with ``s.compile``: compiled; with ``s.patch_embed_gemm``: the patch embedding as a GEMM) or the eager
    run with fp32 frozen weights and the convolution. The query and the teacher's logits only with ``s.compile`` or
    ``s.patch_embed_gemm`` (the default check leaves the graphs' counters as they were)."""
    passes = measuring(s)
    s = tp.Settings(s.device, s.tiny, 0, 0, fast and s.compile, cast_weights=fast, cuda_graphs=fast and s.cuda_graphs,
                    graph_prompts=fast and s.graph_prompts, concurrent_teacher=fast and s.concurrent_teacher,
                    patch_embed_gemm=fast and s.patch_embed_gemm,
                    compile_training_pass=fast and s.compile_training_pass,
                    teacher_low_precision=fast and s.teacher_low_precision)
    torch.manual_seed(0)
    model = Distiller(method=KDP(), teacher_checkpoint=checkpoint, backbone=tp.backbone("S", s), prompt=tp.coda(s),
                      task_sizes=tp.TASK_SIZES, epochs_per_task=1)
    model = tp.prepare(model, s)
    batches = [tp.synthetic_batch(64, s) for _ in range(steps)]
    tp.set_precision(model, "bf16", s)
    model.train()
    losses = []
    for i, batch in enumerate(batches):
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            loss = model.training_step(batch, i)
        losses.append(loss.item())
        loss.backward()
        for p in model.parameters():
            if p.grad is not None:
                p.data.add_(p.grad, alpha=-1e-3)  # plain SGD: identical in both runs, no optimizer state to compare
                p.grad = None
    model.eval()
    with torch.no_grad(), torch.autocast(s.device.type, dtype=torch.bfloat16):
        logits = model(batches[0][0], task=0)
        outputs = {"eval logits": logits}
        if passes:  # the training step's passes on its first batch again (replayed, where graphed)
            outputs["query (student's)"] = query = model.query(batches[0][0])
            outputs["teacher logits"] = model.teacher_forward(batches[0][0], 0, query).logits
    runners = {**counters(model), "side streams": len(model.fast_paths.streams)}
    fell_back = {name: r.disabled_reason for name, r in model.graph_runners.items() if r.disabled_reason}
    return losses, model.trainable_state(), outputs, {**runners, "fell back to eager": fell_back}


def opt_in_levers(s: tp.Settings) -> list[tuple[str, str]]:
    """The opt-in paths that are not bitwise and are on, as ``(flag, what it does)``."""
    levers = (("--compile", "compiled", s.compile), ("--patch-embed-gemm", "patch embedding as a GEMM",
                                                       s.patch_embed_gemm),
              ("--compile-training-pass", "the compiled training pass graphed", s.compile_training_pass),
              ("--teacher-low-precision", "the teacher in bf16 outside autocast", s.teacher_low_precision))
    return [(flag, what) for flag, what, on in levers if on]


def measuring(s: tp.Settings) -> bool:
    """An opt-in path that is not bitwise is on (``compile``, ``patch_embed_gemm``): print deviations, check none."""
    return bool(opt_in_levers(s))


def check_steps(steps: int, s: tp.Settings) -> bool:
    levers = ", ".join(what for _, what in opt_in_levers(s))
    what = f"fast paths ({levers})" + (" with CUDA graphs" if s.cuda_graphs else " without CUDA graphs")
    print(f"# step check: B->S KDP distiller, {steps} bf16 training steps, then eval logits"
          + (f"; {what} vs eager: measured deviation (not bitwise by design)" if measuring(s) else ""))
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = tp.write_teacher_checkpoint("B", "S", "own", directory, s)
        base_losses, base_state, base_out, _ = step_run(False, checkpoint, steps, s)
        fast_losses, fast_state, fast_out, runners = step_run(True, checkpoint, steps, s)
    fell_back = runners.pop("fell back to eager")
    print(f"  graph runners (captures, replays): {runners}")
    check = deviation if measuring(s) else compare
    ok = check("training losses", torch.tensor(fast_losses), torch.tensor(base_losses))
    for name, value in base_state.items():
        ok &= check(f"learned {name}", fast_state[name], value)
    for name in ("eval logits", *(("query (student's)", "teacher logits") if measuring(s) else ())):
        ok &= check(name, fast_out[name], base_out[name])
    if fell_back:
        print(f"  GRAPH CAPTURE FAILED, these passes ran eagerly: {fell_back}")
        ok = False
    if s.device.type == "cuda" and s.cuda_graphs:
        expected = ("teacher", "query", "train", *(("prompt",) if s.graph_prompts else ()))
        replayed = all(runners.get(name, (0, 0))[1] > 0 for name in expected)
        if not replayed:
            print(f"  NOT REPLAYED from CUDA graphs: {[n for n in expected if runners.get(n, (0, 0))[1] == 0]}")
        ok &= replayed
        ok &= runners["side streams"] == int(s.concurrent_teacher)
    return ok


def fit(model: PromptLearner, data: ContinualDataModule, root: Path) -> tuple[torch.Tensor, dict]:
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint

    evaluation = ContinualEvaluation(print_table=False, log_image=False)
    trainer = Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=root,
                      callbacks=[evaluation, ModelCheckpoint(dirpath=root / "checkpoints", save_last=True)],
                      **data.trainer_kwargs())
    trainer.fit(model, data)
    return evaluation.matrix, model.trainable_state()


def check_fit(s: tp.Settings) -> bool:
    print("# fit check: tiny CODA teacher, then a KDP student, Trainer(gpu, bf16-mixed), fast paths on vs off")
    tiny = {"img_size": 32, "patch_size": 8, "depth": 4, "num_heads": 2}
    teacher_vit = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**tiny, "embed_dim": 64})
    student_vit = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**tiny, "embed_dim": 32})
    coda = functools.partial(CodaPrompt, pool_size=20, length=8, layers=(0, 1, 2))
    ok = True
    with tempfile.TemporaryDirectory() as directory:
        results = {}
        for fast in (False, True):
            root = Path(directory) / f"fast_{fast}"
            data = ContinualDataModule(source=SyntheticShapes(num_classes=8, train_per_class=32, test_per_class=8),
                                       num_tasks=2, epochs_per_task=2, batch_size=16, image_size=32)
            flags = dict(cast_frozen_weights=fast, cuda_graphs=fast, graph_prompts=fast and s.graph_prompts)
            torch.manual_seed(0)
            teacher = PromptLearner(backbone=teacher_vit, prompt=coda, **data.model_kwargs(), **flags)
            teacher_matrix, _ = fit(teacher, data, root / "teacher")
            torch.manual_seed(1)
            student = Distiller(method=KDP(), teacher_checkpoint=str(root / "teacher/checkpoints/last.ckpt"),
                                backbone=student_vit, prompt=coda, **data.model_kwargs(), **flags,
                                concurrent_teacher=fast and s.concurrent_teacher)
            student_matrix, state = fit(student, data, root / "student")
            print(f"  fast={fast}: teacher matrix {teacher_matrix.tolist()}, student matrix {student_matrix.tolist()}, "
                  f"student graph runners {counters(student)}")
            results[fast] = teacher_matrix, student_matrix, state
        (t0, s0, state0), (t1, s1, state1) = results[False], results[True]
        ok &= compare("teacher accuracy matrix", t1.nan_to_num(-1), t0.nan_to_num(-1))
        ok &= compare("student accuracy matrix", s1.nan_to_num(-1), s0.nan_to_num(-1))
        for name, value in state0.items():
            ok &= compare(f"student {name}", state1[name], value)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="tiny ViTs; no fit check unless on CUDA")
    parser.add_argument("--graph-prompts", action="store_true", help="the fast paths with graph_prompts (the "
                        "prompt pool's training pass from CUDA graphs; off by default)")
    parser.add_argument("--no-concurrent-teacher", action="store_true", help="the fast paths without "
                        "concurrent_teacher (the teacher's pass on a second CUDA stream)")
    parser.add_argument("--compile", action="store_true", help="opt-in, not bitwise: the fast paths with compile=True "
                        "(the compiled gradient-free passes captured into the CUDA graphs); prints the measured "
                        "deviation from eager instead of checking equality; the step check only")
    parser.add_argument("--patch-embed-gemm", action="store_true", help="opt-in, not bitwise: the fast paths with "
                        "patch_embed_gemm=True (the patch-embedding convolution as reshape + one GEMM) against the "
                        "eager run with the convolution; prints the measured deviation; the step check only")
    parser.add_argument("--compile-training-pass", action="store_true", help="with --compile: the compiled prompted "
                        "training pass captured in the CUDA graphs too (experimental)")
    parser.add_argument("--teacher-low-precision", action="store_true", help="opt-in, not bitwise: the fast paths "
                        "with teacher_low_precision=True (the teacher entirely in bf16 outside autocast) against the "
                        "eager run's autocast teacher; prints the measured deviation; the step check only")
    parser.add_argument("--no-cuda-graphs", action="store_true", help="with --compile, --patch-embed-gemm or "
                        "--teacher-low-precision: without CUDA graphs")
    args = parser.parse_args(argv)
    if args.no_cuda_graphs and not (args.compile or args.patch_embed_gemm or args.teacher_low_precision):
        parser.error("--no-cuda-graphs goes with --compile, --patch-embed-gemm or --teacher-low-precision (without "
                     "them there is no fast path left to check)")
    if args.compile_training_pass and not args.compile:
        parser.error("--compile-training-pass needs --compile")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = tp.Settings(device, args.tiny, 0, 0, args.compile, cuda_graphs=not args.no_cuda_graphs,
                    graph_prompts=args.graph_prompts, concurrent_teacher=not args.no_concurrent_teacher,
                    patch_embed_gemm=args.patch_embed_gemm, compile_training_pass=args.compile_training_pass,
                    teacher_low_precision=args.teacher_low_precision)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    ok = check_steps(args.steps, s)
    if measuring(s):
        flags = " ".join(flag for flag, _ in opt_in_levers(s))
        print(f"({flags}: no fit check; the deviations above are measurements, nothing is asserted on them)")
        print("OK: the fast paths ran as asked" if ok else "FAILED: see above (fallback to eager / no replay)")
        return 0 if ok else 1
    if device.type == "cuda":
        ok &= check_fit(s)
    print("OK: the fast paths match the eager fp32-weight run" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
