"""Every YAML in configs/ parses and trains a few steps through the real `cdl` CLI with a tiny backbone and data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from cdl_lightning.cli import cleanup_temp_configs, cli_main, expand_config_args

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
TINY_VIT = {
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "checkpoint_path": None,
    # width >= 100 so CODA's 100 orthogonal components fit; depth 5 for CODA's layers 0-4
    "model_kwargs": {"img_size": 32, "patch_size": 16, "embed_dim": 128, "depth": 5, "num_heads": 2},
}
LEARNERS = sorted(p for p in CONFIGS.glob("*/*/vit_*.yaml"))
STUDENTS = sorted(p for p in CONFIGS.glob("*/*/*_to_*.yaml"))
METHODS = sorted(CONFIGS.glob("methods/*.yaml"))


@pytest.fixture(autouse=True)
def _no_temporary_configs_left():
    """`expand_config_args` writes temporary files; `cdl` deletes them when it returns, these tests call it directly."""
    yield
    cleanup_temp_configs()


def tiny_override(tmp_path: Path, query_backbone: bool = False) -> str:
    """An override applied last: tiny backbone, synthetic data, CPU, two batches per epoch."""
    override = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "precision": "32-true",
            "limit_train_batches": 2,
            "limit_val_batches": 2,
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "data": {
            "source": {
                "class_path": "cdl_lightning.data.SyntheticShapes",
                "init_args": {"num_classes": 8, "train_per_class": 8, "test_per_class": 4},
            },
            "num_tasks": 2,
            "epochs_per_task": 1,
            "batch_size": 8,
            "image_size": 32,
            "num_workers": 0,
        },
        "model": {"init_args": {"backbone": TINY_VIT, **({"query_backbone": TINY_VIT} if query_backbone else {})}},
        "evaluation": {"print_table": False, "log_image": False},
    }
    path = tmp_path / f"tiny{int(query_backbone)}.yaml"
    path.write_text(yaml.safe_dump(override))
    return str(path)


def run_fit(configs: list[Path | str], workdir: Path) -> list[str]:
    """``cdl fit --config C1 --config C2 ...`` with ``workdir`` as the working directory (the configs write their runs
    to relative ``runs/...``); returns the argument list it ran."""
    args = ["fit"]
    for config in configs:
        args += ["--config", str(config)]
    previous = os.getcwd()
    os.chdir(workdir)
    try:
        cli_main(expand_config_args(args))
    finally:
        os.chdir(previous)
    return args


def teacher_for(student: Path) -> Path:
    teacher = student.name.split("_to_")[0]
    return student.parent / f"vit_{teacher}.yaml"


def test_config_inventory():
    # the paper's table: 2 datasets x 3 learners x (3 backbones + 2 pairs), 7 methods
    assert len(LEARNERS) == 18 and len(STUDENTS) == 12
    assert {p.stem for p in METHODS} == {"none", "kd", "dkd", "fitnets", "reviewkd", "deit", "kdp"}


def test_base_expansion_order(tmp_path):
    files = expand_config_args(["fit", "--config", str(CONFIGS / "cifar100/coda/b_to_s.yaml")])
    names = [Path(f).name for f in files[2::2]]
    assert names[:5] == ["trainer.yaml", "cifar100.yaml", "distiller.yaml", "coda.yaml", "vit_s.yaml"]
    assert names[-1].endswith("b_to_s.yaml")


@pytest.mark.parametrize("config", LEARNERS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_learner_configs_run(config, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_fit([config, tiny_override(tmp_path)], tmp_path)
    run_dir = tmp_path / "runs" / config.relative_to(CONFIGS).with_suffix("")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["filled_rows"] == [0, 1]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("index", range(len(STUDENTS)), ids=lambda i: str(STUDENTS[i].relative_to(CONFIGS)))
def test_student_configs_run(index, tmp_path, monkeypatch):
    """Each student file with a method (rotating so every method runs), after its teacher config has run."""
    student = STUDENTS[index]
    method = METHODS[index % len(METHODS)]
    monkeypatch.chdir(tmp_path)
    tiny = tiny_override(tmp_path)
    run_fit([teacher_for(student), tiny], tmp_path)
    run_fit([student, method, tiny], tmp_path)
    run_dirs = sorted((tmp_path / "runs" / student.relative_to(CONFIGS).with_suffix("")).glob("version_*"))
    metrics = json.loads((run_dirs[-1] / "metrics.json").read_text())
    assert metrics["filled_rows"] == [0, 1]
    assert all(v is not None for v in metrics["accuracy_matrix"][1])


@pytest.mark.parametrize("pair", ["b_to_s", "l_to_b"])
def test_reference_overlays_run(pair, tmp_path, monkeypatch):
    """The reference protocol (query from the student's architecture, no normalisation, LR off-by-one) on a
    teacher and a KDP student; the shared query ViT means the student computes the query once for both."""
    monkeypatch.chdir(tmp_path)
    tiny = tiny_override(tmp_path, query_backbone=True)
    reference = CONFIGS / "reference" / f"{pair}.yaml"
    student = CONFIGS / "cifar100" / "coda" / f"{pair}.yaml"
    run_fit([teacher_for(student), reference, tiny], tmp_path)
    cli = cli_main(
        expand_config_args(
            [
                "fit",
                "--config",
                str(student),
                "--config",
                str(CONFIGS / "methods/kdp.yaml"),
                "--config",
                str(reference),
                "--config",
                tiny,
            ]
        )
    )
    model = cli.model
    assert model.hparams.reference_lr_off_by_one and model.backbone_config.input_norm == "none"
    assert model.share_query


def test_every_config_file_is_covered():
    covered = set(LEARNERS) | set(STUDENTS) | set(METHODS) | set(CONFIGS.glob("reference/*.yaml"))
    covered |= set(CONFIGS.glob("base/*.yaml")) | {CONFIGS / "demo.yaml"} | set(CONFIGS.glob("demo/*.yaml"))
    # the proxy's learner configs (and their bases) run through the CLI in test_pretrain.py, the sweep files are
    # planned in test_sweep.py
    covered |= set(CONFIGS.glob("proxy/*/*.yaml")) | set(CONFIGS.glob("proxy/*.yaml")) | set(CONFIGS.glob("sweeps/*"))
    # configs/proxy/measured/ holds records of what ran on the GPU machine (the device-side sweep files), not configs
    covered |= set(CONFIGS.glob("proxy/measured/**/*.yaml"))
    assert covered == set(CONFIGS.rglob("*.yaml"))
