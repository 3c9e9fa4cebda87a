"""``patch_embed_gemm`` (opt-in, not bitwise): timm's patch-embedding convolution run as reshape + one GEMM
(`GemmPatchEmbed`). The same map (float64: within 1e-12 of the convolution; float32: the whole ViT within float
rounding), the same module tree and ``state_dict``, a warned fallback for ineligible patch embeddings, and the flag
through the learner, the distiller's teacher, checkpoints, ``load_for_inference``, ``torch.export`` and ``cdl fit`` /
``cdl validate --ckpt_path``. The fast paths with the flag against eager with it: ``tests/gpu``."""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
import yaml
from _cli_helpers import TINY_BACKBONE, as_args, teacher_checkpoint_file, two_task_run_options
from timm.layers import PatchEmbed
from torch import nn

from cdl_lightning.cli import cli_main
from cdl_lightning.models import Distiller, PromptLearner
from cdl_lightning.nn import KDP, BackboneConfig, CodaPrompt, GemmPatchEmbed, PromptedViT
from cdl_lightning.nn.vit import gemm_patch_embed_ineligibility

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)


def tiny_vit(**kwargs: object) -> PromptedViT:
    return BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**TINY, **kwargs}).build()


def images(batch: int = 3, size: tuple[int, int] = (32, 32), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(0), dtype=dtype)


@pytest.mark.parametrize("kwargs", [
    dict(img_size=32, patch_size=8, embed_dim=16),
    dict(img_size=(32, 48), patch_size=8, embed_dim=16, norm_layer=nn.LayerNorm, bias=False),  # norm after, no bias
    dict(img_size=28, patch_size=14, in_chans=5, embed_dim=24),
], ids=["square", "rectangular-norm-nobias", "patch14-5chans"])
def test_gemm_equals_the_convolution_in_float64(kwargs):
    torch.manual_seed(0)
    conv = PatchEmbed(**kwargs).double()
    if kwargs.get("norm_layer"):  # a norm that is not the identity at init
        nn.init.normal_(conv.norm.weight)
        nn.init.normal_(conv.norm.bias)
    gemm = copy.deepcopy(conv)
    gemm.__class__ = GemmPatchEmbed
    assert gemm_patch_embed_ineligibility(conv) is None and gemm_patch_embed_ineligibility(gemm) is None
    height, width = conv.img_size
    x = torch.rand(3, kwargs.get("in_chans", 3), height, width, generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    expected, actual = conv(x), gemm(x)
    assert actual.shape == expected.shape == (3, conv.num_patches, conv.proj.out_channels)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    # timm's image-size check, word for word
    with pytest.raises(AssertionError, match=r"Input height \(16\) doesn't match model \(" + str(height)):
        gemm(x[:, :, :16])
    with pytest.raises(AssertionError, match=r"Input width \(16\) doesn't match model \(" + str(width)):
        gemm(x[..., :16])


def test_under_autocast_the_cast_before_the_copy_gives_the_bits_of_the_cast_after():
    vit = tiny_vit()
    embed = vit.vit.patch_embed
    x = images()
    vit.patch_embed_gemm_()
    p = embed.patch_size[0]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        actual = embed(x)
        # the GEMM as `benchmarks/ops.py` wrote it: fp32 patches, cast by F.linear under autocast
        patches = x.reshape(3, 3, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).reshape(3, 16, 3 * p * p)
        expected = F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)
    assert actual.dtype == torch.bfloat16 and torch.equal(actual, expected)
    with torch.no_grad():  # float64 inputs are left alone (as autocast does)
        embed.double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert embed(x.double()).dtype == torch.float64


def test_prompted_and_query_passes_run_the_gemm_within_float32_rounding_and_keep_the_state_dict():
    vit = tiny_vit()
    reference = copy.deepcopy(vit)
    names, state = [n for n, _ in vit.named_modules()], vit.state_dict()
    assert not vit.uses_patch_embed_gemm and vit.patch_embed_gemm_() and vit.uses_patch_embed_gemm
    assert type(vit.vit.patch_embed) is GemmPatchEmbed and isinstance(vit.vit.patch_embed, PatchEmbed)
    # the same module tree, keys and tensors: checkpoints and weight files load as before
    assert [n for n, _ in vit.named_modules()] == names
    assert list(vit.state_dict()) == list(state)
    assert all(vit.state_dict()[k].data_ptr() == v.data_ptr() for k, v in state.items())
    vit.vit.load_state_dict(reference.vit.state_dict())
    g = torch.Generator().manual_seed(3)
    prefixes = {1: (torch.randn(3, 4, 64, generator=g), torch.randn(3, 4, 64, generator=g))}
    token = torch.randn(1, 1, 64, generator=g)
    x = images()
    with torch.no_grad():
        expected = reference(x, prefixes, append=token, return_blocks=True)
        expected_query = reference.query(x)
        with mock.patch.object(F, "conv2d", side_effect=AssertionError("the convolution ran")):
            actual = vit(x, prefixes, append=token, return_blocks=True)  # the prompted pass
            query = vit.query(x)  # the query pass: timm's forward_features
    torch.testing.assert_close(actual.tokens, expected.tokens, rtol=1e-5, atol=1e-5)
    for a, e in zip(actual.blocks, expected.blocks, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(query, expected_query, rtol=1e-5, atol=1e-5)
    # frozen-weight casting still finds the projection's Conv2d; switching back gives the convolution's bits
    assert vit.cast_matmul_weights_(torch.bfloat16) == reference.cast_matmul_weights_(torch.bfloat16)
    assert vit.patch_embed_gemm_(False) is False and type(vit.vit.patch_embed) is PatchEmbed
    with torch.no_grad():
        assert torch.equal(vit(x).tokens, reference(x).tokens)


def test_the_gemm_vit_exports_with_a_dynamic_batch():
    vit = tiny_vit()
    vit.patch_embed_gemm_()

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.vit(x).tokens, self.vit.query(x)

    model = Tokens()
    program = torch.export.export(model, (images(),), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    assert "vit.vit.patch_embed.proj.weight" in program.state_dict
    assert "convolution" not in program.graph_module.code
    x = images(5)
    with torch.no_grad():
        for a, e in zip(program.module()(x), model(x), strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize(("kwargs", "reason"), [
    (dict(dynamic_img_size=True), "dynamic_img_size=True"),
    (dict(dynamic_img_pad=True), "dynamic_img_pad=True"),
    (dict(img_size=30), "not a multiple of the patch size"),
])
def test_an_ineligible_patch_embedding_keeps_its_convolution_with_a_warning(kwargs, reason):
    vit = tiny_vit(**kwargs)
    reference = copy.deepcopy(vit)
    with pytest.warns(UserWarning, match=f"keeps its convolution.*{reason}"):
        assert vit.patch_embed_gemm_() is False
    assert type(vit.vit.patch_embed) is PatchEmbed and not vit.uses_patch_embed_gemm
    size = tuple(vit.vit.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(vit.query(images(size=size)), reference.query(images(size=size)))


def test_other_ineligible_cases_are_named():
    embed = PatchEmbed(img_size=32, patch_size=8, embed_dim=16)
    embed.proj.padding = (1, 1)
    assert "pads" in gemm_patch_embed_ineligibility(embed)
    embed = PatchEmbed(img_size=32, patch_size=8, embed_dim=16, output_fmt="NHWC")
    assert "NHWC feature map" in gemm_patch_embed_ineligibility(embed)
    assert "not timm's PatchEmbed" in gemm_patch_embed_ineligibility(nn.Identity())
    # a swapped module changed by hand afterwards runs the convolution again, with a warning
    embed = PatchEmbed(img_size=32, patch_size=8, embed_dim=16)
    reference = copy.deepcopy(embed)
    embed.__class__ = GemmPatchEmbed
    embed.strict_img_size = False
    reference.strict_img_size = False
    x = images()
    with pytest.warns(UserWarning, match="running the patch-embedding convolution instead"), torch.no_grad():
        assert torch.equal(embed(x), reference(x))


def coda(embed_dim: int, key_dim: int, num_tasks: int) -> CodaPrompt:
    return CodaPrompt(embed_dim, key_dim, num_tasks, pool_size=8, layers=(0, 1))


def test_learner_flag_is_off_by_default_and_reaches_every_frozen_vit(tiny_vit_config):
    query_vit = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**TINY, "embed_dim": 32})
    off = PromptLearner(backbone=tiny_vit_config, prompt=coda, query_backbone=query_vit, task_sizes=[2, 2])
    assert off.hparams["patch_embed_gemm"] is False and not off.fast_paths.patch_embed_gemm
    assert [v.uses_patch_embed_gemm for v in off.frozen_vits()] == [False, False]
    on = PromptLearner(backbone=tiny_vit_config, prompt=coda, query_backbone=query_vit, task_sizes=[2, 2],
                       patch_embed_gemm=True)
    assert on.hparams["patch_embed_gemm"] is True and "patch_embed_gemm=True" in repr(on.fast_paths)
    assert [v.uses_patch_embed_gemm for v in on.frozen_vits()] == [True, True]  # backbone and query ViT
    on.load_state_dict(off.state_dict())  # the same keys
    on.eval()
    off.eval()
    x = images(4)
    with torch.no_grad():
        torch.testing.assert_close(on(x, 1), off(x, 1), rtol=1e-5, atol=1e-5)
    on.fast_paths.patch_embed_gemm = False  # flipped on the instance: applied by `patch_embed_` (a trainer's setup)
    on.fast_paths.patch_embed_(on.frozen_vits())
    assert [v.uses_patch_embed_gemm for v in on.frozen_vits()] == [False, False]


def test_distiller_applies_it_to_its_teacher_and_old_checkpoints_load_without_it(tmp_path, tiny_vit_config):
    student_vit = BackboneConfig(name="vit_tiny_patch16_224", model_kwargs={**TINY, "embed_dim": 32})
    teacher = teacher_checkpoint_file(PromptLearner(backbone=tiny_vit_config, prompt=coda, task_sizes=[2, 2]), tmp_path)
    kwargs = dict(method=KDP(), teacher_checkpoint=teacher, backbone=student_vit, prompt=coda, task_sizes=[2, 2])
    torch.manual_seed(0)
    off = Distiller(**kwargs)
    torch.manual_seed(0)
    on = Distiller(**kwargs, patch_embed_gemm=True)
    assert len(on.frozen_vits()) == 2 and all(v.uses_patch_embed_gemm for v in on.frozen_vits())  # student, teacher
    assert not any(v.uses_patch_embed_gemm for v in off.frozen_vits())
    x = images(4)
    with torch.no_grad():
        for model in (on, off):
            model.open_task(0)
        torch.testing.assert_close(on.teacher_forward(x, 0, on.query(x)).logits,
                                   off.teacher_forward(x, 0, off.query(x)).logits, rtol=1e-5, atol=1e-5)
    # the flag is a hyper-parameter: `load_for_inference` rebuilds with it; a checkpoint without it loads with False
    checkpoint = {"state_dict": on.state_dict(), "hyper_parameters": dict(on.hparams)}
    on.on_save_checkpoint(checkpoint)
    assert checkpoint["hyper_parameters"]["patch_embed_gemm"] is True
    torch.save(checkpoint, tmp_path / "new.ckpt")
    del checkpoint["hyper_parameters"]["patch_embed_gemm"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    new, old = (Distiller.load_for_inference(str(tmp_path / f"{name}.ckpt")) for name in ("new", "old"))
    assert new.fast_paths.patch_embed_gemm and new.classifier.backbone.uses_patch_embed_gemm
    assert not old.fast_paths.patch_embed_gemm and not old.classifier.backbone.uses_patch_embed_gemm
    with torch.no_grad():
        torch.testing.assert_close(new(x, 0), old(x, 0), rtol=1e-5, atol=1e-5)


def test_cdl_fit_with_the_flag_trains_and_its_checkpoint_validates(tmp_path):
    options = {
        **two_task_run_options(tmp_path, "run"),
        "--trainer.enable_model_summary": "false",
        "--model": "cdl_lightning.models.PromptLearner",
        "--model.backbone": TINY_BACKBONE,
        "--model.prompt": "cdl_lightning.nn.prompts.CodaPrompt",
        "--model.prompt.pool_size": 8,
        "--model.prompt.layers": "[0, 1]",
        "--model.init_args.patch_embed_gemm": "true",
        "--evaluation.log_image": "false",
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit = cli_main(["fit", *as_args(options)])
    assert not [w for w in caught if "patch_embed_gemm" in str(w.message)]  # the tiny ViT is eligible: no fallback
    run = tmp_path / "run"
    model = fit.model
    assert model.fast_paths.patch_embed_gemm and model.classifier.backbone.uses_patch_embed_gemm
    fitted = json.loads((run / "metrics.json").read_text())["accuracy_matrix"]
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert torch.load(checkpoint, weights_only=True)["hyper_parameters"]["patch_embed_gemm"] is True
    # the run's config without the flag: `--ckpt_path` brings it back from the checkpoint's hyper-parameters
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["init_args"].pop("patch_embed_gemm") is True
    (tmp_path / "no_flag.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "validate"
    validate = cli_main(["validate", "--config", str(tmp_path / "no_flag.yaml"), "--ckpt_path", str(checkpoint),
                         "--trainer.logger", "false", "--trainer.default_root_dir", str(out),
                         "--evaluation.output_dir", str(out)])
    assert validate.model.classifier.backbone.uses_patch_embed_gemm
    validated = json.loads((out / "metrics.json").read_text())["accuracy_matrix"]
    assert all(v is not None for v in fitted[-1]) and validated[-1] == fitted[-1]  # the fit's last row, exactly


def test_benchmark_flags_run_on_cpu(monkeypatch, capsys):
    """``throughput.py --patch-embed-gemm`` and ``check_fast_paths.py --patch-embed-gemm`` (tiny ViTs, CPU): the
    flag reaches the models, and the check prints the deviation from the convolution without asserting on it."""
    import importlib

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    throughput, check = importlib.import_module("throughput"), importlib.import_module("check_fast_paths")
    built: list[PromptLearner] = []
    prepare = throughput.prepare
    monkeypatch.setattr(throughput, "prepare", lambda model, s: built.append(prepare(model, s)) or built[-1])
    assert throughput.main(["--tiny", "--patch-embed-gemm", "--cases", "infer", "--precision", "bf16"]) == 0
    assert built and all(v.uses_patch_embed_gemm for model in built for v in model.frozen_vits())
    assert '"patch_embed_gemm": true' in capsys.readouterr().out
    built.clear()
    assert check.main(["--tiny", "--patch-embed-gemm", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    # the fast run (GEMM) and the eager run (convolution), the teacher's ViT included
    assert [all(v.uses_patch_embed_gemm for v in m.frozen_vits()) for m in built] == [False, True]
    assert "patch embedding as a GEMM" in out and "max |diff| / max |eager|" in out and "teacher logits" in out
    assert "nothing is asserted on them" in out
