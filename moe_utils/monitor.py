"""Routing statistics: how evenly a router spreads tokens, and how sure it is.

* ``expert_load(routing)``: assignments per expert, before capacity dropping [E]
* ``max_violation(load)``: MaxVio = ``(max_i load_i - mean load) / mean load``
  (defined by Wang et al. 2024, eq. 4, and used by DeepSeek-V3; 0 is perfect balance,
  ``E - 1`` is total collapse)
* ``dead_experts(load, threshold)``: experts whose share of assignments is below
  ``threshold / E`` (default: under a tenth of a fair share)
* ``router_entropy(probs)``: mean over tokens of ``-sum_e p log p`` in nats
  (``ln E`` for a uniform router, 0 for a one-hot router)
* ``routing_stats(routing)``: all of the above plus the dropped fraction, as plain
  Python numbers (what the training loop logs each step)
"""

from __future__ import annotations

import math

import torch

from ._checks import check_float_tensor, check_positive_float
from .routers import Routing

__all__ = ["expert_load", "max_violation", "dead_experts", "router_entropy", "routing_stats"]


def _check_routing(routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")


def expert_load(routing: Routing) -> torch.Tensor:
    """Assignments per expert before capacity dropping: [E] int64 (``routing.tokens_per_expert()``)."""
    _check_routing(routing)
    return routing.tokens_per_expert()


def _as_load(load) -> torch.Tensor:
    load = torch.as_tensor(load)
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty 1-D tensor of per-expert counts, got shape {tuple(load.shape)}")
    if load.is_complex() or load.dtype == torch.bool:
        raise TypeError(f"load must hold real counts, got dtype {load.dtype}")
    return load.double()


def max_violation(load) -> float:
    """MaxVio ``(max load - mean load) / mean load``; 0.0 when nothing was routed."""
    load = _as_load(load)
    mean = float(load.mean())
    return 0.0 if mean == 0 else (float(load.max()) - mean) / mean


def dead_experts(load, threshold: float = 0.1) -> int:
    """Number of experts that received less than ``threshold`` of a fair share (``threshold / E``)."""
    load = _as_load(load)
    threshold = check_positive_float("threshold", threshold, allow_zero=True)
    total = float(load.sum())
    if total == 0:
        return int(load.numel())
    share = load / total
    return int((share < threshold / load.numel()).sum())


def router_entropy(probs: torch.Tensor) -> float:
    """Mean per-token entropy (nats) of router probabilities ``probs: [T, E]``."""
    check_float_tensor("probs", probs, ndim=2)
    if probs.shape[0] == 0:
        return 0.0
    p = probs.detach().double()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def routing_stats(routing: Routing) -> dict:
    """Per-layer statistics as plain numbers.

    Returns ``{"tokens_per_expert": [E ints], "dropped_fraction", "max_violation",
    "dead_experts", "router_entropy" (None without probs), "max_entropy"}``.
    """
    _check_routing(routing)
    load = routing.tokens_per_expert()
    ent = router_entropy(routing.probs) if routing.probs is not None else None
    return {
        "tokens_per_expert": load.tolist(),
        "dropped_fraction": routing.dropped_fraction(),
        "max_violation": max_violation(load),
        "dead_experts": dead_experts(load),
        "router_entropy": ent,
        "max_entropy": math.log(routing.num_experts),
    }
