"""Shared fixtures."""

import pytest

from cdl_lightning.nn import BackboneConfig

TINY_VIT_KWARGS = dict(img_size=32, patch_size=8, embed_dim=64, depth=4, num_heads=2)


@pytest.fixture
def tiny_vit_config() -> BackboneConfig:
    """A tiny random-init ViT: 32 px images, 8 px patches (16 patches + CLS = 17 tokens), width 64, depth 4."""
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs=dict(TINY_VIT_KWARGS))


def pytest_configure(config):
    # tiny models: one intra-op thread is several times faster than two on a 2-core CI machine (no oversubscription)
    import torch

    torch.set_num_threads(1)
