"""``cdl pretrain``: supervised pretraining of a timm ViT on an offline in-memory source, saved as a local weights file.

Prompt-based continual learning assumes a pretrained backbone, and its weights cannot be downloaded on an offline
machine. This tool trains a ViT (all of it) on a fixed-size source (the built-in `SyntheticShapes`, or an ``.npz``
pack such as ``../shared/data/tiny-imagenet-32.npz``) and writes its weights, without classifier, in timm's format:
pass the file as ``backbone.checkpoint_path``. Use classes disjoint from the continual run's, as ImageNet pretraining
is for CIFAR-100: ``--classes LOW HIGH`` (a label range) or ``--class-split K`` (the first ``K`` classes of the
seed-``--split-seed`` permutation ``numpy.random.default_rng(seed).permutation(C)``, i.e. the source's own class
selection ``classes: {seed: S, stop: K}``; the continual run takes the other classes with ``{seed: S, start: K}``).

Recipe (small data wants regularisation): AdamW with linear warmup then cosine decay (per step), RandomResizedCrop +
flip, optional per-sample colour jitter, mixup / CutMix (one of them per batch) and label smoothing, optional
stochastic depth (``drop_path_rate`` in ``--model-kwargs``), bf16 autocast on CUDA. Everything random (init, order,
augmentation, dropout) is drawn from generators seeded by ``--seed``: the same seed gives bitwise the same weights
on the CPU. The weights file gets a sidecar ``FILE.json`` with the recipe, its hash and the accuracies; a rerun with
the same recipe skips the training (``--force`` retrains). ``--probe`` also fits a linear probe on the frozen features
of the held-out classes (the other part of ``--class-split``: ``classes: {seed: S, start: K}``).

    cdl pretrain --out runs/demo/backbone.pth --source synthetic --synthetic-classes 40 --classes 20 40 \
        --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}'
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from cdl_lightning.data.augment import RandomResizedCropFlip
from cdl_lightning.data.npz import NpzSource
from cdl_lightning.data.source import ArraySource
from cdl_lightning.data.synthetic import SyntheticShapes
from cdl_lightning.nn.vit import create_vit

__all__ = ["pretrain", "linear_probe", "recipe_hash", "main"]


def recipe_hash(recipe: dict[str, Any]) -> str:
    """Short SHA-256 of a recipe's canonical JSON (the cache key of a weights file)."""
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _jitter(x: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors uniform in ``[1 - strength, 1 + strength]``."""
    b = x.shape[0]
    factors = 1 + strength * (2 * torch.rand(b, 3, 1, 1, 1, device=x.device) - 1)
    x = x * factors[:, 0]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factors[:, 1] + mean
    gray = x.mean(dim=1, keepdim=True)
    return ((x - gray) * factors[:, 2] + gray).clamp_(0, 1)


def _mix(x: torch.Tensor, y: torch.Tensor, classes: int, mixup: float,
         cutmix: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al. 2018) or CutMix (Yun et al. 2019), chosen with equal odds when both are on, with one
    Beta(a, a) draw per batch; returns the mixed images and soft targets."""
    target = F.one_hot(y, classes).float()
    use_cutmix = cutmix > 0 and (mixup <= 0 or bool(torch.rand(()) < 0.5))
    alpha = cutmix if use_cutmix else mixup
    if alpha <= 0:
        return x, target
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(x.shape[0], device=x.device)
    if use_cutmix:
        h, w = x.shape[-2:]
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
        x = x.clone()
        x[..., top:bottom, left:right] = x[perm][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (h * w)
    else:
        x = lam * x + (1 - lam) * x[perm]
    return x, lam * target + (1 - lam) * target[perm]


@torch.no_grad()
def _features(vit: torch.nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor, device: torch.device,
              autocast: bool) -> torch.Tensor:
    out = []
    x = torch.from_numpy(images)
    for i in range(0, len(x), 512):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            out.append(vit.forward_features((x[i : i + 512].to(device).float().div(255) - mean) / std)[:, 0].float())
    return torch.cat(out)


def linear_probe(train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor,
                 steps: int = 300, lr: float = 0.01, weight_decay: float = 1e-4) -> float:
    """Top-1 test accuracy (%) of a linear classifier on frozen, standardised features (full-batch AdamW)."""
    mu, sigma = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mu) / sigma, (test - mu) / sigma
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        head = torch.nn.Linear(train.shape[1], int(train_y.max()) + 1).to(train.device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = F.cross_entropy(head(train), train_y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return 100.0 * float((head(test).argmax(1) == test_y).float().mean())


def pretrain(
    source: ArraySource,
    out: str,
    name: str = "vit_tiny_patch16_224",
    model_kwargs: dict | None = None,
    classes: tuple[int, int] | None = None,
    epochs: int = 5,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    crop_scale: tuple[float, float] = (0.35, 1.0),
    seed: int = 0,
    device: str | None = None,
    warmup_epochs: float = 0.5,
    label_smoothing: float = 0.0,
    mixup: float = 0.0,
    cutmix: float = 0.0,
    jitter: float = 0.0,
    precision: Literal["32", "bf16"] = "32",
    probe_source: ArraySource | None = None,
    force: bool = False,
    save_dtype: Literal["float32", "float16", "bfloat16"] = "float32",
) -> dict[str, Any]:
    """Train ``name`` (+ a temporary linear head) on ``source``'s train split, restricted to labels in
    ``[classes[0], classes[1])``; save the ViT's weights (no head) to ``out`` with a sidecar ``out + ".json"``.

    Args:
        source: Training source (its test split measures the head's accuracy). Its class selection (the stored
            labels it keeps, ``selected_classes``) is part of the recipe, as is the probe source's.
        out: Weights file to write.
        name: timm model name; ``model_kwargs`` its constructor arguments (``img_size``, ``patch_size``, ...,
            ``drop_path_rate``).
        classes: Label range ``[low, high)`` to train on (default: all).
        epochs, batch_size, lr, weight_decay: AdamW schedule: linear warmup over ``warmup_epochs`` then cosine to 0.
        crop_scale: RandomResizedCrop area range.
        seed: Seeds the initialisation, the sample order and every augmentation draw.
        device: ``"cuda"`` / ``"cpu"`` (default: cuda when available).
        label_smoothing: Smoothing of the (soft) targets.
        mixup, cutmix: Beta parameters of mixup / CutMix (0: off); with both on, each batch uses one of them.
        jitter: Colour jitter strength (0: off).
        precision: ``"bf16"`` autocasts the forward passes on CUDA.
        probe_source: Held-out classes for a linear probe on the frozen features (``None``: no probe).
        force: Retrain even when ``out`` exists with the same recipe.
        save_dtype: dtype of the saved weights. ``"float16"`` halves the file (a ViT-Ti: 11 MB instead of 22 MB) at a
            relative rounding error of at most 2**-11 per weight; the training itself always runs on float32 master
            weights. Loading casts back to the model's dtype. Part of the recipe (another dtype is another file).

    Returns:
        ``train_acc`` / ``test_acc`` of the head on the training classes, ``probe_acc`` (or ``None``), ``seconds``,
        ``hash`` and ``cached`` (True when the training was skipped).
    """
    kwargs = dict(model_kwargs or {})
    recipe = {"source": repr(source), "source_classes": source.selected_classes, "name": name, "model_kwargs": kwargs,
              "classes": list(classes or []),
              "epochs": epochs, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
              "crop_scale": list(crop_scale), "seed": seed, "warmup_epochs": warmup_epochs,
              "label_smoothing": label_smoothing, "mixup": mixup, "cutmix": cutmix, "jitter": jitter,
              "precision": precision, "probe": repr(probe_source) if probe_source is not None else None,
              "probe_classes": probe_source.selected_classes if probe_source is not None else None}
    if save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {save_dtype!r}")
    if save_dtype != "float32":  # (absent for float32, so the hashes of earlier float32 recipes stay valid)
        recipe["save_dtype"] = save_dtype
    digest = recipe_hash(recipe)
    path, sidecar = Path(out), Path(f"{out}.json")
    if not force and path.is_file() and sidecar.is_file():
        stored = json.loads(sidecar.read_text())
        if stored.get("hash") == digest:
            print(f"cached {path} (recipe {digest}): skipping the pretraining (--force retrains)")
            return {**stored["result"], "hash": digest, "cached": True}
    device_ = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = precision == "bf16" and device_.type == "cuda"
    with torch.random.fork_rng(devices=[device_] if device_.type == "cuda" else []):
        torch.manual_seed(seed)  # init, order, augmentation, mixing and stochastic depth all draw from here
        vit = create_vit(name, pretrained=False, model_kwargs=kwargs).to(device_)
        low, high = classes or (0, source.num_classes)
        (train_x, train_y), (test_x, test_y) = source.arrays("train"), source.arrays("test")
        keep, keep_test = (train_y >= low) & (train_y < high), (test_y >= low) & (test_y < high)
        if not keep.any():
            raise ValueError(f"no training images with labels in [{low}, {high})")
        # the whole uint8 training set sits on the device (Tiny-ImageNet 32 px: 157 MB): no host gather per batch
        images, labels = torch.from_numpy(train_x[keep]).to(device_), torch.from_numpy(train_y[keep] - low).to(device_)
        head = torch.nn.Linear(vit.embed_dim, high - low).to(device_)
        optimizer = torch.optim.AdamW([*vit.parameters(), *head.parameters()], lr=lr, weight_decay=weight_decay)
        per_epoch = -(-len(labels) // batch_size)
        steps, warmup = epochs * per_epoch, max(1, round(warmup_epochs * per_epoch))
        def factor(step: int) -> float:  # linear warmup, then cosine to 0
            if step < warmup:
                return (step + 1) / warmup
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        size = int(kwargs.get("img_size", vit.patch_embed.img_size[0]))
        augment = RandomResizedCropFlip(size, scale=crop_scale)
        mean = torch.tensor(vit.pretrained_cfg.get("mean", (0.5,) * 3), device=device_).view(1, 3, 1, 1)
        std = torch.tensor(vit.pretrained_cfg.get("std", (0.5,) * 3), device=device_).view(1, 3, 1, 1)

        def logits(x: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device_.type, dtype=torch.bfloat16, enabled=autocast):
                return head(vit.forward_features((x - mean) / std)[:, 0]).float()

        start = time.perf_counter()
        vit.train()
        for epoch in range(epochs):
            order = torch.randperm(len(labels))
            for i in range(0, len(order), batch_size):
                index = order[i : i + batch_size].to(device_)
                x = augment(images[index].float().div_(255))
                if jitter > 0:
                    x = _jitter(x, jitter)
                x, target = _mix(x, labels[index], high - low, mixup, cutmix)
                target = target * (1 - label_smoothing) + label_smoothing / (high - low)
                loss = -(target * F.log_softmax(logits(x), dim=1)).sum(1).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
            print(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)",
                  flush=True)
    seconds = time.perf_counter() - start
    vit.eval()

    @torch.no_grad()
    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        x, y = torch.from_numpy(x), torch.from_numpy(y - low)
        hits = sum(int((logits(x[i : i + 256].to(device_).float().div(255)).argmax(1).cpu() == y[i : i + 256]).sum())
                   for i in range(0, len(y), 256))
        return 100.0 * hits / max(len(y), 1)

    result: dict[str, Any] = {"train_acc": accuracy(train_x[keep], train_y[keep]),
                              "test_acc": accuracy(test_x[keep_test], test_y[keep_test]), "probe_acc": None,
                              "seconds": seconds}
    if probe_source is not None:
        (ptrain_x, ptrain_y), (ptest_x, ptest_y) = probe_source.arrays("train"), probe_source.arrays("test")
        result["probe_acc"] = linear_probe(
            _features(vit, ptrain_x, mean, std, device_, autocast), torch.from_numpy(ptrain_y).to(device_),
            _features(vit, ptest_x, mean, std, device_, autocast), torch.from_numpy(ptest_y).to(device_))
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, save_dtype)
    torch.save({k: v.cpu().to(dtype) if v.is_floating_point() else v.cpu() for k, v in vit.state_dict().items()},
               path)
    sidecar.write_text(json.dumps({"hash": digest, "recipe": recipe, "result": result}, indent=1))
    probe = f", linear probe on the held-out classes {result['probe_acc']:.1f} %" if probe_source is not None else ""
    print(f"saved {path} ({name}, {sum(p.numel() for p in vit.parameters()):,} parameters, {seconds:.0f} s); head "
          f"accuracy on classes [{low}, {high}): train {result['train_acc']:.1f} %, test {result['test_acc']:.1f} %"
          f"{probe}", flush=True)
    return {**result, "hash": digest, "cached": False}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdl pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="weights file to write (.pth)")
    parser.add_argument("--name", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="timm.create_model arguments (JSON)")
    parser.add_argument("--source", choices=("synthetic", "npz"), default="synthetic")
    parser.add_argument("--npz", help="path of an .npz pack (with --source npz)")
    parser.add_argument("--decode-workers", type=int, default=0, help="processes decoding an encoded .npz pack")
    parser.add_argument("--synthetic-classes", type=int, default=40, help="classes of SyntheticShapes")
    parser.add_argument("--synthetic-seed", type=int, default=1, help="seed of SyntheticShapes")
    parser.add_argument("--classes", type=int, nargs=2, metavar=("LOW", "HIGH"), help="train on labels [LOW, HIGH)")
    parser.add_argument("--class-split", type=int, metavar="K",
                        help="train on the first K classes of the seeded class permutation "
                             "(the source's classes: {seed: SPLIT_SEED, stop: K})")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the --class-split permutation")
    parser.add_argument("--probe", action="store_true", help="linear probe on the other classes of --class-split")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.35, 1.0), metavar=("MIN", "MAX"))
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--mixup", type=float, default=0.0, help="mixup Beta parameter (0: off; 0.8 is common)")
    parser.add_argument("--cutmix", type=float, default=0.0, help="CutMix Beta parameter (0: off; 1.0 is common)")
    parser.add_argument("--jitter", type=float, default=0.0, help="colour jitter strength (0: off; 0.3 is mild)")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="bf16: autocast on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--force", action="store_true", help="retrain even if OUT exists with the same recipe")
    parser.add_argument("--save-dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the saved weights (float16: half the file; training stays float32)")
    args = parser.parse_args(argv)
    if args.source == "npz" and not args.npz:
        parser.error("--source npz needs --npz PATH")
    if args.probe and args.class_split is None:
        parser.error("--probe needs --class-split K (the probe uses the classes not pretrained on)")
    if args.class_split is not None and args.classes:
        parser.error("use --classes or --class-split, not both")
    if args.class_split is not None and args.class_split < 1:
        parser.error(f"--class-split K needs K >= 1, got {args.class_split}")

    def build(classes: dict[str, int] | None) -> ArraySource:
        if args.source == "npz":
            return NpzSource(args.npz, decode_workers=args.decode_workers, classes=classes)
        return SyntheticShapes(num_classes=args.synthetic_classes, seed=args.synthetic_seed, classes=classes)

    probe = None
    if args.class_split is None:
        source = build(None)
    else:  # the sources' own seeded class selection: slices [0, K) and [K, C) of one permutation
        source = build({"seed": args.split_seed, "stop": args.class_split})
        total = len(source.all_class_names)
        if args.class_split >= total:
            parser.error(f"--class-split K must be below the source's {total} classes (the rest are held out), "
                         f"got {args.class_split}")
        if args.probe:
            probe = build({"seed": args.split_seed, "start": args.class_split})
    pretrain(source, args.out, args.name, args.model_kwargs, tuple(args.classes) if args.classes else None,
             args.epochs, args.batch_size, args.lr, args.weight_decay, tuple(args.crop_scale), args.seed, args.device,
             args.warmup_epochs, args.label_smoothing, args.mixup, args.cutmix, args.jitter, args.precision,
             probe_source=probe, force=args.force, save_dtype=args.save_dtype)
