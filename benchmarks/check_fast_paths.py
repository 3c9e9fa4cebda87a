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


def counters(model: PromptLearner) -> dict[str, tuple[int, int]]:
    """``{pass name: (captures, replays)}`` of a model's CUDA-graph runners."""
    return {name: (r.captures, r.replays) for name, r in model.graph_runners.items()}


def step_run(fast: bool, checkpoint: str, steps: int, s: tp.Settings) -> tuple[list[float], dict, torch.Tensor, dict]:
    s = tp.Settings(s.device, s.tiny, 0, 0, False, cast_weights=fast, cuda_graphs=fast,
                    graph_prompts=fast and s.graph_prompts, concurrent_teacher=fast and s.concurrent_teacher)
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
    runners = {**counters(model), "side streams": len(model.fast_paths.streams)}
    return losses, model.trainable_state(), logits, runners


def check_steps(steps: int, s: tp.Settings) -> bool:
    print(f"# step check: B->S KDP distiller, {steps} bf16 training steps, then eval logits")
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = tp.write_teacher_checkpoint("B", "S", "own", directory, s)
        base_losses, base_state, base_logits, _ = step_run(False, checkpoint, steps, s)
        fast_losses, fast_state, fast_logits, runners = step_run(True, checkpoint, steps, s)
    print(f"  graph runners (captures, replays): {runners}")
    ok = compare("training losses", torch.tensor(fast_losses), torch.tensor(base_losses))
    for name, value in base_state.items():
        ok &= compare(f"learned {name}", fast_state[name], value)
    ok &= compare("eval logits", fast_logits, base_logits)
    if s.device.type == "cuda":
        expected = ("teacher", "query", "train", *(("prompt",) if s.graph_prompts else ()))
        ok &= all(runners.get(name, (0, 0))[1] > 0 for name in expected)
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
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = tp.Settings(device, args.tiny, 0, 0, False, graph_prompts=args.graph_prompts,
                    concurrent_teacher=not args.no_concurrent_teacher)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    ok = check_steps(args.steps, s)
    if device.type == "cuda":
        ok &= check_fit(s)
    print("OK: the fast paths match the eager fp32-weight run" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
