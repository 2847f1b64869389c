"""Routing as an attack surface: crafting inputs for chosen experts, capacity overflow,
routing steering, and a toy information leak through dropped tokens.

Threat model (Hayes et al. 2024, "Buffer Overflow in Mixture of Experts", arXiv
2402.05526): several users' sequences share one routing group, capacity limits each
expert's buffer, and priority is position order. An attacker who knows the model and
whose sequences sit earlier in the group can fill the buffers of the experts a victim
needs; the victim's tokens are then dropped and its output changes although its input
did not.

* ``repeated_byte_routing(model, layer)``: share of tokens each expert gets when one byte
  is repeated over a whole window: ``[candidates, E]`` (a cheap first scan)
* ``craft_expert_string(model, layer, expert, length)``: greedy byte search for a string
  whose tokens route to ``expert`` (optionally after a fixed ``prefix``: steering)
* ``routed_fraction(model, seqs, layer, expert)``: share of each sequence's tokens whose
  first choice is ``expert``
* ``craft_flood(model, targets, ...)``: attacker sequences that fill the given experts'
  buffers in a routing group of known size
* ``run_group(model, seqs, **policy)`` and ``output_change(reference, logits, targets)``:
  run sequences as one routing group; KL divergence, top-1 changes and loss change of
  one sequence's next-token distributions against a reference
* ``ToyCapacityMoE`` and ``steal_secret``: the information leak of section 2.3 (one MoE
  layer with capacity, a small secret vocabulary, an attacker who sees only its own
  outputs), after the idea of Yona et al. 2024 ("Stealing User Prompts from Mixture of
  Experts", arXiv 2410.22884)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_positive_float, check_positive_int
from .analysis import _moe_layers, routing_policy
from .capacity import expert_capacity

__all__ = [
    "PRINTABLE",
    "repeated_byte_routing",
    "craft_expert_string",
    "routed_fraction",
    "craft_flood",
    "run_group",
    "output_change",
    "ToyCapacityMoE",
    "LeakResult",
    "steal_secret",
]

PRINTABLE = torch.arange(32, 127)  # the bytes of printable ASCII: what an attacker can type


def _check_layer_expert(model, layer: int, expert: int) -> None:
    layers = _moe_layers(model)
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
        raise ValueError(f"layer must be an int in [0, {len(layers) - 1}], got {layer!r}")
    E = layers[layer].num_experts
    if isinstance(expert, bool) or not isinstance(expert, int) or not 0 <= expert < E:
        raise ValueError(f"expert must be an int in [0, {E - 1}], got {expert!r}")


@torch.no_grad()
def _router_probs(model, seqs: torch.Tensor, layer: int) -> torch.Tensor:
    """Router probabilities of MoE layer ``layer`` for ``seqs: [B, S]``: [B, S, E] (eval, dropless)."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with routing_policy(model, drop_tokens=False):
            out = model(seqs.to(device))
    finally:
        model.train(was)
    r = [r for r in out.routings if r is not None][layer]
    return r.probs.float().cpu().view(seqs.shape[0], seqs.shape[1], -1)


def repeated_byte_routing(model, layer: int, candidates: torch.Tensor = PRINTABLE, length: int | None = None):
    """Share of a window's tokens that pick each expert first when the window is one byte
    repeated ``length`` times (default: the model's ``seq_len``): ``[len(candidates), E]``."""
    _check_layer_expert(model, layer, 0)
    length = model.config.seq_len if length is None else check_positive_int("length", length)
    seqs = candidates.long()[:, None].expand(-1, length).contiguous()
    first = _router_probs(model, seqs, layer).argmax(-1)  # [n, length]
    E = _moe_layers(model)[layer].num_experts
    return F.one_hot(first, E).double().mean(1)


@torch.no_grad()
def craft_expert_string(
    model,
    layer: int,
    expert,
    length: int,
    prefix: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    num_candidates: int = 16,
) -> torch.Tensor:
    """Greedy byte search: ``length`` bytes whose tokens route to ``expert`` at ``layer``.

    Position by position, try every candidate byte and keep the one with the highest
    router probability for ``expert`` at that position (ties: the smaller byte). With
    causal attention a later byte cannot change an earlier token's routing, so each
    choice is final; but an early choice shapes the context of every later token, so the
    result is compared with each candidate byte simply repeated, and whichever sends
    more tokens to the expert is returned. ``prefix`` (ids) is kept in front (steering a
    user's prompt);
    ``candidates`` default to the ``num_candidates`` printable bytes that route to the
    expert most often when repeated. Returns the crafted ids ``[length]`` (prefix not
    included); prefix + crafted must fit in the model's ``seq_len``.

    ``expert`` may be a list of experts: the searches then run side by side (one forward
    pass per position for all of them) and the result is ``[len(expert), length]``.
    """
    many = isinstance(expert, (list, tuple))
    experts = [int(e) if not isinstance(e, bool) else e for e in (expert if many else [expert])]
    if not experts:
        raise ValueError("expert must be an int or a non-empty list of ints")
    for e in experts:
        _check_layer_expert(model, layer, e)
    check_positive_int("length", length)
    prefix = torch.zeros(0, dtype=torch.long) if prefix is None else prefix.reshape(-1).long().cpu()
    if prefix.numel() + length > model.config.seq_len:
        raise ValueError(f"prefix ({prefix.numel()}) + length ({length}) must fit in seq_len={model.config.seq_len}")
    if candidates is None:
        check_positive_int("num_candidates", num_candidates)
        scan = repeated_byte_routing(model, layer)
        cands = [PRINTABLE[torch.argsort(-scan[:, e], stable=True)[:num_candidates]].sort().values for e in experts]
    else:
        c = candidates.reshape(-1).long().cpu()
        if c.numel() == 0 or int(c.min()) < 0 or int(c.max()) >= model.config.vocab_size:
            raise ValueError(f"candidates must be non-empty token ids in [0, {model.config.vocab_size - 1}]")
        cands = [c] * len(experts)
    n = cands[0].numel()
    if any(c.numel() != n for c in cands):  # pragma: no cover - equal by construction
        raise ValueError("every expert needs the same number of candidates")
    cand = torch.stack(cands)  # [X, n]
    target = torch.tensor(experts)
    seqs = prefix.expand(len(experts), -1).clone()  # [X, t]
    for _ in range(length):
        trial = torch.cat([seqs.repeat_interleave(n, 0), cand.reshape(-1, 1)], dim=1)  # [X*n, t+1]
        p = _router_probs(model, trial, layer)[:, -1, :]  # [X*n, E]
        p = p.view(len(experts), n, -1).gather(2, target.view(-1, 1, 1).expand(-1, n, 1))[..., 0]
        best = p.argmax(1)  # first maximum: the smaller byte on a tie
        seqs = torch.cat([seqs, cand.gather(1, best[:, None])], dim=1)
    # greedy is short-sighted (an early byte shapes every later token's context), so
    # compare with each candidate byte simply repeated and keep whichever routes more
    P = prefix.numel()
    repeated = torch.cat([prefix.expand(len(experts) * n, -1), cand.reshape(-1, 1).expand(-1, length)], 1)
    first = _router_probs(model, torch.cat([seqs, repeated]), layer)[:, P:].argmax(-1)  # [X + X*n, length]
    hits = (first == torch.cat([target, target.repeat_interleave(n)])[:, None]).sum(1)
    greedy_hits, rep_hits = hits[: len(experts)], hits[len(experts):].view(len(experts), n)
    rep_best, rep_idx = rep_hits.max(1)
    out = seqs[:, P:].clone()
    for x in range(len(experts)):
        if rep_best[x] > greedy_hits[x]:
            out[x] = cand[x, rep_idx[x]]
    return out if many else out[0]


def routed_fraction(model, seqs: torch.Tensor, layer: int, expert: int) -> torch.Tensor:
    """Share of each sequence's tokens whose first choice at ``layer`` is ``expert``: [B]."""
    _check_layer_expert(model, layer, expert)
    if seqs.dim() == 1:
        seqs = seqs[None]
    return (_router_probs(model, seqs, layer).argmax(-1) == expert).double().mean(1)


def craft_flood(
    model,
    targets: list[int],
    num_sequences: int,
    group_tokens: int,
    layer: int = 0,
    capacity_factor: float | None = None,
) -> torch.Tensor:
    """Attacker sequences that fill the buffers of ``targets`` (in that order) at ``layer``.

    In a routing group of ``group_tokens`` tokens the capacity is ``C = floor(CF * T / E)``
    (CF: ``capacity_factor``, default the model's evaluation capacity factor). For each
    target the attacker crafts one string (``craft_expert_string``) and repeats it until
    ``C`` of its tokens route there, then moves to the next target while sequences are
    left; a target that cannot be filled completely with the remaining sequences is
    skipped (a half-full buffer drops nothing). Leftover sequences repeat the last
    string. Returns ``[n, seq_len]`` ids with ``n <= num_sequences``.
    """
    check_positive_int("num_sequences", num_sequences)
    check_positive_int("group_tokens", group_tokens)
    S = model.config.seq_len
    E = _moe_layers(model)[layer].num_experts
    cf = model.config.eval_capacity_factor if capacity_factor is None else check_positive_float(
        "capacity_factor", capacity_factor)
    C = expert_capacity(group_tokens, E, cf)
    targets = [int(e) for e in targets]
    strings = craft_expert_string(model, layer, targets, S)  # [X, S]
    fractions = [float(routed_fraction(model, s, layer, e)[0]) for s, e in zip(strings, targets)]
    out: list[torch.Tensor] = []
    for s, f in zip(strings, fractions):
        per_seq = int(f * S + 0.5)
        if per_seq == 0:
            continue
        need = math.ceil(C / per_seq)
        if len(out) + need > num_sequences:
            continue
        out.extend([s] * need)
    if not out:
        raise ValueError(f"{num_sequences} sequences cannot fill any target expert's capacity C={C}")
    while len(out) < num_sequences:
        out.append(out[-1])
    return torch.stack(out)


@torch.no_grad()
def run_group(model, seqs: torch.Tensor, **policy):
    """Run ``seqs: [B, S]`` through ``model`` as *one* routing group (eval mode) under a
    routing policy (``analysis.routing_policy`` keywords: ``drop_tokens``,
    ``capacity_factor``, ``group_size``, ``priority``, ``generator``). Returns the
    ``LMOutput`` (logits on the CPU side of the caller's choosing: unchanged)."""
    if not isinstance(seqs, torch.Tensor) or seqs.dim() != 2:
        raise TypeError("seqs must be a [B, S] integer tensor")
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    try:
        with routing_policy(model, **policy):
            return model(seqs.to(device))
    finally:
        model.train(was)


def output_change(reference: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | None = None) -> dict:
    """How much one sequence's next-token distributions moved: ``reference, logits: [S, V]``.

    Returns plain floats: ``kl`` = mean over positions of KL(reference || logits) in nats,
    ``top1_changed`` = share of positions whose most likely next token changed, and with
    ``targets: [S]`` also ``loss`` (cross-entropy of ``logits``) and ``loss_change``
    (minus the reference's).
    """
    if reference.shape != logits.shape or reference.dim() != 2:
        raise ValueError(f"reference and logits must both be [S, V], got {tuple(reference.shape)} and "
                         f"{tuple(logits.shape)}")
    ref = reference.detach().double().log_softmax(-1)
    new = logits.detach().double().log_softmax(-1)
    out = {
        "kl": float((ref.exp() * (ref - new)).sum(-1).mean()),
        "top1_changed": float((ref.argmax(-1) != new.argmax(-1)).double().mean()),
    }
    if targets is not None:
        t = targets.reshape(-1).to(new.device)
        out["loss"] = float(F.nll_loss(new, t))
        out["loss_change"] = out["loss"] - float(F.nll_loss(ref, t))
    return out


# ----------------------------------------------------------------------------- toy leak


class ToyCapacityMoE(nn.Module):
    """One top-1 MoE layer with capacity, on token ids: the setting of the leak demo.

    ``vocab`` token embeddings of width ``d``, a router ``[E, d]``, E tiny experts.
    ``forward(ids [T]) -> (y [T, d], kept [T])`` routes the whole input as one group with
    capacity ``C`` and one of two priorities:

    * ``"position"``: the earliest tokens of an expert are kept (the course convention)
    * ``"score"``: the tokens with the highest router probability are kept, ties to the
      earlier token (batch-prioritised routing, Riquelme et al. 2021, V-MoE); expert-choice
      routing, the setting of Yona et al. 2024, also keeps the highest scores
    * ``randomize=True`` shuffles the priority among tokens of equal rank (all tokens for
      ``"position"``, equal scores for ``"score"``): the randomised-order defence
    * ``capacity=None``: dropless (the dropless defence)
    * ``per_user=True``: each user's tokens (``owners``) fill their own buffers of ``capacity``
      slots (batch isolation); otherwise all tokens of the group share them

    A dropped token's output is 0 (the residual is left to the caller).
    """

    PRIORITIES = ("position", "score")

    def __init__(self, vocab: int = 16, d: int = 8, num_experts: int = 4, capacity: int | None = 4,
                 priority: str = "score", randomize: bool = False, per_user: bool = False, seed: int = 0):
        super().__init__()
        self.vocab = check_positive_int("vocab", vocab)
        check_positive_int("d", d)
        self.num_experts = check_positive_int("num_experts", num_experts, minimum=2)
        self.capacity = None if capacity is None else check_positive_int("capacity", capacity)
        self.per_user = bool(per_user)
        if priority not in self.PRIORITIES:
            raise ValueError(f"priority must be one of {self.PRIORITIES}, got {priority!r}")
        self.priority, self.randomize = priority, bool(randomize)
        g = torch.Generator().manual_seed(seed)  # fixed random weights (buffers: nothing is trained)
        self.register_buffer("emb", torch.randn(vocab, d, generator=g, dtype=torch.float64))
        self.register_buffer("router", torch.randn(num_experts, d, generator=g, dtype=torch.float64))
        self.register_buffer("w", torch.randn(num_experts, d, d, generator=g, dtype=torch.float64) / math.sqrt(d))
        # each vocabulary entry's top-1 expert and gate, computed once: two copies of a token
        # get bit-identical gates (a batched matmul may round identical rows differently)
        gate, expert = (self.emb @ self.router.T).softmax(-1).max(-1)
        self.register_buffer("expert_of", expert)
        self.register_buffer("gate_of", gate)
        self.generator = torch.Generator().manual_seed(seed + 1)

    def route(self, ids: torch.Tensor):
        """(expert [T], gate probability [T]) of each token: top-1 of the router softmax,
        looked up per vocabulary entry."""
        return self.expert_of[ids], self.gate_of[ids]

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, owners: torch.Tensor | None = None):
        """ids: [T] token ids of one routing group; owners: [T] user of each token (only
        ``per_user=True`` reads it). Returns ``(y [T, d], kept [T] bool)``."""
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
            raise TypeError("ids must be a 1-D integer tensor of token ids")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab):
            raise ValueError(f"ids must be in [0, {self.vocab - 1}]")
        T = ids.numel()
        if owners is None:
            owners = torch.zeros(T, dtype=torch.long)
        if owners.shape != ids.shape:
            raise ValueError(f"owners must have the shape of ids {tuple(ids.shape)}, got {tuple(owners.shape)}")
        e, gate = self.route(ids)
        el, gl, ol = e.tolist(), gate.tolist(), owners.tolist()
        tiebreak = torch.randperm(T, generator=self.generator).tolist() if self.randomize else list(range(T))
        if self.priority == "score":
            # highest gate first; equal gates (the same token) by tiebreak order
            order = sorted(range(T), key=lambda t: (-gl[t], tiebreak[t]))
        else:
            order = sorted(range(T), key=lambda t: tiebreak[t])
        keep = [False] * T
        used: dict = {}
        for t in order:
            slot = (ol[t] if self.per_user else 0, el[t])
            if self.capacity is None or used.get(slot, 0) < self.capacity:
                used[slot] = used.get(slot, 0) + 1
                keep[t] = True
        kept = torch.tensor(keep, dtype=torch.bool)
        x = self.emb[ids]
        y = torch.tanh(torch.einsum("td,tdf->tf", x, self.w[e])) * gate[:, None]  # [T, d]
        return y * kept[:, None], kept


@dataclass
class LeakResult:
    """guess: the recovered secret (None if none was found); queries: groups the attacker
    had processed; correct: guess == secret."""

    guess: int | None
    queries: int
    correct: bool


def _attacker_sees_drop(layer: ToyCapacityMoE, victim: int, probe: int, victim_first: bool = True) -> bool:
    """One query: a group holding the victim's token and ``capacity`` copies of ``probe``.
    The attacker sees only its own outputs: did any copy of ``probe`` come back as 0?"""
    n = layer.capacity if layer.capacity is not None else 1
    copies = torch.full((n,), probe, dtype=torch.long)
    v = torch.tensor([victim])
    ids = torch.cat([v, copies]) if victim_first else torch.cat([copies, v])
    owners = torch.cat([torch.zeros(1), torch.ones(n)]) if victim_first else torch.cat([torch.ones(n), torch.zeros(1)])
    y, _ = layer(ids, owners.long())
    mine = y[1:] if victim_first else y[:-1]
    return bool((mine == 0).all(-1).any())  # an all-zero output: that copy was dropped


def steal_secret(layer: ToyCapacityMoE, victim: int, candidates: list[int] | None = None,
                 repeats: int = 1) -> LeakResult:
    """Recover the victim's token from drop/no-drop of the attacker's own tokens.

    The attacker knows the layer (white box) and, per query, sends ``capacity`` copies of
    one probe token into the victim's routing group. If the victim's token takes a slot
    of the probe's expert first, one copy is dropped.

    * ``"score"`` priority: a copy is dropped iff the victim routes to the probe's expert
      with a gate >= the probe's (ties go to the earlier victim). For each expert the
      attacker probes its lowest-gate candidate (is the victim on this expert?), then
      binary-searches the candidates sorted by gate: about E + log2(V / E) queries.
    * ``"position"`` priority: a copy is dropped iff the victim routes to the probe's
      expert; that reveals the expert only, and the attacker guesses the first candidate
      routed there (exact when the expert holds one candidate).

    ``repeats``: send each probe this many times and count a drop if any repeat saw one
    (against a randomised priority order, where one probe can miss).
    """
    check_positive_int("repeats", repeats)
    V = layer.vocab
    cands = list(range(V)) if candidates is None else [int(c) for c in candidates]
    if not cands or any(not 0 <= c < V for c in cands):
        raise ValueError(f"candidates must be a non-empty list of token ids in [0, {V - 1}]")
    if not 0 <= int(victim) < V:
        raise ValueError(f"victim must be a token id in [0, {V - 1}], got {victim}")
    with torch.no_grad():
        e, gate = layer.route(torch.tensor(cands))
    by_expert: dict[int, list[int]] = {}
    for c, ex, _ in sorted(zip(cands, e.tolist(), gate.tolist()), key=lambda z: (z[1], z[2], z[0])):
        by_expert.setdefault(ex, []).append(c)  # each list ascending in gate
    queries = 0

    def probe(token: int) -> bool:
        nonlocal queries
        seen = False
        for _ in range(repeats):
            queries += 1
            seen = _attacker_sees_drop(layer, victim, token) or seen
        return seen

    for group in by_expert.values():
        if not probe(group[0]):
            continue  # the victim is not on this expert (or below its lowest gate)
        if layer.priority == "position":
            return LeakResult(group[0], queries, group[0] == victim)
        # largest index i with a drop: the victim's gate >= gate(group[i]); search on (lo, hi]
        lo, hi = 0, len(group) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if probe(group[mid]):
                lo = mid
            else:
                hi = mid - 1
        return LeakResult(group[lo], queries, group[lo] == victim)
    return LeakResult(None, queries, False)
