"""ex03_switch_capacity: expert capacity, buffer positions, dropping, a Switch layer."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, distinct_choices, randint, randn
from ._vectors import TEST_KEPT_C2, TEST_POSITIONS, TEST_TOP1, test_logits
from .ex01_router_topk import ref_router_logits, ref_router_probs, ref_switch_gate

NAME = "ex03_switch_capacity"
F64 = torch.float64


def ref_expert_capacity(num_tokens, num_experts, capacity_factor, k=1, min_capacity=4):
    exact = Fraction(str(capacity_factor)) * k * num_tokens / num_experts
    return max(min_capacity, math.floor(exact))


def ref_buffer_positions(indices, num_experts):
    T, k = indices.shape
    pos = torch.empty_like(indices)
    filled = [0] * num_experts
    for j in range(k):  # choice-major: every first choice, then every second choice
        for t in range(T):
            e = int(indices[t, j])
            pos[t, j] = filled[e]
            filled[e] += 1
    return pos


def ref_capacity_kept(indices, num_experts, capacity):
    return ref_buffer_positions(indices, num_experts) < capacity


def ref_switch_layer_forward(x, w_gate, expert_weights, capacity_factor=1.25, min_capacity=4):
    T = x.shape[0]
    E = w_gate.shape[1]
    probs = ref_router_probs(ref_router_logits(x, w_gate))
    idx, gate = ref_switch_gate(probs)
    C = ref_expert_capacity(T, E, capacity_factor, 1, min_capacity)
    kept = ref_capacity_kept(idx[:, None], E, C)[:, 0]
    y = x.clone()
    for t in range(T):
        if kept[t]:
            y[t] = x[t] + gate[t].to(x.dtype) * (x[t] @ expert_weights[idx[t]])
    return y


# -- known mistakes, as code ------------------------------------------------------------------


def _token_major_positions(indices, num_experts):
    flat = indices.reshape(-1)
    one_hot = torch.nn.functional.one_hot(flat, num_experts)
    return ((one_hot.cumsum(0) - 1) * one_hot).sum(-1).reshape(indices.shape)


def _switch_variant(x, w_gate, expert_weights, capacity_factor=1.25, min_capacity=4, mistake=""):
    T, E = x.shape[0], w_gate.shape[1]
    probs = ref_router_probs(ref_router_logits(x, w_gate))
    idx, gate = ref_switch_gate(probs)
    if mistake == "renormalised":
        gate = torch.ones_like(gate)
    C = ref_expert_capacity(T, E, capacity_factor, 1, min_capacity)
    kept = ref_capacity_kept(idx[:, None], E, C)[:, 0]
    moe = (gate * kept).to(x.dtype)[:, None] * torch.einsum("td,tdh->th", x, expert_weights[idx])
    if mistake == "zeroed":
        return torch.where(kept[:, None], x + moe, torch.zeros_like(x))
    if mistake == "no residual":
        return moe
    return x + moe


# -- cases ------------------------------------------------------------------------------------

CAPACITY_GRID = [
    # (num_tokens, num_experts, capacity_factor, k, min_capacity)
    (6, 3, 1.0, 1, 0),
    (64, 8, 1.25, 1, 4),
    (10, 4, 1.0, 1, 0),
    (1024, 8, 2.0, 1, 4),
    (16, 8, 1.0, 1, 4),
    (50, 8, 1.25, 2, 4),
    (2048, 128, 1.25, 1, 4),
    (100, 6, 1.5, 1, 0),
    (7, 2, 1.0, 1, 0),
    (4096, 64, 1.0, 2, 4),
    (30, 4, 0.5, 1, 1),
    (3, 8, 2.0, 1, 4),
]
# capacity factors of the random hidden case: multiples of 1/4, for which the plain
# floating-point formula floor(cf * k * T / E) is exact (tests check it)
CAPACITY_FACTORS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def random_capacity_case(h: Rand) -> tuple[int, int, float, int, int]:
    return (h.integer(1, 4096), h.pick((2, 3, 4, 6, 8, 16, 64)), h.pick(CAPACITY_FACTORS), h.integer(1, 2),
            h.integer(0, 4))


def cases_expert_capacity(h: Rand) -> list[Case]:
    cases = [Case("test vector: T=6, E=3, CF=1, min_capacity=0 gives C=2", (6, 3, 1.0), {"min_capacity": 0},
                  expected=2)]
    for i, (T, E, cf, k, mc) in enumerate(CAPACITY_GRID):
        cases.append(Case(f"T={T}, E={E}, CF={cf}, k={k}, min_capacity={mc}", (T, E, cf), {"k": k, "min_capacity": mc},
                          public=i < 5))
    cases.append(Case("default k=1, min_capacity=4: T=32, E=4, CF=1.25", (32, 4, 1.25), public=False))
    T, E, cf, k, mc = random_capacity_case(h)
    cases.append(Case("random T, E, CF, k and min_capacity", (T, E, cf), {"k": k, "min_capacity": mc}, public=False))
    return cases


def cases_buffer_positions(h: Rand) -> list[Case]:
    top1 = torch.tensor(TEST_TOP1)[:, None]
    return [
        Case("test vector: top-1 choices (docs/conventions.md)", (top1, 3), expected=torch.tensor(TEST_POSITIONS)[:, None]),
        Case("random top-1, T=12 E=4", (randint(71, 4, 12, 1), 4)),
        Case("random top-2 (choice-major order), T=8 E=4", (distinct_choices(72, 8, 4, 2), 4),
             hint="all first choices come before all second choices"),
        Case("random top-3, T=10 E=5", (h.choices(10, 5, 3), 5), public=False),
        Case("every token on one expert, T=5 E=3", (torch.zeros(5, 1, dtype=torch.int64), 3), public=False),
        Case("top-2, T=16 E=8", (h.choices(16, 8, 2), 8), public=False),
    ]


def cases_capacity_kept(h: Rand) -> list[Case]:
    top1 = torch.tensor(TEST_TOP1)[:, None]
    return [
        Case("test vector: C=2 keeps [T, T, T, F, T, F]", (top1, 3, 2), expected=torch.tensor(TEST_KEPT_C2)[:, None]),
        Case("random top-1, T=12 E=3 C=3", (randint(81, 3, 12, 1), 3, 3)),
        Case("random top-2, T=10 E=4 C=4", (distinct_choices(82, 10, 4, 2), 4, 4)),
        Case("capacity 0 drops everything", (h.randint(3, 5, 1), 3, 0), public=False),
        Case("capacity larger than T keeps everything", (h.randint(4, 6, 1), 4, 10), public=False),
        Case("top-2, T=16 E=8 C=3", (h.choices(16, 8, 2), 8, 3), public=False),
    ]


def _expert_weights(r: Rand, E: int, d: int, dtype=torch.float32) -> torch.Tensor:
    return r.randn(E, d, d, dtype=dtype, scale=1.0 / math.sqrt(d))


def cases_switch_layer_forward(h: Rand) -> list[Case]:
    x = test_logits()
    eye = torch.eye(3, dtype=F64)
    W = torch.stack([2 * eye, 3 * eye, -eye])
    skewed = torch.tensor([[4.0, 0, 0, 0]] * 4).T.contiguous()
    return [
        Case("test vector: x = logits, w_gate = I, CF=1, min_capacity=0 (C=2, tokens 3 and 5 dropped)", (x, eye, W),
             {"capacity_factor": 1.0, "min_capacity": 0}),
        Case("random float32, T=12 d=6 E=3, CF=1.0 (some tokens dropped)",
             (randn(91, 12, 6), randn(92, 6, 3), _expert_weights(Rand(93), 3, 6)),
             {"capacity_factor": 1.0, "min_capacity": 0}),
        Case("random float32, T=8 d=4 E=2, large capacity (nothing dropped)",
             (randn(94, 8, 4), randn(95, 4, 2), _expert_weights(Rand(96), 2, 4)), {"capacity_factor": 2.0}),
        Case("random float64, T=20 d=8 E=4, CF=0.5",
             (h.randn(20, 8, dtype=F64), h.randn(8, 4, dtype=F64), _expert_weights(h, 4, 8, F64)),
             {"capacity_factor": 0.5, "min_capacity": 1}, public=False),
        Case("default arguments (CF=1.25, min_capacity=4), T=24 d=5 E=4",
             (h.randn(24, 5), h.randn(5, 4, scale=3.0), _expert_weights(h, 4, 5)), public=False),
        Case("skewed router: one expert overflows, T=16 d=4 E=4", (h.randn(16, 4), skewed, _expert_weights(h, 4, 4)),
             {"capacity_factor": 1.0, "min_capacity": 0}, public=False),
    ]


EXERCISE = Exercise(
    name=NAME,
    title="Expert capacity, token dropping and the Switch layer",
    lecture="04_switch_top1",
    questions=[
        Question(
            NAME, "expert_capacity", 2,
            "expert_capacity(num_tokens, num_experts, capacity_factor, k=1, min_capacity=4) -> int",
            ref_expert_capacity, cases_expert_capacity,
            "C = max(min_capacity, floor(capacity_factor * k * num_tokens / num_experts)); floor, not round or "
            "ceil; return an int",
            hints={"type": "return a Python int: math.floor(...) gives one; a float capacity cannot size a buffer"},
            wrong_answers=(
                WrongAnswer("the capacity is rounded up (ceil)",
                            lambda T, E, cf, k=1, min_capacity=4: max(min_capacity, math.ceil(cf * k * T / E)),
                            "round down: an expert never takes more than capacity_factor * k * T / E assignments"),
                WrongAnswer("the capacity is rounded to the nearest integer",
                            lambda T, E, cf, k=1, min_capacity=4: max(min_capacity, round(cf * k * T / E)),
                            "round down (math.floor), not to the nearest integer"),
                WrongAnswer("k is missing from the formula",
                            lambda T, E, cf, k=1, min_capacity=4: max(min_capacity, math.floor(cf * T / E)),
                            "this course's capacity counts assignments, so it has the factor k"),
                WrongAnswer("min_capacity is ignored",
                            lambda T, E, cf, k=1, min_capacity=4: math.floor(cf * k * T / E),
                            "the capacity is never below min_capacity: take the max of the two"),
            ),
        ),
        Question(
            NAME, "buffer_positions", 3, "buffer_positions(indices, num_experts) -> positions [T, k] int64",
            ref_buffer_positions, cases_buffer_positions,
            "position = how many earlier assignments chose the same expert, in choice-major order (all first "
            "choices in token order, then all second choices)",
            hints={"shape": "positions have the shape of indices, [T, k]", "dtype": "return int64 positions"},
            wrong_answers=(
                WrongAnswer("token-major order (all choices of token 0 first, then token 1, ...)",
                            _token_major_positions,
                            "priority is choice-major: every token's first choice (in token order) comes before "
                            "any second choice; indices.t() lists them in that order"),
                WrongAnswer("positions start at 1",
                            lambda indices, num_experts: ref_buffer_positions(indices, num_experts) + 1,
                            "the first assignment an expert receives has position 0"),
            ),
        ),
        Question(
            NAME, "capacity_kept", 2, "capacity_kept(indices, num_experts, capacity) -> kept [T, k] bool",
            ref_capacity_kept, cases_capacity_kept,
            "an assignment is kept when its buffer position is < capacity; return a bool tensor",
            builds_on=("buffer_positions",),
            hints={"dtype": "return a bool tensor: a comparison such as positions < capacity gives one",
                   "shape": "kept has the shape of indices, [T, k]"},
            wrong_answers=(
                WrongAnswer("one assignment too many is kept (position <= capacity)",
                            lambda indices, E, C: ref_buffer_positions(indices, E) <= C,
                            "an expert keeps exactly C assignments, positions 0 .. C-1: kept means position < C"),
            ),
        ),
        Question(
            NAME, "switch_layer_forward", 3,
            "switch_layer_forward(x, w_gate, expert_weights, capacity_factor=1.25, min_capacity=4) -> y [T, d]",
            ref_switch_layer_forward, cases_switch_layer_forward,
            "y = x + gate * (x @ W_e) for kept tokens and y = x for dropped ones: a dropped token passes through "
            "the residual unchanged",
            builds_on=("expert_capacity", "buffer_positions", "capacity_kept"),
            hints={"dtype": "y has the dtype of x: the router runs in float32, so cast the gate back with .to(x.dtype)",
                   "shape": "y has the shape of x, [T, d]"},
            wrong_answers=(
                WrongAnswer("dropped tokens are zeroed",
                            lambda *a, **kw: _switch_variant(*a, **kw, mistake="zeroed"),
                            "a dropped token gets MoE output 0 and passes through the residual: y = x there"),
                WrongAnswer("the gate is renormalised to 1",
                            lambda *a, **kw: _switch_variant(*a, **kw, mistake="renormalised"),
                            "Switch multiplies the expert output by the top-1 probability itself, not by 1"),
                WrongAnswer("the residual connection is missing",
                            lambda *a, **kw: _switch_variant(*a, **kw, mistake="no residual"),
                            "the block returns x + MoE(x): add the input back"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "ref_expert_capacity", "ref_buffer_positions", "ref_capacity_kept", "ref_switch_layer_forward",
           "CAPACITY_GRID", "CAPACITY_FACTORS", "random_capacity_case"]
