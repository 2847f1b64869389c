"""The test vectors of docs/conventions.md (float64), shared by the moe_utils unit tests.

One routing group, T = 6 tokens, E = 3 experts. The values below are copied from the
conventions page, not from a run of moe_utils; tests/test_conventions.py checks
that the page, this file and an independent float64 computation agree.
"""

from __future__ import annotations

import torch

LOGITS = [
    [2.0, 1.0, 0.0],
    [1.5, 0.5, 0.2],
    [0.1, 2.2, 0.3],
    [3.0, 0.1, 0.0],
    [0.2, 0.0, 1.0],
    [1.0, 0.9, 0.8],
]
T, E = 6, 3
TOP1 = [0, 0, 1, 0, 2, 0]
F = [4 / 6, 1 / 6, 1 / 6]
P = [0.481779, 0.306601, 0.211620]
SWITCH_AUX_OVER_ALPHA = 1.2226686
Z_LOSS = 5.3166803
CAPACITY_CF1 = 2  # CF = 1, min_capacity = 0
POSITIONS = [0, 1, 0, 2, 0, 3]
KEPT = [True, True, True, False, True, False]
TOP2_ROW0 = [0.7310586, 0.2689414]
TOP2_ROW3 = [0.9478464, 0.0521536]
TOPK_AUX = 2.1825705  # k = 2, Hugging Face style, no coefficient

# tolerances: the table is rounded to 7 decimals (P to 6); routers compute in float32
TOL64 = 1e-6
TOL32 = 3e-6


def logits64() -> torch.Tensor:
    """The test-vector logits ``[T, E]`` in float64."""
    return torch.tensor(LOGITS, dtype=torch.float64)


def probs64() -> torch.Tensor:
    """Softmax of the test-vector logits ``[T, E]`` in float64."""
    return logits64().softmax(dim=-1)


def identity_input() -> torch.Tensor:
    """``x = I_T`` (d_model = T), so that ``x @ W^T`` returns the rows of ``W^T``."""
    return torch.eye(T)


@torch.no_grad()
def load_vector_into_router(router: torch.nn.Module) -> None:
    """Set ``router.gate.weight`` ([E, d = T]) so that the router logits of
    ``identity_input()`` are exactly the test-vector logits."""
    router.gate.weight.copy_(logits64().t().to(router.gate.weight.dtype))
