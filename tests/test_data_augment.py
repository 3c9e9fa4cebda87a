"""Device-side batched augmentation: crop boxes, resampling, flip, evaluation resize; CPU crops of file sources."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import RandomResizedCrop

from cdl_lightning.data.augment import (
    EvalResize,
    RandomResizedCropFlip,
    crop_params,
    crop_resize,
    sample_crop_boxes,
    seeded_crop_box,
)
from cdl_lightning.data.datasets import EvalCrop, TrainCrop


def test_crop_shapes_range_and_constant_image():
    torch.manual_seed(0)
    x = torch.rand(6, 3, 32, 32)
    out = RandomResizedCropFlip(48)(x)
    assert out.shape == (6, 3, 48, 48) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    constant = torch.full((5, 3, 32, 40), 0.37)
    assert torch.allclose(RandomResizedCropFlip(24)(constant), torch.full((5, 3, 24, 24), 0.37), atol=1e-6)


def test_crop_is_reproducible_from_the_global_generator():
    x = torch.rand(4, 3, 16, 16)
    aug = RandomResizedCropFlip(16)
    torch.manual_seed(7)
    a = aug(x)
    torch.manual_seed(7)
    assert torch.equal(a, aug(x))
    assert not torch.equal(a, aug(x))


def test_boxes_valid_and_distributed_like_torchvision():
    torch.manual_seed(0)
    boxes = sample_crop_boxes(20000, 32, 48)
    top, left, h, w = boxes.T
    assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 32).all() and (left + w <= 48).all()
    reference = torch.tensor(
        [RandomResizedCrop.get_params(torch.zeros(3, 32, 48), (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(20000)]
    ).float()
    assert torch.allclose(boxes.float().mean(0), reference.mean(0), rtol=0.05)
    assert torch.allclose(boxes.float().std(0), reference.std(0), rtol=0.08)
    # a scale no attempt can satisfy -> torchvision's fallback: central crop with the aspect clamped to the ratio
    fallback = sample_crop_boxes(3, 10, 40, scale=(2.0, 2.0))
    torchvision_fallback = RandomResizedCrop.get_params(torch.zeros(3, 10, 40), (2.0, 2.0), (3 / 4, 4 / 3))
    assert fallback.tolist() == [list(crop_params(10, 40))] * 3 == [list(torchvision_fallback)] * 3


def test_full_box_equals_bilinear_interpolate_and_flip():
    x = torch.rand(2, 3, 8, 8)
    full = torch.tensor([[0, 0, 8, 8]] * 2)
    expected = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    assert torch.allclose(crop_resize(x, full, 32), expected, atol=1e-5)
    # a crop of the top-left quadrant at its own size is that quadrant
    quad = torch.tensor([[0, 0, 4, 4], [4, 4, 4, 4]])
    out = crop_resize(x, quad, 4)
    assert torch.allclose(out[0], x[0, :, :4, :4], atol=1e-6) and torch.allclose(out[1], x[1, :, 4:, 4:], atol=1e-6)
    always = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    never = RandomResizedCropFlip(8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0)
    assert torch.allclose(always(x), x.flip(-1), atol=1e-6) and torch.allclose(never(x), x, atol=1e-6)


def test_eval_resize_modes():
    x = torch.rand(2, 3, 32, 32)
    assert EvalResize(32)(x) is x
    up = EvalResize(64)(x)
    assert up.shape == (2, 3, 64, 64)
    assert torch.allclose(up, F.interpolate(x, size=64, mode="bilinear", align_corners=False, antialias=True))
    crop = EvalResize(224, "resize_center_crop")
    assert crop.resize_size == 256
    y = torch.rand(1, 3, 300, 400)
    out = crop(y)
    resized = F.interpolate(y, size=(256, 341), mode="bilinear", align_corners=False, antialias=True)
    assert out.shape == (1, 3, 224, 224) and torch.allclose(out, resized[..., 16:240, 58:282])
    assert EvalResize(16)(torch.rand(1, 3, 20, 40)).shape == (1, 3, 16, 16)  # non-square: shorter side + centre crop
    with pytest.raises(ValueError, match="mode"):
        EvalResize(16, "crop")


def test_cpu_crops_for_file_sources():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    a = TrainCrop(16)(image, np.random.default_rng([0, 1, 2]))
    b = TrainCrop(16)(image, np.random.default_rng([0, 1, 2]))
    assert a.shape == (3, 16, 16) and a.dtype == torch.uint8 and torch.equal(a, b)
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = seeded_crop_box(rng, 30, 50)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 50
    assert EvalCrop(16)(image).shape == (3, 16, 16)
    assert EvalCrop(224, "resize_center_crop")(image).shape == (3, 224, 224)
