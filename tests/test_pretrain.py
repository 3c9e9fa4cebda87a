"""`cdl pretrain`: seeded (same seed -> bitwise the same weights on CPU, through the real entry point), cached by
recipe hash, with the full recipe (mixup/CutMix, smoothing, jitter), the seeded class split (the sources' own
``classes: {seed, stop}`` / ``{seed, start}`` selection) and the linear probe."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from cdl_lightning.cli import main
from cdl_lightning.data import SyntheticShapes

KWARGS = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "drop_path_rate": 0.1}'
RECIPE = ["--synthetic-classes", "8", "--classes", "4", "8", "--epochs", "2", "--batch-size", "32", "--model-kwargs",
          KWARGS, "--mixup", "0.8", "--cutmix", "1.0", "--label-smoothing", "0.1", "--jitter", "0.3"]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_same_seed_same_weights_and_cache(tmp_path, capsys):
    torch.manual_seed(123)  # the global generator's state must not matter ...
    main(["pretrain", "--out", str(tmp_path / "a.pth"), *RECIPE])
    torch.manual_seed(456)
    main(["pretrain", "--out", str(tmp_path / "b.pth"), *RECIPE])
    main(["pretrain", "--out", str(tmp_path / "c.pth"), *RECIPE, "--seed", "1"])
    a, b, c = (_weights(tmp_path / f"{n}.pth") for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # ... bitwise the same weights
    assert not all(torch.equal(a[k], c[k]) for k in a)  # another seed, other weights
    # ... and the global generator is left as it was
    state = torch.get_rng_state()
    main(["pretrain", "--out", str(tmp_path / "d.pth"), *RECIPE, "--force"])
    assert torch.equal(torch.get_rng_state(), state)
    # a rerun with the same recipe is skipped (file untouched); a changed recipe retrains
    stamp = (tmp_path / "a.pth").stat().st_mtime_ns
    capsys.readouterr()
    main(["pretrain", "--out", str(tmp_path / "a.pth"), *RECIPE])
    assert "skipping the pretraining" in capsys.readouterr().out
    assert (tmp_path / "a.pth").stat().st_mtime_ns == stamp
    sidecar = json.loads((tmp_path / "a.pth.json").read_text())
    assert sidecar["recipe"]["mixup"] == 0.8 and sidecar["recipe"]["epochs"] == 2
    main(["pretrain", "--out", str(tmp_path / "a.pth"), *RECIPE[:-2]])  # no jitter: another recipe
    assert json.loads((tmp_path / "a.pth.json").read_text())["hash"] != sidecar["hash"]
    assert (tmp_path / "a.pth").stat().st_mtime_ns != stamp


def test_class_split_builds_complementary_source_selections(tmp_path, monkeypatch):
    """``--class-split 4 --split-seed 3`` pretrains on ``classes={seed: 3, stop: 4}`` and probes on
    ``{seed: 3, start: 4}``: a partition of the classes, each part in permutation order, with the full source's
    images; ``--decode-workers`` reaches an npz source."""
    import cdl_lightning.pretrain as module

    built = {}

    def fake_pretrain(source, out, *args, probe_source, **kwargs):
        built["source"], built["probe"] = source, probe_source

    monkeypatch.setattr(module, "pretrain", fake_pretrain)
    main(["pretrain", "--out", str(tmp_path / "w.pth"), "--synthetic-classes", "10", "--class-split", "4",
          "--split-seed", "3", "--probe"])
    first, rest = built["source"], built["probe"]
    order = np.random.default_rng(3).permutation(10).tolist()
    assert isinstance(first, SyntheticShapes) and first.classes == {"seed": 3, "stop": 4}
    assert rest.classes == {"seed": 3, "start": 4}
    assert first.selected_classes == order[:4] and rest.selected_classes == order[4:]
    assert sorted(first.selected_classes + rest.selected_classes) == list(range(10))
    full = SyntheticShapes(num_classes=10, seed=1)  # --synthetic-seed defaults to 1
    assert first.class_names == [full.class_names[c] for c in order[:4]]
    for part, originals in ((first, order[:4]), (rest, order[4:])):
        for split in ("train", "test"):
            images, labels = part.arrays(split)
            full_images, full_labels = full.arrays(split)
            assert sorted(set(labels.tolist())) == list(range(len(originals)))
            for position, original in enumerate(originals):  # label k of a part is class originals[k] of the source
                assert np.array_equal(images[labels == position], full_images[full_labels == original])
            assert np.array_equal(part.labels(split), labels)
    # npz: the same selection, and --decode-workers passes through
    names = np.array([f"c{c}" for c in range(10)])
    labels = np.repeat(np.arange(10), 2)
    np.savez(tmp_path / "p.npz", names=names, train_images=np.zeros((20, 8, 8, 3), np.uint8), train_labels=labels,
             test_images=np.zeros((20, 8, 8, 3), np.uint8), test_labels=labels)
    main(["pretrain", "--out", str(tmp_path / "w.pth"), "--source", "npz", "--npz", str(tmp_path / "p.npz"),
          "--decode-workers", "2", "--class-split", "4", "--split-seed", "3", "--probe"])
    first, rest = built["source"], built["probe"]
    assert first.decode_workers == 2 and rest.decode_workers == 2
    assert first.class_names == [f"c{c}" for c in order[:4]] and rest.class_names == [f"c{c}" for c in order[4:]]
    # without --probe there is no probe source; K must leave classes to hold out
    main(["pretrain", "--out", str(tmp_path / "w.pth"), "--synthetic-classes", "10", "--class-split", "4"])
    assert built["probe"] is None and built["source"].num_classes == 4
    for bad in ("10", "0"):
        with pytest.raises(SystemExit):
            main(["pretrain", "--out", str(tmp_path / "w.pth"), "--synthetic-classes", "10", "--class-split", bad])


def test_class_split_with_probe(tmp_path):
    out = tmp_path / "w.pth"
    main(["pretrain", "--out", str(out), "--synthetic-classes", "10", "--class-split", "5", "--probe", "--epochs", "1",
          "--model-kwargs", KWARGS.replace(', "drop_path_rate": 0.1', "")])
    result = json.loads(out.with_name("w.pth.json").read_text())["result"]
    # the synthetic shapes are easy: the probe on the 5 held-out classes beats chance (20 %) clearly
    assert result["probe_acc"] > 40.0
    recipe = json.loads(out.with_name("w.pth.json").read_text())["recipe"]
    order = np.random.default_rng(0).permutation(10).tolist()  # --split-seed defaults to 0
    assert recipe["source_classes"] == order[:5] and recipe["probe_classes"] == order[5:]
    assert recipe["source"].startswith("SyntheticShapes(") and "kept 5 of 10 classes" in recipe["source"]
    assert recipe["probe"].startswith("SyntheticShapes(") and "kept 5 of 10 classes" in recipe["probe"]


def test_proxy_configs_select_the_held_out_classes(tmp_path, monkeypatch):
    """configs/proxy/*: the continual run sees classes 102..201 of the seed-0 permutation, 10 tasks of 10, in that
    order (a fake 202-class pack stands in for ../shared/data/tiny-imagenet-32.npz)."""
    from pathlib import Path

    from cdl_lightning.cli import cli_main, expand_config_args

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "work").mkdir()
    names = np.array([f"n{c:03d}" for c in range(202)])
    labels = np.arange(202)
    np.savez(tmp_path / "shared" / "data" / "tiny-imagenet-32.npz", names=names,
             train_images=np.zeros((202, 32, 32, 3), np.uint8), train_labels=labels,
             val_images=np.zeros((202, 32, 32, 3), np.uint8), val_labels=labels)
    monkeypatch.chdir(tmp_path / "work")
    from cdl_lightning.nn.vit import create_vit

    Path("runs/proxy/backbones").mkdir(parents=True)
    kwargs = {"student": {"img_size": 32, "patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 2},
              "teacher": {"img_size": 32, "patch_size": 4}}
    for role in ("student", "teacher"):
        vit = create_vit("vit_tiny_patch16_224", model_kwargs=kwargs[role])
        torch.save({k: v.half() for k, v in vit.state_dict().items()}, f"runs/proxy/backbones/{role}.pth")
    # configs/proxy/sweep_packed.yaml reads the same classes from a pack of the 100 continual ones
    main(["pack", str(tmp_path / "shared" / "data" / "tiny-imagenet-32.npz"), "runs/proxy/tiny-imagenet-proxy-cl.npz",
          "--classes", "{seed: 0, start: 102}"])
    packed = yaml.safe_load((root / "configs" / "proxy" / "sweep_packed.yaml").read_text())["overrides"]
    order = np.random.default_rng(0).permutation(202)
    for learner in ("coda", "dualprompt", "l2p"):
        for role in ("student", "teacher"):
            config = str(root / "configs" / "proxy" / learner / f"{role}.yaml")
            for extra in ([], packed):
                cli = cli_main(expand_config_args(["--config", config, "--trainer.logger", "false",
                                                   "--trainer.accelerator", "cpu", *extra]), run=False)
                data = cli.datamodule
                assert data.num_classes == 100 and data.task_sizes == [10] * 10
                assert data.class_names == [f"n{c:03d}" for c in order[102:]]
                assert cli.model.hparams.backbone["model_kwargs"] == kwargs[role]


def test_save_dtype_float16_rounds_the_same_weights_and_loads(tmp_path):
    from cdl_lightning.nn.vit import create_vit

    main(["pretrain", "--out", str(tmp_path / "full.pth"), *RECIPE])
    main(["pretrain", "--out", str(tmp_path / "half.pth"), *RECIPE, "--save-dtype", "float16"])
    full, half = _weights(tmp_path / "full.pth"), _weights(tmp_path / "half.pth")
    assert {v.dtype for v in half.values()} == {torch.float16}
    # the same training (float32 master weights), only the saved copy is rounded
    assert all(torch.equal(half[k], full[k].half()) for k in full)
    sidecars = [json.loads((tmp_path / f"{n}.pth.json").read_text()) for n in ("full", "half")]
    assert "save_dtype" not in sidecars[0]["recipe"] and sidecars[1]["recipe"]["save_dtype"] == "float16"
    assert sidecars[0]["hash"] != sidecars[1]["hash"]
    vit = create_vit("vit_tiny_patch16_224", pretrained=False, checkpoint_path=str(tmp_path / "half.pth"),
                     model_kwargs=json.loads(KWARGS))
    state = vit.state_dict()
    assert state["blocks.0.attn.qkv.weight"].dtype == torch.float32
    assert torch.equal(state["blocks.0.attn.qkv.weight"], full["blocks.0.attn.qkv.weight"].half().float())
