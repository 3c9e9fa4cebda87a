"""`CIFAR100`: the CIFAR-100 python files, read through torchvision."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cdl_lightning.data.source import ArraySource, Split
from cdl_lightning.data.splits import ClassSelection

__all__ = ["CIFAR100"]

_FILES = ("train", "test", "meta")


class CIFAR100(ArraySource):
    """CIFAR-100 (fine labels, 100 classes, 32 x 32): 50k train / 10k test images, the Split CIFAR-100 benchmark.

    Expects ``{root}/cifar-100-python/{train,test,meta}`` (the extracted ``cifar-100-python.tar.gz``). The files are
    read with ``torchvision.datasets.CIFAR100`` the first time a split is needed and kept in memory as uint8.

    Args:
        root: Folder holding (or receiving) ``cifar-100-python/``.
        download: Download the archive in ``prepare_data`` when the files are missing. Needs internet access.
        classes: Keep only these classes: names (``[apple, bear]``) or indices, or a seeded random subset
            (``{random: 10, seed: 0}``); see `cdl_lightning.data.splits.select_classes`. ``None``: all 100.

    Raises:
        FileNotFoundError: Files missing and ``download`` is false (the message names the path and ``download: true``).
    """

    url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"

    def __init__(self, root: str = "data", download: bool = False, classes: ClassSelection | None = None) -> None:
        self.root = str(root)
        self.download = download
        self.classes = classes
        self.class_names = list(_CLASS_NAMES)
        self.select(classes)
        if not download and not self.files_present():
            raise FileNotFoundError(
                f"CIFAR-100 not found: expected {self.folder}/{{{','.join(_FILES)}}} (the extracted "
                f"cifar-100-python.tar.gz). Set `download: true` on the source to fetch it (needs internet), or place "
                f"the extracted folder there."
            )

    @property
    def folder(self) -> Path:
        """The ``cifar-100-python`` folder."""
        return Path(self.root).expanduser() / "cifar-100-python"

    def files_present(self) -> bool:
        """Whether the three python files exist (no checksum)."""
        return all((self.folder / name).is_file() for name in _FILES)

    def prepare(self) -> None:
        """Download and extract the archive when the files are missing (``download`` must be true)."""
        if self.files_present():
            return
        if not self.download:
            raise FileNotFoundError(f"CIFAR-100 not found in {self.folder}; set `download: true` or place the files")
        import torchvision

        try:
            torchvision.datasets.CIFAR100(self.root, train=True, download=True)
        except Exception as error:  # URLError, socket errors, HTTP errors: all mean "could not fetch"
            raise RuntimeError(
                f"Downloading CIFAR-100 from {torchvision.datasets.CIFAR100.url} failed ({type(error).__name__}: "
                f"{error}). This machine looks offline. Place the files manually: on a machine with internet, download "
                f"cifar-100-python.tar.gz from {self.url}, extract it into {Path(self.root).expanduser()} so that "
                f"{self.folder}/train, test and meta exist, copy that folder here, and set `download: false`."
            ) from error

    def _load(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        import torchvision

        if not self.files_present():
            self.prepare()
        ds = torchvision.datasets.CIFAR100(self.root, train=split == "train", download=False)
        if list(ds.classes) != self.all_class_names:
            raise RuntimeError(f"unexpected CIFAR-100 class list in {self.folder}/meta")
        return ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets, dtype=np.int64)

    def __repr__(self) -> str:
        return f"CIFAR100(root={self.root!r}, download={self.download}{self._selection_repr()})"


# The fine label names in label order (as in the `meta` file), so class names exist before the files are read.
_CLASS_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle "
    "caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant "
    "flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man "
    "maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree "
    "plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper "
    "snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train "
    "trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
assert len(_CLASS_NAMES) == 100
