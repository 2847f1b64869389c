"""Routing metadata for batched dispatch: sort, count, block-align. Plain torch, no host sync.

A routing of ``T`` tokens to ``k`` experts each has ``N = T * k`` *slots*; slot
``s = t * k + j`` is token ``t``'s ``j``-th choice. The loop reference gathers the
tokens of each expert with ``torch.where``; the batched paths instead sort the slots
once so that every expert owns one contiguous range of rows:

    slot:         0  1  2  3  4  5  6  7         (T = 4, k = 2)
    expert:       2  0  1  2  0  1  2  0         dropped slots (kept False) get no expert
    sorted slots: 1  4  7 | 2  5 | 0  3  6        stable: token order inside an expert

A Triton program multiplies ``BLOCK_M`` rows by one expert's weights, so each
expert's range is padded up to a multiple of ``BLOCK_M`` and padding rows hold a
*sentinel* (``N``, one past the last slot), which the kernels mask out:

    padded (BLOCK_M = 4): [1 4 7 S | 2 5 S S | 0 3 6 S]   block -> expert: [0, 1, 2]

The number of padded rows depends on the routing, and reading it back to the host
(``.item()``) would stall the GPU, so every buffer has a *static* upper bound:
``N + E * (BLOCK_M - 1)`` rows, rounded up to a multiple of ``BLOCK_M``. Blocks past
the used ones map to expert ``-1`` and the kernels return at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_positive_int
from ..routers import Routing

__all__ = ["DispatchMetadata", "dispatch_metadata", "sorted_kept_slots"]


@dataclass
class DispatchMetadata:
    """Where every routed slot goes. ``N = T * k`` slots, ``P`` padded rows, ``B = P / block_m`` blocks.

    sorted_slots:   [N] int64, the valid slots sorted by expert (stable), then the dropped ones
    counts:         [E] int64, valid (kept) slots per expert
    offsets:        [E + 1] int64, start of each expert's range in ``sorted_slots``
    padded_offsets: [E + 1] int64, start of each expert's range in the padded layout
    padded_slots:   [P] int64, slot held by each padded row, ``N`` (the sentinel) for padding
    block_expert:   [B] int32, expert of each row block, -1 for unused blocks
    slot_row:       [N] int64, inverse permutation: padded row of each slot, -1 if dropped
    """

    num_tokens: int
    k: int
    num_experts: int
    block_m: int
    sorted_slots: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor
    padded_offsets: torch.Tensor
    padded_slots: torch.Tensor
    block_expert: torch.Tensor
    slot_row: torch.Tensor

    @property
    def num_slots(self) -> int:
        """``N = T * k``; also the sentinel value in ``padded_slots``."""
        return self.num_tokens * self.k

    @property
    def num_rows(self) -> int:
        """``P``: the static number of padded rows."""
        return self.padded_slots.numel()

    @property
    def num_blocks(self) -> int:
        return self.block_expert.numel()


def dispatch_metadata(routing: Routing, block_m: int = 1) -> DispatchMetadata:
    """Sort the ``T * k`` slots of ``routing`` by expert and pad each expert's rows to ``block_m``.

    ``block_m=1`` gives the unpadded sorted layout (the torch backend); the Triton
    kernels pass their ``BLOCK_M``. No ``.item()``/``.tolist()``: safe inside a CUDA
    stream and under CUDA graphs.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")
    block_m = check_positive_int("block_m", block_m)
    T, k = routing.indices.shape
    E = routing.num_experts
    N = T * k
    device = routing.indices.device

    # dropped slots get the key E, so a stable sort puts them after every expert
    key = torch.where(routing.kept, routing.indices, E).reshape(-1)  # [N]
    sorted_key, sorted_slots = torch.sort(key, stable=True)  # [N], [N]
    # bincount would read its maximum back to the host; scatter_add does not
    counts_all = torch.zeros(E + 1, dtype=torch.int64, device=device)
    counts_all.scatter_add_(0, key, torch.ones_like(key))
    counts = counts_all[:E]
    zero = counts.new_zeros(1)
    offsets = torch.cat([zero, counts.cumsum(0)])  # [E + 1]
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_offsets = torch.cat([zero, padded_counts.cumsum(0)])  # [E + 1]

    # static size: every expert wastes at most block_m - 1 rows
    num_blocks = (N + E * (block_m - 1) + block_m - 1) // block_m
    P = num_blocks * block_m

    # row of the p-th sorted slot in the padded layout: its expert's padded start + its rank
    valid = sorted_key < E
    e_clamped = sorted_key.clamp(max=E - 1)
    rank = torch.arange(N, device=device) - offsets[e_clamped]
    row = torch.where(valid, padded_offsets[e_clamped] + rank, P)  # P: a dump row for dropped slots
    padded_slots = torch.full((P + 1,), N, dtype=torch.int64, device=device)
    padded_slots.scatter_(0, row, sorted_slots)
    padded_slots = padded_slots[:P]

    slot_row = torch.full((N,), -1, dtype=torch.int64, device=device)
    slot_row.scatter_(0, sorted_slots, torch.where(valid, row, -1))

    # expert of block b: the e with padded_offsets[e] <= b * block_m < padded_offsets[e + 1]
    block_start = torch.arange(num_blocks, device=device) * block_m
    block_expert = torch.searchsorted(padded_offsets[1:], block_start, right=True)
    block_expert = torch.where(block_expert < E, block_expert, -1).to(torch.int32)

    return DispatchMetadata(
        num_tokens=T,
        k=k,
        num_experts=E,
        block_m=block_m,
        sorted_slots=sorted_slots,
        counts=counts,
        offsets=offsets,
        padded_offsets=padded_offsets,
        padded_slots=padded_slots,
        block_expert=block_expert,
        slot_row=slot_row,
    )


def sorted_kept_slots(routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
    """The unpadded part of ``dispatch_metadata`` only: ``(slots [M], counts [E])``.

    ``slots`` holds the ``M`` kept slots sorted by expert (stable: token order inside an
    expert), ``counts`` the kept slots per expert, so ``slots[offsets[e]:offsets[e+1]]``
    belong to expert ``e``. The torch path needs nothing else, and on the CPU the few
    operations this saves are a noticeable share of a small layer's time.
    """
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")
    E = routing.num_experts
    key = torch.where(routing.kept, routing.indices, E).reshape(-1)  # dropped slots sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=E + 1)[:E]
    return order[: routing.indices.numel() - int((~routing.kept).sum())], counts
