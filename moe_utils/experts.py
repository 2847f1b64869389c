"""Expert feed-forward networks and the stacked ``ExpertBank``.

Two expert kinds appear in the course:

* ``FeedForward``: ``W2 gelu(W1 x)``, the Transformer FFN (GELU, exact erf form)
  used by the Switch-style layers. Biases are off by default so that an expert
  and a row of an ``ExpertBank`` compute exactly the same function.
* ``SwiGLU``: ``W2 (silu(W1 x) * (W3 x))`` with no biases, the Mixtral expert
  (docs/conventions.md, "Experts and the Mixtral block").

``ExpertBank`` stores E experts as *stacked* weights, one parameter per matrix
(``w1: [E, d, f]``, ``w3: [E, d, f]``, ``w2: [E, f, d]``), never one parameter per
expert. Stacking is what lets the batched dispatch (``moe_utils.dispatch``) run all
experts in one grouped matrix multiply. Weights are stored as ``x @ W`` (input
dimension first), the transpose of ``nn.Linear.weight``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_float_tensor, check_last_dim, check_positive_int

__all__ = ["FeedForward", "SwiGLU", "ExpertBank", "EXPERT_KINDS", "expert_activation"]

EXPERT_KINDS = ("swiglu", "gelu")


class FeedForward(nn.Module):
    """Transformer FFN with GELU: ``y = W2 gelu(W1 x)``.

    x: [..., d_model] -> y: [..., d_model]; hidden size ``d_ff``.
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = check_positive_int("d_ff", d_ff)
        self.fc1 = nn.Linear(d_model, d_ff, bias=bias)
        self.fc2 = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        check_last_dim("x", x, self.d_model)
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated FFN of Mixtral/LLaMA: ``y = W2 (silu(W1 x) * (W3 x))``, no biases.

    x: [..., d_model] -> y: [..., d_model]; ``w1`` is the gate projection,
    ``w3`` the up projection, ``w2`` the down projection (Hugging Face names).
    """

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = check_positive_int("d_ff", d_ff)
        self.w1 = nn.Linear(d_model, d_ff, bias=False)
        self.w3 = nn.Linear(d_model, d_ff, bias=False)
        self.w2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor("x", x)
        check_last_dim("x", x, self.d_model)
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def expert_activation(kind: str, h1: torch.Tensor, h3: torch.Tensor | None = None) -> torch.Tensor:
    """The element-wise middle of an expert: ``gelu(h1)`` or ``silu(h1) * h3``."""
    if kind == "gelu":
        return F.gelu(h1)
    if kind == "swiglu":
        return F.silu(h1) * h3
    raise ValueError(f"kind must be one of {EXPERT_KINDS}, got {kind!r}")


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    # the same default as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class ExpertBank(nn.Module):
    """E experts with stacked weights, ready for batched dispatch.

    Parameters (one per matrix, for all experts at once):

    * ``w1: [E, d_model, d_ff]``: first projection (the gate projection for SwiGLU)
    * ``w3: [E, d_model, d_ff]``: up projection, SwiGLU only
    * ``w2: [E, d_ff, d_model]``: down projection

    ``kind="swiglu"`` computes ``(silu(x @ w1[e]) * (x @ w3[e])) @ w2[e]`` (Mixtral);
    ``kind="gelu"`` computes ``gelu(x @ w1[e]) @ w2[e]`` (Switch-style FFN).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int, kind: str = "swiglu"):
        super().__init__()
        if kind not in EXPERT_KINDS:
            raise ValueError(f"kind must be one of {EXPERT_KINDS}, got {kind!r}")
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.d_model = check_positive_int("d_model", d_model)
        self.d_ff = check_positive_int("d_ff", d_ff)
        self.kind = kind
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        if kind == "swiglu":
            self.w3 = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        else:
            self.register_parameter("w3", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self.w1, self.d_model)
        _uniform_(self.w2, self.d_ff)
        if self.w3 is not None:
            _uniform_(self.w3, self.d_model)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, kind={self.kind!r}"

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Run expert ``e`` on rows ``x: [n, d_model]`` -> ``[n, d_model]``."""
        if not 0 <= e < self.num_experts:
            raise ValueError(f"e must be an expert id in [0, {self.num_experts - 1}], got {e}")
        h1 = x @ self.w1[e]
        h3 = x @ self.w3[e] if self.w3 is not None else None
        return expert_activation(self.kind, h1, h3) @ self.w2[e]

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on every row: ``x: [T, d]`` -> ``[T, E, d]`` (for tests and k = E)."""
        h1 = torch.einsum("td,edf->tef", x, self.w1)
        h3 = torch.einsum("td,edf->tef", x, self.w3) if self.w3 is not None else None
        return torch.einsum("tef,efd->ted", expert_activation(self.kind, h1, h3), self.w2)

    def expert_module(self, e: int) -> nn.Module:
        """A standalone ``SwiGLU``/``FeedForward`` holding a copy of expert ``e``."""
        if self.kind == "swiglu":
            m = SwiGLU(self.d_model, self.d_ff)
            pairs = [(m.w1, self.w1), (m.w3, self.w3), (m.w2, self.w2)]
        else:
            m = FeedForward(self.d_model, self.d_ff, bias=False)
            pairs = [(m.fc1, self.w1), (m.fc2, self.w2)]
        with torch.no_grad():
            for lin, stacked in pairs:
                lin.weight.copy_(stacked[e].t())
        return m.to(device=self.w1.device, dtype=self.w1.dtype)

    @torch.no_grad()
    def load_expert(self, e: int, module: nn.Module) -> None:
        """Copy a ``SwiGLU``/``FeedForward`` (no biases) into slot ``e``."""
        if self.kind == "swiglu":
            if not isinstance(module, SwiGLU):
                raise TypeError(f"module must be a SwiGLU for kind='swiglu', got {type(module).__name__}")
            self.w1[e].copy_(module.w1.weight.t())
            self.w3[e].copy_(module.w3.weight.t())
            self.w2[e].copy_(module.w2.weight.t())
        else:
            if not isinstance(module, FeedForward):
                raise TypeError(f"module must be a FeedForward for kind='gelu', got {type(module).__name__}")
            if module.fc1.bias is not None:
                raise ValueError("module has biases; ExpertBank experts have none (use bias=False)")
            self.w1[e].copy_(module.fc1.weight.t())
            self.w2[e].copy_(module.fc2.weight.t())

    @classmethod
    def from_dense(cls, dense: nn.Module, num_experts: int) -> ExpertBank:
        """Sparse upcycling: E exact copies of a dense ``SwiGLU``/``FeedForward``, in its dtype and on its device."""
        if isinstance(dense, SwiGLU):
            kind = "swiglu"
            ref = dense.w1.weight
        elif isinstance(dense, FeedForward):
            kind = "gelu"
            ref = dense.fc1.weight
        else:
            raise TypeError(f"dense must be a SwiGLU or FeedForward, got {type(dense).__name__}")
        # the bank takes the dense weights' dtype: copying float64 weights into a float32 bank
        # would round them, and the copies would no longer be exact
        bank = cls(num_experts, dense.d_model, dense.d_ff, kind=kind).to(device=ref.device, dtype=ref.dtype)
        for e in range(num_experts):
            bank.load_expert(e, dense)
        return bank

    def num_parameters_per_expert(self) -> int:
        return (3 if self.kind == "swiglu" else 2) * self.d_model * self.d_ff
