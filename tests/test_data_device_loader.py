"""`DeviceLoader`: a fixed-size source's batches indexed from one device tensor, the same as the DataLoader path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _cli_helpers import run_matrix, small_coda_fit_args

from cdl_lightning.cli import cli_main
from cdl_lightning.data import ContinualDataModule, SyntheticShapes
from cdl_lightning.data.device_loader import DeviceImages, DeviceLoader, ResumableDeviceLoader
from cdl_lightning.data.loaders import ResumableDataLoader, ResumableSampler


def _module() -> ContinualDataModule:
    source = SyntheticShapes(num_classes=6, train_per_class=9, test_per_class=4, image_size=8)
    return ContinualDataModule(source, num_tasks=2, batch_size=5, image_size=8)


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for ba, bb in zip(a, b, strict=True) for x, y in zip(ba, bb,
                                                                                                            strict=True))


@pytest.mark.parametrize(("world", "rank"), [(1, 0), (2, 1)])
def test_training_batches_and_mid_epoch_resume_equal_the_dataloader(world, rank):
    dm = _module()
    dataset = dm.task_dataset("train", 1).with_epoch(3)
    images = DeviceImages(dataset.base, torch.device("cpu"))

    def loaders() -> tuple[ResumableDataLoader, ResumableDeviceLoader]:
        host = ResumableDataLoader(dataset, ResumableSampler(len(dataset), 7, 3, world, rank), batch_size=5,
                                   generator=torch.Generator().manual_seed(1))
        return host, ResumableDeviceLoader(images, dataset, ResumableSampler(len(dataset), 7, 3, world, rank), 5)

    host, device = loaders()
    assert len(dataset) == 27 and len(host) == len(device) == (6 if world == 1 else 3)
    assert _equal(list(host), list(device))
    assert device.state_dict() == host.state_dict()
    # stop after 1 batch with one loader, resume with the other: the remaining batches are the same
    host, device = loaders()
    first = iter(host)
    next(first)
    state = host.state_dict()
    expected = list(first)
    resumed = loaders()[1]
    resumed.load_state_dict(state)
    assert resumed._resume_batches == 1
    assert _equal(list(resumed), expected)


def test_evaluation_batches_equal_the_dataloader():
    dm = _module()
    dataset = dm.task_dataset("test", [0, 1])
    host = torch.utils.data.DataLoader(dataset, batch_size=3, shuffle=False)
    device = DeviceLoader(DeviceImages(dataset.base, torch.device("cpu")), dataset, range(len(dataset)), 3)
    batches = list(device)
    assert len(dataset) == 24 and len(device) == len(host) == 8
    assert _equal(list(host), batches)
    assert batches[0][0].dtype == torch.uint8 and batches[0][1].dtype == batches[0][2].dtype == torch.int64


def _args(save_dir: Path, device_data: bool, *extra: str) -> list[str]:
    return small_coda_fit_args(save_dir, "--data.device_data", str(device_data).lower(), *extra)


def test_cli_device_data_gives_the_same_run_and_resumes_exactly(tmp_path):
    host, device = tmp_path / "host", tmp_path / "device"
    cli_main(_args(host, False))
    cli_main(_args(device, True))
    assert run_matrix(device) == run_matrix(host)
    assert all(v is not None for v in run_matrix(host)[2])
    state = {k: torch.load(d / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
             for k, d in (("host", host), ("device", device))}
    assert state["host"].keys() == state["device"].keys()
    assert all(torch.equal(state["host"][k], state["device"][k]) for k in state["host"])
    # stopped mid-task with the device loader, resumed with it: the uninterrupted (host loader) run's matrix
    part = tmp_path / "part"
    cli_main(_args(part, True, "--trainer.max_steps", "10", "--checkpoint.every_n_train_steps", "1",
                   "--checkpoint.every_n_epochs", "0"))
    checkpoint = part / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 10
    cli_main(_args(part, True, "--ckpt_path", str(checkpoint)))
    assert run_matrix(part) == run_matrix(host)
