"""The published test vectors of ``docs/conventions.md``: one routing group of T = 6
tokens and E = 3 experts. Cases that use them compare with the published values, so
neither a hard-coded answer nor a bug in a reference can slip through."""

from __future__ import annotations

import torch

TEST_LOGITS = [[2.0, 1.0, 0.0], [1.5, 0.5, 0.2], [0.1, 2.2, 0.3], [3.0, 0.1, 0.0], [0.2, 0.0, 1.0], [1.0, 0.9, 0.8]]
TEST_TOP1 = [0, 0, 1, 0, 2, 0]
TEST_POSITIONS = [0, 1, 0, 2, 0, 3]
TEST_KEPT_C2 = [True, True, True, False, True, False]


def test_logits() -> torch.Tensor:
    """[6, 3] float64."""
    return torch.tensor(TEST_LOGITS, dtype=torch.float64)


def test_probs() -> torch.Tensor:
    return torch.softmax(test_logits(), dim=-1)
