"""Batched expert dispatch: one entry point, ``moe_ffn(x, routing, experts, backend)``.

Backends:

* ``"reference"``: the loop over experts (``reference.py``), the oracle.
* ``"auto"``: the fastest correct path for the device of ``x``.
"""

from __future__ import annotations

import torch

from ..experts import ExpertBank
from ..routers import Routing
from .reference import check_dispatch_inputs, moe_ffn_reference

__all__ = ["moe_ffn", "moe_ffn_reference", "BACKENDS"]

BACKENDS = ("auto", "reference")


def moe_ffn(x: torch.Tensor, routing: Routing, experts: ExpertBank, backend: str = "auto") -> torch.Tensor:
    """Run the routed experts on ``x: [T, d]`` and combine: returns ``[T, d]``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_dispatch_inputs(x, routing, experts)
    return moe_ffn_reference(x, routing, experts)
