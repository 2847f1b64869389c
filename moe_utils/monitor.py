"""Routing statistics: how evenly a router spreads tokens, and how sure it is.

* ``expert_load(routing)``: assignments per expert, before capacity dropping [E]
* ``max_violation(load)``: MaxVio = ``(max_i load_i - mean load) / mean load``
  (defined by Wang et al. 2024, eq. 4, and used by DeepSeek-V3; 0 is perfect balance,
  ``E - 1`` is total collapse)
* ``dead_experts(load, threshold)``: experts whose share of assignments is below
  ``threshold / E`` (default: under a tenth of a fair share)
* ``router_entropy(probs)``: mean over tokens of ``-sum_e p log p`` in nats
  (``ln E`` for a uniform router, 0 for a one-hot router)
* ``routing_stats(routing)``: all of the above plus the dropped fraction, as plain
  Python numbers (what the training loop logs each step)

The routing monitor of notebook 08 (the roles the course's source material calls an
"expert activation analyzer" and a "routing anomaly detector"):

* ``RoutingTrace``: what the routers did for one batch of ``B`` sequences of ``S``
  tokens, per MoE layer (choices, and when known the probabilities and what capacity
  kept); built from a ``TinyLM`` output (``from_routings``) or from Hugging Face router
  logits (``from_router_logits``)
* ``batch_features(trace)`` / ``sequence_features(trace)``: the expert activation
  profile of a batch / of each sequence, as named numbers
* ``RoutingAnomalyDetector``: fitted on benign traces; ``check(trace)`` and
  ``check_sequences(trace)`` return a ``Verdict`` (anomalous?, score, threshold, reasons)
* ``roc_curve(benign_scores, attack_scores)`` and ``roc_auc(...)``: how well a score
  separates held-out benign from attacked traffic
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ._checks import check_float_tensor, check_index_tensor, check_positive_float, check_positive_int
from .routers import Routing

__all__ = [
    "expert_load",
    "max_violation",
    "dead_experts",
    "router_entropy",
    "routing_stats",
    "RoutingTrace",
    "batch_features",
    "sequence_features",
    "Verdict",
    "RoutingAnomalyDetector",
    "roc_curve",
    "roc_auc",
]


def _check_routing(routing) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a moe_utils.Routing, got {type(routing).__name__}")


def expert_load(routing: Routing) -> torch.Tensor:
    """Assignments per expert before capacity dropping: [E] int64 (``routing.tokens_per_expert()``)."""
    _check_routing(routing)
    return routing.tokens_per_expert()


def _as_load(load) -> torch.Tensor:
    load = torch.as_tensor(load)
    if load.dim() != 1 or load.numel() == 0:
        raise ValueError(f"load must be a non-empty 1-D tensor of per-expert counts, got shape {tuple(load.shape)}")
    if load.is_complex() or load.dtype == torch.bool:
        raise TypeError(f"load must hold real counts, got dtype {load.dtype}")
    return load.double()


def max_violation(load) -> float:
    """MaxVio ``(max load - mean load) / mean load``; 0.0 when nothing was routed."""
    load = _as_load(load)
    mean = float(load.mean())
    return 0.0 if mean == 0 else (float(load.max()) - mean) / mean


def dead_experts(load, threshold: float = 0.1) -> int:
    """Number of experts that received less than ``threshold`` of a fair share (``threshold / E``)."""
    load = _as_load(load)
    threshold = check_positive_float("threshold", threshold, allow_zero=True)
    total = float(load.sum())
    if total == 0:
        return int(load.numel())
    share = load / total
    return int((share < threshold / load.numel()).sum())


def router_entropy(probs: torch.Tensor) -> float:
    """Mean per-token entropy (nats) of router probabilities ``probs: [T, E]``."""
    check_float_tensor("probs", probs, ndim=2)
    if probs.shape[0] == 0:
        return 0.0
    p = probs.detach().double()
    return float(-(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean())


def routing_stats(routing: Routing) -> dict:
    """Per-layer statistics as plain numbers.

    Returns ``{"tokens_per_expert": [E ints], "dropped_fraction", "max_violation",
    "dead_experts", "router_entropy" (None without probs), "max_entropy"}``.
    """
    _check_routing(routing)
    load = routing.tokens_per_expert()
    ent = router_entropy(routing.probs) if routing.probs is not None else None
    return {
        "tokens_per_expert": load.tolist(),
        "dropped_fraction": routing.dropped_fraction(),
        "max_violation": max_violation(load),
        "dead_experts": dead_experts(load),
        "router_entropy": ent,
        "max_entropy": math.log(routing.num_experts),
    }


# ----------------------------------------------------------------------------- the routing monitor


@dataclass
class RoutingTrace:
    """What the routers did for one batch of ``B`` sequences of ``S`` tokens.

    indices: per MoE layer, ``[B, S, k]`` int64 expert ids, best first
    num_experts: E (the same in every layer)
    probs:   per layer ``[B, S, E]`` router probabilities, or None
    kept:    per layer ``[B, S, k]`` bool, False where capacity dropped the assignment, or None
    """

    indices: list
    num_experts: int
    probs: list | None = None
    kept: list | None = None

    def __post_init__(self) -> None:
        check_positive_int("num_experts", self.num_experts)
        if isinstance(self.indices, torch.Tensor) or not isinstance(self.indices, Sequence) or not self.indices:
            raise TypeError("indices must be a non-empty list of [B, S, k] tensors, one per MoE layer")
        shape = None
        for i, t in enumerate(self.indices):
            check_index_tensor(f"indices[{i}]", t, ndim=3, upper=self.num_experts)
            if t.shape[0] == 0 or t.shape[1] == 0:
                raise ValueError(f"empty batch: indices[{i}] has shape {tuple(t.shape)}; a trace needs at least "
                                 "one sequence of at least one token")
            if shape is None:
                shape = t.shape[:2]
            elif t.shape[:2] != shape:
                raise ValueError(f"every layer must cover the same [B, S] tokens: layer 0 has {tuple(shape)}, "
                                 f"layer {i} has {tuple(t.shape[:2])}")
        L = len(self.indices)
        for name in ("probs", "kept"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, Sequence) or len(v) != L:
                raise ValueError(f"{name} must be None or a list of {L} tensors, one per layer")
            for i, t in enumerate(v):
                want = (*shape, self.num_experts) if name == "probs" else tuple(self.indices[i].shape)
                if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(want):
                    got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                    raise ValueError(f"{name}[{i}] must have shape {tuple(want)}, got {got}")
        self.indices = [t.detach().cpu() for t in self.indices]
        if self.probs is not None:
            self.probs = [t.detach().double().cpu() for t in self.probs]
        if self.kept is not None:
            self.kept = [t.detach().bool().cpu() for t in self.kept]

    @property
    def num_layers(self) -> int:
        return len(self.indices)

    @property
    def batch_size(self) -> int:
        return self.indices[0].shape[0]

    @property
    def seq_len(self) -> int:
        return self.indices[0].shape[1]

    @classmethod
    def from_routings(cls, routings: Sequence, batch_size: int) -> RoutingTrace:
        """From ``LMOutput.routings`` of a ``TinyLM`` on a ``[batch_size, S]`` batch (dense
        layers, None, are skipped)."""
        check_positive_int("batch_size", batch_size)
        rs = [r for r in routings if r is not None]
        if not rs:
            raise ValueError("routings holds no MoE layer")
        for r in rs:
            if not isinstance(r, Routing):
                raise TypeError(f"routings must hold moe_utils Routing records, got {type(r).__name__}")
            if r.num_tokens % batch_size:
                raise ValueError(f"{r.num_tokens} routed tokens do not split into batch_size={batch_size} sequences")
        B = batch_size
        S = rs[0].num_tokens // B
        probs = None if any(r.probs is None for r in rs) else [r.probs.reshape(B, S, -1) for r in rs]
        return cls([r.indices.reshape(B, S, -1) for r in rs], rs[0].num_experts, probs,
                   [r.kept.reshape(B, S, -1) for r in rs])

    @classmethod
    def from_router_logits(cls, logits: Sequence, batch_size: int, k: int) -> RoutingTrace:
        """From router logits ``[layers][B*S, E]`` (Hugging Face ``output_router_logits=True``):
        the top-k choices and softmax probabilities; no capacity information (dropless)."""
        check_positive_int("batch_size", batch_size)
        if isinstance(logits, torch.Tensor) or not isinstance(logits, Sequence) or not logits:
            raise TypeError("logits must be a non-empty list of [B*S, E] tensors, one per layer")
        idx, probs = [], []
        for i, t in enumerate(logits):
            check_float_tensor(f"logits[{i}]", t, ndim=2)
            if t.shape[0] == 0:
                raise ValueError(f"empty batch: logits[{i}] has no token")
            if t.shape[0] % batch_size:
                raise ValueError(f"logits[{i}] has {t.shape[0]} rows, not a multiple of batch_size={batch_size}")
            E = t.shape[1]
            if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= E:
                raise ValueError(f"k must be an int in [1, num_experts={E}], got {k!r}")
            B, S = batch_size, t.shape[0] // batch_size
            p = t.detach().double().softmax(-1)
            probs.append(p.reshape(B, S, E))
            idx.append(p.topk(k, dim=-1).indices.reshape(B, S, k))
        return cls(idx, logits[0].shape[1], probs)

    def select(self, rows) -> RoutingTrace:
        """The trace of some sequences of the batch (a list of row indices)."""
        rows = torch.as_tensor(rows, dtype=torch.long).reshape(-1)
        return RoutingTrace([t[rows] for t in self.indices], self.num_experts,
                            None if self.probs is None else [t[rows] for t in self.probs],
                            None if self.kept is None else [t[rows] for t in self.kept])


# feature name -> two-sided? (a value far *below* the benign range is suspicious too)
_TWO_SIDED = ("load share", "router entropy")


def _layer_features(trace: RoutingTrace, rows: slice | None = None) -> list[dict]:
    out = []
    E = trace.num_experts
    for li, idx in enumerate(trace.indices):
        first = idx[..., 0]  # [B, S]
        B, S = first.shape
        counts = torch.nn.functional.one_hot(first, E).double().sum(1)  # [B, E]
        per_seq_max = counts.max(-1).values / S  # [B]
        consecutive = (first[:, 1:] == first[:, :-1]).double().mean(-1) if S > 1 else torch.zeros(B, dtype=torch.float64)
        f = {"counts": counts, "per_seq_max": per_seq_max, "consecutive": consecutive}
        if trace.probs is not None:
            p = trace.probs[li]
            f["entropy"] = -(p * torch.log(p.clamp_min(1e-30))).sum(-1).mean(-1)  # [B]
        if trace.kept is not None:
            f["dropped"] = (~trace.kept[li]).double().mean((-1, -2))  # [B]
        out.append(f)
    return out


def batch_features(trace: RoutingTrace) -> dict[str, float]:
    """The expert activation profile of a whole batch, one number per named feature.

    Per layer ``l``: ``"L{l} load share e{i}"`` (share of first choices taken by expert i),
    ``"L{l} busiest expert share"``, ``"L{l} most concentrated sequence"`` (the largest
    share of one sequence's tokens on one expert), ``"L{l} consecutive same expert"``
    (mean over sequences), and when known ``"L{l} router entropy"`` (nats) and
    ``"L{l} dropped fraction"``.
    """
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    out: dict[str, float] = {}
    for li, f in enumerate(_layer_features(trace)):
        share = f["counts"].sum(0) / f["counts"].sum()
        for e in range(trace.num_experts):
            out[f"L{li} load share e{e}"] = float(share[e])
        out[f"L{li} busiest expert share"] = float(share.max())
        out[f"L{li} most concentrated sequence"] = float(f["per_seq_max"].max())
        out[f"L{li} consecutive same expert"] = float(f["consecutive"].mean())
        if "entropy" in f:
            out[f"L{li} router entropy"] = float(f["entropy"].mean())
        if "dropped" in f:
            out[f"L{li} dropped fraction"] = float(f["dropped"].mean())
    return out


def sequence_features(trace: RoutingTrace) -> list[dict[str, float]]:
    """The expert activation profile of each sequence of the batch: per layer ``l``,
    ``"L{l} busiest expert share"``, ``"L{l} consecutive same expert"``, and when known
    ``"L{l} router entropy"`` and ``"L{l} dropped fraction"``."""
    if not isinstance(trace, RoutingTrace):
        raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
    rows: list[dict[str, float]] = [{} for _ in range(trace.batch_size)]
    for li, f in enumerate(_layer_features(trace)):
        for b in range(trace.batch_size):
            rows[b][f"L{li} busiest expert share"] = float(f["per_seq_max"][b])
            rows[b][f"L{li} consecutive same expert"] = float(f["consecutive"][b])
            if "entropy" in f:
                rows[b][f"L{li} router entropy"] = float(f["entropy"][b])
            if "dropped" in f:
                rows[b][f"L{li} dropped fraction"] = float(f["dropped"][b])
    return rows


@dataclass
class Verdict:
    """anomalous: score > threshold; score: the largest standardised deviation from benign
    traffic over all features; reasons: one line per feature beyond the threshold, worst
    first (empty for a benign verdict); z: every feature's deviation."""

    anomalous: bool
    score: float
    threshold: float
    reasons: list[str] = field(default_factory=list)
    z: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        head = "ANOMALOUS" if self.anomalous else "benign"
        lines = [f"{head}: score {self.score:.1f} (threshold {self.threshold:.1f})"]
        lines += [f"  - {r}" for r in self.reasons[:5]]
        if len(self.reasons) > 5:
            lines.append(f"  ... and {len(self.reasons) - 5} more")
        return "\n".join(lines)


class _Profile:
    """Mean and spread of named features over benign samples, and the deviation score."""

    SD_FLOOR = 0.01  # every feature is a share (or nats): spreads below 1% are noise

    def __init__(self, rows: list[dict[str, float]]):
        self.names = list(rows[0])
        for r in rows:
            if list(r) != self.names:
                raise ValueError("every benign sample must have the same features (same layers, same fields)")
        x = torch.tensor([[r[n] for n in self.names] for r in rows], dtype=torch.float64)
        self.mean = x.mean(0)
        self.sd = (x.std(0, correction=1) if x.shape[0] > 1 else torch.zeros_like(self.mean)).clamp_min(self.SD_FLOOR)

    def z(self, row: dict[str, float]) -> dict[str, float]:
        if list(row) != self.names:
            missing = sorted(set(self.names) - set(row))
            extra = sorted(set(row) - set(self.names))
            raise ValueError(f"the trace's features differ from the fitted ones (missing {missing[:3]}, "
                             f"unexpected {extra[:3]}): score traces of the kind the detector was fitted on")
        out = {}
        for i, n in enumerate(self.names):
            z = (row[n] - float(self.mean[i])) / float(self.sd[i])
            out[n] = abs(z) if any(t in n for t in _TWO_SIDED) else z
        return out

    def describe(self, name: str, value: float) -> str:
        i = self.names.index(name)
        return f"{name} = {value:.3f} (benign {float(self.mean[i]):.3f} +- {float(self.sd[i]):.3f})"


class RoutingAnomalyDetector:
    """Flags batches (and sequences) whose expert activation profile is far from benign.

    ``fit(benign, calibration=None)`` learns each feature's mean and spread on benign
    traces and sets the threshold on the score so that a fraction ``fpr`` of the
    calibration traces (default: the benign ones; better: held-out benign traces) is
    flagged. The score of a trace is the largest one-sided standardised deviation
    ``(value - mean) / sd`` over the features (two-sided for load shares and entropy).
    ``check`` scores a batch, ``check_sequences`` each sequence of a batch.
    """

    def __init__(self, fpr: float = 0.01):
        fpr = check_positive_float("fpr", fpr)
        if not fpr < 1:
            raise ValueError(f"fpr must be in (0, 1), got {fpr}")
        self.fpr = fpr
        self.num_experts: int | None = None
        self.num_layers: int | None = None
        self.batch_size: int | None = None
        self._batch: _Profile | None = None
        self._seq: _Profile | None = None
        self.threshold: float | None = None
        self.sequence_threshold: float | None = None

    @property
    def fitted(self) -> bool:
        return self._batch is not None

    def _check_trace(self, trace) -> None:
        if not isinstance(trace, RoutingTrace):
            raise TypeError(f"trace must be a RoutingTrace, got {type(trace).__name__}")
        if not self.fitted:
            raise RuntimeError("this RoutingAnomalyDetector is not fitted yet: call fit(benign_traces) first")
        if trace.num_experts != self.num_experts:
            raise ValueError(f"the trace has num_experts={trace.num_experts}, but the detector was fitted on "
                             f"num_experts={self.num_experts}: fit one detector per model")
        if trace.num_layers != self.num_layers:
            raise ValueError(f"the trace has {trace.num_layers} MoE layers, but the detector was fitted on "
                             f"{self.num_layers}")

    @staticmethod
    def _threshold(scores: list[float], fpr: float) -> float:
        s = torch.tensor(scores, dtype=torch.float64)
        return float(torch.quantile(s, 1.0 - fpr, interpolation="higher"))

    def fit(self, benign: Sequence, calibration: Sequence | None = None) -> RoutingAnomalyDetector:
        """Learn the benign profile from ``benign`` traces (at least 2, all with the same
        number of experts, layers and sequences per batch); set both thresholds on
        ``calibration`` (default: ``benign``)."""
        if isinstance(benign, RoutingTrace) or not isinstance(benign, Sequence) or len(benign) < 2:
            raise ValueError("benign must be a list of at least 2 RoutingTrace batches of benign traffic")
        calibration = benign if calibration is None else calibration
        if isinstance(calibration, RoutingTrace) or not isinstance(calibration, Sequence) or not calibration:
            raise ValueError("calibration must be a non-empty list of RoutingTrace batches")
        for t in list(benign) + list(calibration):
            if not isinstance(t, RoutingTrace):
                raise TypeError(f"benign and calibration must hold RoutingTrace objects, got {type(t).__name__}")
        first = benign[0]
        for t in list(benign) + list(calibration):
            if (t.num_experts, t.num_layers, t.batch_size) != (first.num_experts, first.num_layers, first.batch_size):
                raise ValueError("every benign and calibration trace must have the same num_experts, number of "
                                 f"layers and batch size as the first ({first.num_experts}, {first.num_layers}, "
                                 f"{first.batch_size})")
        self.num_experts, self.num_layers, self.batch_size = first.num_experts, first.num_layers, first.batch_size
        self._batch = _Profile([batch_features(t) for t in benign])
        self._seq = _Profile([row for t in benign for row in sequence_features(t)])
        self.threshold = self._threshold([self.score(t) for t in calibration], self.fpr)
        seq_scores = [self._seq_score(row) for t in calibration for row in sequence_features(t)]
        self.sequence_threshold = self._threshold(seq_scores, self.fpr)
        return self

    def score(self, trace: RoutingTrace) -> float:
        """The batch's anomaly score (larger: further from benign)."""
        self._check_trace(trace)
        if trace.batch_size != self.batch_size:
            raise ValueError(f"the trace holds {trace.batch_size} sequences but the detector was fitted on batches "
                             f"of {self.batch_size} (batch features depend on it); use check_sequences, or fit on "
                             "batches of this size")
        return max(self._batch.z(batch_features(trace)).values())

    def _seq_score(self, row: dict[str, float]) -> float:
        return max(self._seq.z(row).values())

    def sequence_scores(self, trace: RoutingTrace) -> list[float]:
        """Each sequence's anomaly score."""
        self._check_trace(trace)
        return [self._seq_score(row) for row in sequence_features(trace)]

    def _verdict(self, profile: _Profile, row: dict[str, float], threshold: float) -> Verdict:
        z = profile.z(row)
        score = max(z.values())
        worst = sorted((n for n in z if z[n] > threshold), key=lambda n: -z[n])
        reasons = [f"{profile.describe(n, row[n])}, {z[n]:.1f} sd" for n in worst]
        return Verdict(score > threshold, score, threshold, reasons, z)

    def check(self, trace: RoutingTrace) -> Verdict:
        """Verdict on a whole batch, with the features beyond the threshold as reasons."""
        self.score(trace)  # all checks
        return self._verdict(self._batch, batch_features(trace), self.threshold)

    def check_sequences(self, trace: RoutingTrace) -> list[Verdict]:
        """One verdict per sequence of the batch (any batch size)."""
        self._check_trace(trace)
        return [self._verdict(self._seq, row, self.sequence_threshold) for row in sequence_features(trace)]


def _scores(name: str, v) -> torch.Tensor:
    t = torch.as_tensor(v, dtype=torch.float64).reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} must hold at least one score")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must hold finite scores")
    return t


def roc_curve(benign_scores, attack_scores) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ROC of a score where larger means "attack": ``(fpr, tpr, thresholds)``.

    At threshold ``t`` a sample is flagged when its score is > t; the thresholds are every
    distinct score plus one below all of them, in decreasing order, so the curve runs from
    (0, 0) to (1, 1).
    """
    b, a = _scores("benign_scores", benign_scores), _scores("attack_scores", attack_scores)
    allv = torch.cat([a, b]).unique().sort(descending=True).values
    th = torch.cat([allv, allv[-1:] - 1.0])
    fpr = torch.stack([(b > t).double().mean() for t in th])
    tpr = torch.stack([(a > t).double().mean() for t in th])
    return fpr, tpr, th


def roc_auc(benign_scores, attack_scores) -> float:
    """Area under the ROC curve: the probability that a random attack sample scores higher
    than a random benign one (ties count one half), the Mann-Whitney statistic."""
    b, a = _scores("benign_scores", benign_scores), _scores("attack_scores", attack_scores)
    greater = (a[:, None] > b[None, :]).double().sum()
    ties = (a[:, None] == b[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (a.numel() * b.numel()))
