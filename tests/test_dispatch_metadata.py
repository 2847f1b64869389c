"""The routing metadata of the batched dispatch, tested alone (plain torch, CPU)."""

from __future__ import annotations

import pytest
import torch

from moe_utils import Routing
from moe_utils.dispatch import dispatch_metadata


def _routing(T=11, k=2, E=4, drop=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    kept = torch.rand(T, k, generator=g) >= drop
    return Routing(idx, torch.rand(T, k, generator=g), kept, E)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_sorted_slots_are_a_stable_permutation_of_the_kept_slots(block_m):
    r = _routing()
    m = dispatch_metadata(r, block_m=block_m)
    flat_e, flat_kept = r.indices.reshape(-1), r.kept.reshape(-1)
    n_kept = int(flat_kept.sum())
    assert sorted(m.sorted_slots.tolist()) == list(range(r.indices.numel()))
    valid = m.sorted_slots[:n_kept]
    assert bool(flat_kept[valid].all()) and not bool(flat_kept[m.sorted_slots[n_kept:]].any())
    # grouped by expert, and token (slot) order inside each expert
    expected = [s for e in range(r.num_experts) for s in range(flat_e.numel()) if flat_kept[s] and flat_e[s] == e]
    assert valid.tolist() == expected
    assert m.counts.tolist() == r.kept_per_expert().tolist()
    assert m.offsets.tolist() == [0] + torch.cumsum(m.counts, 0).tolist()


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_each_block_holds_one_expert_and_padding_is_the_sentinel(block_m):
    r = _routing(T=23, k=2, E=5)
    m = dispatch_metadata(r, block_m=block_m)
    N = r.indices.numel()
    assert m.num_rows % block_m == 0 and m.num_rows >= N
    assert (m.padded_offsets % block_m == 0).all()
    flat_e = r.indices.reshape(-1)
    for b, e in enumerate(m.block_expert.tolist()):
        slots = m.padded_slots[b * block_m : (b + 1) * block_m]
        real = slots[slots < N]
        if e < 0:
            assert real.numel() == 0, f"unused block {b} holds slots {real.tolist()}"
        else:
            assert bool((flat_e[real] == e).all()), f"block {b} mixes experts"
    # each expert's padded range holds its slots in sorted order, then sentinels
    for e in range(r.num_experts):
        lo, hi = int(m.padded_offsets[e]), int(m.padded_offsets[e + 1])
        n = int(m.counts[e])
        assert m.padded_slots[lo : lo + n].tolist() == m.sorted_slots[int(m.offsets[e]) : int(m.offsets[e + 1])].tolist()
        assert bool((m.padded_slots[lo + n : hi] == N).all())
        assert hi - lo - n < block_m
    assert bool((m.padded_slots[int(m.padded_offsets[-1]) :] == N).all())


def test_gather_then_scatter_is_the_identity():
    r = _routing(T=17, k=3, E=6, drop=0.3)
    m = dispatch_metadata(r, block_m=8)
    N = r.indices.numel()
    values = torch.randn(N, 5)
    padded = torch.full((m.num_rows, 5), float("nan"))
    ok = m.padded_slots < N
    padded[ok] = values[m.padded_slots[ok]]  # gather slots into the padded, expert-sorted layout
    kept = r.kept.reshape(-1)
    assert bool((m.slot_row[~kept] == -1).all())
    back = padded[m.slot_row[kept]]  # scatter back with the inverse permutation
    torch.testing.assert_close(back, values[kept], rtol=0, atol=0)
    assert bool((m.padded_slots[m.slot_row[kept]] == torch.nonzero(kept).squeeze(1)).all())


def test_block_expert_is_non_decreasing_then_unused():
    r = _routing(T=40, k=2, E=8, drop=0.0)
    m = dispatch_metadata(r, block_m=4)
    be = m.block_expert.tolist()
    used = [e for e in be if e >= 0]
    assert used == sorted(used) and be == used + [-1] * (len(be) - len(used))
    assert m.block_expert.dtype == torch.int32


def test_empty_batch_and_all_dropped():
    m = dispatch_metadata(_routing(T=0, k=2, E=3), block_m=4)
    assert m.sorted_slots.numel() == 0 and m.counts.tolist() == [0, 0, 0]
    assert bool((m.block_expert == -1).all())
    m = dispatch_metadata(_routing(T=5, k=1, E=3, drop=1.01), block_m=4)
    assert m.counts.sum() == 0 and bool((m.slot_row == -1).all()) and bool((m.padded_slots == 5).all())


def test_bad_arguments_raise():
    with pytest.raises(TypeError, match="routing"):
        dispatch_metadata("not a routing")
    with pytest.raises(ValueError, match="block_m"):
        dispatch_metadata(_routing(), block_m=0)
    with pytest.raises(TypeError, match="block_m"):
        dispatch_metadata(_routing(), block_m=2.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_metadata_never_syncs_with_the_host_on_cuda():
    r = _routing(T=64, k=2, E=8)
    r = Routing(r.indices.cuda(), r.weights.cuda(), r.kept.cuda(), r.num_experts)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        dispatch_metadata(r, block_m=16)
    finally:
        torch.cuda.set_sync_debug_mode("default")
