"""`PredictionWriter`: write ``cdl predict`` results as a CSV of file, predicted class and score."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from typing_extensions import override


class PredictionWriter(BasePredictionWriter):
    """Collect ``predict_step`` outputs (dicts with ``preds``, ``scores``, ``index``) and write ``predictions.csv``.

    File names come from ``trainer.datamodule.predict_paths`` (indexed by ``index``) and class names from
    ``pl_module.class_names``, when those exist; otherwise indices are written. Under DDP each rank writes its own
    ``predictions.rank{r}.csv``.

    Args:
        output_dir: folder of the CSV; default: the trainer's log dir.
        filename: name of the CSV.
    """

    def __init__(self, output_dir: str | None = None, filename: str = "predictions.csv") -> None:
        super().__init__(write_interval="epoch")
        self.output_dir, self.filename = output_dir, filename
        self.rows: list[dict[str, Any]] = []

    @override
    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Any, batch_indices: Any
    ) -> None:
        batches = predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        paths = getattr(trainer.datamodule, "predict_paths", None) if trainer.datamodule is not None else None
        names = getattr(pl_module, "class_names", None)
        self.rows = []
        for batch in batches:
            for index, pred, score in zip(batch["index"].tolist(), batch["preds"].tolist(), batch["scores"].tolist()):
                self.rows.append({
                    "file": str(paths[index]) if paths is not None else index,
                    "class_index": pred,
                    "class_name": names[pred] if names is not None else str(pred),
                    "score": round(float(score), 6),
                })
        folder = Path(self.output_dir or trainer.log_dir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        name = self.filename if trainer.world_size == 1 else f"{Path(self.filename).stem}.rank{trainer.global_rank}.csv"
        with open(folder / name, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["file", "class_index", "class_name", "score"])
            writer.writeheader()
            writer.writerows(self.rows)
        print(f"wrote {len(self.rows)} predictions to {folder / name}")
