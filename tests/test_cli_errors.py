"""`cdl` speaks to a user's mistakes in a few lines: exit status 2, the option and the fix, no traceback."""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _cli_helpers import TINY_BACKBONE, as_args, cpu_run_options

from cdl_lightning.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def options(tmp_path: Path, **extra: object) -> list[str]:
    return as_args({
        **cpu_run_options(tmp_path, "run"),
        "--data.source.num_classes": 4,
        "--data.num_tasks": 2,
        "--data.image_size": 32,
        "--model.backbone": TINY_BACKBONE,
        **extra,
    })


def user_error(capsys, argv: list[str]) -> str:
    """Run ``cdl ARGV``, expect exit status 2, and return stderr (checked to be short and traceback-free)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Seed set" not in line]
    assert "Traceback" not in err and len(lines) <= 3, err
    assert lines[0].startswith(f"cdl {argv[0]}: error: ")
    return lines[0]


def test_missing_weights_file(tmp_path, capsys):
    weights = f'"pretrained": false, "checkpoint_path": "{tmp_path}/w.pth"'
    backbone = TINY_BACKBONE.replace('"pretrained": false', weights)
    line = user_error(capsys, ["fit", *options(tmp_path, **{"--model.backbone": backbone})])
    assert "checkpoint_path" in line and "w.pth" in line and "does not exist" in line


def test_bad_value_and_bad_folder(tmp_path, capsys):
    assert "num_tasks" in user_error(capsys, ["fit", *options(tmp_path, **{"--data.num_tasks": 0})])
    folder = ["--data.source", "cdl_lightning.data.ImageFolderSource", "--data.source.root", str(tmp_path / "none")]
    assert str(tmp_path / "none") in user_error(capsys, ["fit", *options(tmp_path), *folder])


def test_missing_teacher_checkpoint(tmp_path, capsys):
    student = {"--model": "cdl_lightning.models.Distiller", "--model.method": "cdl_lightning.nn.LogitKD",
               "--model.teacher_checkpoint": str(tmp_path / "teacher.ckpt")}
    line = user_error(capsys, ["fit", *options(tmp_path, **student)])
    assert "teacher checkpoint" in line and "teacher.ckpt" in line


def test_teacher_with_another_input_or_token_grid_is_refused_before_compute(tmp_path, capsys):
    # a teacher run's checkpoint (as TeacherRun reads it) on 32 px images in 8 px patches
    from cdl_lightning.models.distiller import TeacherRun
    from cdl_lightning.nn.vit import as_backbone_config
    from cdl_lightning.tasks import TaskSchedule

    teacher = tmp_path / "teacher.ckpt"
    backbone = {"name": "vit_tiny_patch16_224", "pretrained": False,
                "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}}
    cdl = {"task_sizes": [2, 2], "class_order": None, "prompt_spec": None, "task_snapshots": [{}, {}]}
    torch.save({"hyper_parameters": {"backbone": backbone}, "cdl": cdl}, teacher)
    # FitNets compares the tokens of both: a student on 16 px patches (2x2 grid) is refused
    student_backbone = TINY_BACKBONE.replace('"patch_size": 8', '"patch_size": 16')
    student = {"--model": "cdl_lightning.models.Distiller", "--model.method": "cdl_lightning.nn.FitNets",
               "--model.teacher_checkpoint": str(teacher), "--model.backbone": student_backbone}
    line = user_error(capsys, ["fit", *options(tmp_path, **student)])
    assert "4x4 patch grid" in line and "2x2 patches" in line and str(teacher) in line and "patch grid differs" in line
    # logit distillation only needs the same images: another patch grid is fine, another input size is not
    run, schedule = TeacherRun(str(teacher)), TaskSchedule((2, 2))
    run.check_matches(schedule, as_backbone_config(json.loads(student_backbone)), same_tokens=False)
    larger = json.loads(TINY_BACKBONE)
    larger["model_kwargs"]["img_size"] = 64
    with pytest.raises(ValueError, match="input size differs"):
        run.check_matches(schedule, as_backbone_config(larger), same_tokens=False)


def test_unknown_keys_suggest_the_closest_and_name_the_file(tmp_path, capsys):
    config = tmp_path / "mine.yaml"
    config.write_text("model:\n  init_args:\n    lrr: 0.1\n")
    line = user_error(capsys, ["fit", *options(tmp_path), "--config", str(config)])
    assert "`lrr`" in line and str(config) in line and "did you mean `lr`" in line
    line = user_error(capsys, ["fit", *options(tmp_path), "--data.batch_sizee", "3"])
    assert "--data.batch_sizee" in line and "did you mean --data.batch_size" in line


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    bad = options(tmp_path, **{"--data.num_tasks": 0})
    with pytest.raises(Exception) as error_info:
        main(["fit", *bad, "--debug"])
    assert not isinstance(error_info.value, SystemExit)
    monkeypatch.setenv("CDL_DEBUG", "1")
    with pytest.raises(Exception) as error_info:
        main(["fit", *bad])
    assert not isinstance(error_info.value, SystemExit)


def test_optimizer_options_are_refused(tmp_path, capsys):
    line = user_error(capsys, ["fit", *options(tmp_path), "--optimizer", "SGD"])
    assert "--optimizer" in line and "--model.init_args.lr" in line
    config = tmp_path / "opt.yaml"
    config.write_text("lr_scheduler:\n  class_path: torch.optim.lr_scheduler.StepLR\n")
    line = user_error(capsys, ["fit", *options(tmp_path), "--config", str(config)])
    assert f"lr_scheduler (in {config})" in line


def test_base_expansion_leaves_no_temporary_files(tmp_path, capsys, monkeypatch):
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    # a config with a _base_ list (written to a temporary file), then a parse error: the file is gone afterwards
    user_error(capsys, ["fit", "--config", str(CONFIGS / "cifar100/coda/vit_s.yaml"), "--data.batch_sizee", "3"])
    assert list(temp.iterdir()) == []


def test_help_lists_every_subcommand(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for name in ("fit", "validate", "test", "predict", "compare", "pretrain"):
        assert f"\n  {name} " in out


def test_no_argv_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["cdl", "fit", "--print_config"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(SystemExit):
            main(["fit", *options(tmp_path), "--print_config"])
    assert not [w for w in caught if "intended to run from within Python" in str(w.message)]


@pytest.mark.parametrize("null", [["null"], ["None"], ["=null"]])
def test_null_for_one_backbone_field_on_the_command_line_is_none(tmp_path, capsys, null):
    """``--model.init_args.backbone.checkpoint_path null`` unsets the demo's weights file (jsonargparse alone would
    pass the string 'None' and the run would look for a file of that name); the backbone's other fields stay."""
    key = "--model.init_args.backbone.checkpoint_path"
    override = [key + null[0]] if null[0].startswith("=") else [key, *null]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "demo.yaml"), *override, "--print_config"])
    assert exit_info.value.code in (0, None)
    backbone = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["backbone"]
    assert backbone["checkpoint_path"] is None
    assert backbone["name"] == "vit_tiny_patch16_224" and backbone["model_kwargs"]["embed_dim"] == 96
