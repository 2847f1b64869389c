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

from .._checks import check_finite, check_float_tensor, check_last_dim, check_real_device
from ..experts import ExpertBank
from ..routers import Routing

__all__ = ["moe_ffn_reference", "check_dispatch_inputs", "check_dispatch_output"]


def check_dispatch_inputs(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> None:
    """Validate ``x: [T, d]`` against a ``Routing`` and an ``ExpertBank``."""
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")
    if not isinstance(experts, ExpertBank):
        raise TypeError(f"experts must be a moe_utils.ExpertBank, got {type(experts).__name__}")
    check_float_tensor("x", x, ndim=2)
    check_last_dim("x", x, experts.d_model)
    check_finite("x", x)
    if routing.num_tokens != x.shape[0]:
        raise ValueError(f"routing is for T={routing.num_tokens} tokens but x has {x.shape[0]} rows")
    if routing.num_experts != experts.num_experts:
        raise ValueError(
            f"routing.num_experts={routing.num_experts} must equal experts.num_experts={experts.num_experts}"
        )
    for name in ("w1", "w3", "w2"):
        p = getattr(experts, name)
        if p is None:
            continue
        check_real_device(f"experts.{name}", p)
        if p.dtype != x.dtype or p.device != x.device:
            raise TypeError(
                f"experts.{name} is {p.dtype} on {p.device} but x is {x.dtype} on {x.device}; "
                f"cast one to match the other (experts.to(x.dtype) or x.to(experts.{name}.dtype))"
            )
    if routing.indices.device != x.device:
        raise ValueError(f"routing is on {routing.indices.device} but x is on {x.device}; move both to one device")
    check_finite("routing weights", routing.weights)


def check_dispatch_output(y: torch.Tensor, experts: ExpertBank) -> torch.Tensor:
    """Raise if the MoE output holds NaN/inf, naming the experts whose weights are not finite.

    The inputs were checked before the dispatch, so a non-finite output comes from the
    expert weights (a NaN or inf in some expert) or from an overflow inside an expert.
    Every backend runs this check, so all of them fail the same way.
    """
    try:
        check_finite("MoE output", y)
    except ValueError:
        bad = []
        for name in ("w1", "w3", "w2"):
            p = getattr(experts, name)
            if p is not None:
                per_expert = (~torch.isfinite(p.detach())).flatten(1).any(1)
                if bool(per_expert.any()):
                    bad.append(f"experts.{name} in expert(s) {per_expert.nonzero().flatten().tolist()}")
        if bad:
            raise ValueError(
                "the MoE output is not finite because the expert weights hold NaN or inf: " + "; ".join(bad)
                + " (a diverged training step? lower the learning rate or clip gradients)"
            ) from None
        raise ValueError(
            f"the MoE output is not finite although the input and the expert weights are: an expert "
            f"overflowed in {y.dtype} (values too large for the dtype; use float32 or scale the input)"
        ) from None
    return y


def moe_ffn_reference(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """Loop over experts. x: [T, d] -> y: [T, d] (dropped assignments add 0).

    Raises ValueError instead of returning NaN/inf (see ``check_dispatch_output``)."""
    check_dispatch_inputs(x, routing, experts)
    y = torch.zeros_like(x)
    w = routing.weights.to(x.dtype)
    for e in range(experts.num_experts):
        token_ids, slot_ids = torch.where((routing.indices == e) & routing.kept)
        if token_ids.numel() == 0:
            continue
        out = experts.forward_expert(e, x[token_ids])  # [n_e, d]
        y = y.index_add(0, token_ids, out * w[token_ids, slot_ids].unsqueeze(-1))
    return check_dispatch_output(y, experts)
