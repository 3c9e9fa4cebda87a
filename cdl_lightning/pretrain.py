"""``cdl pretrain``: supervised pretraining of a timm ViT on an offline in-memory source, saved as a local weights file.

Prompt-based continual learning assumes a pretrained backbone, and its weights cannot be downloaded on an offline
machine. This tool trains a ViT (all of it) on a fixed-size source (the built-in `SyntheticShapes`, or an ``.npz``
pack such as ``../shared/data/tiny-imagenet-32.npz``) and writes its weights, without classifier, in timm's format:
pass the file as ``backbone.checkpoint_path``. Use classes disjoint from the continual run's (``--classes``), as
ImageNet pretraining is for CIFAR-100.

    cdl pretrain --out runs/demo/backbone.pth --source synthetic --synthetic-classes 40 --classes 20 40 \
        --model-kwargs '{"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 4, "num_heads": 3}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cdl_lightning.data.augment import RandomResizedCropFlip
from cdl_lightning.data.npz import NpzSource
from cdl_lightning.data.source import ArraySource
from cdl_lightning.data.synthetic import SyntheticShapes
from cdl_lightning.nn.vit import create_vit


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
) -> dict[str, float]:
    """Train ``name`` (+ a temporary linear head) on ``source``'s train split, restricted to labels in
    ``[classes[0], classes[1])``, with AdamW, a cosine schedule and RandomResizedCrop + flip; save the ViT's weights
    (no head) to ``out`` and return the train / test accuracy of the head on those classes."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator().manual_seed(seed)
    kwargs = dict(model_kwargs or {})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vit = create_vit(name, pretrained=False, model_kwargs=kwargs).to(device)
    low, high = classes or (0, source.num_classes)
    (train_x, train_y), (test_x, test_y) = source.arrays("train"), source.arrays("test")
    keep, keep_test = (train_y >= low) & (train_y < high), (test_y >= low) & (test_y < high)
    if not keep.any():
        raise ValueError(f"no training images with labels in [{low}, {high})")
    images, labels = torch.from_numpy(train_x[keep]), torch.from_numpy(train_y[keep] - low)
    head = torch.nn.Linear(vit.embed_dim, high - low).to(device)
    params = [*vit.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = epochs * -(-len(labels) // batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps, pct_start=0.1)
    size = int(kwargs.get("img_size", vit.patch_embed.img_size[0]))
    augment = RandomResizedCropFlip(size, scale=crop_scale)
    mean = torch.tensor(vit.pretrained_cfg.get("mean", (0.5,) * 3), device=device).view(1, 3, 1, 1)
    std = torch.tensor(vit.pretrained_cfg.get("std", (0.5,) * 3), device=device).view(1, 3, 1, 1)

    def logits(x: torch.Tensor) -> torch.Tensor:
        return head(vit.forward_features((x - mean) / std)[:, 0])

    start = time.perf_counter()
    vit.train()
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(order), batch_size):
            index = order[i : i + batch_size]
            x = augment(images[index].to(device).float().div_(255))
            loss = F.cross_entropy(logits(x), labels[index].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"pretrain epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)")
    vit.eval()

    @torch.no_grad()
    def accuracy(x: np.ndarray, y: np.ndarray) -> float:
        x, y = torch.from_numpy(x), torch.from_numpy(y - low)
        hits = sum(int((logits(x[i : i + 256].to(device).float().div(255)).argmax(1).cpu() == y[i : i + 256]).sum())
                   for i in range(0, len(y), 256))
        return 100.0 * hits / max(len(y), 1)

    result = {"train_acc": accuracy(train_x[keep], train_y[keep]), "test_acc": accuracy(test_x[keep_test],
                                                                                         test_y[keep_test])}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.cpu() for k, v in vit.state_dict().items()}, path)
    print(f"saved {path} ({name}, {sum(p.numel() for p in vit.parameters()):,} parameters); head accuracy on "
          f"classes [{low}, {high}): train {result['train_acc']:.1f} %, test {result['test_acc']:.1f} %")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="cdl pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="weights file to write (.pth)")
    parser.add_argument("--name", default="vit_tiny_patch16_224", help="timm model name")
    parser.add_argument("--model-kwargs", type=json.loads, default={}, help="timm.create_model arguments (JSON)")
    parser.add_argument("--source", choices=("synthetic", "npz"), default="synthetic")
    parser.add_argument("--npz", help="path of an .npz pack (with --source npz)")
    parser.add_argument("--synthetic-classes", type=int, default=40, help="classes of SyntheticShapes")
    parser.add_argument("--synthetic-seed", type=int, default=1, help="seed of SyntheticShapes")
    parser.add_argument("--classes", type=int, nargs=2, metavar=("LOW", "HIGH"), help="train on labels [LOW, HIGH)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    args = parser.parse_args(argv)
    if args.source == "npz":
        if not args.npz:
            parser.error("--source npz needs --npz PATH")
        source: ArraySource = NpzSource(args.npz)
    else:
        source = SyntheticShapes(num_classes=args.synthetic_classes, seed=args.synthetic_seed)
    pretrain(source, args.out, args.name, args.model_kwargs, tuple(args.classes) if args.classes else None,
             args.epochs, args.batch_size, args.lr, seed=args.seed, device=args.device)
