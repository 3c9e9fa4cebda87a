"""``cdl export`` (`cdl_lightning.export`): CODA, DualPrompt and L2P learners and a KDP student, each trained one epoch
per task through ``cdl fit``, exported to ``.pt2`` (torch.export) and ONNX; every artefact gives the checkpoint model's
logits within 1e-5 at batch sizes other than the tracing example's; the sidecar is versioned and checked."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _cli_helpers import TINY_BACKBONE, as_args, two_task_run_options

from cdl_lightning.cli import main
from cdl_lightning.export import ONNX_OPSET, export, load_exported
from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.nn import BackboneConfig

HAS_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript"))
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None
FORMATS = ["pt2", "onnx"] if HAS_ONNX else ["pt2"]
TEACHER_BACKBONE = json.dumps({
    "name": "vit_tiny_patch16_224",
    "pretrained": False,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 3, "num_heads": 2},
})
LEARNERS = {
    "coda": {"--model": "cdl_lightning.models.PromptLearner", "--model.backbone": TEACHER_BACKBONE,
             "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt", "--model.prompt.pool_size": 10,
             "--model.prompt.length": 4, "--model.prompt.layers": "[0, 1]"},
    "dualprompt": {"--model": "cdl_lightning.models.PromptLearner", "--model.backbone": TINY_BACKBONE,
                   "--model.prompt": "cdl_lightning.nn.prompts.DualPrompt", "--model.prompt.g_layers": "[0]",
                   "--model.prompt.e_layers": "[1, 2]", "--model.prompt.pool_size": 4, "--model.prompt.e_length": 4},
    "l2p": {"--model": "cdl_lightning.models.PromptLearner", "--model.backbone": TINY_BACKBONE,
            "--model.prompt": "cdl_lightning.nn.prompts.L2P", "--model.prompt.pool_size": 6,
            "--model.prompt.length": 4, "--model.prompt.top_k": 2},
}
CLASS_NAMES = ["disk_0", "square_0", "ring_0", "plus_0", "triangle_0", "bars_0"]

pytestmark = pytest.mark.slow  # trains four runs through cdl fit and exports each (about 50 s on 2 cores)


def fit(save_dir: Path, name: str, model: dict[str, object]) -> Path:
    """``cdl fit``: 2 tasks x 3 synthetic classes, one epoch per task, two batches per epoch; returns the run folder."""
    main(["fit", *as_args({**two_task_run_options(save_dir, name), **model})])
    return save_dir / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Three learners and a KDP student of the CODA one; the teacher's run is then moved (the student exports alone)."""
    root = tmp_path_factory.mktemp("export_runs")
    folders = {name: fit(root / "runs", name, options) for name, options in LEARNERS.items()}
    teacher_ckpt = folders["coda"] / "checkpoints" / "last.ckpt"
    folders["kdp"] = fit(root / "runs", "kdp", {
        "--model": "cdl_lightning.models.Distiller", "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.L2P", "--model.prompt.pool_size": 6, "--model.prompt.length": 4,
        "--model.prompt.top_k": 2, "--model.method": "cdl_lightning.nn.KDP", "--model.teacher_checkpoint": teacher_ckpt,
    })
    folders["coda"] = Path(shutil.move(str(folders["coda"]), str(root / "moved" / "coda")))
    return folders


@pytest.fixture(scope="module")
def exports(runs, tmp_path_factory) -> dict[str, SimpleNamespace]:
    """Every run exported through ``cdl export`` (pt2, and ONNX where onnx/onnxscript are installed)."""
    out = {}
    for name, run in runs.items():
        folder = tmp_path_factory.mktemp(f"export_{name}")
        main(["export", str(run), "--out", str(folder), "--formats", *FORMATS, "--no-verify"])
        model = PromptLearner.load_for_inference(run)
        out[name] = SimpleNamespace(folder=folder, model=model, sidecar=json.loads((folder / "model.json").read_text()))
    return out


def images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", ["coda", "dualprompt", "l2p", "kdp"])
def test_pt2_export_equals_the_checkpoint_model(exports, name):
    exported = exports[name]
    artefact = load_exported(exported.folder / "model.pt2")
    for batch in (5, 1):  # the example had 2: the batch axis is dynamic
        x = images(batch, seed=batch)
        with torch.no_grad():
            expected = exported.model(x)
        actual = artefact(x)
        assert actual.shape == (batch, 6)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    # the exported program also loads with plain torch (no cdl-lightning needed to serve it)
    program = torch.export.load(str(exported.folder / "model.pt2"))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(images(3)), exported.model(images(3)), rtol=0, atol=1e-5)


@pytest.mark.skipif(not HAS_ONNX, reason="onnx / onnxscript not installed (pip install 'cdl-lightning[export]')")
@pytest.mark.parametrize("name", ["coda", "dualprompt", "l2p", "kdp"])
def test_onnx_export_equals_the_checkpoint_model(exports, name):
    import onnx

    exported = exports[name]
    proto = onnx.load(str(exported.folder / "model.onnx"))
    onnx.checker.check_model(proto)
    opsets = {o.domain: o.version for o in proto.opset_import}
    assert opsets[""] == ONNX_OPSET == exported.sidecar["files"]["onnx"]["opset"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # a named, dynamic batch axis
    if not HAS_ORT:
        pytest.skip("onnxruntime not installed: the ONNX graph was only checked, not run")
    artefact = load_exported(exported.folder / "model.onnx")
    for batch in (5, 1):
        x = images(batch, seed=batch)
        with torch.no_grad():
            expected = exported.model(x)
        torch.testing.assert_close(artefact(x), expected, rtol=0, atol=1e-5)


def test_pt2_moves_to_another_device(exports):
    """The program is traced on CPU; ``device=`` rewrites its device checks (meta stands in for CUDA here)."""
    artefact = load_exported(exports["kdp"].folder / "model.pt2", device="meta")
    logits = artefact(images(3))
    assert logits.device.type == "meta" and logits.shape == (3, 6)


def test_prompt_selection_is_in_the_graph(exports):
    """L2P's top-k and DualPrompt's argmax are graph operations, not constants traced from the example."""
    ops = {name: {str(n.target) for n in torch.export.load(str(exports[name].folder / "model.pt2")).graph.nodes}
           for name in ("l2p", "dualprompt")}
    assert any("topk" in op for op in ops["l2p"]) and any("argmax" in op for op in ops["dualprompt"])


def test_sidecar_describes_the_model(exports):
    sidecar, model = exports["kdp"].sidecar, exports["kdp"].model
    assert sidecar["timm_model"] == "vit_tiny_patch16_224"
    assert sidecar["model"]["class"] == "cdl_lightning.models.distiller.Distiller"
    assert sidecar["model"]["method"]["class_path"] == "cdl_lightning.nn.kd.KDP"
    assert sidecar["classes"] == {"num_classes": 6, "names": CLASS_NAMES, "original_ids": [0, 1, 2, 3, 4, 5]}
    assert sidecar["tasks"] == {"covered": 2, "total": 2, "last_task": 1, "task_sizes": [3, 3], "class_range": [0, 6]}
    assert sidecar["input"]["shape"] == ["batch", 3, 32, 32] and sidecar["input"]["dtype"] == "float32"
    norm = sidecar["input"]["normalization"]
    assert norm["applied_in_graph"] and norm["mean"] == model.classifier.backbone.mean.flatten().tolist()
    assert sidecar["library"]["version"] == __import__("cdl_lightning").__version__
    assert sidecar["source_checkpoint"].endswith("kdp/checkpoints/last.ckpt")
    assert set(sidecar["files"]) == set(FORMATS)
    assert sidecar["files"]["pt2"]["bytes"] == (exports["kdp"].folder / "model.pt2").stat().st_size
    # the KD prompts and KD head are part of the exported parameters; no teacher
    assert sidecar["model"]["parameters"] == sum(p.numel() for p in model.parameters())


def test_uint8_input_and_an_earlier_task(runs, tmp_path):
    model = PromptLearner.load_for_inference(runs["l2p"])
    metadata = export(runs["l2p"], tmp_path, formats=("pt2",), task=0, input_dtype="uint8")
    assert metadata["verification"]["max_abs_diff"]["pt2"] <= 1e-5
    assert metadata["classes"]["names"] == CLASS_NAMES[:3] and metadata["input"]["value_range"] == [0, 255]
    artefact = load_exported(tmp_path)
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(pixels.float() / 255, task=0)
    assert expected.shape == (4, 3)
    torch.testing.assert_close(artefact(pixels), expected, rtol=0, atol=1e-5)
    with pytest.raises(TypeError, match="takes uint8 images"):
        artefact(pixels.float())


def copy_export(exports, name: str, to: Path) -> Path:
    shutil.copytree(exports[name].folder, to)
    return to


def edit_sidecar(folder: Path, edit) -> None:
    sidecar = json.loads((folder / "model.json").read_text())
    edit(sidecar)
    (folder / "model.json").write_text(json.dumps(sidecar))


def test_refuses_another_library_major_or_format_version(exports, tmp_path):
    folder = copy_export(exports, "l2p", tmp_path / "a")
    edit_sidecar(folder, lambda s: s["library"].update(version="1.0.0"))
    with pytest.raises(ValueError, match=r"exported by cdl-lightning 1\.0\.0, this is .*another major version"):
        load_exported(folder / "model.pt2")
    folder = copy_export(exports, "l2p", tmp_path / "b")
    edit_sidecar(folder, lambda s: s.update(format_version=2))
    with pytest.raises(ValueError, match="export format version 2"):
        load_exported(folder / "model.pt2")


def test_refuses_a_changed_or_swapped_artefact(exports, runs, tmp_path):
    folder = copy_export(exports, "l2p", tmp_path / "a")
    other = tmp_path / "task0"
    export(runs["l2p"], other, formats=("pt2",), task=0, verify=False)  # 3 classes
    shutil.copy(other / "model.pt2", folder / "model.pt2")
    with pytest.raises(ValueError, match="changed since it was exported"):
        load_exported(folder / "model.pt2")
    with pytest.raises(ValueError, match="outputs 3 logits but its sidecar describes 6 classes"):
        load_exported(folder / "model.pt2", check_hash=False)


def test_refuses_a_mismatched_model(exports):
    folder = exports["kdp"].folder
    assert load_exported(folder / "model.pt2", model=exports["kdp"].model).class_names == CLASS_NAMES
    with pytest.raises(ValueError, match=r"backbone width: export 32 vs model 48"):
        load_exported(folder / "model.pt2", model=exports["coda"].model)
    other = PromptLearner(
        backbone=BackboneConfig(name="vit_small_patch16_224", model_kwargs=json.loads(TINY_BACKBONE)["model_kwargs"]),
        task_sizes=[2, 2],
    )
    with pytest.raises(ValueError, match=r"timm model: .*number of classes: export 6 vs model 4.*class names"):
        load_exported(folder / "model.pt2", model=other)


def test_export_of_a_distiller_builds_no_teacher(exports):
    model = exports["kdp"].model
    assert isinstance(model, Distiller) and model.teacher is None and model.inference_only


def test_deploy_benchmark_runs_on_cpu(tmp_path, monkeypatch):
    """benchmarks/deploy.py with tiny random models: a row per side and form, with sizes that make sense."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    deploy = importlib.import_module("deploy")
    rows = deploy.main(["--random", "tiny", "--device", "cpu", "--forms", "checkpoint", "pt2", "--batch", "4",
                        "--warmup", "0", "--steps", "1", "--out", str(tmp_path)])
    assert [(r.side, r.form) for r in rows] == [("teacher", "checkpoint"), ("teacher", "pt2"),
                                                ("student", "checkpoint"), ("student", "pt2")]
    teacher, student = rows[0].parameters, rows[2].parameters
    assert teacher > student > 0 and rows[1].parameters == teacher
    # a checkpoint holds the trainable state only; the exported program holds every weight
    assert rows[1].file_mib > rows[0].file_mib and rows[3].file_mib > rows[2].file_mib
    assert all(r.latency_ms > 0 and r.img_per_s > 0 for r in rows)
    assert (tmp_path / "student.pt2").is_file()
