"""ex01_router_topk: router logits, the softmax, top-k routing, the Switch gate."""

from __future__ import annotations

import torch

from ..runner import compare
from ..spec import Case, Exercise, Question, Rand, WrongAnswer, probs, randn
from ._vectors import TEST_TOP1, test_logits, test_probs

NAME = "ex01_router_topk"
BF16 = torch.bfloat16
F64 = torch.float64


# -- references: written here, independent of the rest of moe_utils ---------------------


def ref_router_logits(x, w_gate):
    return x.to(torch.float32) @ w_gate.to(torch.float32)


def ref_router_probs(logits):
    h = logits.to(torch.float32)
    h = h - h.max(dim=-1, keepdim=True).values
    e = h.exp()
    return e / e.sum(dim=-1, keepdim=True)


def ref_top_k_routing(probs, k):
    vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)  # ties: lower expert id first
    vals, idx = vals[:, :k], idx[:, :k]
    return idx.to(torch.int64), vals / vals.sum(dim=-1, keepdim=True)


def ref_switch_gate(probs):
    idx = probs.argmax(dim=-1)
    return idx.to(torch.int64), probs.gather(1, idx[:, None])[:, 0]


# -- tie-aware comparisons: any of the tied experts is a right answer ---------------------


def _same_choice_values(probs, got_idx, exp_idx) -> bool:
    """True when ``got_idx`` picks, row by row and rank by rank, experts with exactly
    the probabilities the expected experts have (so they differ only among ties)."""
    if not isinstance(got_idx, torch.Tensor) or got_idx.shape != exp_idx.shape or got_idx.dtype != exp_idx.dtype:
        return False
    E = probs.shape[-1]
    if bool(((got_idx < 0) | (got_idx >= E)).any()):
        return False
    if got_idx.dim() == 2 and got_idx.shape[1] > 1:
        s = got_idx.sort(dim=-1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):  # an expert chosen twice
            return False
    g = got_idx if got_idx.dim() == 2 else got_idx[:, None]
    e = exp_idx if exp_idx.dim() == 2 else exp_idx[:, None]
    return bool(torch.equal(probs.gather(1, g), probs.gather(1, e)))


def _tie_aware(got, expected, case, label="output"):
    probs = case.args[0]
    if not isinstance(got, (tuple, list)) or len(got) != 2:
        return compare(got, expected, case, label)
    miss = compare(got[0], expected[0], case, f"{label}[0]")
    if miss is not None and miss.kind == "values" and _same_choice_values(probs, got[0], expected[0]):
        miss = None
    return miss or compare(got[1], expected[1], case, f"{label}[1]")


# -- cases -----------------------------------------------------------------------------------

_BF16_HINT = "selective precision: cast x and w_gate to float32 BEFORE the matmul; a bf16 matmul loses ~3 digits"


def cases_router_logits(h: Rand) -> list[Case]:
    x = test_logits()
    eye = torch.eye(3, dtype=F64)
    return [
        Case("test vector: x = the conventions page's logits, w_gate = identity", (x, eye), expected=x.float()),
        Case("random float32, T=7 d=5 E=4", (randn(1, 7, 5), randn(2, 5, 4))),
        Case("bfloat16 inputs, T=16 d=32 E=8", (randn(3, 16, 32, dtype=BF16), randn(4, 32, 8, dtype=BF16)),
             hint=_BF16_HINT),
        Case("random float64, T=9 d=6 E=5", (h.randn(9, 6, dtype=F64), h.randn(6, 5, dtype=F64)), public=False),
        Case("bfloat16 inputs, T=33 d=64 E=16", (h.randn(33, 64, dtype=BF16), h.randn(64, 16, dtype=BF16)),
             public=False, hint=_BF16_HINT),
        Case("one token, T=1 d=3 E=2", (h.randn(1, 3), h.randn(3, 2)), public=False),
    ]


def cases_router_probs(h: Rand) -> list[Case]:
    row0 = torch.tensor([0.6652409557748219, 0.24472847105479764, 0.09003057317038046])
    return [
        Case("test vector (docs/conventions.md logits)", (test_logits(),)),
        Case("random float32, T=8 E=4", (randn(11, 8, 4, scale=3.0),)),
        Case("large logits (need the max-subtraction trick), T=3 E=4", (randn(12, 3, 4, scale=200.0),)),
        Case("test vector row 0 only", (test_logits()[:1],), expected=row0[None, :]),
        Case("bfloat16 logits, T=5 E=8", (h.randn(5, 8, dtype=BF16),), public=False),
        Case("random float64, T=10 E=6", (h.randn(10, 6, dtype=F64),), public=False),
        Case("large float32 logits, T=6 E=5", (h.randn(6, 5, scale=300.0),), public=False),
        Case("one expert, T=4 E=1", (h.randn(4, 1),), public=False),
        Case("more experts than tokens, T=2 E=7", (h.randn(2, 7),), public=False),
    ]


def _tied_probs(h: Rand, T: int, E: int) -> torch.Tensor:
    """Random router probabilities in which expert E-1 always ties with expert 1."""
    p = h.probs(T, E)
    p[:, E - 1] = p[:, 1]
    return p / p.sum(dim=-1, keepdim=True)


TIES = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.125, 0.375, 0.375, 0.125]])
TOP1_TIES = torch.tensor([[0.375, 0.375, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25]])


def cases_top_k_routing(h: Rand) -> list[Case]:
    p = test_probs()
    return [
        Case("test vector rows 0 and 3 (docs/conventions.md), k=2", (p[[0, 3]], 2), expected=(
            torch.tensor([[0, 1], [0, 1]]),
            torch.tensor([[0.7310586, 0.2689414], [0.9478464, 0.0521536]], dtype=F64),
        ), atol=1e-6),
        Case("test vector, k=2", (p, 2)),
        Case("random float32, T=8 E=6 k=2", (probs(21, 8, 6), 2)),
        Case("ties at the k-th place (either tied expert is right), k=2", (TIES.clone(), 2),
             hint="with ties, more than k probabilities may equal the k-th largest: select exactly k per row "
                  "(topk does), and renormalise over those k only"),
        Case("random float32, T=5 E=8 k=3", (h.probs(5, 8), 3), public=False),
        Case("k = E (all experts), T=4 E=4", (h.probs(4, 4), 4), public=False),
        Case("k = 1 (renormalised weight is 1), T=6 E=5", (h.probs(6, 5), 1), public=False),
        Case("random float64, T=12 E=16 k=4", (h.probs(12, 16, dtype=F64), 4), public=False),
        Case("random ties, T=9 E=6 k=2", (_tied_probs(h, 9, 6), 2), public=False),
    ]


def cases_switch_gate(h: Rand) -> list[Case]:
    p = test_probs()
    return [
        Case("test vector (docs/conventions.md top-1 experts)", (p,), expected=(torch.tensor(TEST_TOP1), p.max(dim=-1).values)),
        Case("random float32, T=9 E=4", (probs(31, 9, 4),)),
        Case("ties for the top-1 place (either tied expert is right)", (TOP1_TIES.clone(),)),
        Case("random float64, T=16 E=8", (h.probs(16, 8, dtype=F64),), public=False),
        Case("one token, T=1 E=3", (h.probs(1, 3),), public=False),
        Case("random ties, T=7 E=5", (_tied_probs(h, 7, 5),), public=False),
    ]


EXERCISE = Exercise(
    name=NAME,
    title="Router logits, softmax, top-k and the Switch gate",
    lecture="02_router",
    questions=[
        Question(
            NAME, "router_logits", 1, "router_logits(x, w_gate) -> logits [T, E] float32",
            ref_router_logits, cases_router_logits,
            "logits = x @ w_gate computed in float32 (cast both to float32 first), shape [T, E]",
            hints={
                "dtype": "the logits are float32 whatever the input dtype: cast x and w_gate with .float() "
                         "before the matmul",
                "shape": "the logits have shape [T, E]: x is [T, d] and w_gate is [d, E], so x @ w_gate (no transpose)",
            },
            wrong_answers=(
                WrongAnswer("the matmul runs in bfloat16 and only the result is cast",
                            lambda x, w_gate: (x @ w_gate).float(), _BF16_HINT),
            ),
        ),
        Question(
            NAME, "router_probs", 2, "router_probs(logits) -> probs [T, E] float32",
            ref_router_probs, cases_router_probs,
            "softmax over the EXPERT axis (the last one): every row must sum to 1; return float32",
            hints={
                "nan": "exp overflows for large logits: subtract each row's maximum before exp "
                       "(torch.softmax does this for you)",
                "dtype": "return float32: cast the logits with .float() first",
                "shape": "the probabilities have the shape of the logits, [T, E]",
            },
            wrong_answers=(
                WrongAnswer("a softmax over the token axis (each column sums to 1)",
                            lambda logits: torch.softmax(logits.float(), dim=0),
                            "the softmax runs over the experts, the last axis (dim=-1): each row sums to 1"),
            ),
        ),
        Question(
            NAME, "top_k_routing", 3, "top_k_routing(probs, k) -> (indices [T, k] int64, weights [T, k])",
            ref_top_k_routing, cases_top_k_routing,
            "take the k largest probabilities per row (best first), then divide them by their sum so each "
            "row sums to 1",
            ("indices", "weights"),
            hints={
                "shape": "indices and weights both have shape [T, k]: k choices per token (top-k along the expert axis, dim=-1)",
                "dtype": "indices are int64 (what topk returns); weights keep the dtype of probs",
            },
            wrong_answers=(
                WrongAnswer("the weights are the raw top-k probabilities, not renormalised",
                            lambda probs, k: tuple(reversed(probs.topk(k, dim=-1))),
                            "divide the k probabilities by their sum, so that each row of weights sums to 1"),
                WrongAnswer("the weights are a softmax of the top-k probabilities",
                            lambda probs, k: (probs.topk(k, dim=-1)[1], torch.softmax(probs.topk(k, dim=-1)[0], -1)),
                            "renormalise by dividing by the sum of the k probabilities, not with a second softmax"),
            ),
            check=_tie_aware,
        ),
        Question(
            NAME, "switch_gate", 2, "switch_gate(probs) -> (index [T] int64, gate [T])",
            ref_switch_gate, cases_switch_gate,
            "gate = the top-1 probability itself, NOT renormalised (renormalising makes it 1 and the router "
            "gets no gradient)",
            ("index", "gate"),
            hints={
                "shape": "index and gate both have shape [T]: one expert and one gate per token",
                "dtype": "index is int64 and gate has the dtype of probs: return (index, gate) in that order",
            },
            wrong_answers=(
                WrongAnswer("the gate is renormalised (always 1)",
                            lambda probs: (probs.argmax(-1), torch.ones(probs.shape[0], dtype=probs.dtype)),
                            "the Switch gate is the top-1 probability itself: dividing it by itself gives 1 "
                            "and the router gets no gradient"),
            ),
            check=_tie_aware,
        ),
    ],
)

__all__ = ["EXERCISE", "ref_router_logits", "ref_router_probs", "ref_top_k_routing", "ref_switch_gate"]
