"""The loop-over-experts MoE forward: the oracle every faster path is tested against.

For each expert ``e``: gather the tokens routed to it (and kept by capacity), run
the expert on them, multiply by the routing weight, and add into the output:

    y[t] = sum_{j < k, kept[t, j]} w[t, j] * expert_{i[t, j]}(x[t])

Slow on purpose: one small matmul per expert, Python-level gathers, and a full-size
gradient per stacked-weight slice in the backward. ``moe_utils.dispatch`` has the
fast paths.
"""

from __future__ import annotations

import torch

from .._checks import check_float_tensor, check_last_dim
from ..experts import ExpertBank
from ..routers import Routing

__all__ = ["moe_ffn_reference", "check_dispatch_inputs"]


def check_dispatch_inputs(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> None:
    """Validate ``x: [T, d]`` against a ``Routing`` and an ``ExpertBank``."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be a moe_utils.ExpertBank, got {type(experts).__name__}")
    check_float_tensor("x", x, ndim=2)
    check_last_dim("x", x, experts.d_model)
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing is for T={routing.num_tokens} tokens but x has {x.shape[0]} rows")
    if routing.num_experts != experts.num_experts:
        raise ValueError(
            f"routing.num_experts={routing.num_experts} must equal experts.num_experts={experts.num_experts}"
        )


def moe_ffn_reference(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Loop over experts. x: [T, d] -> y: [T, d] (dropped assignments add 0)."""
    check_dispatch_inputs(x, routing, experts)
    y = torch.zeros_like(x)
    w = routing.weights.to(x.dtype)
    for e in range(experts.num_experts):
        token_ids, slot_ids = torch.where((routing.indices == e) & routing.kept)
        if token_ids.numel() == 0:
            continue
        out = experts.forward_expert(e, x[token_ids])  # [n_e, d]
        y = y.index_add(0, token_ids, out * w[token_ids, slot_ids].unsqueeze(-1))
    return y
