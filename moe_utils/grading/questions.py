"""The graded questions: one fixed signature each, an independent reference, and test cases.

Every question of every exercise notebook is a ``Question``: the function name the
student defines, its points, a reference implementation written here (on purpose
independent of the rest of ``moe_utils``; ``tests/test_grading.py`` checks that the
two agree), and a list of seeded ``Case`` objects. Public cases are what the
notebook's ``check_<name>(fn)`` cell runs; hidden cases are added by the autograder.
The MOE_REFERENCE.md test vectors appear as public cases with their *published*
values as the expected output, so neither a hard-coded answer nor a reference bug
can slip through.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["Case", "Question", "EXERCISES", "QUESTIONS", "questions_for", "find_question", "TEST_LOGITS"]

# MOE_REFERENCE.md test vectors: one routing group, T = 6 tokens, E = 3 experts (float64).
TEST_LOGITS = [[2.0, 1.0, 0.0], [1.5, 0.5, 0.2], [0.1, 2.2, 0.3], [3.0, 0.1, 0.0], [0.2, 0.0, 1.0], [1.0, 0.9, 0.8]]
TEST_TOP1 = [0, 0, 1, 0, 2, 0]
TEST_POSITIONS = [0, 1, 0, 2, 0, 3]
TEST_KEPT_C2 = [True, True, True, False, True, False]


def _logits() -> torch.Tensor:
    return torch.tensor(TEST_LOGITS, dtype=torch.float64)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(seed: int, *shape: int, dtype=torch.float32, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype)


def _probs(seed: int, T: int, E: int, dtype=torch.float32) -> torch.Tensor:
    return torch.softmax(_randn(seed, T, E, dtype=torch.float64, scale=2.0), dim=-1).to(dtype)


def _randint(seed: int, high: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, high, shape, generator=_gen(seed), dtype=torch.int64)


def _distinct_choices(seed: int, T: int, E: int, k: int) -> torch.Tensor:
    """[T, k] expert ids, distinct inside each row (like a real top-k)."""
    return torch.rand(T, E, generator=_gen(seed)).argsort(dim=-1)[:, :k].contiguous()


@dataclass
class Case:
    """One call of a student's function.

    ``expected`` given: compared as is (published test-vector values); otherwise the
    question's reference computes it. ``grad``: positions of float tensor arguments
    whose gradients (of the summed ``grad_output``-th output) are compared too.
    """

    name: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    public: bool = True
    expected: Any = None
    grad: tuple[int, ...] = ()
    grad_output: int | None = None
    atol: float = 1e-5
    rtol: float = 1e-4
    hint: str | None = None


@dataclass
class Question:
    exercise: str
    name: str
    points: int
    signature: str
    reference: Callable
    make_cases: Callable[[], list[Case]]
    hint: str
    outputs: tuple[str, ...] = ()  # names of tuple outputs, for messages

    @property
    def qid(self) -> str:
        return f"{self.exercise}.{self.name}"

    def cases(self, hidden: bool = True) -> list[Case]:
        return [c for c in self.make_cases() if hidden or c.public]


# --------------------------------------------------------------------------------------
# ex01_router_topk
# --------------------------------------------------------------------------------------


def ref_router_logits(x, w_gate):
    return x.to(torch.float32) @ w_gate.to(torch.float32)


def ref_router_probs(logits):
    h = logits.to(torch.float32)
    h = h - h.max(dim=-1, keepdim=True).values
    e = h.exp()
    return e / e.sum(dim=-1, keepdim=True)


def ref_top_k_routing(probs, k):
    vals, idx = torch.sort(probs, dim=-1, descending=True, stable=True)
    vals, idx = vals[:, :k], idx[:, :k]
    return idx.to(torch.int64), vals / vals.sum(dim=-1, keepdim=True)


def ref_switch_gate(probs):
    idx = probs.argmax(dim=-1)
    return idx.to(torch.int64), probs.gather(1, idx[:, None])[:, 0]


def _cases_router_logits():
    x = _logits()
    eye = torch.eye(3, dtype=torch.float64)
    return [
        Case("test vector: x = MOE_REFERENCE logits, w_gate = identity", (x, eye), expected=x.float()),
        Case("random float32, T=7 d=5 E=4", (_randn(1, 7, 5), _randn(2, 5, 4))),
        Case(
            "bfloat16 inputs, T=16 d=32 E=8",
            (_randn(3, 16, 32, dtype=torch.bfloat16), _randn(4, 32, 8, dtype=torch.bfloat16)),
            hint="selective precision: cast x and w_gate to float32 BEFORE the matmul; a bf16 matmul loses ~3 digits",
        ),
        Case("random float64, T=9 d=6 E=5", (_randn(5, 9, 6, dtype=torch.float64), _randn(6, 6, 5, dtype=torch.float64)), public=False),
        Case(
            "bfloat16 inputs, T=33 d=64 E=16",
            (_randn(7, 33, 64, dtype=torch.bfloat16), _randn(8, 64, 16, dtype=torch.bfloat16)),
            public=False,
        ),
        Case("one token, T=1 d=3 E=2", (_randn(9, 1, 3), _randn(10, 3, 2)), public=False),
    ]


def _cases_router_probs():
    expected_row0 = torch.tensor([0.6652409557748219, 0.24472847105479764, 0.09003057317038046])
    pub = [
        Case("test vector: MOE_REFERENCE logits", (_logits(),)),
        Case("random float32, T=8 E=4", (_randn(11, 8, 4, scale=3.0),)),
        Case("large logits (need the max-subtraction trick), T=3 E=4", (_randn(12, 3, 4, scale=200.0),)),
    ]
    return pub + [
        Case("test vector row 0 only", (_logits()[:1],), expected=expected_row0[None, :]),
        Case("bfloat16 logits, T=5 E=8", (_randn(13, 5, 8, dtype=torch.bfloat16),), public=False),
        Case("random float64, T=10 E=6", (_randn(14, 10, 6, dtype=torch.float64),), public=False),
        Case("one expert, T=4 E=1", (_randn(15, 4, 1),), public=False),
        Case("more experts than tokens, T=2 E=7", (_randn(16, 2, 7),), public=False),
    ]


def _cases_top_k_routing():
    p = torch.softmax(_logits(), dim=-1)
    return [
        Case(
            "test vector rows 0 and 3 (MOE_REFERENCE), k=2",
            (p[[0, 3]], 2),
            expected=(
                torch.tensor([[0, 1], [0, 1]]),
                torch.tensor([[0.7310586, 0.2689414], [0.9478464, 0.0521536]], dtype=torch.float64),
            ),
            atol=1e-6,
        ),
        Case("test vector, k=2", (p, 2)),
        Case("random float32, T=8 E=6 k=2", (_probs(21, 8, 6), 2)),
        Case("random float32, T=5 E=8 k=3", (_probs(22, 5, 8), 3), public=False),
        Case("k = E (all experts), T=4 E=4", (_probs(23, 4, 4), 4), public=False),
        Case("k = 1 (renormalised weight is 1), T=6 E=5", (_probs(24, 6, 5), 1), public=False),
        Case("random float64, T=12 E=16 k=4", (_probs(25, 12, 16, dtype=torch.float64), 4), public=False),
    ]


def _cases_switch_gate():
    p = torch.softmax(_logits(), dim=-1)
    return [
        Case("test vector (MOE_REFERENCE top-1 indices)", (p,), expected=(torch.tensor(TEST_TOP1), p.max(dim=-1).values)),
        Case("random float32, T=9 E=4", (_probs(31, 9, 4),)),
        Case("random float64, T=16 E=8", (_probs(32, 16, 8, dtype=torch.float64),), public=False),
        Case("one token, T=1 E=3", (_probs(33, 1, 3),), public=False),
    ]


# --------------------------------------------------------------------------------------
# ex02_balance_losses
# --------------------------------------------------------------------------------------


def ref_switch_aux_loss(probs, top1, alpha=1e-2):
    T, E = probs.shape
    counts = torch.zeros(E, dtype=probs.dtype).index_add_(0, top1, torch.ones(T, dtype=probs.dtype))
    f = counts / T
    P = probs.mean(dim=0)
    return alpha * E * (f * P).sum()


def ref_topk_aux_loss(probs, indices):
    T, E = probs.shape
    k = indices.shape[1]
    f = torch.zeros(k, E, dtype=probs.dtype)
    for j in range(k):
        f[j] = torch.zeros(E, dtype=probs.dtype).index_add_(0, indices[:, j], torch.ones(T, dtype=probs.dtype)) / T
    return E * (f * probs.mean(dim=0)[None, :]).sum()


def ref_router_z_loss(logits):
    m = logits.max(dim=-1, keepdim=True).values
    lse = (logits - m).exp().sum(dim=-1).log() + m[:, 0]
    return (lse * lse).mean()


def _cases_switch_aux_loss():
    p = torch.softmax(_logits(), dim=-1)
    top1 = torch.tensor(TEST_TOP1)
    return [
        Case("test vector, alpha = 1", (p, top1), {"alpha": 1.0}, expected=torch.tensor(1.2226686, dtype=torch.float64), atol=1e-6),
        Case("test vector, default alpha = 1e-2", (p, top1), expected=torch.tensor(0.012226686, dtype=torch.float64), atol=1e-8),
        Case("random float32, T=16 E=4", (_probs(41, 16, 4), _randint(42, 4, 16))),
        Case(
            "gradient reaches the router probabilities (float64, T=10 E=5)",
            (_probs(43, 10, 5, dtype=torch.float64), _randint(44, 5, 10)),
            {"alpha": 1.0},
            grad=(0,),
            hint="only P (the mean probability) carries gradient: f comes from counts; do not detach P",
        ),
        Case("uniform routing gives alpha", (torch.full((8, 4), 0.25), torch.arange(8) % 4), {"alpha": 0.5}, public=False),
        Case("total collapse gives alpha * E", (F.one_hot(torch.zeros(6, dtype=torch.int64), 5).float(), torch.zeros(6, dtype=torch.int64)), {"alpha": 1.0}, public=False),
        Case("random float64, T=33 E=8, alpha = 0.1", (_probs(45, 33, 8, dtype=torch.float64), _randint(46, 8, 33)), {"alpha": 0.1}, public=False),
        Case("an expert nobody chose, T=5 E=6", (_probs(47, 5, 6), _randint(48, 2, 5)), {"alpha": 1.0}, grad=(0,), public=False),
    ]


def _cases_topk_aux_loss():
    p = torch.softmax(_logits(), dim=-1)
    top2 = p.topk(2, dim=-1).indices
    return [
        Case("test vector, k=2 (MOE_REFERENCE: 2.1825705)", (p, top2), expected=torch.tensor(2.1825705, dtype=torch.float64), atol=1e-6),
        Case("random float32, T=12 E=6 k=2", (_probs(51, 12, 6), _distinct_choices(52, 12, 6, 2))),
        Case("perfect balance gives k (k=2, E=4)", (torch.full((8, 4), 0.25), torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], 1))),
        Case("gradient reaches the router probabilities (float64, T=9 E=5 k=3)", (_probs(53, 9, 5, dtype=torch.float64), _distinct_choices(54, 9, 5, 3)), grad=(0,), public=False),
        Case("k = 1 equals the Switch loss with alpha 1, T=10 E=4", (_probs(55, 10, 4), _distinct_choices(56, 10, 4, 1)), public=False),
        Case("random float64, T=20 E=8 k=2", (_probs(57, 20, 8, dtype=torch.float64), _distinct_choices(58, 20, 8, 2)), public=False),
    ]


def _cases_router_z_loss():
    return [
        Case("test vector (MOE_REFERENCE: 5.3166803)", (_logits(),), expected=torch.tensor(5.3166803, dtype=torch.float64), atol=1e-6),
        Case("zero logits, E=8: (ln 8)^2, not 0", (torch.zeros(4, 8),), expected=torch.tensor(math.log(8) ** 2, dtype=torch.float32)),
        Case("random float32, T=7 E=5", (_randn(61, 7, 5, scale=2.0),)),
        Case("large logits (use logsumexp, not log(sum(exp))), T=3 E=4", (_randn(62, 3, 4, scale=300.0, dtype=torch.float64),), public=False, rtol=1e-6),
        Case("gradient (float64, T=6 E=4)", (_randn(63, 6, 4, dtype=torch.float64),), grad=(0,), public=False),
        Case("one token, T=1 E=3", (_randn(64, 1, 3),), public=False),
    ]


# --------------------------------------------------------------------------------------
# ex03_switch_capacity
# --------------------------------------------------------------------------------------


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


_CAPACITY_GRID = [
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


def _cases_expert_capacity():
    cases = []
    for i, (T, E, cf, k, mc) in enumerate(_CAPACITY_GRID):
        cases.append(
            Case(
                f"T={T}, E={E}, CF={cf}, k={k}, min_capacity={mc}",
                (T, E, cf),
                {"k": k, "min_capacity": mc},
                public=i < 5,
            )
        )
    cases.insert(0, Case("test vector: T=6, E=3, CF=1, min_capacity=0 gives C=2", (6, 3, 1.0), {"min_capacity": 0}, expected=2))
    cases.append(Case("default k=1, min_capacity=4: T=32, E=4, CF=1.25", (32, 4, 1.25), public=False))
    return cases


def _cases_buffer_positions():
    top1 = torch.tensor(TEST_TOP1)[:, None]
    return [
        Case("test vector: top-1 choices (MOE_REFERENCE)", (top1, 3), expected=torch.tensor(TEST_POSITIONS)[:, None]),
        Case("random top-1, T=12 E=4", (_randint(71, 4, 12, 1), 4)),
        Case("random top-2 (choice-major order), T=8 E=4", (_distinct_choices(72, 8, 4, 2), 4), hint="all first choices come before all second choices"),
        Case("random top-3, T=10 E=5", (_distinct_choices(73, 10, 5, 3), 5), public=False),
        Case("every token on one expert, T=5 E=3", (torch.zeros(5, 1, dtype=torch.int64), 3), public=False),
        Case("top-2, T=16 E=8", (_distinct_choices(74, 16, 8, 2), 8), public=False),
    ]


def _cases_capacity_kept():
    top1 = torch.tensor(TEST_TOP1)[:, None]
    return [
        Case("test vector: C=2 keeps [T, T, T, F, T, F]", (top1, 3, 2), expected=torch.tensor(TEST_KEPT_C2)[:, None]),
        Case("random top-1, T=12 E=3 C=3", (_randint(81, 3, 12, 1), 3, 3)),
        Case("random top-2, T=10 E=4 C=4", (_distinct_choices(82, 10, 4, 2), 4, 4)),
        Case("capacity 0 drops everything", (_randint(83, 3, 5, 1), 3, 0), public=False),
        Case("capacity larger than T keeps everything", (_randint(84, 4, 6, 1), 4, 10), public=False),
        Case("top-2, T=16 E=8 C=3", (_distinct_choices(85, 16, 8, 2), 8, 3), public=False),
    ]


def _expert_weights(seed: int, E: int, d: int, dtype=torch.float32) -> torch.Tensor:
    return _randn(seed, E, d, d, dtype=dtype, scale=1.0 / math.sqrt(d))


def _cases_switch_layer_forward():
    x = _logits()
    eye = torch.eye(3, dtype=torch.float64)
    W = torch.stack([2 * eye, 3 * eye, -eye])
    return [
        Case("test vector: x = logits, w_gate = I, CF=1, min_capacity=0 (C=2, tokens 3 and 5 dropped)", (x, eye, W), {"capacity_factor": 1.0, "min_capacity": 0}),
        Case("random float32, T=12 d=6 E=3, CF=1.0 (some tokens dropped)", (_randn(91, 12, 6), _randn(92, 6, 3), _expert_weights(93, 3, 6)), {"capacity_factor": 1.0, "min_capacity": 0}),
        Case("random float32, T=8 d=4 E=2, large capacity (nothing dropped)", (_randn(94, 8, 4), _randn(95, 4, 2), _expert_weights(96, 2, 4)), {"capacity_factor": 2.0}),
        Case("random float64, T=20 d=8 E=4, CF=0.5", (_randn(97, 20, 8, dtype=torch.float64), _randn(98, 8, 4, dtype=torch.float64), _expert_weights(99, 4, 8, torch.float64)), {"capacity_factor": 0.5, "min_capacity": 1}, public=False),
        Case("default arguments (CF=1.25, min_capacity=4), T=24 d=5 E=4", (_randn(100, 24, 5), _randn(101, 5, 4, scale=3.0), _expert_weights(102, 4, 5)), public=False),
        Case("skewed router: one expert overflows, T=16 d=4 E=4", (_randn(103, 16, 4), torch.tensor([[4.0, 0, 0, 0]] * 4).T.contiguous(), _expert_weights(104, 4, 4)), {"capacity_factor": 1.0, "min_capacity": 0}, public=False),
    ]


# --------------------------------------------------------------------------------------
# ex04_mixtral_block
# --------------------------------------------------------------------------------------


def ref_swiglu_expert(x, w1, w3, w2):
    a = x @ w1
    return ((a * torch.sigmoid(a)) * (x @ w3)) @ w2


def ref_mixtral_block_forward(x, w_gate, w1, w3, w2, k=2):
    probs = ref_router_probs(ref_router_logits(x, w_gate))
    idx, wts = ref_top_k_routing(probs, k)
    # every expert on every token, then pick: independent of any dispatch code
    a = torch.einsum("td,edf->tef", x, w1)
    h = (a * torch.sigmoid(a)) * torch.einsum("td,edf->tef", x, w3)
    out = torch.einsum("tef,efd->ted", h, w2)  # [T, E, d]
    picked = out.gather(1, idx[:, :, None].expand(-1, -1, x.shape[1]))  # [T, k, d]
    return (wts.to(x.dtype)[:, :, None] * picked).sum(dim=1)


def _swiglu_weights(seed: int, E: int | None, d: int, f: int, dtype=torch.float32):
    lead = () if E is None else (E,)
    w1 = _randn(seed, *lead, d, f, dtype=dtype, scale=1 / math.sqrt(d))
    w3 = _randn(seed + 1, *lead, d, f, dtype=dtype, scale=1 / math.sqrt(d))
    w2 = _randn(seed + 2, *lead, f, d, dtype=dtype, scale=1 / math.sqrt(f))
    return w1, w3, w2


def _cases_swiglu_expert():
    return [
        Case("random float32, T=5 d=4 f=6", (_randn(111, 5, 4), *_swiglu_weights(112, None, 4, 6))),
        Case("known value: x=[1, 0], w1=w3=I, w2=I", (torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.eye(2), torch.eye(2)), expected=torch.tensor([[1.0 / (1.0 + math.exp(-1.0)), 0.0]])),
        Case("random float64, T=7 d=8 f=16", (_randn(113, 7, 8, dtype=torch.float64), *_swiglu_weights(114, None, 8, 16, torch.float64)), public=False),
        Case("batched input [2, 3, d], d=4 f=5", (_randn(115, 2, 3, 4), *_swiglu_weights(116, None, 4, 5)), public=False),
    ]


def _cases_mixtral_block_forward():
    x = _logits()
    eye = torch.eye(3, dtype=torch.float64)
    return [
        Case("test vector: x = logits, w_gate = I, E=3, k=2", (x, eye, *_swiglu_weights(121, 3, 3, 4, torch.float64)), {"k": 2}),
        Case("random float32, T=10 d=8 f=16 E=4 k=2", (_randn(122, 10, 8), _randn(123, 8, 4), *_swiglu_weights(124, 4, 8, 16))),
        Case("random float32, T=6 d=4 f=8 E=8 k=3", (_randn(125, 6, 4), _randn(126, 4, 8), *_swiglu_weights(127, 8, 4, 8)), {"k": 3}, public=False),
        Case("k=1 (renormalised weight 1), T=5 d=4 f=6 E=3", (_randn(128, 5, 4), _randn(129, 4, 3), *_swiglu_weights(130, 3, 4, 6)), {"k": 1}, public=False),
        Case("float64, default k, T=12 d=6 f=10 E=6", (_randn(131, 12, 6, dtype=torch.float64), _randn(132, 6, 6, dtype=torch.float64), *_swiglu_weights(133, 6, 6, 10, torch.float64)), public=False),
    ]


# --------------------------------------------------------------------------------------
# ex05_dispatch_metadata
# --------------------------------------------------------------------------------------


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


def _cases_sort_slots_by_expert():
    top2 = torch.softmax(_logits(), -1).topk(2, dim=-1).indices
    return [
        Case("test vector: top-1 choices", (torch.tensor(TEST_TOP1)[:, None],), expected=(torch.tensor([0, 0, 0, 0, 1, 2]), torch.tensor([0, 1, 3, 5, 2, 4]))),
        Case("test vector: top-2 choices (ties keep slot order)", (top2,)),
        Case("random top-2, T=10 E=4", (_distinct_choices(141, 10, 4, 2),)),
        Case("random top-1 with many ties, T=40 E=3", (_randint(142, 3, 40, 1),), public=False),
        Case("random top-4, T=64 E=8", (_distinct_choices(143, 64, 8, 4),), public=False),
        Case("every slot on one expert, T=7 k=2", (torch.tensor([[2, 2]] * 7),), public=False),
    ]


def _cases_expert_offsets():
    return [
        Case("test vector: top-1 choices, E=3", (torch.tensor(TEST_TOP1)[:, None], 3), expected=(torch.tensor([4, 1, 1]), torch.tensor([0, 4, 5, 6]))),
        Case("random top-2, T=10 E=5", (_distinct_choices(151, 10, 5, 2), 5)),
        Case("empty experts at both ends, T=6 E=6", (torch.tensor([[2], [3], [2], [3], [2], [2]]), 6), public=False),
        Case("random top-3, T=33 E=8", (_distinct_choices(152, 33, 8, 3), 8), public=False),
    ]


def _cases_permute_tokens():
    x = _logits()
    return [
        Case("test vector: top-1 order", (x, torch.tensor([0, 1, 3, 5, 2, 4]), 1)),
        Case("random top-2, T=6 d=3", (_randn(161, 6, 3), torch.randperm(12, generator=_gen(162)), 2)),
        Case("random top-3, T=9 d=5 float64", (_randn(163, 9, 5, dtype=torch.float64), torch.randperm(27, generator=_gen(164)), 3), public=False),
        Case("identity order, T=4 d=2 k=2", (_randn(165, 4, 2), torch.arange(8), 2), public=False),
    ]


def _cases_unpermute_and_combine():
    return [
        Case("top-1 with unit weights undoes the permutation", (torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 3, 5, 2, 4]), torch.ones(6, 1)), expected=torch.arange(12.0).reshape(6, 2)[torch.tensor([0, 1, 4, 2, 5, 3])]),
        Case("random top-2, T=5 d=3", (_randn(171, 10, 3), torch.randperm(10, generator=_gen(172)), _probs(173, 5, 2))),
        Case("random top-3, T=7 d=4 float64", (_randn(174, 21, 4, dtype=torch.float64), torch.randperm(21, generator=_gen(175)), _probs(176, 7, 3, dtype=torch.float64)), public=False),
        Case("gradient flows to y_sorted and weights, T=4 d=2 k=2", (_randn(177, 8, 2, dtype=torch.float64), torch.randperm(8, generator=_gen(178)), _probs(179, 4, 2, dtype=torch.float64)), grad=(0, 2), public=False),
    ]


# --------------------------------------------------------------------------------------
# the registry
# --------------------------------------------------------------------------------------

EX01, EX02, EX03, EX04, EX05 = (
    "ex01_router_topk",
    "ex02_balance_losses",
    "ex03_switch_capacity",
    "ex04_mixtral_block",
    "ex05_dispatch_metadata",
)

QUESTIONS: list[Question] = [
    Question(EX01, "router_logits", 1, "router_logits(x, w_gate) -> logits [T, E] float32", ref_router_logits, _cases_router_logits,
             "logits = x @ w_gate computed in float32 (cast both to float32 first), shape [T, E]"),
    Question(EX01, "router_probs", 2, "router_probs(logits) -> probs [T, E] float32", ref_router_probs, _cases_router_probs,
             "softmax over the EXPERT axis (the last one): every row must sum to 1; return float32"),
    Question(EX01, "top_k_routing", 3, "top_k_routing(probs, k) -> (indices [T, k] int64, weights [T, k])", ref_top_k_routing,
             _cases_top_k_routing, "take the k largest probabilities per row (best first), then divide them by their sum so each row sums to 1",
             ("indices", "weights")),
    Question(EX01, "switch_gate", 2, "switch_gate(probs) -> (index [T] int64, gate [T])", ref_switch_gate, _cases_switch_gate,
             "gate = the top-1 probability itself, NOT renormalised (renormalising makes it 1 and the router gets no gradient)",
             ("index", "gate")),
    Question(EX02, "switch_aux_loss", 3, "switch_aux_loss(probs, top1, alpha=1e-2) -> scalar", ref_switch_aux_loss, _cases_switch_aux_loss,
             "alpha * E * sum_i f_i * P_i: f_i = fraction of tokens whose top-1 is i, P_i = mean probability of i; do not forget the factor E"),
    Question(EX02, "topk_aux_loss", 3, "topk_aux_loss(probs, indices) -> scalar", ref_topk_aux_loss, _cases_topk_aux_loss,
             "f is a [k, E] table: f[j, e] = fraction of tokens whose j-th choice is e; loss = E * sum_{j,e} f[j, e] * P[e] (k at balance)"),
    Question(EX02, "router_z_loss", 2, "router_z_loss(logits) -> scalar", ref_router_z_loss, _cases_router_z_loss,
             "mean over tokens of (logsumexp over experts)^2; use torch.logsumexp so large logits do not overflow"),
    Question(EX03, "expert_capacity", 2, "expert_capacity(num_tokens, num_experts, capacity_factor, k=1, min_capacity=4) -> int",
             ref_expert_capacity, _cases_expert_capacity,
             "C = max(min_capacity, floor(capacity_factor * k * num_tokens / num_experts)); floor, not round or ceil; return an int"),
    Question(EX03, "buffer_positions", 3, "buffer_positions(indices, num_experts) -> positions [T, k] int64", ref_buffer_positions,
             _cases_buffer_positions,
             "position = how many earlier assignments chose the same expert, in choice-major order (all first choices in token order, then all second choices)"),
    Question(EX03, "capacity_kept", 2, "capacity_kept(indices, num_experts, capacity) -> kept [T, k] bool", ref_capacity_kept,
             _cases_capacity_kept, "an assignment is kept when its buffer position is < capacity; return a bool tensor"),
    Question(EX03, "switch_layer_forward", 3,
             "switch_layer_forward(x, w_gate, expert_weights, capacity_factor=1.25, min_capacity=4) -> y [T, d]",
             ref_switch_layer_forward, _cases_switch_layer_forward,
             "y = x + gate * (x @ W_e) for kept tokens and y = x for dropped ones: a dropped token passes through the residual unchanged"),
    Question(EX04, "swiglu_expert", 2, "swiglu_expert(x, w1, w3, w2) -> [..., d]", ref_swiglu_expert, _cases_swiglu_expert,
             "(silu(x @ w1) * (x @ w3)) @ w2; silu(a) = a * sigmoid(a)"),
    Question(EX04, "mixtral_block_forward", 4, "mixtral_block_forward(x, w_gate, w1, w3, w2, k=2) -> y [T, d]",
             ref_mixtral_block_forward, _cases_mixtral_block_forward,
             "router in float32: softmax, top-k, renormalise the k weights; y[t] = sum_j w[t, j] * SwiGLU_{i[t, j]}(x[t]); no residual"),
    Question(EX05, "sort_slots_by_expert", 3, "sort_slots_by_expert(indices) -> (sorted_experts [T*k] int64, order [T*k] int64)",
             ref_sort_slots_by_expert, _cases_sort_slots_by_expert,
             "flatten to slots s = t*k + j and sort them by expert with a STABLE sort (torch.argsort(..., stable=True)): ties keep slot order",
             ("sorted_experts", "order")),
    Question(EX05, "expert_offsets", 2, "expert_offsets(indices, num_experts) -> (counts [E] int64, offsets [E+1] int64)",
             ref_expert_offsets, _cases_expert_offsets,
             "counts = torch.bincount(indices.flatten(), minlength=E); offsets starts at 0 and is the running sum of counts",
             ("counts", "offsets")),
    Question(EX05, "permute_tokens", 2, "permute_tokens(x, order, k) -> x_sorted [T*k, d]", ref_permute_tokens, _cases_permute_tokens,
             "slot s belongs to token s // k, so row i of the result is x[order[i] // k]"),
    Question(EX05, "unpermute_and_combine", 3, "unpermute_and_combine(y_sorted, order, weights) -> y [T, d]",
             ref_unpermute_and_combine, _cases_unpermute_and_combine,
             "invert the permutation (row i holds slot order[i]), reshape to [T, k, d], multiply by weights[..., None] and sum over k"),
]

EXERCISES: dict[str, list[Question]] = {}
for _q in QUESTIONS:
    EXERCISES.setdefault(_q.exercise, []).append(_q)


def questions_for(exercise: str) -> list[Question]:
    if exercise not in EXERCISES:
        raise ValueError(f"exercise must be one of {sorted(EXERCISES)}, got {exercise!r}")
    return EXERCISES[exercise]


def find_question(name: str) -> Question:
    """Look a question up by function name (``router_probs``) or id (``ex01_router_topk.router_probs``)."""
    for q in QUESTIONS:
        if name in (q.name, q.qid):
            return q
    raise ValueError(f"no question named {name!r}; known: {[q.name for q in QUESTIONS]}")
