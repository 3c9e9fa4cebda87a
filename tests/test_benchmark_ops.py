"""benchmarks/ops.py (single-op timings of a ViT step's small kernels) runs on CPU and reports what it compares."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cdl_lightning.nn.vit import patch_embed_as_gemm


@pytest.fixture
def ops(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("ops")


def test_ops_benchmark_tiny_on_cpu(ops, capsys):
    rows = ops.main(["--tiny"])
    assert {(row["op"], row["arch"]) for row in rows} == {
        (op, arch) for op in ("patch-embed", "residual-add", "layer-norm", "bf16-stream", "prefix-kv")
        for arch in ("S", "B")}
    for row in rows:
        assert row["us"] > 0
        if row["op"] in ("residual-add", "prefix-kv"):  # the same bits as the op they would replace
            assert row["max_diff"] == 0.0
        if row["op"] == "bf16-stream":  # the stream rounded to bf16: close to the fp32 op, not equal
            assert 0 < row["max_diff"] < 0.1
        if row["op"] == "patch-embed":  # the GEMM form is the same map: equal up to bf16 rounding
            assert row["max_diff"] < 1e-2
    printed = capsys.readouterr().out
    assert "reshape + F.linear" in printed and '"bench": "cdl-ops"' in printed


def test_patch_embed_as_gemm_is_the_convolution():
    """In float64 the reshape + GEMM form equals timm's strided convolution to rounding (1e-12)."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=gen, dtype=torch.float64)
    weight = torch.randn(16, 3, 8, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(16, generator=gen, dtype=torch.float64)
    conv = F.conv2d(images, weight, bias, stride=8).flatten(2).transpose(1, 2)
    torch.testing.assert_close(patch_embed_as_gemm(images, weight, bias, (8, 8)), conv, rtol=0, atol=1e-12)
