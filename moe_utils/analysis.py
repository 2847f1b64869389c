"""Expert activation analysis: what a trained router's choices depend on, measured.

Everything here works on *router logits*, one ``[T, E]`` tensor per MoE layer, the
format a Hugging Face MoE model returns with ``output_router_logits=True``. So the same
statistics run on the course's ``TinyLM`` (``router_logits_of``) and on a real
checkpoint (``hf_router_logits``).

* ``routing_policy(model, ...)``: run a model with another capacity rule (dropless, a
  capacity factor, per-sequence groups, random priority) and restore it afterwards
* ``router_logits_of(model, windows)``: ``[layers][N*S, E]`` logits of a ``TinyLM``
* ``top_choices(logits, k)``: the experts each token picks, ``[T, k]``, best first
* ``byte_classes(windows)``: letter / digit / indent / space / newline / operator /
  punctuation / other for every byte of ``[N, S]`` windows
* ``routing_shares``: a label x expert table of routing shares (domain x expert,
  byte class x expert)
* ``mutual_information`` and ``conditional_mutual_information`` in bits (plug-in)
* ``domain_expert_test``: mutual information between domain and expert with a
  permutation test that shuffles whole windows' labels (tokens of one window are not
  independent, so shuffling single tokens would overstate the evidence)
* ``consecutive_repetition``: how often consecutive tokens share their first choice (and
  any choice), against 1/E and against the rate the expert loads alone would give
  (Jiang et al. 2024, Mixtral paper, section 5, Table 5)
* ``expert_ablation(layer, expert)``: a context manager that removes one expert (its
  tokens go to their next choice, or its output is zeroed)
* ``domain_losses`` and ``ablation_losses``: per-domain loss, and its change when each
  expert of each layer is removed
* ``hf_router_logits`` / ``load_local_hf_moe``: router logits of a Hugging Face MoE model
  (``transformers`` is imported only when these are called; nothing is downloaded)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ._checks import check_float_tensor, check_index_tensor, check_positive_int
from ._ops import softmax_lastdim
from .capacity import capacity_mask
from .routers import Routing, SwitchRouter, TopKRouter

__all__ = [
    "BYTE_CLASSES",
    "routing_policy",
    "router_logits_of",
    "top_choices",
    "byte_classes",
    "routing_shares",
    "mutual_information",
    "conditional_mutual_information",
    "PermutationTest",
    "domain_expert_test",
    "consecutive_repetition",
    "expert_ablation",
    "domain_windows",
    "domain_losses",
    "ablation_losses",
    "hf_router_logits",
    "load_local_hf_moe",
]

PRIORITIES = ("position", "random")


# ----------------------------------------------------------------------------- routing policy


def _moe_layers(model) -> list:
    layers = getattr(model, "moe_layers", None)
    if layers is None:
        raise TypeError(f"model must be a moe_utils TinyLM (with .moe_layers), got {type(model).__name__}")
    return list(layers)


class _RandomPriorityRouter(nn.Module):
    """Wraps a ``SwitchRouter``: same choices, but capacity keeps a *random* subset of the
    tokens that chose an expert instead of the earliest ones (priority order shuffled per
    group with ``generator``)."""

    def __init__(self, inner: SwitchRouter, generator: torch.Generator | None):
        super().__init__()
        self.inner = inner
        self.generator = generator
        self.d_model, self.num_experts, self.k = inner.d_model, inner.num_experts, 1

    @property
    def group_size(self):
        return self.inner.group_size

    def forward(self, x: torch.Tensor) -> Routing:
        r = self.inner(x)
        if r.capacity is None:  # dropless: nothing to prioritise
            return r
        T = r.num_tokens
        G = self.inner.group_size or T
        perm = torch.cat(
            [g * G + torch.randperm(G, generator=self.generator) for g in range(T // G)]
        ).to(r.indices.device)
        kept_p, pos_p = capacity_mask(r.indices[perm], r.num_experts, r.capacity, group_size=G)
        kept = torch.empty_like(kept_p)
        pos = torch.empty_like(pos_p)
        kept[perm], pos[perm] = kept_p, pos_p
        return Routing(r.indices, r.weights, kept, r.num_experts, probs=r.probs, logits=r.logits,
                       capacity=r.capacity, positions=pos)


@contextmanager
def routing_policy(
    model,
    *,
    drop_tokens: bool | None = None,
    capacity_factor: float | None = None,
    group_size: int | None | str = "keep",
    priority: str = "position",
    generator: torch.Generator | None = None,
) -> Iterator:
    """Temporarily change how the Switch layers of ``model`` apply capacity.

    drop_tokens:     False: dropless (every assignment kept); None: unchanged
    capacity_factor: sets both the training and the evaluation capacity factor
    group_size:      tokens per routing group (the model's ``S`` gives one group per
                     sequence: batch isolation); None: the whole batch is one group;
                     ``"keep"``: unchanged
    priority:        ``"position"`` (earliest tokens kept, the course convention) or
                     ``"random"`` (a random subset of an overfull expert's tokens is kept)
    generator:       random source of the ``"random"`` priority

    Layers without capacity (``TopKRouter``) are left as they are. Everything is restored
    on exit, even after an exception.
    """
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}, got {priority!r}")
    if capacity_factor is not None and (isinstance(capacity_factor, bool) or not capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a number > 0 or None, got {capacity_factor!r}")
    if group_size not in ("keep", None):
        check_positive_int("group_size", group_size)
    saved = []
    try:
        for layer in _moe_layers(model):
            router = layer.router
            if not isinstance(router, SwitchRouter):
                continue
            saved.append((layer, router, router.drop_tokens, router.capacity_factor,
                          router.eval_capacity_factor, router.group_size))
            if drop_tokens is not None:
                router.drop_tokens = bool(drop_tokens)
            if capacity_factor is not None:
                router.capacity_factor = router.eval_capacity_factor = float(capacity_factor)
            if group_size != "keep":
                router.group_size = group_size
            if priority == "random":
                layer.router = _RandomPriorityRouter(router, generator)
        yield model
    finally:
        for layer, router, drop, cf, ecf, gs in saved:
            layer.router = router
            router.drop_tokens, router.capacity_factor = drop, cf
            router.eval_capacity_factor, router.group_size = ecf, gs


# ----------------------------------------------------------------------------- logits and choices


def _check_windows(name: str, windows) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.is_floating_point() \
            or windows.dtype == torch.bool:
        raise TypeError(f"{name} must be a [N, S] integer tensor of token ids")
    if windows.numel() == 0:
        raise ValueError(f"{name} must hold at least one token, got shape {tuple(windows.shape)}")


@torch.no_grad()
def router_logits_of(model, windows: torch.Tensor, batch_size: int = 256, dropless: bool = True) -> list[torch.Tensor]:
    """Router logits of every MoE layer of a ``TinyLM`` on ``windows: [N, S]``.

    Returns ``[layers][N*S, E]`` float32 (window-major: token ``n*S + s``), the layout of
    Hugging Face's ``router_logits``. Eval mode (no jitter); ``dropless=True`` switches
    capacity off so that the second layer sees every token processed by the first (the
    router's *choices* never depend on capacity, but later layers' inputs do).
    """
    _check_windows("windows", windows)
    check_positive_int("batch_size", batch_size)
    layers = _moe_layers(model)
    if not layers:
        raise ValueError("model has no MoE layer (a dense model has no router logits)")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    per_layer: list[list[torch.Tensor]] = [[] for _ in layers]
    try:
        with routing_policy(model, drop_tokens=False if dropless else None):
            for i in range(0, windows.shape[0], batch_size):
                out = model(windows[i : i + batch_size].to(device))
                moe = [r for r in out.routings if r is not None]
                for j, r in enumerate(moe):
                    per_layer[j].append(r.logits.float().cpu())
    finally:
        model.train(was_training)
    return [torch.cat(chunks) for chunks in per_layer]


def _check_logits_list(logits) -> list[torch.Tensor]:
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    if not isinstance(logits, Sequence) or len(logits) == 0:
        raise TypeError("router logits must be a non-empty list of [T, E] tensors, one per layer")
    E = None
    for i, t in enumerate(logits):
        check_float_tensor(f"router logits of layer {i}", t, ndim=2)
        if E is None:
            E = t.shape[1]
        elif t.shape[1] != E:
            raise ValueError(f"every layer must have the same number of experts: layer 0 has {E}, "
                             f"layer {i} has {t.shape[1]}")
    return list(logits)


def top_choices(logits: torch.Tensor, k: int = 1) -> torch.Tensor:
    """The ``k`` experts with the largest logits, best first: ``[T, E] -> [T, k]`` int64.

    Same experts as top-k of the softmax (a softmax keeps the order); a Switch router
    is ``k = 1``, Mixtral ``k = 2``.
    """
    check_float_tensor("logits", logits, ndim=2)
    E = logits.shape[1]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
        raise ValueError(f"k must be an int in [1, num_experts={E}], got {k!r}")
    return logits.topk(k, dim=-1).indices


# ----------------------------------------------------------------------------- byte classes

BYTE_CLASSES = ("letter", "digit", "indent", "space", "newline", "operator", "punctuation", "other")
_OPERATORS = b"+-*/=<>%&|^~"


def _byte_class_table() -> torch.Tensor:
    table = torch.full((256,), BYTE_CLASSES.index("other"), dtype=torch.long)
    for b in range(256):
        c = bytes([b])
        if c.isalpha():
            table[b] = BYTE_CLASSES.index("letter")
        elif c.isdigit():
            table[b] = BYTE_CLASSES.index("digit")
        elif c in (b" ", b"\t"):
            table[b] = BYTE_CLASSES.index("space")
        elif c in (b"\n", b"\r"):
            table[b] = BYTE_CLASSES.index("newline")
        elif c in [bytes([o]) for o in _OPERATORS]:
            table[b] = BYTE_CLASSES.index("operator")
        elif 33 <= b <= 126:
            table[b] = BYTE_CLASSES.index("punctuation")
    return table


_TABLE = _byte_class_table()


def byte_classes(windows: torch.Tensor) -> torch.Tensor:
    """Class of every byte of ``windows: [N, S]`` (indices into ``BYTE_CLASSES``), [N, S].

    ``indent``: a space or tab with only spaces/tabs between it and a newline earlier in
    the same window (leading whitespace of a line); other spaces and tabs are ``space``.
    Letters and digits are ASCII; bytes >= 128 (parts of UTF-8 characters) are ``other``.
    """
    _check_windows("windows", windows)
    w = windows.cpu().long()
    if int(w.min()) < 0 or int(w.max()) > 255:
        raise ValueError("windows must hold byte ids in [0, 255]")
    cls = _TABLE[w]
    space, newline = BYTE_CLASSES.index("space"), BYTE_CLASSES.index("newline")
    is_space = cls == space
    # a space is leading if the most recent non-space byte before it is a newline
    N, S = w.shape
    idx = torch.arange(S).expand(N, S)
    last_non_space = torch.where(~is_space, idx, torch.full_like(idx, -1)).cummax(dim=1).values
    prev = last_non_space.clamp_min(0)
    leading = is_space & (last_non_space >= 0) & (cls.gather(1, prev) == newline)
    return torch.where(leading, torch.full_like(cls, BYTE_CLASSES.index("indent")), cls)


# ----------------------------------------------------------------------------- shares and information


def _check_labels(name: str, labels, size: int, upper: int) -> torch.Tensor:
    check_index_tensor(name, labels, upper=upper)
    labels = labels.reshape(-1).cpu()
    if labels.numel() != size:
        raise ValueError(f"{name} must hold one label per token ({size}), got {labels.numel()}")
    return labels


def _as_choices(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T] or [T, k] (or [N, S, k]) expert ids -> [T, k] on the CPU."""
    check_positive_int("num_experts", num_experts)
    check_index_tensor("experts", experts, upper=num_experts)
    e = experts.cpu()
    if e.dim() == 1:
        e = e[:, None]
    elif e.dim() == 3:
        e = e.reshape(-1, e.shape[-1])
    elif e.dim() != 2:
        raise ValueError(f"experts must have shape [T], [T, k] or [N, S, k], got {tuple(experts.shape)}")
    return e


def routing_shares(labels: torch.Tensor, experts: torch.Tensor, num_labels: int, num_experts: int):
    """Share of each label's assignments that go to each expert.

    labels: [T] ints in [0, num_labels) (domain, byte class...); experts: [T] or [T, k].
    Returns ``(shares [num_labels, E], counts [num_labels])``: each row of ``shares`` sums
    to 1 over all k choices of the label's tokens; a label with no token has a row of
    zeros and count 0 (check ``counts`` before reading its row).
    """
    check_positive_int("num_labels", num_labels)
    e = _as_choices(experts, num_experts)
    lab = _check_labels("labels", labels, e.shape[0], num_labels)
    k = e.shape[1]
    joint = torch.bincount((lab[:, None] * num_experts + e).reshape(-1),
                           minlength=num_labels * num_experts).view(num_labels, num_experts).double()
    counts = torch.bincount(lab, minlength=num_labels)
    shares = joint / (counts[:, None].double() * k).clamp_min(1)
    return shares, counts


def _entropy_bits(counts: torch.Tensor) -> float:
    c = counts[counts > 0].double()
    p = c / c.sum()
    return float(-(p * torch.log2(p)).sum())


def mutual_information(x: torch.Tensor, y: torch.Tensor, nx: int, ny: int) -> float:
    """Plug-in mutual information ``I(X; Y)`` in bits of two aligned label tensors.

    x: [T] ints in [0, nx); y: [T] ints in [0, ny). ``H(X) + H(Y) - H(X, Y)`` from the
    empirical counts (biased upwards on small samples: compare with a shuffled baseline).
    """
    check_positive_int("nx", nx)
    check_positive_int("ny", ny)
    check_index_tensor("x", x, upper=nx)
    x = x.reshape(-1).cpu()
    if x.numel() == 0:
        raise ValueError("x and y must hold at least one sample")
    y = _check_labels("y", y, x.numel(), ny)
    hx = _entropy_bits(torch.bincount(x, minlength=nx))
    hy = _entropy_bits(torch.bincount(y, minlength=ny))
    hxy = _entropy_bits(torch.bincount(x * ny + y, minlength=nx * ny))
    return max(0.0, hx + hy - hxy)


def conditional_mutual_information(x, y, z, nx: int, ny: int, nz: int) -> float:
    """Plug-in ``I(X; Y | Z) = H(X,Z) + H(Y,Z) - H(X,Y,Z) - H(Z)`` in bits.

    How much X tells about Y once Z is known: with X = domain, Y = expert, Z = byte,
    the domain information the router uses beyond the current byte.
    """
    check_positive_int("nz", nz)
    check_index_tensor("x", x, upper=nx)
    x = x.reshape(-1).cpu()
    if x.numel() == 0:
        raise ValueError("x, y and z must hold at least one sample")
    y = _check_labels("y", y, x.numel(), ny)
    z = _check_labels("z", z, x.numel(), nz)
    hxz = _entropy_bits(torch.bincount(x * nz + z, minlength=nx * nz))
    hyz = _entropy_bits(torch.bincount(y * nz + z, minlength=ny * nz))
    hxyz = _entropy_bits(torch.bincount((x * ny + y) * nz + z, minlength=nx * ny * nz))
    hz = _entropy_bits(torch.bincount(z, minlength=nz))
    return max(0.0, hxz + hyz - hxyz - hz)


@dataclass
class PermutationTest:
    """statistic: the observed value; null: the statistic under each shuffle;
    p_value: ``(1 + #(null >= statistic)) / (1 + permutations)``."""

    statistic: float
    null: torch.Tensor
    p_value: float

    @property
    def null_mean(self) -> float:
        return float(self.null.mean())

    @property
    def excess(self) -> float:
        """Observed minus the shuffled mean: the information beyond the estimator's bias."""
        return self.statistic - self.null_mean


def domain_expert_test(
    window_labels: torch.Tensor,
    experts: torch.Tensor,
    num_labels: int,
    num_experts: int,
    permutations: int = 200,
    seed: int = 0,
) -> PermutationTest:
    """Mutual information (bits) between a window's label (its domain) and the first-choice
    expert of each of its tokens, with a permutation test over *windows*.

    window_labels: [N] label of each window; experts: [N, S] or [N, S, k] choices (the
    first choice is used). The null shuffles the N window labels, keeping each window's
    tokens together: consecutive tokens are correlated, so a token-level shuffle would
    treat 64 dependent tokens as 64 independent pieces of evidence.
    """
    check_positive_int("permutations", permutations)
    check_index_tensor("window_labels", window_labels, ndim=1, upper=num_labels)
    check_index_tensor("experts", experts, ndim=(2, 3), upper=num_experts)
    N = window_labels.shape[0]
    if N < 2:
        raise ValueError(f"a permutation test needs at least 2 windows, got {N}")
    if experts.shape[0] != N:
        raise ValueError(f"experts must have one row per window ({N}), got shape {tuple(experts.shape)}")
    first = experts.cpu()
    first = first[..., 0] if first.dim() == 3 else first
    S = first.shape[1]
    flat = first.reshape(-1)
    labels = window_labels.cpu()
    stat = mutual_information(labels.repeat_interleave(S), flat, num_labels, num_experts)
    g = torch.Generator().manual_seed(seed)
    null = torch.empty(permutations, dtype=torch.float64)
    for i in range(permutations):
        shuffled = labels[torch.randperm(N, generator=g)]
        null[i] = mutual_information(shuffled.repeat_interleave(S), flat, num_labels, num_experts)
    p = (1 + int((null >= stat).sum())) / (1 + permutations)
    return PermutationTest(stat, null, p)


def consecutive_repetition(experts: torch.Tensor, num_experts: int) -> dict:
    """How often consecutive tokens of a window share experts (Mixtral paper, Table 5).

    experts: [N, S] (top-1) or [N, S, k] choices of N windows of S tokens, best first.
    Returns plain floats:

    * ``first``: fraction of pairs (t, t+1) of one window with the same first choice
    * ``any``: fraction of pairs whose k choices share at least one expert (k > 1)
    * ``uniform_first`` = 1/E and ``uniform_any`` = ``1 - C(E-k, k) / C(E, k)``: the rates
      of a router that picks uniformly at random (12.5% and 46.4% for E = 8, k = 2)
    * ``load_first``: ``sum_e share_e^2`` with the observed first-choice shares: the rate
      if consecutive tokens were independent draws from the experts' actual loads
    """
    check_index_tensor("experts", experts, ndim=(2, 3), upper=num_experts)
    e = experts.cpu()
    e = e[..., None] if e.dim() == 2 else e
    N, S, k = e.shape
    if S < 2 or N == 0:
        raise ValueError(f"experts must hold windows of at least 2 tokens, got shape {tuple(experts.shape)}")
    a, b = e[:, :-1], e[:, 1:]
    first = float((a[..., 0] == b[..., 0]).double().mean())
    overlap = (a[..., :, None] == b[..., None, :]).any(-1).any(-1)
    share = torch.bincount(e[..., 0].reshape(-1), minlength=num_experts).double()
    share = share / share.sum()
    E = num_experts
    return {
        "first": first,
        "any": float(overlap.double().mean()),
        "uniform_first": 1.0 / E,
        "uniform_any": 1.0 - math.comb(E - k, k) / math.comb(E, k),
        "load_first": float((share**2).sum()),
    }


# ----------------------------------------------------------------------------- ablation

ABLATION_MODES = ("reroute", "drop")


class _AblatedRouter(nn.Module):
    """Wraps a router so that one expert is never used.

    ``reroute``: the expert's logit is set to -inf before the top-k, so its tokens go to
    their next choice (softmax over the remaining experts; capacity as before).
    ``drop``: choices unchanged, but the expert's assignments are dropped: it contributes
    0, as if capacity had dropped them (the other choice of a top-2 token still counts).
    """

    def __init__(self, inner: nn.Module, expert: int, mode: str):
        super().__init__()
        self.inner, self.expert, self.mode = inner, expert, mode
        self.d_model, self.num_experts = inner.d_model, inner.num_experts
        self.k = getattr(inner, "k", 1)

    @property
    def group_size(self):
        return getattr(self.inner, "group_size", None)

    def forward(self, x: torch.Tensor) -> Routing:
        r = self.inner(x)
        if self.mode == "drop":
            kept = r.kept & (r.indices != self.expert)
            return Routing(r.indices, r.weights, kept, r.num_experts, probs=r.probs, logits=r.logits,
                           capacity=r.capacity, positions=r.positions)
        masked = r.logits.clone()
        masked[:, self.expert] = float("-inf")
        probs = softmax_lastdim(masked)
        router = self.inner
        if isinstance(router, TopKRouter):
            top_p, top_i = probs.topk(router.k, dim=-1)
            weights = softmax_lastdim(masked.gather(-1, top_i)) if router.renormalize else top_p
            kept = torch.ones_like(top_i, dtype=torch.bool)
            return Routing(top_i, weights, kept, r.num_experts, probs=probs, logits=r.logits)
        gate, idx = probs.max(dim=-1, keepdim=True)
        if r.capacity is None:
            kept = torch.ones_like(idx, dtype=torch.bool)
            return Routing(idx, gate, kept, r.num_experts, probs=probs, logits=r.logits)
        kept, pos = capacity_mask(idx, r.num_experts, r.capacity, group_size=router.group_size)
        return Routing(idx, gate, kept, r.num_experts, probs=probs, logits=r.logits,
                       capacity=r.capacity, positions=pos)


@contextmanager
def expert_ablation(layer, expert: int, mode: str = "reroute") -> Iterator:
    """Remove expert ``expert`` from the MoE layer ``layer`` inside a ``with`` block.

    mode ``"reroute"``: its tokens go to their next choice (``TopKRouter`` or
    ``SwitchRouter`` only); ``"drop"``: its output is zeroed (any router). The layer's
    router is restored on exit.
    """
    from .layers import MoELayer

    if not isinstance(layer, MoELayer):
        raise TypeError(f"layer must be a moe_utils MoELayer, got {type(layer).__name__}")
    if mode not in ABLATION_MODES:
        raise ValueError(f"mode must be one of {ABLATION_MODES}, got {mode!r}")
    E = layer.num_experts
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < E:
        raise ValueError(f"expert must be an int in [0, {E - 1}], got {expert!r}")
    inner = layer.router
    if mode == "reroute" and not isinstance(inner, (TopKRouter, SwitchRouter)):
        raise TypeError(f"mode='reroute' needs a TopKRouter or SwitchRouter, got {type(inner).__name__}; "
                        "use mode='drop'")
    if mode == "reroute" and getattr(inner, "k", 1) >= E:
        raise ValueError(f"mode='reroute' needs k < num_experts, got k={inner.k}, num_experts={E}")
    layer.router = _AblatedRouter(inner, expert, mode)
    try:
        yield layer
    finally:
        layer.router = inner


def domain_windows(streams: Mapping[str, torch.Tensor], seq_len: int, per_domain: int) -> dict[str, torch.Tensor]:
    """``per_domain`` windows of ``seq_len + 1`` tokens per domain, spread evenly over each
    stream (non-overlapping when the stream is long enough): ``{domain: [n, seq_len + 1]}``.

    The first ``seq_len`` tokens are the input, the last ``seq_len`` the targets.
    """
    check_positive_int("seq_len", seq_len)
    check_positive_int("per_domain", per_domain)
    out = {}
    for d, s in streams.items():
        if not isinstance(s, torch.Tensor) or s.dim() != 1 or s.is_floating_point():
            raise TypeError(f"streams[{d!r}] must be a 1-D integer tensor of token ids")
        span = s.numel() - seq_len - 1
        if span < 0:
            raise ValueError(f"streams[{d!r}] holds {s.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        starts = torch.linspace(0, span, per_domain).round().long()
        out[d] = s[starts[:, None] + torch.arange(seq_len + 1)]
    return out


@torch.no_grad()
def domain_losses(model, windows: Mapping[str, torch.Tensor], dropless: bool = True) -> dict[str, float]:
    """Mean next-token cross-entropy (nats) of ``model`` on each domain's windows
    ``{domain: [n, S + 1]}``, in eval mode (dropless by default: capacity effects apart)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = {}
    try:
        with routing_policy(model, drop_tokens=False if dropless else None):
            for d, w in windows.items():
                _check_windows(f"windows[{d!r}]", w)
                w = w.to(device)
                out[d] = float(model(w[:, :-1], w[:, 1:]).loss)
    finally:
        model.train(was_training)
    return out


def ablation_losses(model, windows: Mapping[str, torch.Tensor], mode: str = "reroute") -> torch.Tensor:
    """Loss change (nats per token) on each domain when each expert is removed.

    Returns ``[layers, E, domains]`` (domains in the order of ``windows``): entry
    ``[l, e, d]`` is loss(without expert e of layer l) - loss(full model) on domain d,
    both dropless, on the same windows (a paired difference).
    """
    base = domain_losses(model, windows)
    layers = _moe_layers(model)
    E = layers[0].num_experts
    out = torch.zeros(len(layers), E, len(windows), dtype=torch.float64)
    for li, layer in enumerate(layers):
        for e in range(E):
            with expert_ablation(layer, e, mode):
                ab = domain_losses(model, windows)
            out[li, e] = torch.tensor([ab[d] - base[d] for d in windows])
    return out


# ----------------------------------------------------------------------------- Hugging Face models


def hf_router_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Router logits of a Hugging Face MoE model (Mixtral, OLMoE, Qwen-MoE, Granite-MoE...).

    Calls ``model(input_ids, output_router_logits=True)`` without gradients and returns
    the ``router_logits`` as a list of float32 ``[batch*seq, E]`` tensors, one per MoE
    layer (padding tokens removed when ``attention_mask`` is given), ready for
    ``top_choices``, ``routing_shares`` and the monitor.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise TypeError("input_ids must be a [batch, seq] integer tensor")
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_router_logits=True)
    logits = getattr(out, "router_logits", None)
    if not logits:
        raise ValueError(f"{type(model).__name__} returned no router_logits: is it a Mixture-of-Experts model?")
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool().cpu()
    result = []
    for t in logits:
        t = t.detach().float().cpu().reshape(-1, t.shape[-1])
        result.append(t if keep is None else t[keep])
    return result


def load_local_hf_moe(path: str, dtype: torch.dtype = torch.bfloat16):
    """A Hugging Face causal LM and its tokenizer from a *local* folder (never downloads:
    ``local_files_only=True``). Needs ``pip install transformers``."""
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_local_hf_moe needs the transformers package: pip install transformers") from err
    load_model = transformers.AutoModelForCausalLM.from_pretrained
    load_tok = transformers.AutoTokenizer.from_pretrained
    try:
        model = load_model(path, dtype=dtype, local_files_only=True)  # transformers >= 4.56
    except TypeError:  # pragma: no cover - older releases call it torch_dtype
        model = load_model(path, torch_dtype=dtype, local_files_only=True)
    return model.eval(), load_tok(path, local_files_only=True)
