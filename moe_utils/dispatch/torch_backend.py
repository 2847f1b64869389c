"""Batched dispatch in plain PyTorch: the CPU path and the fallback where Triton is missing.

Three steps (the same as the Triton path, with torch doing each one):

1. sort: ``sorted_kept_slots`` orders the kept slots by expert, so expert ``e`` owns
   rows ``offsets[e]:offsets[e+1]`` of the gathered input ``xs = x[slots // k]``;
2. experts: one matmul per expert and matrix on its contiguous row range, inside a
   custom ``autograd.Function`` (``GroupedExperts``) whose backward writes every
   expert's weight gradient into *one* preallocated ``[E, d, f]`` buffer;
3. combine: write each output row back to its slot (``[T, k, d]``, dropped slots stay
   0), multiply by the routing weights and sum over ``k``. No atomics, so the result
   is deterministic.

Why the custom Function: in the loop reference ``x @ w1[e]`` indexes the stacked
weight inside autograd, and the backward of that indexing allocates a zero ``[E, d, f]``
gradient per expert and matrix, then adds them up: ``E`` full-size buffers where one
suffices. The Function also keeps the activation ``a = act(h1, h3)`` from the forward
(one ``[M, f]`` buffer) instead of recomputing it per expert in the backward.

The split sizes are read back to the host (``counts.tolist()``) to slice the rows,
which is free on CPU; on a GPU the Triton path avoids it.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank, expert_activation
from ..routers import Routing
from .metadata import sorted_kept_slots

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

    ``split`` and ``unbind`` cut the row blocks and the per-expert weights into views in
    one call each, so the per-expert loops below do nothing but matrix products.
    """

    @staticmethod
    def forward(ctx, xs, counts, kind, w1, w3, w2):
        M = xs.shape[0]
        f = w1.shape[2]
        used = [e for e, n in enumerate(counts) if n]
        h1 = xs.new_empty(M, f)
        h3 = xs.new_empty(M, f) if kind == "swiglu" else None
        x_e, h1_e = xs.split(counts), h1.split(counts)
        w1_e = w1.unbind(0)
        for e in used:
            torch.mm(x_e[e], w1_e[e], out=h1_e[e])  # [n, d] @ [d, f]
        if h3 is not None:
            h3_e, w3_e = h3.split(counts), w3.unbind(0)
            for e in used:
                torch.mm(x_e[e], w3_e[e], out=h3_e[e])
        a = expert_activation(kind, h1, h3)  # [M, f], all rows at once
        ys = xs.new_empty(M, w2.shape[2])
        a_e, ys_e, w2_e = a.split(counts), ys.split(counts), w2.unbind(0)
        for e in used:
            torch.mm(a_e[e], w2_e[e], out=ys_e[e])  # [n, f] @ [f, d]
        ctx.counts, ctx.used, ctx.kind = counts, used, kind
        ctx.save_for_backward(xs, w1, w3, w2, h1, h3, a)
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xs, w1, w3, w2, h1, h3, a = ctx.saved_tensors
        kind, counts, used = ctx.kind, ctx.counts, ctx.used
        gy = gy.contiguous()
        # one buffer per stacked weight; only experts without tokens need zeros
        idle = [e for e in range(len(counts)) if not counts[e]]
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gw3 = torch.empty_like(w3) if w3 is not None else None
        for g in (gw1, gw2, gw3):
            if g is not None and idle:
                g[idle] = 0
        ga = torch.empty_like(h1)  # gradient of the activation a = act(h1[, h3])
        gy_e, ga_e, a_e = gy.split(counts), ga.split(counts), a.split(counts)
        w2_e, gw2_e = w2.unbind(0), gw2.unbind(0)
        for e in used:
            torch.mm(gy_e[e], w2_e[e].t(), out=ga_e[e])  # dA = dY W2^T
            torch.mm(a_e[e].t(), gy_e[e], out=gw2_e[e])  # dW2 = A^T dY
        gh1, gh3 = _activation_backward(kind, ga, h1, h3)  # all rows at once
        gxs = torch.empty_like(xs)
        x_e, gx_e, gh1_e = xs.split(counts), gxs.split(counts), gh1.split(counts)
        w1_e, gw1_e = w1.unbind(0), gw1.unbind(0)
        for e in used:
            torch.mm(x_e[e].t(), gh1_e[e], out=gw1_e[e])  # dW1 = X^T dH1
            torch.mm(gh1_e[e], w1_e[e].t(), out=gx_e[e])  # dX = dH1 W1^T (+ dH3 W3^T)
        if gh3 is not None:
            gh3_e, w3_e, gw3_e = gh3.split(counts), w3.unbind(0), gw3.unbind(0)
            for e in used:
                torch.mm(x_e[e].t(), gh3_e[e], out=gw3_e[e])
                gx_e[e].addmm_(gh3_e[e], w3_e[e].t())
        return gxs, None, None, gw1, gw3, gw2


def moe_ffn_torch(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Sorted, batched MoE FFN in torch. x: [T, d] -> y: [T, d]; autograd through
    ``x``, the expert weights and ``routing.weights``. Inputs are checked by ``moe_ffn``."""
    T, k = routing.indices.shape
    d = x.shape[1]
    slots, counts = sorted_kept_slots(routing)  # kept slots, grouped by expert
    xs = x.index_select(0, slots // k if k > 1 else slots)  # [M, d] gather (one copy)
    ys = GroupedExperts.apply(xs, counts.tolist(), experts.kind, experts.w1, experts.w3, experts.w2)
    w = routing.weights.to(x.dtype)
    if k == 1 and slots.numel() == T:  # nothing dropped, one choice: scatter straight to tokens
        return ys.new_empty(T, d).index_copy(0, slots, ys) * w
    y_slots = ys.new_zeros(T * k, d).index_copy(0, slots, ys)  # slot order; dropped rows stay 0
    if k == 1:
        return y_slots * w
    return (y_slots.view(T, k, d) * w.unsqueeze(-1)).sum(1)  # combine: sum_j w[t, j] y[t, j], no atomics
