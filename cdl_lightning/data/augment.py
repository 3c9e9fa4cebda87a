"""Batched image transforms that run on the batch's device (pure torch + ``torchvision.ops.roi_align``).

The reference resizes 32 px CIFAR images to 224 px with PIL on the CPU, which starves the GPU. Here a uint8 batch
goes to the device and is cropped/resized there, one kernel for the whole batch. Randomness comes from the global
torch generator of the batch's device (``torch.rand(..., device=x.device)``), so a callback that saves and restores
RNG states (`cdl_lightning.callbacks.RNGStateCallback`) makes a resumed run draw the same crops.

Inputs are float images in [0, 1], ``B x C x H x W``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

__all__ = ["RandomResizedCropFlip", "EvalResize", "sample_crop_boxes", "seeded_crop_box", "crop_params", "crop_resize"]


class RandomResizedCropFlip(nn.Module):
    """``RandomResizedCrop(size, scale, ratio)`` + ``RandomHorizontalFlip(hflip)`` for a whole batch, per-sample boxes.

    Boxes are drawn as torchvision's ``RandomResizedCrop.get_params`` does, vectorised: ``attempts`` candidate (area,
    log-aspect) draws per sample, the first that fits is used, and a sample with none falls back to the central crop
    with the aspect clamped to ``ratio``. Each box is resampled to ``size x size`` with ``roi_align`` (bilinear,
    ``aligned=True``; adaptive sampling averages several points per output pixel when shrinking, which antialiases like
    PIL's resize). Upscaling a full-image box equals ``F.interpolate(mode="bilinear", align_corners=False)``.

    Args:
        size: Output side in pixels.
        scale: Range of the crop area as a fraction of the image area.
        ratio: Range of the crop aspect ratio (width / height), sampled log-uniformly.
        hflip: Probability of a horizontal flip.
        attempts: Candidate draws per sample (torchvision uses 10).
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
        attempts: int = 10,
    ) -> None:
        super().__init__()
        if scale[0] > scale[1] or ratio[0] > ratio[1]:
            raise ValueError(f"scale and ratio must be (min, max), got {scale} and {ratio}")
        self.size = int(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.hflip = float(hflip)
        self.attempts = int(attempts)

    def forward(self, images: Tensor) -> Tensor:
        """Crop, resize and flip ``images`` (float ``B x C x H x W``) to ``B x C x size x size``."""
        b, _, h, w = images.shape
        boxes = sample_crop_boxes(b, h, w, self.scale, self.ratio, self.attempts, images.device)
        out = crop_resize(images, boxes, self.size)
        if self.hflip > 0:
            flip = torch.rand(b, device=images.device) < self.hflip
            out = torch.where(flip[:, None, None, None], out.flip(-1), out)
        return out

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, ratio={tuple(round(r, 4) for r in self.ratio)}, hflip={self.hflip}"
        )


class EvalResize(nn.Module):
    """Deterministic evaluation resize (the reference's test transforms), batched.

    - ``"resize"``: ``Resize(size)`` (CIFAR-100 in the reference): the shorter side becomes ``size``; a non-square
      image is then centre-cropped to ``size x size`` so the batch stays rectangular.
    - ``"resize_center_crop"``: ``Resize(int(size / crop_pct)) + CenterCrop(size)`` (ImageNet-R: 256 then 224).

    Bilinear with antialias (``F.interpolate(..., antialias=True)``, like torchvision's tensor ``Resize``). A batch
    already ``size x size`` in ``"resize"`` mode is returned unchanged.

    Args:
        size: Output side in pixels.
        mode: ``"resize"`` or ``"resize_center_crop"``.
        crop_pct: Fraction kept by the centre crop in ``"resize_center_crop"`` mode (0.875: 224 of 256).
    """

    def __init__(
        self, size: int, mode: Literal["resize", "resize_center_crop"] = "resize", crop_pct: float = 0.875
    ) -> None:
        super().__init__()
        if mode not in ("resize", "resize_center_crop"):
            raise ValueError(f"mode must be 'resize' or 'resize_center_crop', got {mode!r}")
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = int(size)
        self.mode = mode
        self.crop_pct = float(crop_pct)

    @property
    def resize_size(self) -> int:
        """Side the shorter edge is resized to before the centre crop."""
        return self.size if self.mode == "resize" else int(math.floor(self.size / self.crop_pct))

    def forward(self, images: Tensor) -> Tensor:
        """Resize (and centre-crop) float ``B x C x H x W`` to ``B x C x size x size``."""
        h, w = images.shape[-2:]
        if h == w == self.resize_size and self.resize_size == self.size:
            return images
        short = self.resize_size
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        if (new_h, new_w) != (h, w):
            images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        top, left = int(round((new_h - self.size) / 2.0)), int(round((new_w - self.size) / 2.0))
        return images[..., top : top + self.size, left : left + self.size]

    def extra_repr(self) -> str:
        return f"size={self.size}, mode={self.mode!r}, crop_pct={self.crop_pct}"


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    device: torch.device | str | None = None,
) -> Tensor:
    """Per-sample RandomResizedCrop boxes ``(top, left, height, width)`` as an int64 ``B x 4`` tensor.

    Draws with the global generator of ``device``; same distribution as ``torchvision.transforms.RandomResizedCrop``.
    """
    area = float(height * width)
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    u = torch.rand(batch, attempts, 4, device=device, dtype=torch.float64)
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u[..., 0])
    aspect = torch.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[..., 1])
    crop_w = torch.round(torch.sqrt(target_area * aspect))
    crop_h = torch.round(torch.sqrt(target_area / aspect))
    valid = (crop_w > 0) & (crop_w <= width) & (crop_h > 0) & (crop_h <= height)
    first = valid.to(torch.int8).argmax(dim=1, keepdim=True)  # index of the first valid attempt (0 when none)
    pick = lambda t: t.gather(1, first).squeeze(1)
    crop_h, crop_w, u_top, u_left = pick(crop_h), pick(crop_w), pick(u[..., 2]), pick(u[..., 3])
    # torch.randint(0, n + 1) as floor(U * (n + 1)), clamped against U rounding to 1.
    top = torch.minimum(torch.floor(u_top * (height - crop_h + 1)), height - crop_h)
    left = torch.minimum(torch.floor(u_left * (width - crop_w + 1)), width - crop_w)
    boxes = torch.stack([top, left, crop_h, crop_w], dim=1).long()
    # the fallback as Python scalars: a tensor built from them would be a host-to-device copy that waits for the GPU
    fallback, found = crop_params(height, width, ratio), valid.any(dim=1)
    return torch.stack([torch.where(found, boxes[:, i], fallback[i]) for i in range(4)], dim=1)


def crop_params(height: int, width: int, ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop fallback box ``(top, left, h, w)``: the central crop, aspect clamped to ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def crop_resize(images: Tensor, boxes: Tensor, size: int) -> Tensor:
    """Resample box ``(top, left, h, w)`` of each image to ``size x size`` (bilinear ``roi_align``, aligned=True)."""
    dtype = images.dtype
    x = images if dtype in (torch.float32, torch.float64) else images.float()
    top, left, h, w = boxes.to(x.dtype).unbind(1)
    index = torch.arange(x.shape[0], device=x.device, dtype=x.dtype)
    rois = torch.stack([index, left, top, left + w, top + h], dim=1)
    out = roi_align(x, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return out.to(dtype)


def seeded_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """One RandomResizedCrop box ``(top, left, h, w)`` drawn from a numpy generator (CPU path for file sources)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(attempts):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return crop_params(height, width, ratio)
