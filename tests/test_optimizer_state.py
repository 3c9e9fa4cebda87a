"""Optimizer state packed as nonzero rows (`cdl_lightning.models.optimizer_state`): bitwise round trips (``-0.0``,
NaN, all-zero and no-zero tensors, every dtype), what stays whole, sizes, and that the live Adam state is never
touched. The checkpoints of real fits are checked in ``test_models_learner.py``, ``test_models_distiller.py`` and
``test_drills.py`` (exact resume)."""

from __future__ import annotations

import importlib
import io
from pathlib import Path

import pytest
import torch
from torch import nn

from cdl_lightning.models.optimizer_state import (
    MIN_PACKED_BYTES,
    nonzero_rows,
    pack_optimizer_states,
    pack_state_tensor,
    unpack_optimizer_states,
    unpack_state_tensor,
)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


def assert_same_states(a: dict, b: dict) -> None:
    """Two optimizer state dicts with bitwise the same tensors and equal everything else."""
    assert a.keys() == b.keys() and a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for index, per_param in a["state"].items():
        assert per_param.keys() == b["state"][index].keys()
        for name, value in per_param.items():
            other = b["state"][index][name]
            assert same_bits(value, other) if isinstance(value, torch.Tensor) else value == other, (index, name)


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensor data in a nest of dicts and lists (other values count 0)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (dict, list)):
        return sum(tensor_bytes(item) for item in (obj.values() if isinstance(obj, dict) else obj))
    return 0


def moments(rows: int = 64, width: int = 32) -> torch.Tensor:
    """A ``2 x rows x width`` float32 moment (16 KiB at the defaults) whose rows 3, 4 and 40 of the first layer and
    row 5 of the second are nonzero."""
    t = torch.zeros(2, rows, width)
    t[0, 3] = torch.arange(width, dtype=torch.float32)  # one zero element in a nonzero row
    t[0, 4, 7] = 1e-38
    t[0, 40] = -2.5
    t[1, 5] = 1.0
    return t


def test_round_trip_is_bitwise_and_stores_only_the_nonzero_rows():
    t = moments()
    packed = pack_state_tensor(t)
    assert set(packed) == {"nonzero_rows", "values", "shape"}
    assert torch.equal(packed["nonzero_rows"], torch.tensor([3, 4, 40, 64 + 5]))
    assert packed["values"].shape == (4, 32) and packed["shape"] == [2, 64, 32]
    assert packed["values"].untyped_storage().data_ptr() != t.untyped_storage().data_ptr()  # a copy, not a view
    assert same_bits(unpack_state_tensor(packed), t)
    # 4 rows of 32 float32 plus 4 int64 indices instead of 128 rows
    assert packed["values"].numel() * 4 + packed["nonzero_rows"].numel() * 8 == 4 * 128 + 32 < t.numel() * 4


def test_rows_are_told_apart_by_bits_so_negative_zero_and_nan_are_kept():
    t = torch.zeros(64, 32)
    t[2, 0] = -0.0  # zero as a value, not as bits
    t[9, 31] = float("nan")
    t[20] = float("-inf")
    assert torch.equal(nonzero_rows(t), torch.tensor([2, 9, 20]))
    restored = unpack_state_tensor(pack_state_tensor(t))
    assert same_bits(restored, t)
    assert torch.signbit(restored[2, 0]) and not torch.signbit(restored[2, 1]) and torch.isnan(restored[9, 31])


def test_all_zero_and_no_zero_tensors():
    zeros = torch.zeros(4, 256, 8)
    packed = pack_state_tensor(zeros)
    assert packed["nonzero_rows"].numel() == 0 and packed["values"].shape == (0, 8)
    assert same_bits(unpack_state_tensor(packed), zeros)
    full = torch.randn(4, 256, 8) + 10  # no zero row: whole, the same object
    assert pack_state_tensor(full) is full
    mostly = zeros.clone()
    mostly.view(-1, 8)[:1000] = 1.0  # 1000 of 1024 rows: rows and indices would be larger than the tensor
    assert pack_state_tensor(mostly) is mostly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool])
def test_round_trip_keeps_every_dtype(dtype):
    t = torch.zeros(512, 16).to(dtype)
    t[7] = torch.ones(16).to(dtype)
    t[300, 3] = torch.ones(()).to(dtype)
    packed = pack_state_tensor(t, min_bytes=0)
    assert torch.equal(packed["nonzero_rows"], torch.tensor([7, 300])) and packed["values"].dtype == dtype
    assert same_bits(unpack_state_tensor(packed), t)


def test_scalars_small_and_unusual_tensors_stay_whole():
    step = torch.tensor(12.0)
    small = torch.zeros(MIN_PACKED_BYTES // 4 - 1)  # one element under the limit
    vector = torch.zeros(MIN_PACKED_BYTES // 4)  # 1-d at the limit: elements are rows of one
    sparse = torch.zeros(64, 64).to_sparse()
    for item in (step, small, sparse, 3, None, "x"):
        assert pack_state_tensor(item) is item
        assert unpack_state_tensor(item) is item
    vector[5] = -0.0
    packed = pack_state_tensor(vector)
    assert torch.equal(packed["nonzero_rows"], torch.tensor([5])) and packed["values"].shape == (1, 1)
    assert same_bits(unpack_state_tensor(packed), vector)
    non_contiguous = moments().transpose(1, 2)  # rows along the last dimension of the transposed view
    assert same_bits(unpack_state_tensor(pack_state_tensor(non_contiguous)), non_contiguous)


def test_damaged_entry_is_refused():
    packed = pack_state_tensor(moments())
    for damage in ({"values": packed["values"][:2]}, {"nonzero_rows": packed["nonzero_rows"] + 1000},
                   {"shape": [2, 64, 16]}):
        with pytest.raises(ValueError, match="packed optimizer state tensor .* damaged"):
            unpack_state_tensor({**packed, **damage})


def adam_on_own_rows() -> tuple[torch.optim.Adam, list[nn.Parameter]]:
    """Adam after two steps in which only rows 10..19 of a stacked ``3 x 40 x 64`` parameter (in every layer) and of a
    ``40 x 64`` head got gradients (the others exactly zero, as in a task), plus a bias too small to pack."""
    torch.manual_seed(0)
    components, head = nn.Parameter(torch.randn(3, 40, 64)), nn.Parameter(torch.randn(40, 64))
    bias = nn.Parameter(torch.zeros(40))
    optimizer = torch.optim.Adam([components, head, bias], lr=1e-3)
    for _ in range(2):
        for p in (components, head, bias):
            p.grad = torch.zeros_like(p)
        components.grad[:, 10:20] = torch.randn(3, 10, 64)
        head.grad[10:20] = torch.randn(10, 64)
        bias.grad[10:20] = torch.randn(10)
        optimizer.step()
    return optimizer, [components, head, bias]


def test_optimizer_states_round_trip_and_shrink():
    optimizer, _ = adam_on_own_rows()
    state = optimizer.state_dict()
    packed = pack_optimizer_states([state])
    assert packed[0]["param_groups"] == state["param_groups"]
    components, head, bias = (packed[0]["state"][i] for i in range(3))
    for name in ("exp_avg", "exp_avg_sq"):
        own_rows = torch.tensor([layer * 40 + row for layer in range(3) for row in range(10, 20)])  # every layer
        assert torch.equal(components[name]["nonzero_rows"], own_rows)
        assert torch.equal(head[name]["nonzero_rows"], torch.arange(10, 20))
        assert bias[name] is state["state"][2][name]  # 160 bytes: whole
    assert components["step"] is state["state"][0]["step"]  # scalars as they are

    assert tensor_bytes(packed[0]["state"]) < tensor_bytes(state["state"]) / 3
    assert_same_states(unpack_optimizer_states(packed)[0], state)
    # through torch.save / load(weights_only=True), as Lightning's checkpoints
    buffer = io.BytesIO()
    torch.save(packed, buffer)
    buffer.seek(0)
    assert_same_states(unpack_optimizer_states(torch.load(buffer, weights_only=True))[0], state)


def test_the_live_optimizer_state_is_never_touched():
    """``Optimizer.state_dict()`` hands out the live per-parameter dicts: packing must build new ones, its values
    must be copies, and the optimizer must go on (and load the unpacked state) as before."""
    optimizer, params = adam_on_own_rows()
    live = {p: dict(s) for p, s in optimizer.state.items()}  # the tensor objects before packing
    before = {p: {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    state = optimizer.state_dict()
    packed = pack_optimizer_states([state])
    for p, per_param in optimizer.state.items():
        assert per_param.keys() == live[p].keys()
        assert all(per_param[k] is live[p][k] and same_bits(per_param[k], before[p][k]) for k in per_param)
    assert all(isinstance(v, torch.Tensor) for s in state["state"].values() for v in s.values())  # plain still
    restored, _ = adam_on_own_rows()
    restored.load_state_dict(unpack_optimizer_states(packed)[0])
    for p_restored, p_before in zip(restored.param_groups[0]["params"], before, strict=True):
        for name, value in before[p_before].items():
            assert same_bits(restored.state[p_restored][name], value), name
    # a further step changes the live moments in place, not the packed copies (tensors left whole, such as ``step``,
    # are the live ones, as in Lightning's plain checkpoint dict: a background write clones them when it is queued)
    for p in params:
        p.grad = torch.ones_like(p)
    packed_values = packed[0]["state"][0]["exp_avg"]["values"].clone()
    optimizer.step()
    assert torch.equal(packed[0]["state"][0]["exp_avg"]["values"], packed_values)
    assert not torch.equal(optimizer.state[params[0]]["exp_avg"].view(-1, 64)[10], packed_values[0])


def test_checkpoint_size_benchmark_runs_on_cpu(tmp_path, monkeypatch):
    """benchmarks/checkpoint_size.py with the tiny ViT: the packed file and Adam state are the smaller ones."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    benchmark = importlib.import_module("checkpoint_size")
    result = benchmark.main(["--tiny", "--task", "2", "--steps", "1", "--repeats", "1", "--out", str(tmp_path)])
    assert result["adam_state_mb"]["packed"] < result["adam_state_mb"]["plain"] / 3
    assert result["file_mb"]["plain"] - result["file_mb"]["packed"] > 0.9 * (
        result["adam_state_mb"]["plain"] - result["adam_state_mb"]["packed"])
    assert (tmp_path / "packed.ckpt").is_file()
