"""Subprocess script of `test_gpu_ddp.py` (DDP re-launches the script it runs, so it cannot run inside pytest).

``python _ddp_eval.py fit ROOT``: fit a tiny CODA learner on 1 GPU (bf16-mixed), ``ROOT/last.ckpt`` and
``ROOT/fit/metrics.json``. ``python _ddp_eval.py validate ROOT DEVICES``: ``trainer.validate`` of ``ROOT/last.ckpt``
on ``DEVICES`` GPUs (DDP when 2), ``ROOT/validate_{DEVICES}/metrics.json``. The test set has odd per-task sizes
(7 images per class, 3 classes per task), so 2 ranks get unequal shares and padding would show.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu import CODA, TEACHER_VIT  # noqa: E402

from cdl_lightning.callbacks import ContinualEvaluation  # noqa: E402
from cdl_lightning.data import ContinualDataModule, SyntheticShapes  # noqa: E402
from cdl_lightning.models import PromptLearner  # noqa: E402


def main(mode: str, root: Path, devices: int = 1) -> None:
    seed_everything(0, verbose=False)
    source = SyntheticShapes(num_classes=6, train_per_class=32, test_per_class=7)
    data = ContinualDataModule(source=source, num_tasks=2, epochs_per_task=2, batch_size=16, eval_batch_size=8,
                               image_size=32)
    torch.manual_seed(0)  # the random-init frozen ViT is rebuilt identically (checkpoints omit it)
    model = PromptLearner(backbone=TEACHER_VIT, prompt=CODA, **data.model_kwargs())
    name = "fit" if mode == "fit" else f"validate_{devices}"
    evaluation = ContinualEvaluation(print_table=False, log_image=False, output_dir=str(root / name))
    callbacks = [evaluation]
    if mode == "fit":
        callbacks.append(ModelCheckpoint(dirpath=root, save_last=True, enable_version_counter=False))
    trainer = Trainer(accelerator="gpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      precision="bf16-mixed", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=root, callbacks=callbacks, **data.trainer_kwargs())
    if mode == "fit":
        trainer.fit(model, data)
    else:
        trainer.validate(model, data, ckpt_path=str(root / "last.ckpt"))


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 1)
