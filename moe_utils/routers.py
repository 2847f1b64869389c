"""Routers: map hidden states ``x: [T, d]`` to a ``Routing`` record.

Conventions (docs/conventions.md, "Router"):

* Logits ``h = x @ W_r`` (no bias) are computed in float32 even when the model
  runs in bf16 ("selective precision", Switch Transformer Table 2); float64 inputs
  stay float64, so a float64 layer can be checked exactly against a float64 reference.
* ``TopKRouter`` (Mixtral): ``p = softmax(h)``, top-k of ``p``, renormalise the k
  weights to sum to 1. Dropless. Identical to top-k of the logits followed by a
  softmax over those k logits.
* ``SwitchRouter``: top-1, gate ``p[i*]`` *not* renormalised, expert capacity with
  position-order dropping (``moe_utils.capacity``), multiplicative jitter on the
  router *input* in training only.
* ``NoisyTopKRouter`` (Shazeer et al. 2017): ``H = x W_g + N(0,1) softplus(x W_noise)``
  in training, top-k of ``H``, softmax over the kept k. ``W_g``, ``W_noise`` start at 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (
    check_finite,
    check_float_tensor,
    check_index_tensor,
    check_k,
    check_last_dim,
    check_positive_float,
    check_positive_int,
)
from ._ops import softmax_lastdim
from .capacity import capacity_mask, expert_capacity

__all__ = ["Routing", "TopKRouter", "SwitchRouter", "NoisyTopKRouter", "router_logits", "router_dtype"]


@dataclass
class Routing:
    """What a router decided for ``T`` tokens, ``E`` experts, ``k`` choices each.

    indices: [T, k] int64 expert ids, best first
    weights: [T, k] combine weights (gate values), float32 (float64 for a float64 input);
             *not* multiplied by ``kept``; must be finite (NaN/inf raise ValueError)
    kept:    [T, k] bool, False where capacity dropped the assignment
    probs:   [T, E] router probabilities (what the aux losses use), or None
    logits:  [T, E] router logits (what the z-loss uses), or None
    capacity: the per-expert capacity used, or None for dropless routing
    positions: [T, k] buffer positions (capacity routers), or None
    """

    indices: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    num_experts: int
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    capacity: int | None = None
    positions: torch.Tensor | None = None

    def __post_init__(self) -> None:
        check_positive_int("num_experts", self.num_experts)
        check_index_tensor("indices", self.indices, ndim=2, upper=self.num_experts)
        check_float_tensor("weights", self.weights, ndim=2)
        check_finite("routing weights", self.weights)
        if self.weights.shape != self.indices.shape:
            raise ValueError(
                f"weights must have the shape of indices {tuple(self.indices.shape)}, got {tuple(self.weights.shape)}"
            )
        if not isinstance(self.kept, torch.Tensor) or self.kept.dtype != torch.bool:
            raise TypeError("kept must be a bool tensor of shape [T, k]")
        if self.kept.shape != self.indices.shape:
            raise ValueError(f"kept must have the shape of indices {tuple(self.indices.shape)}, got {tuple(self.kept.shape)}")
        if self.indices.shape[1] > self.num_experts:
            raise ValueError(f"k must be in [1, num_experts={self.num_experts}], got k={self.indices.shape[1]}")

    @classmethod
    def fixed(cls, indices: torch.Tensor, weights: torch.Tensor, num_experts: int) -> Routing:
        """A dropless routing given by hand (tests, gradchecks, exercises)."""
        return cls(indices=indices, weights=weights, kept=torch.ones_like(indices, dtype=torch.bool), num_experts=num_experts)

    @property
    def num_tokens(self) -> int:
        return self.indices.shape[0]

    @property
    def k(self) -> int:
        return self.indices.shape[1]

    @property
    def combine_weights(self) -> torch.Tensor:
        """``weights * kept``: [T, k], zero where an assignment was dropped."""
        return self.weights * self.kept.to(self.weights.dtype)

    def tokens_per_expert(self) -> torch.Tensor:
        """Assignments per expert *before* capacity dropping: [E] int64."""
        return torch.bincount(self.indices.reshape(-1), minlength=self.num_experts)

    def kept_per_expert(self) -> torch.Tensor:
        """Assignments per expert after capacity dropping: [E] int64."""
        return torch.bincount(self.indices[self.kept], minlength=self.num_experts)

    def dropped_fraction(self) -> float:
        """Fraction of assignments dropped by capacity (0.0 for an empty batch)."""
        n = self.kept.numel()
        return 0.0 if n == 0 else float((~self.kept).sum()) / n


def router_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype router logits are computed in: float32 at least (selective precision),
    float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``h = x @ W_r`` in float32, or float64 for a float64 ``x`` (selective precision); raises on NaN/inf.

    ``weight`` is an ``nn.Linear`` weight, i.e. ``W_r^T`` of shape ``[E, d]``; ``W_r`` is ``[d, E]``.
    """
    dt = router_dtype(x.dtype)
    h = F.linear(x.to(dt), weight.to(dt))
    check_finite("router logits", h)
    return h


class _RouterBase(nn.Module):
    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        # named like Hugging Face's Mixtral ``gate``: weight [E, d]
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def _check_input(self, x: torch.Tensor) -> None:
        check_float_tensor("x", x, ndim=2)
        check_last_dim("x", x, self.d_model)
        check_finite("x", x)


class TopKRouter(_RouterBase):
    """Mixtral router: softmax in float32, top-k, renormalise (dropless).

    ``renormalize=False`` keeps the raw top-k probabilities (Switch-style gates for
    k > 1). With ``k=1`` and ``renormalize=True`` every weight is exactly 1, so the
    task loss gives the router no gradient (notebook 02 demonstrates it).
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, renormalize: bool = True):
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        self.renormalize = bool(renormalize)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, renormalize={self.renormalize}"

    def forward(self, x: torch.Tensor) -> Routing:
        self._check_input(x)
        logits = router_logits(x, self.gate.weight)  # [T, E] float32
        probs = softmax_lastdim(logits)  # = logits.softmax(-1), faster on the CPU for a few experts
        top_p, top_i = probs.topk(self.k, dim=-1)  # [T, k]
        if self.renormalize:
            # softmax over the k kept logits == top_p / top_p.sum(): same function and
            # gradients, but for k = 1 this form gives an exactly-zero router gradient
            weights = softmax_lastdim(logits.gather(-1, top_i))
        else:
            weights = top_p
        kept = torch.ones_like(top_i, dtype=torch.bool)
        return Routing(top_i, weights, kept, self.num_experts, probs=probs, logits=logits)


class SwitchRouter(_RouterBase):
    """Switch Transformer router: top-1, un-renormalised gate, capacity, jitter.

    * gate = ``p[i*]`` (not renormalised, so the router gets a task gradient)
    * capacity ``C = max(min_capacity, floor(CF * T / E))`` per routing group, with
      ``capacity_factor`` in training and ``eval_capacity_factor`` in eval mode;
      the first ``C`` tokens of each expert are kept (position order)
    * ``group_size``: route in contiguous groups of this many tokens (None: the
      whole batch is one group); T must then be a multiple of it
    * jitter: in training the router *input* is multiplied by
      ``Uniform(1 - jitter_eps, 1 + jitter_eps)``; the experts see the clean input
    * ``drop_tokens=False`` disables capacity (dropless top-1)
    """

    def __init__(
        self,
        d_model: int,
        num_experts: int,
        capacity_factor: float = 1.25,
        eval_capacity_factor: float = 2.0,
        min_capacity: int = 4,
        jitter_eps: float = 1e-2,
        group_size: int | None = None,
        drop_tokens: bool = True,
    ):
        super().__init__(d_model, num_experts)
        self.k = 1
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.eval_capacity_factor = check_positive_float("eval_capacity_factor", eval_capacity_factor)
        self.min_capacity = check_positive_int("min_capacity", min_capacity, minimum=0)
        self.jitter_eps = check_positive_float("jitter_eps", jitter_eps, allow_zero=True)
        if self.jitter_eps >= 1.0:
            raise ValueError(f"jitter_eps must be in [0, 1), got {jitter_eps}")
        self.group_size = None if group_size is None else check_positive_int("group_size", group_size)
        self.drop_tokens = bool(drop_tokens)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
            f"eval_capacity_factor={self.eval_capacity_factor}, min_capacity={self.min_capacity}, "
            f"jitter_eps={self.jitter_eps}, group_size={self.group_size}"
        )

    def current_capacity_factor(self) -> float:
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def capacity(self, num_tokens: int) -> int:
        """Per-expert capacity for a group of ``num_tokens`` in the current mode."""
        return expert_capacity(num_tokens, self.num_experts, self.current_capacity_factor(), 1, self.min_capacity)

    def forward(self, x: torch.Tensor) -> Routing:
        self._check_input(x)
        T = x.shape[0]
        x_r = x
        if self.training and self.jitter_eps > 0:
            dt = router_dtype(x.dtype)
            noise = torch.empty_like(x, dtype=dt).uniform_(1.0 - self.jitter_eps, 1.0 + self.jitter_eps)
            x_r = x.to(dt) * noise
        logits = router_logits(x_r, self.gate.weight)
        probs = softmax_lastdim(logits)  # = logits.softmax(-1)
        gate, idx = probs.max(dim=-1, keepdim=True)  # [T, 1]: gate NOT renormalised
        if not self.drop_tokens:
            kept = torch.ones_like(idx, dtype=torch.bool)
            return Routing(idx, gate, kept, self.num_experts, probs=probs, logits=logits)
        G = self.group_size if self.group_size is not None else T
        C = self.capacity(G)
        kept, pos = capacity_mask(idx, self.num_experts, C, group_size=self.group_size)
        return Routing(idx, gate, kept, self.num_experts, probs=probs, logits=logits, capacity=C, positions=pos)


class NoisyTopKRouter(_RouterBase):
    """Noisy top-k gating (Shazeer et al. 2017).

    ``H = x W_g + eps * softplus(x W_noise)``, ``eps ~ N(0, 1)``, in training only;
    keep the top-k of ``H`` and softmax over them (so weights sum to 1). ``W_g`` and
    ``W_noise`` start at zero, as in the paper. ``probs`` is ``softmax(H)`` over all
    experts, the quantity the load-balancing losses see.

    Note: at initialisation every logit is 0, so in eval mode (no noise) ``topk``
    breaks the tie the same way for every token and all tokens pick the same
    experts; in training the noise spreads them until ``W_g`` has learned.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2):
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        self.noise = nn.Linear(d_model, num_experts, bias=False)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.noise.weight)

    def forward(self, x: torch.Tensor) -> Routing:
        self._check_input(x)
        h = router_logits(x, self.gate.weight)
        if self.training:
            dt = router_dtype(x.dtype)
            std = F.softplus(F.linear(x.to(dt), self.noise.weight.to(dt)))
            h = h + torch.randn_like(h) * std
        top_h, top_i = h.topk(self.k, dim=-1)
        weights = top_h.softmax(dim=-1)
        kept = torch.ones_like(top_i, dtype=torch.bool)
        return Routing(top_i, weights, kept, self.num_experts, probs=h.softmax(dim=-1), logits=h)
