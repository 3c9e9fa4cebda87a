"""Helpers shared by the tests that drive `cdl` through ``cli_main``: a tiny backbone and option lists."""

from __future__ import annotations

import json
from pathlib import Path

TINY_BACKBONE = json.dumps({
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2},
})


def cpu_run_options(save_dir: Path, name: str) -> dict[str, object]:
    """A seeded CPU run without progress bar, logged by TensorBoard to ``save_dir/name`` (no version folder), on
    the built-in synthetic data."""
    return {
        "--seed_everything": 0,
        "--trainer.accelerator": "cpu",
        "--trainer.enable_progress_bar": "false",
        "--trainer.logger": "lightning.pytorch.loggers.TensorBoardLogger",
        "--trainer.logger.save_dir": save_dir,
        "--trainer.logger.name": name,
        "--trainer.logger.version": "",
        "--data.source": "cdl_lightning.data.SyntheticShapes",
    }


def as_args(options: dict[str, object]) -> list[str]:
    """``{"--key": value}`` (in order) as a ``cli_main`` argument list."""
    return [part for key, value in options.items() for part in (key, str(value))]
