"""``cdl export``: a trained learner or student as self-contained artefacts for serving.

    cdl export runs/cifar100/coda/b_to_s/version_0            # -> runs/.../version_0/export/model.{pt2,onnx,json}
    cdl export path/to/last.ckpt --out deploy/ --formats pt2 --input-dtype uint8

Each artefact holds the whole inference network, frozen backbone and query encoder weights included (checkpoints do
not hold those): ``model.pt2`` (`torch.export`, load with ``torch.export.load(path).module()``) and ``model.onnx``
(opset 18, run with onnxruntime). Both take one input ``images`` of shape ``batch x 3 x H x W`` (RGB, NCHW, any batch
size, ``H x W`` the model's input size; resize / crop before, as the data module's test transform does), either
``float32`` in ``[0, 1]`` (default) or ``uint8`` in ``0..255`` (``--input-dtype uint8``); the backbone's mean/std
normalisation is applied inside the graph. The output ``logits`` (``batch x C``) are the model's inference logits over
the ``C`` classes of the tasks learned so far: prompt selection as at evaluation (L2P top-k, DualPrompt argmax, CODA's
weighted components) and, for a KDP / DeiT-token student, ``(1 - alpha) CLS head + alpha KD head``. No teacher is
involved. ``model.json`` (the sidecar) names the classes, the input, the normalisation, the tasks covered, the timm
model and the library version; `load_exported` reads it and refuses artefacts of another format or library major
version, files changed since export, and (given a model) an artefact that does not match that model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

import cdl_lightning
from cdl_lightning.models.inference import InferenceGraph, load_for_inference, resolve_checkpoint
from cdl_lightning.models.learner import PromptLearner

FORMAT = "cdl-lightning-export"
FORMAT_VERSION = 1
"""Version of the sidecar layout and of the exported forward's contract; bumped when either changes."""
ONNX_OPSET = 18
FORMATS = ("pt2", "onnx")
Format = Literal["pt2", "onnx"]


def _major(version: str) -> str:
    return str(version).split(".")[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _example(graph: InferenceGraph, batch: int, seed: int = 0) -> Tensor:
    height, width = graph.input_size
    generator = torch.Generator().manual_seed(seed)
    if graph.input_dtype == "uint8":
        return torch.randint(0, 256, (batch, 3, height, width), generator=generator, dtype=torch.uint8)
    return torch.rand(batch, 3, height, width, generator=generator)


def _dynamic_batch() -> tuple[dict[int, Any]]:
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def export_pt2(graph: InferenceGraph, path: Path, example: Tensor) -> None:
    """`torch.export` the inference graph with a dynamic batch dimension and save it (``.pt2``)."""
    program = torch.export.export(graph, (example,), dynamic_shapes=_dynamic_batch())
    torch.export.save(program, str(path))


def export_onnx(graph: InferenceGraph, path: Path, example: Tensor, opset: int = ONNX_OPSET) -> None:
    """Export the inference graph to ONNX (torch's dynamo exporter, ``opset``, dynamic batch axis ``batch``)."""
    try:
        import onnxscript  # noqa: F401  (the dynamo exporter needs it; fail with the fix, not deep inside torch)
    except ImportError as err:
        raise ImportError("ONNX export needs the `onnx` and `onnxscript` packages: pip install "
                          "'cdl-lightning[export]' (or export only pt2: --formats pt2)") from err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(graph, (example,), dynamo=True, dynamic_shapes=_dynamic_batch(),
                                    opset_version=opset, input_names=["images"], output_names=["logits"],
                                    verbose=False)
    program.save(str(path))


def describe(model: PromptLearner, graph: InferenceGraph) -> dict[str, Any]:
    """The sidecar's description of the model and of the exported forward's contract (files are added later)."""
    import timm

    backbone = model.classifier.backbone
    height, width = graph.input_size
    stop = graph.num_classes
    config = model.backbone_config
    query = model.query_config
    normalized = backbone.input_norm != "none"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library": {"name": "cdl-lightning", "version": cdl_lightning.__version__},
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "timm_model": config.name,
        "model": {
            "class": f"{type(model).__module__}.{type(model).__qualname__}",
            "backbone": {"name": config.name, "model_kwargs": config.model_kwargs, "input_norm": config.input_norm,
                         "pretrained": config.pretrained, "checkpoint_path": config.checkpoint_path},
            "query_backbone": None if query is None else {"name": query.name, "model_kwargs": query.model_kwargs},
            "prompt": model.hparams.get("prompt"),
            "method": model.hparams.get("method"),
            "embed_dim": backbone.embed_dim,
            "depth": backbone.depth,
            "parameters": sum(p.numel() for p in graph.parameters()),
        },
        "input": {
            "name": "images",
            "shape": ["batch", 3, height, width],
            "dtype": graph.input_dtype,
            "value_range": [0, 255] if graph.input_dtype == "uint8" else [0.0, 1.0],
            "layout": "NCHW, RGB; resize / centre-crop to the input size before calling",
            "normalization": {
                "applied_in_graph": True,
                "mean": backbone.mean.flatten().tolist() if normalized else None,
                "std": backbone.std.flatten().tolist() if normalized else None,
                "note": ("(x - mean) / std on [0, 1] values, inside the graph" if normalized
                         else "none (input_norm: none, the reference's quirk): [0, 1] values enter the ViT"),
            },
        },
        "output": {"name": "logits", "shape": ["batch", stop],
                   "meaning": "inference logits over the learned classes; argmax = label, classes.names[label]"},
        "dynamic_batch": {"axis": 0, "min": 1},
        "classes": {
            "num_classes": stop,
            "names": list(model.class_names[:stop]),
            "original_ids": (list(model.task_schedule.class_order[:stop])
                             if model.task_schedule.class_order is not None else None),
        },
        "tasks": {"covered": graph.task + 1, "total": model.num_tasks, "last_task": graph.task,
                  "task_sizes": list(model.task_schedule.task_sizes[: graph.task + 1]), "class_range": [0, stop]},
        "source_checkpoint": getattr(model, "checkpoint_path", None),
        "files": {},
    }


def export(
    model: PromptLearner | str | Path,
    out_dir: str | Path,
    formats: tuple[str, ...] = FORMATS,
    task: int | None = None,
    input_dtype: Literal["float32", "uint8"] = "float32",
    example_batch: int = 2,
    verify: bool = True,
    atol: float = 1e-5,
    name: str = "model",
) -> dict[str, Any]:
    """Export a trained model (or the checkpoint / run folder it comes from) to ``out_dir/{name}.pt2``,
    ``{name}.onnx`` and the sidecar ``{name}.json``; returns the sidecar's content.

    Args:
        model: a trained `PromptLearner` / `Distiller`, or its checkpoint file or run folder.
        out_dir: folder of the artefacts (created).
        formats: any of ``"pt2"``, ``"onnx"``.
        task: the last task the logits cover; ``None`` = the last learned task.
        input_dtype: ``"float32"`` (``[0, 1]``) or ``"uint8"`` (``0..255``) input images.
        example_batch: batch size of the tracing example (the exported batch axis is dynamic anyway).
        verify: load each artefact back and compare its logits with the model's on two batch sizes.
        atol: the largest absolute logit difference ``verify`` accepts.
        name: file stem of the artefacts.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown export formats {unknown or list(formats)}: choose from {list(FORMATS)}")
    if isinstance(model, (str, Path)):
        model = load_for_inference(model)
    model = model.to("cpu").eval()
    graph = InferenceGraph(model, task, input_dtype).eval()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    metadata = describe(model, graph)
    example = _example(graph, example_batch)
    with torch.no_grad():
        for fmt in formats:
            path = out / f"{name}.{fmt}"
            (export_pt2 if fmt == "pt2" else export_onnx)(graph, path, example)
            entry: dict[str, Any] = {"file": path.name, "bytes": path.stat().st_size, "sha256": _sha256(path)}
            if fmt == "onnx":
                entry["opset"] = ONNX_OPSET
            metadata["files"][fmt] = entry
    sidecar = out / f"{name}.json"
    sidecar.write_text(json.dumps(metadata, indent=2))
    if verify:
        metadata["verification"] = verify_export(sidecar, graph, atol, example_batch)
        sidecar.write_text(json.dumps(metadata, indent=2))
    return metadata


def verify_export(sidecar: Path, graph: InferenceGraph, atol: float, example_batch: int) -> dict[str, Any]:
    """Run every artefact (ONNX only where onnxruntime is installed) on batches of ``example_batch + 1`` and 1 and
    compare with the model's logits; raises if any differs by more than ``atol``."""
    result: dict[str, Any] = {"atol": atol, "batch_sizes": [example_batch + 1, 1], "max_abs_diff": {}}
    metadata = json.loads(sidecar.read_text())
    for fmt in metadata["files"]:
        if fmt == "onnx" and not onnxruntime_available():
            result["max_abs_diff"][fmt] = "not run: onnxruntime is not installed"
            continue
        exported = load_exported(sidecar, backend=fmt)
        worst = 0.0
        for batch in result["batch_sizes"]:
            images = _example(graph, batch, seed=batch)
            with torch.no_grad():
                expected = graph(images)
            worst = max(worst, (exported(images) - expected).abs().max().item())
        if worst > atol:
            raise RuntimeError(f"exported {fmt} logits differ from the model's by {worst:.3g} > atol {atol:g}")
        result["max_abs_diff"][fmt] = worst
    return result


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


# ---------------------------------------------------------------------------------------------------------- loading
def read_sidecar(path: str | Path) -> tuple[dict[str, Any], Path]:
    """The sidecar of an export (its ``.json``, an artefact next to it, or the export folder) and its path; refuses
    another format, a newer format version or another library major version."""
    file = Path(path).expanduser()
    if file.is_dir():
        candidates = sorted(file.glob("*.json"))
        if len(candidates) != 1:
            raise FileNotFoundError(f"{file} holds {len(candidates)} .json sidecars: pass the sidecar or artefact")
        file = candidates[0]
    elif file.suffix != ".json":
        file = file.with_suffix(".json")
    if not file.is_file():
        raise FileNotFoundError(f"no export sidecar {str(file)!r}: `cdl export` writes it next to the artefacts")
    metadata = json.loads(file.read_text())
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{file} is not a cdl-lightning export sidecar (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{file} has export format version {metadata.get('format_version')}, this cdl-lightning "
                         f"({cdl_lightning.__version__}) reads version {FORMAT_VERSION}: re-export the checkpoint with "
                         "this version (`cdl export CHECKPOINT`) or use the version that wrote it")
    version = str(metadata.get("library", {}).get("version", "?"))
    if _major(version) != _major(cdl_lightning.__version__):
        raise ValueError(f"{file} was exported by cdl-lightning {version}, this is {cdl_lightning.__version__} "
                         "(another major version): re-export the checkpoint with this version (`cdl export "
                         f"CHECKPOINT`) or load it with cdl-lightning {_major(version)}.x")
    return metadata, file


def check_compatible(metadata: dict[str, Any], model: PromptLearner, task: int | None = None) -> None:
    """Refuse an export that does not match ``model`` (timm model, backbone width and depth, input size, classes),
    naming every difference."""
    graph = InferenceGraph(model, task)
    expected = {
        "timm model": (metadata["timm_model"], model.backbone_config.name),
        "backbone width": (metadata["model"]["embed_dim"], model.classifier.backbone.embed_dim),
        "backbone depth": (metadata["model"]["depth"], model.classifier.backbone.depth),
        "number of classes": (metadata["classes"]["num_classes"], graph.num_classes),
        "input size": (list(metadata["input"]["shape"][2:]), list(graph.input_size)),
        "class names": (metadata["classes"]["names"], list(model.class_names[: graph.num_classes])),
    }
    problems = [f"{what}: export {a!r} vs model {b!r}" for what, (a, b) in expected.items() if a != b]
    if problems:
        raise ValueError("the exported model does not match this model (" + "; ".join(problems) + "): export this "
                         "model's own checkpoint (`cdl export CHECKPOINT`) instead")


class ExportedModel:
    """An exported artefact ready to run: ``logits = exported(images)`` (torch tensor or numpy array in, torch tensor
    out), with the sidecar's ``metadata`` and ``class_names``.

    Attributes:
        metadata: the sidecar's content.
        backend: ``"pt2"`` or ``"onnx"``.
        path: the artefact file.
    """

    def __init__(self, metadata: dict[str, Any], backend: Format, path: Path, device: str | torch.device) -> None:
        self.metadata, self.backend, self.path = metadata, backend, path
        self.device = torch.device(device)
        if backend == "pt2":
            program = torch.export.load(str(path))
            output = next(node for node in program.graph.nodes if node.op == "output")
            width = int(output.args[0][0].meta["val"].shape[-1])
            if self.device.type != "cpu":  # the program was traced on CPU: its device checks and constants say so
                from torch.export.passes import move_to_device_pass

                program = move_to_device_pass(program, self.device)
            self.module = program.module()
        else:
            import onnxruntime

            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
            width = self.session.get_outputs()[0].shape[-1]
        classes = metadata["classes"]["num_classes"]
        if width != classes:
            raise ValueError(f"{path} outputs {width} logits but its sidecar describes {classes} classes: the artefact "
                             "and the sidecar come from different exports")

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["classes"]["names"])

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.uint8 if self.metadata["input"]["dtype"] == "uint8" else torch.float32

    def __call__(self, images: Tensor | np.ndarray) -> Tensor:
        images = torch.as_tensor(images)
        if images.dtype != self.input_dtype:
            raise TypeError(f"this export takes {self.metadata['input']['dtype']} images "
                            f"({self.metadata['input']['value_range']}), got {images.dtype}")
        if self.backend == "pt2":
            with torch.no_grad():
                return self.module(images.to(self.device))
        logits = self.session.run(["logits"], {"images": images.cpu().numpy()})[0]
        return torch.from_numpy(logits)


def load_exported(
    path: str | Path,
    backend: Format | None = None,
    device: str | torch.device = "cpu",
    model: PromptLearner | None = None,
    check_hash: bool = True,
) -> ExportedModel:
    """Load an artefact written by `export` after checking its sidecar (format and library major version, the file's
    SHA-256, and, given ``model``, that the export matches that model).

    Args:
        path: the sidecar, an artefact (its sidecar is the ``.json`` next to it) or the export folder.
        backend: ``"pt2"`` (`torch.export.load`) or ``"onnx"`` (onnxruntime); default: the artefact ``path`` names,
            else pt2 if exported.
        device: where the pt2 module runs (moved there by ``torch.export.passes.move_to_device_pass``; ONNX uses CUDA
            when onnxruntime has it and ``device`` is CUDA).
        model: a model the export must match (timm model, classes, input size).
        check_hash: refuse an artefact whose SHA-256 differs from the one recorded at export.
    """
    metadata, sidecar = read_sidecar(path)
    given = Path(path)
    if backend is None:
        backend = given.suffix[1:] if given.suffix[1:] in FORMATS else ("pt2" if "pt2" in metadata["files"] else "onnx")
    if backend not in metadata["files"]:
        raise ValueError(f"{sidecar} lists no {backend} artefact (exported: {sorted(metadata['files'])})")
    entry = metadata["files"][backend]
    artefact = sidecar.parent / entry["file"]
    if not artefact.is_file():
        raise FileNotFoundError(f"{artefact} (named by {sidecar}) does not exist")
    if check_hash and _sha256(artefact) != entry["sha256"]:
        raise ValueError(f"{artefact} changed since it was exported (SHA-256 differs from {sidecar}'s): re-export it")
    if model is not None:
        check_compatible(metadata, model, metadata["tasks"]["last_task"])
    if backend == "onnx" and not onnxruntime_available():
        raise ImportError("running the ONNX artefact needs onnxruntime: pip install 'cdl-lightning[export]'")
    return ExportedModel(metadata, backend, artefact, device)


# -------------------------------------------------------------------------------------------------------------- CLI
def default_out_dir(checkpoint: Path) -> Path:
    """``<run>/export`` for ``<run>/checkpoints/<file>.ckpt``, else ``export-<stem>`` next to the file."""
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent / "export"
    return checkpoint.parent / f"export-{checkpoint.stem}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdl export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a run's checkpoint file, or its run folder (checkpoints/last.ckpt)")
    parser.add_argument("--out", help="output folder (default: <run>/export)")
    parser.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    parser.add_argument("--task", type=int, help="last task the logits cover (default: the last learned)")
    parser.add_argument("--input-dtype", choices=("float32", "uint8"), default="float32",
                        help="float32 images in [0, 1] (default) or uint8 in 0..255")
    parser.add_argument("--example-batch", type=int, default=2, help="batch size of the tracing example")
    parser.add_argument("--atol", type=float, default=1e-5, help="tolerance of the verification")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing the artefacts with the model")
    parser.add_argument("--name", default="model", help="file stem of the artefacts")
    args = parser.parse_args(argv)
    checkpoint = resolve_checkpoint(args.checkpoint)
    out = Path(args.out) if args.out else default_out_dir(checkpoint)
    metadata = export(checkpoint, out, tuple(args.formats), args.task, args.input_dtype, args.example_batch,
                      not args.no_verify, args.atol, args.name)
    print(f"exported {metadata['model']['class'].rsplit('.', 1)[-1]} ({metadata['timm_model']}, "
          f"{metadata['classes']['num_classes']} classes, tasks 0..{metadata['tasks']['last_task']}) to {out}:")
    for fmt, entry in metadata["files"].items():
        check = metadata.get("verification", {}).get("max_abs_diff", {}).get(fmt)
        check = f", max |logit diff| vs checkpoint {check:.2e}" if isinstance(check, float) else ""
        opset = f" (ONNX opset {entry['opset']})" if fmt == "onnx" else ""
        print(f"  {entry['file']}{opset}: {entry['bytes'] / 2**20:.1f} MiB{check}")
    print(f"  {args.name}.json: sidecar (classes, input {metadata['input']['shape']} {metadata['input']['dtype']}, "
          "normalisation inside the graph)")
