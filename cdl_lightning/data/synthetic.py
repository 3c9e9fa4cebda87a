"""`SyntheticShapes`: the built-in offline data set (no file, no network), generated procedurally from a seed."""

from __future__ import annotations

import numpy as np

from cdl_lightning.data.source import ArraySource, Split
from cdl_lightning.data.splits import ClassSelection

__all__ = ["SyntheticShapes", "SHAPE_NAMES"]

#: Shape of class ``c`` is ``SHAPE_NAMES[c % 8]``; its hue is ``frac(0.618 c)``: consecutive classes get distant hues.
SHAPE_NAMES = ("disk", "square", "ring", "plus", "triangle", "bars", "cross", "frame")


class SyntheticShapes(ArraySource):
    """Coloured shapes on noisy backgrounds: a small, learnable, deterministic stand-in for a real data set.

    Class ``c`` is the pair (shape ``c % 8``, hue ``frac(0.618 c)``: the golden-ratio sequence, so consecutive
    classes have distant hues): every class has its own colour, so even a frozen random-init ViT (whose features
    keep colour statistics) separates the classes of a task.
    Every image draws its own position, size, rotation, hue jitter, saturation, brightness, background colour and
    gradient, and pixel noise, so the class is carried by the shape and the colour only. A small random-init ViT
    (or a linear probe on pixels) learns it well above chance within a few epochs.

    The train and test splits come from independent child seeds of ``seed``, so changing ``test_per_class`` does not
    change the training images. Generation is vectorised numpy (default size: about 0.1 s).

    Args:
        num_classes: Number of classes (>= 1).
        train_per_class: Training images per class.
        test_per_class: Test images per class.
        image_size: Side of the square images, in pixels (>= 8).
        seed: Seed of the whole data set.
        noise: Standard deviation of the per-pixel Gaussian noise (images in [0, 1] before quantisation).
        classes: Keep only these of the ``num_classes`` generated classes (names such as ``disk_0`` or indices, or
            ``{random: k, seed: s}``; see `cdl_lightning.data.splits.select_classes`). The kept images are the same as
            in the full set.
    """

    def __init__(
        self,
        num_classes: int = 20,
        train_per_class: int = 100,
        test_per_class: int = 20,
        image_size: int = 32,
        seed: int = 0,
        noise: float = 0.08,
        classes: ClassSelection | None = None,
    ) -> None:
        if num_classes < 1 or train_per_class < 1 or test_per_class < 1:
            raise ValueError("num_classes, train_per_class and test_per_class must all be >= 1")
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size}")
        self.train_per_class = train_per_class
        self.test_per_class = test_per_class
        self.image_size = image_size
        self.seed = seed
        self.noise = noise
        self.num_hues = num_classes
        self.classes = classes
        self.class_names = [f"{SHAPE_NAMES[c % len(SHAPE_NAMES)]}_{c // len(SHAPE_NAMES)}" for c in range(num_classes)]
        self.select(classes)

    def _labels(self, split: Split) -> np.ndarray:
        per_class = self.train_per_class if split == "train" else self.test_per_class
        return np.repeat(np.arange(len(self.all_class_names), dtype=np.int64), per_class)

    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        labels = self._labels(split)
        child = np.random.SeedSequence(self.seed).spawn(2)[0 if split == "train" else 1]
        return self.generate(labels, np.random.default_rng(child)), labels

    def generate(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Draw one uint8 ``N x 3 x S x S`` image per label with the random generator ``rng``."""
        n, s = len(labels), self.image_size
        shape = labels % len(SHAPE_NAMES)
        hue_family = labels

        def draw(low: float, high: float) -> np.ndarray:
            return rng.uniform(low, high, size=(n, 1, 1)).astype(np.float32)

        # Geometry: centre, radius, rotation; pixel grid in shape coordinates (u, v), unit = radius.
        cx, cy = draw(0.3, 0.7) * s, draw(0.3, 0.7) * s
        radius = draw(0.2, 0.32) * s
        theta = draw(-0.35, 0.35)
        ys, xs = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
        dx, dy = (xs[None] - cx) / radius, (ys[None] - cy) / radius
        u = np.cos(theta) * dx + np.sin(theta) * dy
        v = -np.sin(theta) * dx + np.cos(theta) * dy
        au, av, rad, box = np.abs(u), np.abs(v), np.sqrt(u * u + v * v), np.maximum(np.abs(u), np.abs(v))
        masks = np.stack(
            [
                rad < 1.0,  # disk
                box < 0.8,  # square
                (rad > 0.55) & (rad < 1.0),  # ring
                ((au < 0.28) & (av < 1.0)) | ((av < 0.28) & (au < 1.0)),  # plus
                (v > -0.7) & (v < 0.8) & (au < 0.65 * (v + 0.7)),  # triangle
                (au < 0.95) & (np.abs(av - 0.5) < 0.2),  # two bars
                ((np.abs(u - v) < 0.35) | (np.abs(u + v) < 0.35)) & (box < 0.85),  # diagonal cross
                (box > 0.5) & (box < 0.9),  # square frame
            ]
        )
        mask = masks[shape, np.arange(n)][:, None].astype(np.float32)  # N x 1 x S x S

        # Foreground colour: hue family + jitter, saturation and value drawn per image.
        hue = (hue_family[:, None, None] * 0.6180339887 + 0.03 * draw(-0.5, 0.5)) + 0.05  # golden-ratio hues
        fg = _hsv_to_rgb(hue % 1.0, draw(0.65, 1.0), draw(0.75, 1.0))  # N x 3 x 1 x 1
        # Background: dark, weakly coloured, with a random linear gradient.
        bg = draw(0.05, 0.35)[:, None] + 0.08 * rng.standard_normal((n, 3, 1, 1)).astype(np.float32)
        gx, gy = draw(-0.15, 0.15), draw(-0.15, 0.15)
        gradient = (gx * (xs[None] / s - 0.5) + gy * (ys[None] / s - 0.5))[:, None]
        image = mask * fg + (1.0 - mask) * (bg + gradient)
        image += self.noise * rng.standard_normal(image.shape).astype(np.float32)
        return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)

    def __repr__(self) -> str:
        return (
            f"SyntheticShapes(num_classes={len(self.all_class_names)}, train_per_class={self.train_per_class}, "
            f"test_per_class={self.test_per_class}, image_size={self.image_size}, seed={self.seed}"
            f"{self._selection_repr()})"
        )


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape ``N x 1 x 1``; returns ``N x 3 x 1 x 1`` in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0], dtype=np.float32)[None, :, None, None] + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)
