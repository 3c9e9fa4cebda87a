"""Per-task snapshots packed as changed rows (`cdl_lightning.models.snapshots`): bitwise round trips, sizes, caching,
and the older plain format."""

from __future__ import annotations

import pytest
import torch

from cdl_lightning.models.snapshots import (
    PACKED_KEY,
    PLAIN_KEY,
    SnapshotPacker,
    changed_rows,
    checkpoint_snapshots,
    pack_snapshots,
    unpack_snapshots,
)


def coda_like_snapshots(tasks: int = 4, per_task: int = 3) -> list[dict[str, torch.Tensor]]:
    """Snapshots shaped like CODA's stacked ``layers x pool x length x dim`` parameters and a head: task ``t`` changes
    its own components (in every layer) and head rows."""
    generator = torch.Generator().manual_seed(0)
    state = {
        "prompt.components": torch.randn(2, tasks * per_task, 4, 16, generator=generator),
        "prompt.keys": torch.randn(2, tasks * per_task, 16, generator=generator),
        "head.weight": torch.randn(tasks * per_task, 16, generator=generator),
        "head.bias": torch.randn(tasks * per_task, generator=generator),
        "method.scale": torch.tensor(1.0),
    }
    snapshots = []
    for task in range(tasks):
        state = {name: t.clone() for name, t in state.items()}
        own = slice(task * per_task, (task + 1) * per_task)
        state["prompt.components"][:, own] += 1
        state["prompt.keys"][:, own] -= 1
        state["head.weight"][own] *= 2
        state["head.bias"][own] += 0.5
        state["method.scale"] += 1
        snapshots.append(state)
    return snapshots


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensor data in a nest of dicts and lists."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    items = obj.values() if isinstance(obj, dict) else obj
    return sum(tensor_bytes(item) for item in items)


def test_round_trip_is_bitwise_and_stores_only_the_changed_rows():
    snapshots = coda_like_snapshots()
    packed = pack_snapshots(snapshots)
    for original, restored in zip(snapshots, unpack_snapshots(packed), strict=True):
        assert_bitwise(original, restored)
    assert all(set(item) == {"full"} for item in packed[0].values())  # the first snapshot is whole
    # task 2 changed components 6..8 of every layer: rows (layer, component, length position) of the 2x12x4 grid
    components = packed[2]["prompt.components"]
    expected = torch.tensor([(layer * 12 + c) * 4 + i for layer in range(2) for c in (6, 7, 8) for i in range(4)])
    assert torch.equal(components["rows"], expected)
    assert components["values"].shape == (24, 16)
    assert torch.equal(packed[2]["head.weight"]["rows"], torch.tensor([6, 7, 8]))
    assert "full" in packed[2]["method.scale"]  # 0-d: nothing to cut into rows
    # packed: the first whole, then per task 24 component + 6 key + 3 head rows of 16, 3 bias values, the scale, and
    # the int64 indices of those 36 rows
    assert tensor_bytes(snapshots) == 4 * 4 * (2 * 12 * 4 * 16 + 2 * 12 * 16 + 12 * 16 + 12 + 1)
    assert tensor_bytes(packed) == tensor_bytes(snapshots[0]) + 3 * (4 * (33 * 16 + 3 + 1) + 8 * 36)


def test_rows_compare_bits_not_values():
    zeros = torch.zeros(3, 2)
    signed = zeros.clone()
    signed[1, 0] = -0.0  # equal as a value, other bits
    assert torch.equal(changed_rows(zeros, signed), torch.tensor([1]))
    nan = torch.full((3, 2), float("nan"))
    assert changed_rows(nan, nan.clone()).numel() == 0  # the same NaN bits: unchanged
    restored = unpack_snapshots(pack_snapshots([{"w": zeros}, {"w": signed}]))[1]["w"]
    assert torch.signbit(restored[1, 0]) and not torch.signbit(restored[0, 0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.bool])
def test_round_trip_keeps_every_dtype(dtype):
    first = torch.zeros(8, 4).to(dtype)
    second = first.clone()
    second[3] = torch.ones(4).to(dtype)
    packed = pack_snapshots([{"w": first}, {"w": second}])
    assert "rows" in packed[1]["w"] and torch.equal(packed[1]["w"]["rows"], torch.tensor([3]))
    assert_bitwise(unpack_snapshots(packed)[1], {"w": second})


def test_changed_shape_dtype_new_and_dropped_tensors_are_stored_whole():
    first = {"grown": torch.zeros(4, 3), "cast": torch.zeros(4, 3), "dropped": torch.ones(2)}
    second = {"grown": torch.zeros(5, 3), "cast": torch.zeros(4, 3, dtype=torch.float64), "new": torch.ones(2, 2)}
    packed = pack_snapshots([first, second])
    assert all(set(item) == {"full"} for item in packed[1].values())
    assert_bitwise(unpack_snapshots(packed)[1], second)


def test_mostly_changed_tensor_is_stored_whole():
    first = torch.zeros(4, 2)
    second = first.clone()
    second[:3] = 1  # 3 indices (8 bytes each) plus 3 rows (8 bytes each) would be larger than the 32-byte tensor
    assert set(pack_snapshots([{"w": first}, {"w": second}])[1]["w"]) == {"full"}
    unchanged = pack_snapshots([{"w": first}, {"w": first.clone()}])[1]["w"]
    assert unchanged["rows"].numel() == 0 and unchanged["values"].shape == (0, 2)


def test_packer_reuses_what_it_packed_and_follows_replaced_snapshots():
    snapshots = coda_like_snapshots()
    packer = SnapshotPacker()
    first = packer(snapshots[:2])
    second = packer(snapshots[:3])
    assert second[0] is first[0] and second[1] is first[1]  # not compared again
    assert len(second) == 3
    replaced = [snapshots[0], {name: t + 1 for name, t in snapshots[1].items()}, snapshots[2]]
    third = packer(replaced)  # a loaded checkpoint's new list: entries 1 and 2 re-packed against the new objects
    assert third[0] is first[0] and third[1] is not first[1] and third[2] is not second[2]
    for original, restored in zip(replaced, unpack_snapshots(third), strict=True):
        assert_bitwise(original, restored)


def test_checkpoint_snapshots_reads_packed_and_plain_entries():
    snapshots = coda_like_snapshots(tasks=2)
    for cdl in ({PACKED_KEY: pack_snapshots(snapshots)}, {PLAIN_KEY: snapshots}):
        restored = checkpoint_snapshots(cdl)
        assert len(restored) == 2
        for original, loaded in zip(snapshots, restored, strict=True):
            assert_bitwise(original, loaded)
    assert checkpoint_snapshots({}) == []


def test_damaged_packed_entry_names_the_problem():
    packed = pack_snapshots(coda_like_snapshots(tasks=2))
    del packed[0]["head.weight"]
    with pytest.raises(ValueError, match=r"snapshot 1 stores 'head.weight' as changed rows.*damaged"):
        unpack_snapshots(packed)
