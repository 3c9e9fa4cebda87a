"""ContinualDataModule under real DDP (2 CPU processes, gloo): sharded training data, exact evaluation."""

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning.pytorch as pl
    import torch
    from cdl_lightning.data import ContinualDataModule, SyntheticShapes

    class Recorder(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(3 * 8 * 8, 6)
            self.train_batches, self.val_targets, self.val_tasks = [], [], []

        def training_step(self, batch, batch_idx):
            images, targets, task_ids = batch
            self.train_batches.append([self.current_epoch, len(targets)])
            return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

        def validation_step(self, batch, batch_idx):
            self.val_targets += batch[1].tolist()
            self.val_tasks += batch[2].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    source = SyntheticShapes(num_classes=6, train_per_class=11, test_per_class=3, image_size=8)
    dm = ContinualDataModule(source, num_tasks=2, epochs_per_task=1, batch_size=4, eval_batch_size=2, image_size=8)
    model = Recorder()
    trainer = pl.Trainer(
        max_epochs=2, reload_dataloaders_every_n_epochs=1, num_sanity_val_steps=0, accelerator="cpu", devices=2,
        strategy="ddp", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    result = {
        "train_batches": model.train_batches,
        "val_targets": model.val_targets,
        "val_tasks": model.val_tasks,
        "train_sampler": type(trainer.train_dataloader.sampler).__name__,
        "rank": trainer.global_rank,
    }
    with open(f"{sys.argv[1]}/rank{trainer.global_rank}.json", "w") as f:
        json.dump(result, f)
    """
)


@pytest.mark.slow  # two DDP processes (gloo) started in a subprocess
def test_ddp_train_shards_and_exact_validation(tmp_path):
    script = tmp_path / "ddp_data.py"
    script.write_text(SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in ranks:
        assert result["train_sampler"] == "ResumableSampler"  # not replaced by Lightning's DistributedSampler
        # 33 samples per task -> 17 per rank (one padded) -> batches of 4, 4, 4, 4, 1 in each epoch
        assert result["train_batches"] == [[e, n] for e in range(2) for n in (4, 4, 4, 4, 1)]
    # validation after epoch 0 sees task 0 (9 samples), after epoch 1 tasks 0 and 1 (18): each sample exactly once
    targets = sorted(ranks[0]["val_targets"] + ranks[1]["val_targets"])
    assert targets == sorted([c for c in range(3) for _ in range(3)] + [c for c in range(6) for _ in range(3)])
    assert len(ranks[0]["val_tasks"]) == 5 + 9 and len(ranks[1]["val_tasks"]) == 4 + 9
