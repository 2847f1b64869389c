"""ex09_beyond_topk: expert-choice selection, aux-loss-free bias routing and its update,
sparse upcycling (lecture 09, docs/conventions.md "Other routing schemes")."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, probs, randn

NAME = "ex09_beyond_topk"
F64 = torch.float64


# -- references, written from the definitions ---------------------------------------------------


def ref_expert_choice_capacity(num_tokens, num_experts, capacity_factor):
    if num_tokens == 0:
        return 0
    exact = Fraction(str(capacity_factor)) * num_tokens / num_experts
    return min(num_tokens, max(1, math.floor(exact)))


def ref_expert_choice_weights(probs, capacity_factor=2.0):
    T, E = probs.shape
    C = ref_expert_choice_capacity(T, E, capacity_factor)
    out = torch.zeros_like(probs)
    for e in range(E):  # expert e keeps its C best tokens: a sort over the token axis
        ranked = sorted(range(T), key=lambda t: (-float(probs[t, e]), t))
        for t in ranked[:C]:
            out[t, e] = probs[t, e]
    return out


def ref_bias_topk_routing(scores, bias, k):
    biased = scores + bias.to(scores.dtype)
    idx = biased.topk(k, dim=-1).indices
    g = scores.gather(-1, idx)
    return idx, g / g.sum(dim=-1, keepdim=True)


def ref_bias_update(bias, load, rate=1e-3):
    load = load.to(F64)
    return bias + (rate * torch.sign(load.mean() - load)).to(bias.dtype)


def ref_upcycle_experts(w1, w3, w2, num_experts):
    return tuple(torch.stack([w.clone() for _ in range(num_experts)]) for w in (w1, w3, w2))


# -- known mistakes, as code ------------------------------------------------------------------


def _ec_top_c_over_experts(probs, capacity_factor=2.0):
    # each *token* keeps its C best experts (token choice with k = C), C capped at E
    T, E = probs.shape
    C = min(E, ref_expert_choice_capacity(T, E, capacity_factor))
    idx = probs.topk(C, dim=1).indices
    return torch.zeros_like(probs).scatter(1, idx, probs.gather(1, idx))


def _ec_renormalised(probs, capacity_factor=2.0):
    w = ref_expert_choice_weights(probs, capacity_factor)
    s = w.sum(dim=1, keepdim=True)
    return torch.where(s > 0, w / s.clamp_min(1e-30), w)


def _ec_no_floor(probs, capacity_factor=2.0):
    T, E = probs.shape
    C = min(T, math.ceil(capacity_factor * T / E))
    out = torch.zeros_like(probs)
    top = probs.topk(C, dim=0).indices
    return out.scatter(0, top, probs.gather(0, top))


def _bias_in_gate(scores, bias, k):
    biased = scores + bias.to(scores.dtype)
    top, idx = biased.topk(k, dim=-1)
    return idx, top / top.sum(dim=-1, keepdim=True)


def _bias_not_renormalised(scores, bias, k):
    idx, _ = ref_bias_topk_routing(scores, bias, k)
    return idx, scores.gather(-1, idx)


def _bias_ignored(scores, bias, k):
    return ref_bias_topk_routing(scores, torch.zeros_like(bias), k)


def _update_wrong_sign(bias, load, rate=1e-3):
    load = load.to(F64)
    return bias + (rate * torch.sign(load - load.mean())).to(bias.dtype)


def _update_proportional(bias, load, rate=1e-3):
    load = load.to(F64)
    return bias + (rate * (load.mean() - load)).to(bias.dtype)


def _upcycle_fresh(w1, w3, w2, num_experts):
    # only expert 0 copies the dense FFN; the others are new random weights
    g = torch.Generator().manual_seed(0)
    out = []
    for w in (w1, w3, w2):
        stack = torch.randn((num_experts, *w.shape), generator=g, dtype=F64).to(w.dtype) * w.std()
        stack[0] = w
        out.append(stack)
    return tuple(out)


def _upcycle_wrong_axis(w1, w3, w2, num_experts):
    return tuple(torch.stack([w] * num_experts, dim=-1) for w in (w1, w3, w2))


# -- cases ------------------------------------------------------------------------------------


def cases_expert_choice_weights(h: Rand) -> list[Case]:
    eye_like = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.6, 0.1, 0.3], [0.2, 0.2, 0.6],
                             [0.3, 0.4, 0.3], [0.05, 0.05, 0.9]], dtype=F64)
    # by hand: T=6, E=3, c=1 -> C=2; expert 0 keeps tokens 2 (0.6), 0 (0.5); expert 1 keeps
    # 1 (0.8), 4 (0.4); expert 2 keeps 5 (0.9), 3 (0.6)
    by_hand = torch.zeros(6, 3, dtype=F64)
    for t, e in ((2, 0), (0, 0), (1, 1), (4, 1), (5, 2), (3, 2)):
        by_hand[t, e] = eye_like[t, e]
    skew = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8]], dtype=F64)
    return [
        Case("by hand: T=6, E=3, c=1 (C=2)", (eye_like,), {"capacity_factor": 1.0}, expected=by_hand),
        Case("random float32, T=16 E=4, default c=2 (C=8)", (probs(901, 16, 4),),
             hint="each expert (column) keeps its C highest-scoring tokens (rows): a top-C over the token axis"),
        Case("one token taken by two experts, one by none: T=3 E=3 c=1 (C=1)", (skew,), {"capacity_factor": 1.0}),
        Case("c * T / E = 2.5 rounds down: T=10 E=4 c=1 (C=2)", (probs(902, 10, 4),), {"capacity_factor": 1.0}),
        Case("random float64, T=10 E=8 c=2 (C=2)", (h.probs(10, 8, F64),), public=False),
        Case("C capped at T: T=3 E=2 c=2", (h.probs(3, 2),), {"capacity_factor": 2.0}, public=False),
        Case("C at least 1: T=4 E=16 c=1", (h.probs(4, 16),), {"capacity_factor": 1.0}, public=False),
        Case("c=1.25, T=24 E=8 (C=3)", (h.probs(24, 8),), {"capacity_factor": 1.25}, public=False),
    ]


def cases_bias_topk_routing(h: Rand) -> list[Case]:
    s = probs(911, 8, 4, F64)
    return [
        Case("zero bias: the renormalised top-2 of the scores", (s, torch.zeros(4, dtype=F64), 2)),
        Case("a bias that changes the choice, softmax scores, T=10 E=6 k=2",
             (probs(912, 10, 6), torch.tensor([0.3, -0.2, 0.0, 0.1, -0.4, 0.25]), 2)),
        Case("sigmoid scores (not summing to 1), T=6 E=5 k=3",
             (torch.sigmoid(randn(913, 6, 5)), randn(914, 5, scale=0.3), 3)),
        Case("large bias forces experts, float64, T=9 E=8 k=2",
             (h.probs(9, 8, F64), torch.tensor([0.0, 0, 0, 5.0, 0, 0, 5.0, 0], dtype=F64), 2), public=False),
        Case("k=1 (weight 1), T=7 E=4", (h.probs(7, 4), h.randn(4, scale=0.2), 1), public=False),
        Case("random bias, T=12 E=8 k=4", (torch.sigmoid(h.randn(12, 8)), h.randn(8, scale=0.5), 4), public=False),
    ]


def cases_bias_update(h: Rand) -> list[Case]:
    return [
        Case("by hand: load [5, 1, 3, 3], mean 3", (torch.zeros(4), torch.tensor([5, 1, 3, 3]), 0.001),
             expected=torch.tensor([-0.001, 0.001, 0.0, 0.0])),
        Case("from a non-zero bias, default rate", (torch.tensor([0.1, -0.2, 0.05]), torch.tensor([10, 2, 6]))),
        Case("float64 bias, rate 0.01, E=8", (h.randn(8, dtype=F64, scale=0.1), h.randint(50, 8), 0.01), public=False),
        Case("perfect balance leaves the bias alone", (h.randn(6, scale=0.1), torch.full((6,), 7), 0.001),
             public=False),
        Case("one expert takes everything, E=5", (torch.zeros(5), torch.tensor([0, 0, 40, 0, 0]), 0.001),
             public=False),
    ]


def cases_upcycle_experts(h: Rand) -> list[Case]:
    return [
        Case("d=4, f=6, E=3", (randn(921, 4, 6), randn(922, 4, 6), randn(923, 6, 4), 3)),
        Case("float64, d=8, f=16, E=8", (h.randn(8, 16, dtype=F64), h.randn(8, 16, dtype=F64),
                                        h.randn(16, 8, dtype=F64), 8), public=False),
        Case("one expert, d=3, f=5", (h.randn(3, 5), h.randn(3, 5), h.randn(5, 3), 1), public=False),
    ]


EXERCISE = Exercise(
    name=NAME,
    title="Expert choice, loss-free balancing and sparse upcycling",
    lecture="09_beyond_top_k",
    questions=[
        Question(
            NAME, "expert_choice_weights", 4, "expert_choice_weights(probs, capacity_factor=2.0) -> G [T, E]",
            ref_expert_choice_weights, cases_expert_choice_weights,
            "C = min(T, max(1, floor(c * T / E))); expert e keeps its C highest probs[:, e] (a top-C over the "
            "tokens, one column at a time); G[t, e] = probs[t, e] for a kept pair, 0 otherwise (not renormalised)",
            hints={"shape": "G has the shape of probs, [T, E]: one weight per (token, expert) pair, 0 where the expert "
                            "did not take the token"},
            wrong_answers=(
                WrongAnswer("top-C over the experts of each token instead of over the tokens of each expert",
                            _ec_top_c_over_experts,
                            "in expert choice the *experts* choose: take the top-C along the token axis (dim 0), "
                            "one column per expert; a top-k along dim 1 is token choice"),
                WrongAnswer("each token's weights renormalised to sum to 1", _ec_renormalised,
                            "expert choice combines with the raw scores probs[t, e]; a token may have 0, 1 or "
                            "several experts, and its weights are not renormalised"),
                WrongAnswer("capacity rounded up instead of down", _ec_no_floor,
                            "C = floor(c * T / E) (at least 1, at most T), not the ceiling"),
            ),
        ),
        Question(
            NAME, "bias_topk_routing", 3, "bias_topk_routing(scores, bias, k) -> (indices [T, k], weights [T, k])",
            ref_bias_topk_routing, cases_bias_topk_routing,
            "choose the top-k of scores + bias (best first); the weights are the *unbiased* scores of the chosen "
            "experts divided by their sum",
            outputs=("indices", "weights"),
            hints={"dtype": "indices are int64 (topk gives them); the weights have the dtype of scores"},
            wrong_answers=(
                WrongAnswer("bias in the weights too", _bias_in_gate,
                            "weights: unbiased scores (V3 2.1.2); the bias only picks experts"),
                WrongAnswer("the weights are not renormalised", _bias_not_renormalised,
                            "divide the k chosen scores by their sum so each token's weights add up to 1"),
                WrongAnswer("the bias is ignored in the selection", _bias_ignored,
                            "select with scores + bias: the bias is what balances the load"),
            ),
        ),
        Question(
            NAME, "bias_update", 1, "bias_update(bias, load, rate=1e-3) -> new bias [E]",
            ref_bias_update, cases_bias_update,
            "b_i + rate * sign(mean(load) - load_i): an overloaded expert loses rate, an underloaded one gains it, an "
            "expert exactly at the mean keeps its bias; return a new tensor of bias's dtype",
            hints={"dtype": "return the bias's dtype: load holds integer counts, so take the mean in floating point"},
            wrong_answers=(
                WrongAnswer("the sign is flipped", _update_wrong_sign,
                            "mean - load: an overloaded expert (load above the mean) must become *less* attractive"),
                WrongAnswer("the step is proportional to the error", _update_proportional,
                            "Wang et al. 2024 move every bias by the same step, rate * sign(error)"),
            ),
        ),
        Question(
            NAME, "upcycle_experts", 2, "upcycle_experts(w1, w3, w2, num_experts) -> (W1, W3, W2)",
            ref_upcycle_experts, cases_upcycle_experts,
            "stack num_experts copies of each dense matrix along a new first axis: W1 [E, d, f], W3 [E, d, f], "
            "W2 [E, f, d]",
            outputs=("W1", "W3", "W2"),
            hints={"shape": "the expert axis comes first: torch.stack([w] * E) or w.expand(E, ...).clone()"},
            own_memory=True,
            wrong_answers=(
                WrongAnswer("only the first expert is a copy; the others are freshly initialised", _upcycle_fresh,
                            "every expert starts as an exact copy of the dense FFN, so the upcycled layer computes "
                            "the dense function at step 0"),
                WrongAnswer("the copies are stacked on the last axis", _upcycle_wrong_axis,
                            "stack on a new first axis: W1[e] must be the dense w1"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "ref_expert_choice_weights", "ref_bias_topk_routing", "ref_bias_update", "ref_upcycle_experts"]
