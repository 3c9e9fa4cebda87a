"""Shared fixtures.

- Every test runs in its own empty working directory (`isolated_cwd`, autouse): nothing a test or the code under test
  writes to a relative path lands in the repository, and a test that leaves files there fails, naming them. Tests
  reach repository files through absolute paths (``Path(__file__).resolve().parents[1] / ...``).
- `shared_pack` opens a data pack of ``../shared/data`` (beside the repository on our machines only) or skips the test
  with a reason when it is absent (a fresh clone passes ``make test`` with nothing beside it).
- Markers (registered in ``pyproject.toml``): ``slow`` (deselected by ``make test``, run by ``make test-all`` and CI)
  and ``gpu`` (``tests/gpu``, skipped without CUDA; ``make test-gpu``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cdl_lightning.nn import BackboneConfig

TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CDL_SHARED_DATA", REPO.parent / "shared" / "data"))  # CDL_SHARED_DATA overrides


@pytest.fixture
def tiny_vit_config() -> BackboneConfig:
    """A tiny random-init ViT: 32 px images, 8 px patches (16 patches + CLS = 17 tokens), width 64, depth 4."""
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=dict(TINY_VIT_KWARGS))


def shared_pack_path(name: str) -> Path:
    """``../shared/data/<name>`` or ``pytest.skip`` with a reason when it is absent (for module-level use too)."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"data pack {path} is absent (it lives beside the repository on the project's machines only)")
    return path


@pytest.fixture
def shared_pack() -> Callable[[str], Path]:
    """``shared_pack("tiny-imagenet-ci.npz")``: the path of a pack of ``../shared/data``; skips the test when absent."""
    return shared_pack_path


@pytest.fixture(autouse=True, scope="session")
def decode_cache_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`NpzSource`'s decoded-image cache (``decode_cache="auto"``) goes to a folder of this test session, not the
    user's ``~/.cache``; subprocesses inherit it through ``CDL_CACHE_DIR``."""
    folder = tmp_path_factory.mktemp("cdl-cache")
    previous = os.environ.get("CDL_CACHE_DIR")
    os.environ["CDL_CACHE_DIR"] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop("CDL_CACHE_DIR", None)
    else:
        os.environ["CDL_CACHE_DIR"] = previous


@pytest.fixture(autouse=True)
def isolated_cwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Run the test in a fresh empty working directory and fail it if it leaves anything there."""
    cwd = tmp_path_factory.mktemp("cwd")
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        yield cwd
    finally:
        os.chdir(previous)
    left = sorted(p.name for p in cwd.iterdir())
    assert not left, f"the test wrote into its working directory (use tmp_path): {left}"


def pytest_configure(config):
    # tiny models: one intra-op thread is several times faster than two on a 2-core CI machine (no oversubscription)
    import torch

    torch.set_num_threads(1)
