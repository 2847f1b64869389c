"""The two collectives of expert parallelism: a differentiable all-to-all and a small header exchange.

``all_to_all(x, send_splits, recv_splits)`` on ``W`` ranks: every rank cuts its rows
``x: [N, d]`` into ``W`` consecutive pieces of ``send_splits[0], ..., send_splits[W-1]``
rows and sends piece ``j`` to rank ``j`` (piece ``r`` stays on rank ``r`` itself). It
receives ``recv_splits[i]`` rows from each rank ``i`` and returns them concatenated in
rank order: ``[sum(recv_splits), d]``. Rank ``r``'s ``recv_splits[i]`` must equal rank
``i``'s ``send_splits[r]``; ``exchange_header`` is how the ranks learn them.

Backward: the gradient of a received row belongs to the rank that sent the row, so the
backward pass is the *same* all-to-all with the two split lists swapped. torch 2.13 has
an autograd-aware version, ``torch.distributed.nn.functional.all_to_all_single``, but
it is deprecated there (a ``FutureWarning`` pointing to a private module), so the course
writes the 15 lines itself on top of ``torch.distributed.all_to_all_single``.

Every rank must run every collective in the same order, forward and backward: a rank
that skips one leaves the others waiting until the process group's timeout.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_to_all", "exchange_header"]


class _AllToAll(torch.autograd.Function):
    """``out = all_to_all(x)``; ``grad_x = all_to_all(grad_out)`` with the splits swapped."""

    @staticmethod
    def forward(ctx, x, send_splits, recv_splits, group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x.new_empty(sum(recv_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        # the rows we received came from the ranks in recv_splits: send their gradients back
        grad_x = _AllToAll.apply(grad_out.contiguous(), ctx.recv_splits, ctx.send_splits, ctx.group)
        return grad_x, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Exchange rows of ``x: [N, ...]`` between all ranks; differentiable (see the module docstring).

    send_splits: W ints summing to N, rows for rank 0, 1, ...; recv_splits: W ints, rows
    arriving from rank 0, 1, ... Returns ``[sum(recv_splits), ...]``.
    """
    world = dist.get_world_size(group)
    for name, splits in (("send_splits", send_splits), ("recv_splits", recv_splits)):
        if len(splits) != world or any(not isinstance(s, int) or s < 0 for s in splits):
            raise ValueError(f"{name} must be {world} non-negative ints (one per rank), got {splits}")
    if sum(send_splits) != x.shape[0]:
        raise ValueError(f"send_splits must sum to the {x.shape[0]} rows of x, got {send_splits}")
    return _AllToAll.apply(x, list(send_splits), list(recv_splits), group)


def exchange_header(
    counts: torch.Tensor, world_size: int, capacity: int = -1, failed: bool = False, group=None
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Tell every rank how many rows it will get from us, in one small ``all_to_all_single``.

    counts: [E] int64 rows this rank sends to each global expert (expert ``e`` lives on
    rank ``e // (E / W)``), on the device the process group communicates from. Rank
    ``j`` gets the row ``[counts of j's experts..., capacity, failed]``: the two extra
    columns let one collective also check that every rank uses the same capacity, and
    let a rank that hit an error (``failed=True``, counts all 0) stop the others instead
    of leaving them waiting in the next all-to-all.

    Returns ``(received [W, E_local], capacities [W], failed_ranks)``: ``received[i, e]``
    is the number of rows rank ``i`` sends for local expert ``e`` and ``capacities[i]``
    the capacity rank ``i`` uses (-1: dropless).
    """
    e_local = counts.numel() // world_size
    header = torch.cat(
        [
            counts.reshape(world_size, e_local),
            counts.new_full((world_size, 1), capacity),
            counts.new_full((world_size, 1), int(failed)),
        ],
        dim=1,
    )  # [W, E_local + 2], row j goes to rank j
    got = torch.empty_like(header)
    dist.all_to_all_single(got, header, group=group)
    failed_ranks = [i for i, f in enumerate(got[:, -1].tolist()) if f]
    return got[:, :e_local], got[:, e_local], failed_ranks
