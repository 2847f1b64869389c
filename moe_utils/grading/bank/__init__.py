"""The question bank: one module per exercise notebook.

To add an exercise, write ``exNN_<topic>.py`` here (copy the layout of an existing
one: references, case makers, ``EXERCISE``) and add it to ``MODULES`` below. The
guide is ``exercises/README.md``, "Adding an exercise".
"""

from __future__ import annotations

from . import (
    ex01_router_topk,
    ex02_balance_losses,
    ex03_switch_capacity,
    ex04_mixtral_block,
    ex05_dispatch_metadata,
    ex08_routing_security,
    ex09_beyond_topk,
    ex10_expert_parallel,
)

MODULES = [
    ex01_router_topk,
    ex02_balance_losses,
    ex03_switch_capacity,
    ex04_mixtral_block,
    ex05_dispatch_metadata,
    ex08_routing_security,
    ex09_beyond_topk,
    ex10_expert_parallel,
]
ALL = [m.EXERCISE for m in MODULES]

__all__ = ["ALL", "MODULES"]
