"""Single-op timings of a ViT step's costliest small kernels, alone on the GPU, and of candidate replacements.

``profile_step.py`` sums kernel times over a real step, where the distiller's concurrent teacher overlaps the
student's kernels and so inflates each one. This script times each op alone (CUDA events, median of ``--repeats``
batches of ``--iters`` calls) at the shapes of a batch-64, 224 px ViT-S/16 and ViT-B/16 step under bf16 autocast, and
prints, for each replacement, the largest difference from the op it would replace (0 = the same bits):

- ``patch-embed``: the strided convolution of timm's ``PatchEmbed`` (cuDNN, default algorithm choice), the same with
  ``torch.backends.cudnn.benchmark``, and the same map as a reshape + ``F.linear`` (kernel == stride, no padding: one
  GEMM over the flattened patches, `cdl_lightning.nn.vit.patch_embed_as_gemm`, what ``patch_embed_gemm`` runs;
  rounding may differ from the convolution's);
- ``residual-add``: the residual stream's ``x + y`` with ``x`` fp32 and ``y`` bf16 (autocast's Linear output), as
  PyTorch runs it (one mixed-dtype kernel), and as ``x + y.float()`` (a cast and a same-dtype add; bitwise the same);
- ``layer-norm``: ``F.layer_norm`` of the fp32 residual stream (autocast runs it in fp32), bytes moved vs the time;
- ``bf16-stream``: the same add and LayerNorm with the residual stream in bf16, as a distiller's
  ``teacher_low_precision`` runs its teacher (half the bytes; not bitwise: the difference is from the fp32 op);
- ``prefix-kv``: a prompt prefix joined to the keys (`cdl_lightning.nn.vit.prefix_attention`: ``torch.cat`` of the
  batch-broadcast prefix and the key view of the qkv projection), and the same tensor written by two ``copy_`` into
  one allocation (the same bits).

Each row prints the achieved bandwidth or TFLOP/s, so a slow kernel shows against the GPU's peak.

    python benchmarks/ops.py                 # GPU
    python benchmarks/ops.py --tiny          # CPU smoke test (tiny shapes, numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from cdl_lightning.nn.vit import patch_embed_as_gemm

WIDTHS = {"S": 384, "B": 768}


def timer(fn: Callable[[], object], device: torch.device, iters: int, repeats: int) -> float:
    """Median seconds per call of ``fn`` over ``repeats`` batches of ``iters`` calls (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1000 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def rows_for(arch: str, batch: int, size: int, patch: int, device: torch.device, iters: int, repeats: int):
    width, dtype = WIDTHS[arch], torch.bfloat16
    tokens = (size // patch) ** 2 + 1
    gen = torch.Generator(device=device).manual_seed(0)
    images = torch.rand(batch, 3, size, size, device=device, generator=gen)
    weight = (torch.randn(width, 3, patch, patch, device=device, generator=gen) * 0.02).to(dtype)
    bias = (torch.randn(width, device=device, generator=gen) * 0.02).to(dtype)
    autocast = torch.autocast(device.type, dtype=dtype)
    run = lambda fn: timer(fn, device, iters, repeats)  # noqa: E731

    def conv():
        with autocast:
            return F.conv2d(images, weight, bias, stride=patch).flatten(2).transpose(1, 2)

    def linear():
        with autocast:
            return patch_embed_as_gemm(images, weight, bias, (patch, patch))

    flops = 2 * batch * (tokens - 1) * width * 3 * patch * patch
    reference = conv()
    out = []
    for name, fn, setting in (("conv2d (cuDNN default)", conv, False), ("conv2d (cudnn.benchmark)", conv, True),
                              ("reshape + F.linear", linear, False)):
        previous = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = setting
        try:
            seconds = run(fn)
            diff = max_diff(fn(), reference)
        finally:
            torch.backends.cudnn.benchmark = previous
        out.append({"op": "patch-embed", "arch": arch, "variant": name, "us": seconds * 1e6,
                    "tflops": flops / seconds / 1e12, "max_diff": diff})

    x = torch.randn(batch, tokens, width, device=device, generator=gen)
    y = torch.randn(batch, tokens, width, device=device, generator=gen).to(dtype)
    moved = x.numel() * (4 + 2 + 4)
    reference = x + y
    for name, fn in (("x + y (mixed dtypes)", lambda: x + y), ("x + y.float()", lambda: x + y.float())):
        seconds = run(fn)
        out.append({"op": "residual-add", "arch": arch, "variant": name, "us": seconds * 1e6,
                    "gb_per_s": moved / seconds / 1e9, "max_diff": max_diff(fn(), reference)})

    ln_w, ln_b = torch.ones(width, device=device), torch.zeros(width, device=device)
    seconds = run(lambda: F.layer_norm(x, (width,), ln_w, ln_b))
    out.append({"op": "layer-norm", "arch": arch, "variant": "F.layer_norm fp32", "us": seconds * 1e6,
                "gb_per_s": x.numel() * 8 / seconds / 1e9, "max_diff": 0.0})

    xb, ln_wb, ln_bb = x.to(dtype), ln_w.to(dtype), ln_b.to(dtype)
    for name, fn, moved, fp32 in (
            ("x + y (both bf16)", lambda: xb + y, x.numel() * 6, reference),
            ("F.layer_norm bf16", lambda: F.layer_norm(xb, (width,), ln_wb, ln_bb), x.numel() * 4,
             F.layer_norm(x, (width,), ln_w, ln_b))):
        seconds = run(fn)
        out.append({"op": "bf16-stream", "arch": arch, "variant": name, "us": seconds * 1e6,
                    "gb_per_s": moved / seconds / 1e9, "max_diff": max_diff(fn(), fp32)})

    heads, head_dim, length = width // 64, 64, 4  # ViT-S/B heads of 64; a CODA prompt of 8 = 4 key + 4 value rows
    qkv = torch.randn(batch, tokens, 3, heads, head_dim, device=device, generator=gen).to(dtype)
    keys = qkv.unbind(2)[1]  # B x N x H x hd, a strided view (as prefix_attention has it)
    prefix = torch.randn(1, length, width, device=device, generator=gen).to(dtype)

    def cat():
        return torch.cat([prefix.expand(batch, -1, -1).reshape(batch, -1, heads, head_dim), keys], dim=1)

    def copies():
        joined = torch.empty(batch, length + tokens, heads, head_dim, device=device, dtype=dtype)
        joined[:, :length].copy_(prefix.view(1, length, heads, head_dim))
        joined[:, length:].copy_(keys)
        return joined

    reference = cat()
    moved = 2 * (batch * tokens * width * 2) + batch * length * width * 2  # read the keys, write them and the prefix
    for name, fn in (("torch.cat", cat), ("empty + 2 copy_", copies)):
        seconds = run(fn)
        out.append({"op": "prefix-kv", "arch": arch, "variant": name, "us": seconds * 1e6,
                    "gb_per_s": moved / seconds / 1e9, "max_diff": max_diff(fn(), reference)})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="32 px, batch 4, CPU: a smoke test")
    parser.add_argument("--device", help="default: cuda (cpu with --tiny)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU machine, or pass --tiny for the CPU smoke test")
    batch, size, iters, repeats = (4, 32, 2, 2) if args.tiny else (args.batch, 224, args.iters, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name}, torch {torch.__version__}, batch {batch}, {size} px, bf16 autocast")
    print(f"{'op':13} {'arch':4} {'variant':26} {'us':>9} {'rate':>14} {'max |diff|':>11}")
    rows = []
    for arch in WIDTHS:
        for row in rows_for(arch, batch, size, 16 if not args.tiny else 8, device, iters, repeats):
            rate = f"{row['tflops']:.1f} TFLOP/s" if "tflops" in row else f"{row['gb_per_s']:.0f} GB/s"
            print(f"{row['op']:13} {arch:4} {row['variant']:26} {row['us']:9.1f} {rate:>14} {row['max_diff']:11.3g}")
            print(json.dumps({"bench": "cdl-ops", "batch": batch, "size": size, **row}))
            rows.append(row)
    return rows


if __name__ == "__main__":
    main()
