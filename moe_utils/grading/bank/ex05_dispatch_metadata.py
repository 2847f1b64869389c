"""ex05_dispatch_metadata: sorting slots by expert, offsets, permute and un-permute."""

from __future__ import annotations

import torch

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, distinct_choices, probs, randn
from ._vectors import TEST_TOP1, test_logits, test_probs

NAME = "ex05_dispatch_metadata"
F64 = torch.float64


def ref_sort_slots_by_expert(indices):
    flat = indices.reshape(-1).tolist()
    order = sorted(range(len(flat)), key=lambda s: (flat[s], s))  # Python's sort is stable
    order_t = torch.tensor(order, dtype=torch.int64)
    return indices.reshape(-1)[order_t].to(torch.int64), order_t


def ref_expert_offsets(indices, num_experts):
    counts = torch.zeros(num_experts, dtype=torch.int64)
    for e in indices.reshape(-1).tolist():
        counts[e] += 1
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(counts, 0)
    return counts, offsets


def ref_permute_tokens(x, order, k):
    return x[order // k]


def ref_unpermute_and_combine(y_sorted, order, weights):
    T, k = weights.shape
    y = torch.zeros(T, y_sorted.shape[1], dtype=y_sorted.dtype)
    for i, s in enumerate(order.tolist()):
        t, j = divmod(s, k)
        y[t] += weights[t, j].to(y_sorted.dtype) * y_sorted[i]
    return y


def _reverse_ties(indices):
    flat = indices.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True).flip(0)
    return flat[order], order


def cases_sort_slots_by_expert(h: Rand) -> list[Case]:
    top2 = test_probs().topk(2, dim=-1).indices
    return [
        Case("test vector: top-1 choices", (torch.tensor(TEST_TOP1)[:, None],),
             expected=(torch.tensor([0, 0, 0, 0, 1, 2]), torch.tensor([0, 1, 3, 5, 2, 4]))),
        Case("test vector: top-2 choices (ties keep slot order)", (top2,)),
        Case("random top-2, T=10 E=4", (distinct_choices(141, 10, 4, 2),)),
        Case("random top-1 with many ties, T=40 E=3", (h.randint(3, 40, 1),), public=False),
        Case("random top-4, T=64 E=8", (h.choices(64, 8, 4),), public=False),
        Case("every slot on one expert, T=7 k=2", (torch.tensor([[2, 2]] * 7),), public=False),
    ]


def cases_expert_offsets(h: Rand) -> list[Case]:
    return [
        Case("test vector: top-1 choices, E=3", (torch.tensor(TEST_TOP1)[:, None], 3),
             expected=(torch.tensor([4, 1, 1]), torch.tensor([0, 4, 5, 6]))),
        Case("random top-2, T=10 E=5", (distinct_choices(151, 10, 5, 2), 5)),
        Case("empty experts at both ends, T=6 E=6", (torch.tensor([[2], [3], [2], [3], [2], [2]]), 6), public=False),
        Case("random top-3, T=33 E=8", (h.choices(33, 8, 3), 8), public=False),
    ]


def cases_permute_tokens(h: Rand) -> list[Case]:
    return [
        Case("test vector: top-1 order", (test_logits(), torch.tensor([0, 1, 3, 5, 2, 4]), 1)),
        Case("random top-2, T=6 d=3", (randn(161, 6, 3), Rand(162).perm(12), 2)),
        Case("random top-3, T=9 d=5 float64", (h.randn(9, 5, dtype=F64), h.perm(27), 3), public=False),
        Case("identity order, T=4 d=2 k=2", (h.randn(4, 2), torch.arange(8), 2), public=False),
    ]


def cases_unpermute_and_combine(h: Rand) -> list[Case]:
    y = torch.arange(12.0).reshape(6, 2)
    return [
        Case("top-1 with unit weights undoes the permutation", (y, torch.tensor([0, 1, 3, 5, 2, 4]), torch.ones(6, 1)),
             expected=y[torch.tensor([0, 1, 4, 2, 5, 3])]),
        Case("random top-2, T=5 d=3", (randn(171, 10, 3), Rand(172).perm(10), probs(173, 5, 2))),
        Case("random top-3, T=7 d=4 float64", (h.randn(21, 4, dtype=F64), h.perm(21), h.probs(7, 3, dtype=F64)),
             public=False),
        Case("gradient flows to y_sorted and weights, T=4 d=2 k=2",
             (h.randn(8, 2, dtype=F64), h.perm(8), h.probs(4, 2, dtype=F64)), grad=(0, 2), public=False),
    ]


EXERCISE = Exercise(
    name=NAME,
    title="Dispatch metadata: sort, offsets, permute, combine",
    lecture="06_batched_dispatch",
    questions=[
        Question(
            NAME, "sort_slots_by_expert", 3,
            "sort_slots_by_expert(indices) -> (sorted_experts [T*k] int64, order [T*k] int64)",
            ref_sort_slots_by_expert, cases_sort_slots_by_expert,
            "flatten to slots s = t*k + j and sort them by expert with a STABLE sort (torch.argsort(..., "
            "stable=True)): ties keep slot order",
            ("sorted_experts", "order"),
            hints={"shape": "both outputs are flat, shape [T*k]: flatten indices with reshape(-1) first",
                   "dtype": "both outputs are int64 (argsort returns int64)"},
            wrong_answers=(
                WrongAnswer("slots of the same expert are in reverse slot order", _reverse_ties,
                            "use a stable ascending sort: slots with the same expert keep ascending slot order"),
            ),
        ),
        Question(
            NAME, "expert_offsets", 2, "expert_offsets(indices, num_experts) -> (counts [E] int64, offsets [E+1] int64)",
            ref_expert_offsets, cases_expert_offsets,
            "counts = torch.bincount(indices.flatten(), minlength=E); offsets starts at 0 and is the running sum "
            "of counts",
            ("counts", "offsets"),
            hints={"shape": "counts has shape [E] even when the last experts get no slot (bincount's minlength=E); "
                            "offsets has E + 1: it starts at 0 and ends at T * k",
                   "dtype": "counts and offsets are int64"},
            wrong_answers=(
                WrongAnswer("offsets lack the leading 0",
                            lambda indices, E: (ref_expert_offsets(indices, E)[0], ref_expert_offsets(indices, E)[1][1:]),
                            "offsets[e] is where expert e's block starts, so offsets[0] = 0 and there are E + 1"),
            ),
        ),
        Question(
            NAME, "permute_tokens", 2, "permute_tokens(x, order, k) -> x_sorted [T*k, d]",
            ref_permute_tokens, cases_permute_tokens,
            "slot s belongs to token s // k, so row i of the result is x[order[i] // k]",
            hints={"exception": "order holds slot ids s = t*k + j, up to T*k - 1: turn them into token ids "
                                "(s // k) before indexing x",
                   "shape": "one row per slot: shape [T*k, d]"},
            wrong_answers=(
                WrongAnswer("the choice number s % k is used instead of the token s // k",
                            lambda x, order, k: x[order % k],
                            "slot s = t*k + j belongs to token t = s // k"),
            ),
        ),
        Question(
            NAME, "unpermute_and_combine", 3, "unpermute_and_combine(y_sorted, order, weights) -> y [T, d]",
            ref_unpermute_and_combine, cases_unpermute_and_combine,
            "invert the permutation (row i holds slot order[i]), reshape to [T, k, d], multiply by "
            "weights[..., None] and sum over k",
            hints={"shape": "y has shape [T, d]: reshape the slot-ordered rows to [T, k, d] and sum over the k choices",
                   "dtype": "y has the dtype of y_sorted: cast the weights with .to(y_sorted.dtype)"},
            wrong_answers=(
                WrongAnswer("order is used where its inverse is needed",
                            lambda y_sorted, order, weights: (weights.to(y_sorted.dtype)[:, :, None] * y_sorted[order]
                                                              .reshape(*weights.shape, -1)).sum(1),
                            "row i of y_sorted holds slot order[i]: invert the permutation (torch.argsort(order)) "
                            "to put the rows back in slot order"),
                WrongAnswer("the routing weights are not applied",
                            lambda y_sorted, order, weights: y_sorted[torch.argsort(order)]
                            .reshape(*weights.shape, -1).sum(1),
                            "multiply each slot's output by its routing weight before summing over k"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "ref_sort_slots_by_expert", "ref_expert_offsets", "ref_permute_tokens",
           "ref_unpermute_and_combine"]
