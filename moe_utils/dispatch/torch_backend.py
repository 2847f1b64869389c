"""Batched dispatch in plain PyTorch: the CPU path and the fallback where Triton is missing.

Three steps (the same as the Triton path, with torch doing each one):

1. sort: ``dispatch_metadata`` orders the kept slots by expert, so expert ``e`` owns
   rows ``offsets[e]:offsets[e+1]`` of the gathered input ``xs = x[sorted_slots // k]``;
2. experts: one matmul per expert and matrix on its contiguous row range, inside a
   custom ``autograd.Function`` (``GroupedExperts``) whose backward writes every
   expert's weight gradient into *one* preallocated ``[E, d, f]`` buffer;
3. combine: write each output row back to its slot (``[T, k, d]``, dropped slots stay
   0), multiply by the routing weights and sum over ``k``. No atomics, so the result
   is deterministic.

Why the custom Function: in the loop reference ``x @ w1[e]`` indexes the stacked
weight inside autograd, and the backward of that indexing allocates a zero ``[E, d, f]``
gradient per expert and matrix, then adds them up: ``E`` full-size buffers where one
suffices.

The split sizes are read back to the host (``counts.tolist()``) to slice the rows,
which is free on CPU; on a GPU the Triton path avoids it.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank, expert_activation
from ..routers import Routing
from .metadata import dispatch_metadata

__all__ = ["GroupedExperts", "moe_ffn_torch"]


def _activation_backward(kind: str, g: torch.Tensor, h1: torch.Tensor, h3: torch.Tensor | None):
    """Gradients of ``gelu(h1)`` or ``silu(h1) * h3`` given the output gradient ``g``."""
    if kind == "gelu":
        return torch.ops.aten.gelu_backward(g, h1), None
    return torch.ops.aten.silu_backward(g * h3, h1), g * torch.nn.functional.silu(h1)


class GroupedExperts(torch.autograd.Function):
    """``ys[r] = expert_e(xs[r])`` for the rows ``r`` of each expert's range.

    xs: [M, d] rows sorted by expert; counts: list of E ints (rows per expert);
    w1, w3: [E, d, f] (w3 None for GELU experts); w2: [E, f, d]  ->  ys: [M, d]
    """

    @staticmethod
    def forward(ctx, xs, counts, kind, w1, w3, w2):
        M = xs.shape[0]
        f = w1.shape[2]
        h1 = xs.new_empty(M, f)
        h3 = xs.new_empty(M, f) if kind == "swiglu" else None
        ys = xs.new_empty(M, w2.shape[2])
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            torch.mm(xs[rows], w1[e], out=h1[rows])  # [n, d] @ [d, f]
            if h3 is not None:
                torch.mm(xs[rows], w3[e], out=h3[rows])
            a = expert_activation(kind, h1[rows], h3[rows] if h3 is not None else None)
            torch.mm(a, w2[e], out=ys[rows])  # [n, f] @ [f, d]
            start += n
        ctx.counts, ctx.kind = counts, kind
        ctx.save_for_backward(xs, w1, w3, w2, h1, h3)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xs, w1, w3, w2, h1, h3 = ctx.saved_tensors
        kind, counts = ctx.kind, ctx.counts
        gy = gy.contiguous()
        # one buffer per stacked weight; experts without tokens keep a zero gradient
        gw1 = torch.zeros_like(w1)
        gw3 = torch.zeros_like(w3) if w3 is not None else None
        gw2 = torch.zeros_like(w2)
        ga = torch.empty_like(h1)  # gradient of the activation a = act(h1[, h3])
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = slice(start, start + n)
                torch.mm(gy[rows], w2[e].t(), out=ga[rows])  # dA = dY W2^T
                start += n
        gh1, gh3 = _activation_backward(kind, ga, h1, h3)  # all rows at once
        gxs = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = slice(start, start + n)
            x_e = xs[rows]
            a = expert_activation(kind, h1[rows], h3[rows] if h3 is not None else None)
            torch.mm(a.t(), gy[rows], out=gw2[e])  # dW2 = A^T dY
            torch.mm(x_e.t(), gh1[rows], out=gw1[e])  # dW1 = X^T dH1
            torch.mm(gh1[rows], w1[e].t(), out=gxs[rows])  # dX = dH1 W1^T (+ dH3 W3^T)
            if gh3 is not None:
                torch.mm(x_e.t(), gh3[rows], out=gw3[e])
                gxs[rows].addmm_(gh3[rows], w3[e].t())
            start += n
        return gxs, None, None, gw1, gw3, gw2


def moe_ffn_torch(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Sorted, batched MoE FFN in torch. x: [T, d] -> y: [T, d]; autograd through
    ``x``, the expert weights and ``routing.weights``. Inputs are checked by ``moe_ffn``."""
    T, k = routing.indices.shape
    d = x.shape[1]
    meta = dispatch_metadata(routing, block_m=1)
    counts = meta.counts.tolist()  # host read: fine on CPU, see the module docstring
    M = sum(counts)
    slots = meta.sorted_slots[:M]  # valid slots, grouped by expert
    xs = x.index_select(0, slots // k)  # [M, d] gather (one copy)
    ys = GroupedExperts.apply(xs, counts, experts.kind, experts.w1, experts.w3, experts.w2)
    y_slots = ys.new_zeros(T * k, d).index_copy(0, slots, ys)  # slot order; dropped rows stay 0
    w = routing.weights.to(x.dtype)
    return (y_slots.view(T, k, d) * w.unsqueeze(-1)).sum(1)  # combine: sum over k, no atomics
