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

Beyond top-k (notebook 09; docs/conventions.md, "Other routing schemes"):

* ``RandomRouter``: k experts drawn uniformly per token, weights 1/k; nothing learned.
* ``HashRouter`` (Roller et al. 2021): the expert is a fixed table lookup of the token id.
* ``ExpertChoiceRouter`` (Zhou et al. 2022): each expert picks its top-C tokens; a token
  may get 0 or several experts (``Routing.valid`` marks the padding slots).
* ``BiasBalancedRouter`` (Wang et al. 2024; DeepSeek-V3 section 2.1.2): a per-expert bias
  for the top-k *selection* only, updated outside autograd after each optimizer step.
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

__all__ = [
    "Routing",
    "TopKRouter",
    "SwitchRouter",
    "NoisyTopKRouter",
    "RandomRouter",
    "HashRouter",
    "ExpertChoiceRouter",
    "BiasBalancedRouter",
    "random_hash_table",
    "balanced_hash_table",
    "router_logits",
    "router_dtype",
]


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
    valid:   [T, k] bool, False for *padding* slots that are no assignment at all, or None
             (every slot is an assignment). Expert choice gives tokens different numbers
             of experts: k is the largest number any token got, and the other tokens'
             extra slots are padding (valid and kept False, weight 0). Padding counts
             neither as load nor as dropped; ``kept`` must be False wherever ``valid`` is.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    kept: torch.Tensor
    num_experts: int
    probs: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    capacity: int | None = None
    positions: torch.Tensor | None = None
    valid: torch.Tensor | None = None

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
        if self.valid is not None:
            if not isinstance(self.valid, torch.Tensor) or self.valid.dtype != torch.bool:
                raise TypeError("valid must be None or a bool tensor of shape [T, k]")
            if self.valid.shape != self.indices.shape:
                raise ValueError(
                    f"valid must have the shape of indices {tuple(self.indices.shape)}, got {tuple(self.valid.shape)}"
                )
            if bool((self.kept & ~self.valid).any()):
                raise ValueError("kept must be False in every padding slot (where valid is False)")

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
        """Assignments per expert *before* capacity dropping: [E] int64 (padding slots excluded)."""
        if self.valid is not None:
            return torch.bincount(self.indices[self.valid], minlength=self.num_experts)
        return torch.bincount(self.indices.reshape(-1), minlength=self.num_experts)

    def kept_per_expert(self) -> torch.Tensor:
        """Assignments per expert after capacity dropping: [E] int64."""
        return torch.bincount(self.indices[self.kept], minlength=self.num_experts)

    def dropped_fraction(self) -> float:
        """Fraction of assignments dropped by capacity (0.0 for an empty batch; padding
        slots are no assignments, so expert choice drops nothing by this measure)."""
        if self.valid is not None:
            n = int(self.valid.sum())
            return 0.0 if n == 0 else float((self.valid & ~self.kept).sum()) / n
        n = self.kept.numel()
        return 0.0 if n == 0 else float((~self.kept).sum()) / n

    def no_expert_fraction(self) -> float:
        """Fraction of tokens with no kept assignment at all (0.0 for an empty batch).

        Such a token leaves the MoE layer as 0 and the block as its residual. For top-1
        with capacity it equals ``dropped_fraction``; for expert choice it counts the
        tokens that no expert picked."""
        T = self.num_tokens
        return 0.0 if T == 0 else float((~self.kept.any(dim=1)).sum()) / T


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


# ----------------------------------------------------------------------------- beyond top-k (notebook 09)


class RandomRouter(nn.Module):
    """"Fake MoE": each token goes to ``k`` distinct experts drawn uniformly at random.

    A fresh draw on every call, in training and in evaluation, from torch's global random
    generator (or ``generator``, a CPU ``torch.Generator``); the weights are ``1/k``. No
    parameters, nothing learned: the baseline any learned router must beat
    (docs/conventions.md, "Other routing schemes"). The draw is ``rand(T, E).topk(k)``:
    every set of ``k`` experts is equally likely.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, generator: torch.Generator | None = None):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.k = check_k(k, num_experts)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}"

    def forward(self, x: torch.Tensor) -> Routing:
        check_float_tensor("x", x, ndim=2)
        check_last_dim("x", x, self.d_model)
        check_finite("x", x)
        T = x.shape[0]
        # drawn on the CPU (where a seeded generator lives), then moved: same draws on any device
        idx = torch.rand(T, self.num_experts, generator=self.generator).topk(self.k, dim=1).indices.to(x.device)
        weights = torch.full((T, self.k), 1.0 / self.k, dtype=router_dtype(x.dtype), device=x.device)
        return Routing(idx, weights, torch.ones_like(idx, dtype=torch.bool), self.num_experts)


def _check_vocab(num_experts: int, vocab_size: int) -> None:
    check_positive_int("num_experts", num_experts)
    check_positive_int("vocab_size", vocab_size)


def random_hash_table(vocab_size: int, num_experts: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``[vocab_size]`` int64: an expert drawn uniformly at random for every token id (Roller et
    al. 2021's "random hash"), from ``generator`` or torch's global random generator."""
    _check_vocab(num_experts, vocab_size)
    return torch.randint(0, num_experts, (vocab_size,), generator=generator)


def balanced_hash_table(token_counts, num_experts: int) -> torch.Tensor:
    """``[V]`` int64: a token -> expert table that spreads the *tokens* of a corpus evenly.

    ``token_counts[v]`` is how often id ``v`` occurs in the training split. Greedy, largest
    first: the ids in order of falling count (ties: smaller id first) each go to the expert
    with the smallest load so far (ties: smaller expert id), the balanced assignment of
    Roller et al. 2021 (built greedily from training-data frequencies, most frequent ids
    into the emptiest expert); the tie rules are the course's. No table can do better than the most frequent token allows: an expert holding a
    token that alone is more than ``1/E`` of the corpus is overloaded whatever the rest.
    """
    counts = torch.as_tensor(token_counts)
    if counts.dim() != 1 or counts.numel() == 0 or counts.is_floating_point() or counts.dtype == torch.bool:
        raise TypeError("token_counts must be a non-empty 1-D integer tensor of counts per token id")
    if int(counts.min()) < 0:
        raise ValueError(f"token_counts must be >= 0, got a minimum of {int(counts.min())}")
    check_positive_int("num_experts", num_experts)
    order = sorted(range(counts.numel()), key=lambda v: (-int(counts[v]), v))
    load = [0] * num_experts
    table = torch.empty(counts.numel(), dtype=torch.int64)
    for v in order:
        e = min(range(num_experts), key=lambda j: (load[j], j))
        table[v] = e
        load[e] += int(counts[v])
    return table


class HashRouter(nn.Module):
    """Hash layer (Roller et al. 2021): token id ``v`` goes to expert ``table[v]``, weight 1.

    ``table: [vocab_size]`` int64 is fixed (a buffer, saved with the model, never trained);
    the router has no parameters and needs no balance loss. Build it with
    ``HashRouter.random(...)`` or ``HashRouter.balanced(...)`` (``random_hash_table``,
    ``balanced_hash_table``). The routing ignores the hidden state: it is a pure function
    of the token id, so the router must be given the ids, ``router(x, token_ids=ids)``.
    ``MoELayer`` forwards them (``layer(x, token_ids=...)``), and ``TinyLM`` passes its input
    ids to every layer: a hash layer in block ``l`` routes position ``t`` by the *input*
    token at ``t``, as in the paper.
    """

    needs_token_ids = True

    def __init__(self, d_model: int, num_experts: int, table: torch.Tensor):
        super().__init__()
        self.d_model = check_positive_int("d_model", d_model)
        self.num_experts = check_positive_int("num_experts", num_experts)
        check_index_tensor("table", table, ndim=1, upper=num_experts)
        if table.numel() == 0:
            raise ValueError("table must hold one expert id per token id, got an empty tensor")
        self.register_buffer("table", table.to(torch.int64).clone())

    @classmethod
    def random(cls, d_model: int, num_experts: int, vocab_size: int, generator: torch.Generator | None = None):
        return cls(d_model, num_experts, random_hash_table(vocab_size, num_experts, generator))

    @classmethod
    def balanced(cls, d_model: int, num_experts: int, token_counts):
        return cls(d_model, num_experts, balanced_hash_table(token_counts, num_experts))

    @property
    def vocab_size(self) -> int:
        return self.table.numel()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, vocab_size={self.vocab_size}"

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Routing:
        check_float_tensor("x", x, ndim=2)
        check_last_dim("x", x, self.d_model)
        check_finite("x", x)
        if token_ids is None:
            raise ValueError(
                "HashRouter routes by token id: call it as router(x, token_ids=ids) with ids of shape "
                f"[{x.shape[0]}] (in a model, MoELayer and TinyLM pass them)"
            )
        if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or token_ids.dtype == torch.bool:
            raise TypeError("token_ids must be an integer tensor of token ids")
        if token_ids.shape != (x.shape[0],):
            raise ValueError(f"token_ids must have shape [{x.shape[0]}] (one id per row of x), got {tuple(token_ids.shape)}")
        if token_ids.numel():
            lo, hi = int(token_ids.min()), int(token_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token_ids must be in [0, vocab_size - 1 = {self.vocab_size - 1}], got [{lo}, {hi}]")
        idx = self.table.to(token_ids.device)[token_ids].unsqueeze(1).to(x.device)  # [T, 1]
        weights = torch.ones(idx.shape, dtype=router_dtype(x.dtype), device=x.device)
        return Routing(idx, weights, torch.ones_like(idx, dtype=torch.bool), self.num_experts)


class ExpertChoiceRouter(_RouterBase):
    """Expert choice (Zhou et al. 2022, section 3.2): the experts pick the tokens.

    * scores ``S = softmax(x W_r)`` over experts, ``[T, E]`` (float32, like every router)
    * in each routing group of ``G`` tokens, expert ``e`` takes the ``C`` tokens with the
      highest ``S[:, e]``: ``C = min(G, max(1, floor(c * G / E)))``, ``c = capacity_factor``
      (2 in most of the paper's experiments: on average ``c`` experts per token)
    * the combine weight of (token t, expert e) is ``S[t, e]``, not renormalised
    * every expert is exactly full (``C`` tokens); a token may get 0, 1 or several experts

    The ``Routing`` record: ``k`` is the largest number of experts any token got in this
    batch; each token's experts fill its first slots, best score first, and the rest are
    padding (``valid`` and ``kept`` False, weight 0, index 0). No aux loss is needed.

    The choice for one token depends on every other token of the group, *later ones
    included*, so a causal language model using it sees the future (the batch's
    composition) in training, and decodes differently one token at a time.
    ``group_size`` (None: the whole batch is one group) must divide the token count.
    """

    def __init__(self, d_model: int, num_experts: int, capacity_factor: float = 2.0, group_size: int | None = None):
        super().__init__(d_model, num_experts)
        if isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool) and capacity_factor <= 0:
            raise ValueError(
                f"capacity_factor must be a finite number > 0 for expert choice (c = average experts per "
                f"token; the paper uses 2), got {capacity_factor}"
            )
        self.capacity_factor = check_positive_float("capacity_factor", capacity_factor)
        self.group_size = None if group_size is None else check_positive_int("group_size", group_size)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, capacity_factor={self.capacity_factor}, "
                f"group_size={self.group_size}")

    def capacity(self, group_tokens: int) -> int:
        """Tokens each expert takes from a group of ``group_tokens``: ``min(G, max(1, floor(c G / E)))``."""
        check_positive_int("group_tokens", group_tokens, minimum=0)
        if group_tokens == 0:
            return 0
        return min(group_tokens, expert_capacity(group_tokens, self.num_experts, self.capacity_factor, 1, 1))

    def forward(self, x: torch.Tensor) -> Routing:
        self._check_input(x)
        T, E = x.shape[0], self.num_experts
        logits = router_logits(x, self.gate.weight)
        probs = softmax_lastdim(logits)  # [T, E]
        if T == 0:
            empty = torch.zeros(0, 1, dtype=torch.int64, device=x.device)
            none = torch.zeros(0, 1, dtype=torch.bool, device=x.device)
            return Routing(empty, probs.new_zeros(0, 1), none, E, probs=probs, logits=logits, capacity=0, valid=none)
        G = self.group_size if self.group_size is not None else T
        if T % G:
            raise ValueError(f"the number of tokens T={T} must be a multiple of group_size={G}")
        n, C = T // G, self.capacity(G)
        # expert e of group g keeps its C best tokens of that group: top-C over *tokens*
        w, tok = probs.view(n, G, E).transpose(1, 2).topk(C, dim=-1)  # [n, E, C]
        tok = tok + (torch.arange(n, device=x.device) * G).view(n, 1, 1)  # token ids in the batch
        e_ids = torch.arange(E, device=x.device).view(1, E, 1).expand_as(tok)
        tok, e_ids, w = tok.reshape(-1), e_ids.reshape(-1), w.reshape(-1)
        # slots per token, best score first: sort by score (descending), then stably by token
        order = w.detach().argsort(descending=True, stable=True)
        order = order[tok[order].argsort(stable=True)]
        tok, e_ids, w = tok[order], e_ids[order], w[order]
        per_token = torch.bincount(tok, minlength=T)  # experts per token, 0 allowed
        k = max(1, int(per_token.max()))
        rank = torch.arange(tok.numel(), device=x.device) - (per_token.cumsum(0) - per_token)[tok]
        indices = torch.zeros(T, k, dtype=torch.int64, device=x.device)
        indices[tok, rank] = e_ids
        valid = torch.zeros(T, k, dtype=torch.bool, device=x.device)
        valid[tok, rank] = True
        weights = probs.new_zeros(T, k).index_put((tok, rank), w)  # differentiable in w
        return Routing(indices, weights, valid.clone(), E, probs=probs, logits=logits, capacity=C, valid=valid)


SCORE_FUNCS = ("softmax", "sigmoid")


class BiasBalancedRouter(_RouterBase):
    """Auxiliary-loss-free balancing (Wang et al. 2024, Algorithm 1; DeepSeek-V3 section 2.1.2).

    The course's variant, exactly:

    * scores ``s = softmax(x W_r)`` (``score_func="softmax"``, the default, so that only the
      balancing differs from the Mixtral router) or ``s = sigmoid(x W_r)``
      (``"sigmoid"``, as in DeepSeek-V3 and Wang et al.'s main experiments)
    * selection: the top-k of ``s + b``, with ``b`` a per-expert bias (a buffer, no gradient)
    * gates: the *unbiased* ``s`` of the selected experts, normalised to sum to 1
      (for softmax: exactly the Mixtral gate); ``b`` never reaches the output
    * each forward in training mode adds the batch's assignments per expert to
      ``pending_load``; ``update_bias()`` (called by ``after_optimizer_step()``, which
      ``moe_utils.train.train`` calls after every ``optimizer.step()``, outside autograd)
      applies ``b_i <- b_i + u * sign(mean(load) - load_i)`` with ``u = update_rate``
      (0.001, the paper's choice) and clears the counts. Overloaded experts lose ``u``,
      underloaded ones gain ``u``. Evaluation-mode forwards do not count.

    ``probs`` in the ``Routing`` record is ``s`` normalised over all experts (for softmax, ``s``
    itself), so the monitor's router entropy works for both score functions.
    """

    def __init__(self, d_model: int, num_experts: int, k: int = 2, score_func: str = "softmax",
                 update_rate: float = 1e-3):
        super().__init__(d_model, num_experts)
        self.k = check_k(k, num_experts)
        if score_func not in SCORE_FUNCS:
            raise ValueError(f"score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
        self.score_func = score_func
        self.update_rate = check_positive_float("update_rate", update_rate, allow_zero=True)
        self.register_buffer("bias", torch.zeros(num_experts))
        self.register_buffer("pending_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, num_experts={self.num_experts}, k={self.k}, "
                f"score_func={self.score_func!r}, update_rate={self.update_rate}")

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        return softmax_lastdim(logits) if self.score_func == "softmax" else torch.sigmoid(logits)

    def forward(self, x: torch.Tensor) -> Routing:
        self._check_input(x)
        logits = router_logits(x, self.gate.weight)  # [T, E]
        s = self.scores(logits)
        top_i = (s.detach() + self.bias.to(s.dtype)).topk(self.k, dim=-1).indices  # the bias only selects
        g = s.gather(-1, top_i)
        weights = g / g.sum(dim=-1, keepdim=True)  # unbiased scores, normalised over the selected
        if self.training:
            self.pending_load += torch.bincount(top_i.reshape(-1), minlength=self.num_experts).to(self.pending_load)
        probs = s if self.score_func == "softmax" else s / s.sum(dim=-1, keepdim=True)
        kept = torch.ones_like(top_i, dtype=torch.bool)
        return Routing(top_i, weights, kept, self.num_experts, probs=probs, logits=logits)

    @torch.no_grad()
    def update_bias(self) -> torch.Tensor:
        """Apply ``b += u * sign(mean(load) - load)`` for the load counted since the last
        update, clear the count, and return the step (zeros when nothing was counted)."""
        load = self.pending_load.to(self.bias.dtype)
        if not bool(load.sum() > 0):
            return torch.zeros_like(self.bias)
        step = self.update_rate * torch.sign(load.mean() - load)
        self.bias += step
        self.pending_load.zero_()
        return step

    def after_optimizer_step(self) -> None:
        self.update_bias()
