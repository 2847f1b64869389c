"""Two reductions over a short last dimension, written out for speed on the CPU.

Router logits are ``[T, E]`` with a handful of experts. For such a short last dimension,
torch's CPU ``softmax`` and ``logsumexp`` kernels are several times slower than the same
formula written as a few element-wise operations (about 150 us against 35 us for
``[1024, 8]`` on one core), and a router calls them on every step. Same functions, same
gradients; results agree with torch's to a few units in the last place.
"""

from __future__ import annotations

import torch

__all__ = ["softmax_lastdim", "logsumexp_lastdim"]


def softmax_lastdim(x: torch.Tensor) -> torch.Tensor:
    """``torch.softmax(x, dim=-1)``: ``exp(x - max) / sum exp(x - max)``.

    The max is taken without gradient: softmax does not depend on the shift, so the
    gradient is exactly that of the formula.
    """
    e = (x - x.detach().amax(dim=-1, keepdim=True)).exp()
    return e / e.sum(dim=-1, keepdim=True)


def logsumexp_lastdim(x: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(x, dim=-1)``: ``max + log sum exp(x - max)``, stable for large ``x``."""
    m = x.detach().amax(dim=-1, keepdim=True)
    return m.squeeze(-1) + (x - m).exp().sum(dim=-1).log()
