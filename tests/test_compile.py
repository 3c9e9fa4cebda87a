"""``compile=True`` compiles every ViT pass and leaves the numbers as they were."""

from __future__ import annotations

import functools

import pytest
import torch

from cdl_lightning.models import PromptLearner
from cdl_lightning.nn import BackboneConfig
from cdl_lightning.nn.prompts import CodaPrompt


@pytest.mark.slow  # torch.compile: about a minute of compilation on 2 cores
def test_compiled_learner_matches_eager():
    backbone = BackboneConfig(name="vit_tiny_patch16_224",
                              model_kwargs=dict(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2))
    model = PromptLearner(backbone=backbone, prompt=functools.partial(CodaPrompt, pool_size=8, layers=(0, 1)),
                          task_sizes=[2, 2], compile=True).eval()
    images = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        eager = model(images, 1)
        model.configure_model()
        model.configure_model()  # idempotent
        compiled = model(images, 1)
        remainder = model(images[:3], 1)  # a smaller batch: padded to 4 (`BatchPadding`), no second compile
    vit = model.classifier.backbone
    assert vit._compiled_call_impl is not None and vit._compiled_call_impl.padded_calls == 1
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(remainder, eager[:3], rtol=1e-4, atol=1e-5)
