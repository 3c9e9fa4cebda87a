"""ContinualDataModule: task loaders, eval coverage, resumable training loader, RNG callback, exact resume in a fit."""

import random
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from PIL import Image

from cdl_lightning.callbacks.rng_state import RNGStateCallback
from cdl_lightning.data import ContinualDataModule, ImageFolderSource, ResumableDataLoader, SyntheticShapes


def _small_source(**kwargs):
    args = {"num_classes": 6, "train_per_class": 10, "test_per_class": 3, "image_size": 8, "seed": 0}
    return SyntheticShapes(**{**args, **kwargs})


class _FakeTrainer:
    """What the datamodule reads from a trainer."""

    def __init__(self, epoch=0, world_size=1, rank=0, training=True):
        self.current_epoch, self.world_size, self.global_rank = epoch, world_size, rank
        self.training, self.predicting = training, False
        self.state, self.lightning_module = SimpleNamespace(fn="fit"), None


def test_attributes_and_validation():
    dm = ContinualDataModule(_small_source(), num_tasks=3, class_order=[5, 4, 3, 2, 1, 0], epochs_per_task=2)
    assert dm.num_tasks == 3 and dm.num_classes == 6 and dm.epochs_per_task == 2
    assert dm.task_sizes == [2, 2, 2] and dm.task_offsets == [0, 2, 4]
    assert dm.class_order == [5, 4, 3, 2, 1, 0] and dm.class_names[:2] == ["bars_0", "triangle_0"]
    assert dm.current_task == 0 and list(dm.task_classes(2)) == [4, 5]
    assert ContinualDataModule().num_classes == 20  # default: the offline synthetic source
    assert ContinualDataModule(_small_source(), num_tasks=2, class_order="random", seed=1).class_order == [
        int(c) for c in np.random.default_rng(1).permutation(6)
    ]
    with pytest.raises(ValueError, match="cannot split 6 classes evenly into 4 tasks"):
        ContinualDataModule(_small_source(), num_tasks=4)
    with pytest.raises(ValueError, match="duplicates"):
        ContinualDataModule(_small_source(), num_tasks=2, class_order=[0, 0, 1, 2, 3, 4])
    with pytest.raises(FileNotFoundError, match="predict_root"):
        ContinualDataModule(_small_source(), num_tasks=2, predict_root="/nonexistent/folder")
    assert "task_sizes=[2, 2, 2]" in repr(dm) and str(dm) == repr(dm)
    assert "task 2: classes [4, 6)" in dm.summary()


def test_train_loader_has_only_current_task_and_val_covers_seen_tasks():
    dm = ContinualDataModule(
        _small_source(), num_tasks=3, first_task_classes=2, class_order="random", epochs_per_task=2, batch_size=4
    )
    for epoch in range(6):
        dm.trainer = _FakeTrainer(epoch)
        task = epoch // 2
        assert dm.current_task == task
        images, targets, task_ids = (torch.cat(parts) for parts in zip(*dm.train_dataloader(), strict=True))
        assert images.shape == (20, 3, 8, 8) and images.dtype == torch.uint8
        assert sorted(set(targets.tolist())) == list(dm.task_classes(task)) and set(task_ids.tolist()) == {task}
        # remapped targets correspond to the original labels through class_order
        original = dm.source.labels("train")[dm.task_dataset("train", task).indices]
        assert [dm.class_order[t] for t in dm.task_dataset("train", task).targets] == original.tolist()
        images, targets, task_ids = (torch.cat(parts) for parts in zip(*dm.val_dataloader(), strict=True))
        assert len(targets) == 6 * (task + 1)
        assert np.bincount(task_ids.numpy()).tolist() == [6] * (task + 1)
        assert torch.equal(task_ids, targets // 2)
    dm.trainer = _FakeTrainer(100)
    assert dm.current_task == 2  # clamped
    test = dm.test_dataloader()
    assert len(test.dataset) == 18 and sorted(set(test.dataset.task_ids.tolist())) == [0, 1, 2]


def test_train_shuffle_is_seeded_per_epoch_and_sharded():
    dm = ContinualDataModule(_small_source(), num_tasks=2, batch_size=5, epochs_per_task=2)
    order = lambda epoch, world=1, rank=0: _indices(dm, epoch, world, rank)  # noqa: E731
    assert order(0) == order(0) and order(0) != order(1) and sorted(order(0)) == sorted(order(1))
    shards = [order(0, 3, r) for r in range(3)]
    assert [len(s) for s in shards] == [10, 10, 10] and sorted(sum(shards, [])) == sorted(order(0))


def _indices(dm, epoch, world, rank):
    dm.trainer = _FakeTrainer(epoch, world, rank)
    loader = dm.train_dataloader()
    return [int(loader.dataset.indices[i]) for i in loader.sampler]


def test_eval_loader_is_exact_under_ddp():
    dm = ContinualDataModule(_small_source(num_classes=4, test_per_class=5), num_tasks=2, eval_batch_size=3)
    counts = []
    for rank in range(3):
        dm.trainer = _FakeTrainer(epoch=1, world_size=3, rank=rank, training=False)
        loader = dm.test_dataloader()
        assert isinstance(loader.sampler, UnrepeatedDistributedSampler)
        counts.append(sum(len(t) for _, t, _ in loader))
    assert counts == [7, 7, 6] and sum(counts) == 20  # no padding, no duplicate


def test_resumable_loader_skips_exactly_the_consumed_batches():
    dm = ContinualDataModule(_small_source(), num_tasks=2, batch_size=4, epochs_per_task=3)
    dm.trainer = _FakeTrainer(epoch=1)
    full = [t.tolist() for _, t, _ in dm.train_dataloader()]
    assert len(full) == 8  # 30 samples / 4, last batch of 2
    loader = dm.train_dataloader()
    iterator = iter(loader)
    for _ in range(3):
        next(iterator)
    state = loader.state_dict()
    assert state["batches"] == 3 and state["epoch"] == 1 and all(isinstance(v, int) for v in state.values())
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert len(resumed) == 8
    rest = [t.tolist() for _, t, _ in resumed]
    assert rest == full[3:]
    assert resumed.state_dict()["batches"] == 8
    assert [t.tolist() for _, t, _ in resumed] == full  # the skip applies to one iteration only
    other_epoch = dm.train_dataloader()
    dm.trainer = _FakeTrainer(epoch=2)
    next_epoch = dm.train_dataloader()
    next_epoch.load_state_dict(state)  # a state from another epoch is ignored
    assert len([b for b in next_epoch]) == 8 and other_epoch is not next_epoch


def test_preprocess_train_and_eval():
    dm = ContinualDataModule(_small_source(), num_tasks=2, image_size=16, test_resize="resize_center_crop")
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    train = dm.preprocess(images, train=True)
    evaluation = dm.preprocess(images, train=False)
    assert train.shape == evaluation.shape == (3, 3, 16, 16) and train.dtype == torch.float32
    assert 0 <= train.min() and train.max() <= 1
    dm.trainer = _FakeTrainer(training=False)
    batch = dm.on_after_batch_transfer((images, torch.zeros(3).long(), torch.zeros(3).long()), 0)
    assert torch.equal(batch[0], evaluation)
    same = ContinualDataModule(_small_source(), num_tasks=2, image_size=8)
    assert torch.equal(same.preprocess(images, train=False), images.float() / 255)


def test_image_folder_datamodule_and_predict(tmp_path):
    for c, name in enumerate(["a", "b"]):
        (tmp_path / "tree" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (30 + i, 20), (100 * c, 10 * i, 50)).save(tmp_path / "tree" / name / f"{i}.png")
    (tmp_path / "new" / "sub").mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (25, 40), (i, 0, 0)).save(tmp_path / "new" / ("sub" if i else "") / f"x{i}.jpg")
    dm = ContinualDataModule(
        ImageFolderSource(str(tmp_path / "tree")),
        num_tasks=2,
        batch_size=4,
        image_size=12,
        predict_root=str(tmp_path / "new"),
    )
    images, targets, task_ids = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.uint8 and set(targets.tolist()) == {0}
    again = next(iter(dm.train_dataloader()))[0]
    assert torch.equal(images, again)  # CPU crops seeded by (seed, epoch, sample)
    val = next(iter(dm.val_dataloader()))
    assert val[0].shape == (1, 3, 12, 12) and val[1].tolist() == [0]
    assert torch.equal(dm.preprocess(val[0], train=True), val[0].float() / 255)  # file sources: dtype only
    assert [Path(p).name for p in dm.predict_paths] == ["x1.jpg", "x2.jpg", "x0.jpg"]  # sorted paths: sub/ first
    images, index = next(iter(dm.predict_dataloader()))
    assert images.shape == (3, 3, 12, 12) and index.tolist() == [0, 1, 2]


def test_rng_callback_round_trip(tmp_path):
    callback = RNGStateCallback()
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = callback.state_dict()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    torch.save({"rng": state}, tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)["rng"]
    RNGStateCallback().load_state_dict(loaded)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


class _Recorder(pl.LightningModule):
    """Linear classifier that records every training batch (after device-side augmentation) and validation counts."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3 * 8 * 8, 6)
        self.seen: list[tuple[int, int, list[int], float]] = []
        self.val_tasks: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        images, targets, task_ids = batch
        self.seen.append((self.current_epoch, batch_idx, targets.tolist(), round(images.sum().item(), 3)))
        return torch.nn.functional.cross_entropy(self.layer(images.flatten(1)), targets)

    def on_validation_epoch_start(self):
        self.val_tasks.append([])

    def validation_step(self, batch, batch_idx):
        self.val_tasks[-1] += batch[2].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, ckpt_path=None, every=None):
    pl.seed_everything(0, verbose=False)
    model = _Recorder()
    dm = ContinualDataModule(_small_source(), num_tasks=2, epochs_per_task=2, batch_size=4, image_size=8)
    callbacks = [RNGStateCallback()]
    if every:
        callbacks.append(ModelCheckpoint(tmp_path, "{step}", every_n_train_steps=every, save_top_k=-1))
    trainer = pl.Trainer(
        max_epochs=4,
        reload_dataloaders_every_n_epochs=1,
        check_val_every_n_epoch=2,
        num_sanity_val_steps=0,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,  # Lightning's default checkpoint callback writes here, not into the cwd
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return model, trainer


def test_fit_resumes_mid_epoch_exactly(tmp_path):
    full, trainer = _fit(tmp_path, every=6)  # 8 batches per epoch (30 samples / 4): step 6 is mid-epoch 0
    assert isinstance(trainer.train_dataloader, ResumableDataLoader)
    assert len(full.seen) == 32 and [s[0] for s in full.seen] == [e for e in range(4) for _ in range(8)]
    # after task 0: task 0; after task 1: tasks 0 and 1, interleaved by class (so limit_val_batches sees every task)
    assert full.val_tasks == [[0] * 9, [0, 0, 0, 1, 1, 1] * 3]
    for epoch in range(4):
        labels = {t for s in full.seen if s[0] == epoch for t in s[2]}
        assert labels == ({0, 1, 2} if epoch < 2 else {3, 4, 5})
    for step in (6, 12, 18):  # mid-epoch of epochs 0, 1 and 2 (task 1)
        resumed, _ = _fit(tmp_path / "resume", ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert resumed.seen == full.seen[step:]
        for a, b in zip(resumed.parameters(), full.parameters(), strict=True):
            assert torch.equal(a, b)


def test_trainer_and_model_kwargs_state_the_data_facts_once():
    from cdl_lightning.data import ContinualDataModule, SyntheticShapes

    dm = ContinualDataModule(SyntheticShapes(num_classes=6, train_per_class=2, test_per_class=1), num_tasks=3,
                             epochs_per_task=4, class_order="random", seed=1)
    assert dm.trainer_kwargs() == {"max_epochs": 12, "check_val_every_n_epoch": 4,
                                   "reload_dataloaders_every_n_epochs": 1, "num_sanity_val_steps": 0}
    kwargs = dm.model_kwargs()
    assert list(kwargs) == ["task_schedule"] and kwargs["task_schedule"] is dm.task_schedule
    schedule = dm.task_schedule.to_dict()
    assert schedule["task_sizes"] == [2, 2, 2] and schedule["epochs_per_task"] == 4
    assert sorted(schedule["class_order"]) == list(range(6)) and schedule["class_order"] == dm.class_order
    assert schedule["class_names"] == dm.class_names
