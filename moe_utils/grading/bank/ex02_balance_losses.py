"""ex02_balance_losses: the Switch and top-k load-balancing losses, the router z-loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, distinct_choices, probs, randint, randn
from ._vectors import TEST_TOP1, test_logits, test_probs

NAME = "ex02_balance_losses"
F64 = torch.float64


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


def _f_top1(top1, E, dtype):
    return F.one_hot(top1, E).to(dtype).mean(dim=0)


def cases_switch_aux_loss(h: Rand) -> list[Case]:
    p = test_probs()
    top1 = torch.tensor(TEST_TOP1)
    collapse = F.one_hot(torch.zeros(6, dtype=torch.int64), 5).float()
    return [
        Case("test vector, alpha = 1", (p, top1), {"alpha": 1.0}, expected=torch.tensor(1.2226686, dtype=F64), atol=1e-6),
        Case("test vector, default alpha = 1e-2", (p, top1), expected=torch.tensor(0.012226686, dtype=F64), atol=1e-8),
        Case("random float32, T=16 E=4", (probs(41, 16, 4), randint(42, 4, 16))),
        Case("gradient reaches the router probabilities (float64, T=10 E=5)",
             (probs(43, 10, 5, dtype=F64), randint(44, 5, 10)), {"alpha": 1.0}, grad=(0,),
             hint="only P (the mean probability) carries gradient: f comes from counts; do not detach P"),
        Case("uniform routing gives alpha", (torch.full((8, 4), 0.25), torch.arange(8) % 4), {"alpha": 0.5}, public=False),
        Case("total collapse gives alpha * E", (collapse, torch.zeros(6, dtype=torch.int64)), {"alpha": 1.0}, public=False),
        Case("random float64, T=33 E=8, alpha = 0.1", (h.probs(33, 8, dtype=F64), h.randint(8, 33)), {"alpha": 0.1},
             public=False),
        Case("an expert nobody chose, T=5 E=6", (h.probs(5, 6), h.randint(2, 5)), {"alpha": 1.0}, grad=(0,), public=False),
    ]


def cases_topk_aux_loss(h: Rand) -> list[Case]:
    p = test_probs()
    top2 = p.topk(2, dim=-1).indices
    balanced = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], 1)
    return [
        Case("test vector, k=2 (docs/conventions.md: 2.1825705)", (p, top2), expected=torch.tensor(2.1825705, dtype=F64),
             atol=1e-6),
        Case("random float32, T=12 E=6 k=2", (probs(51, 12, 6), distinct_choices(52, 12, 6, 2))),
        Case("perfect balance gives k (k=2, E=4)", (torch.full((8, 4), 0.25), balanced)),
        Case("gradient reaches the router probabilities (float64, T=9 E=5 k=3)",
             (h.probs(9, 5, dtype=F64), h.choices(9, 5, 3)), grad=(0,), public=False),
        Case("k = 1 equals the Switch loss with alpha 1, T=10 E=4", (h.probs(10, 4), h.choices(10, 4, 1)), public=False),
        Case("random float64, T=20 E=8 k=2", (h.probs(20, 8, dtype=F64), h.choices(20, 8, 2)), public=False),
    ]


def _huge_logits(r: Rand, T: int, E: int) -> torch.Tensor:
    """float32 logits around 900: exp overflows in float32 and in float64 too."""
    return (r.randn(T, E, dtype=F64, scale=60.0) + 900.0).float()


def cases_router_z_loss(h: Rand) -> list[Case]:
    return [
        Case("test vector (docs/conventions.md: 5.3166803)", (test_logits(),), expected=torch.tensor(5.3166803, dtype=F64),
             atol=1e-6),
        Case("zero logits, E=8: (ln 8)^2, not 0", (torch.zeros(4, 8),),
             expected=torch.tensor(math.log(8) ** 2, dtype=torch.float32)),
        Case("random float32, T=7 E=5", (randn(61, 7, 5, scale=2.0),)),
        Case("large float32 logits (exp overflows: use logsumexp), T=4 E=6", (_huge_logits(Rand(65), 4, 6),)),
        Case("large float64 logits, T=3 E=4", (h.randn(3, 4, scale=300.0, dtype=F64),), public=False, rtol=1e-6),
        Case("large float32 logits, T=5 E=8", (_huge_logits(h, 5, 8),), public=False),
        Case("gradient (float64, T=6 E=4)", (h.randn(6, 4, dtype=F64),), grad=(0,), public=False),
        Case("one token, T=1 E=3", (h.randn(1, 3),), public=False),
    ]


_SCALAR = "return a 0-dim tensor (a scalar): sum (or average) over every axis the formula sums over"

EXERCISE = Exercise(
    name=NAME,
    title="Load-balancing losses and the router z-loss",
    lecture="03_load_balancing",
    questions=[
        Question(
            NAME, "switch_aux_loss", 3, "switch_aux_loss(probs, top1, alpha=1e-2) -> scalar",
            ref_switch_aux_loss, cases_switch_aux_loss,
            "alpha * E * sum_i f_i * P_i: f_i = fraction of tokens whose top-1 is i, P_i = mean probability of i; "
            "do not forget the factor E",
            hints={
                "shape": _SCALAR,
                "dtype": "return the dtype of probs: F.one_hot gives int64, so cast f with .to(probs.dtype)",
                "grad": "only P (the mean probability) carries gradient: f comes from counts; do not detach P",
            },
            wrong_answers=(
                WrongAnswer("the factor E is missing",
                            lambda probs, top1, alpha=1e-2: alpha * (_f_top1(top1, probs.shape[1], probs.dtype)
                                                                     * probs.mean(0)).sum(),
                            "loss = alpha * E * sum_i f_i P_i; with the factor E, perfect balance gives alpha"),
                WrongAnswer("f is computed from the probabilities instead of the top-1 counts",
                            lambda probs, top1, alpha=1e-2: alpha * probs.shape[1] * (probs.mean(0) ** 2).sum(),
                            "f_i counts the tokens whose top-1 expert is i (F.one_hot(top1, E).mean(0)); "
                            "only P comes from the probabilities"),
            ),
        ),
        Question(
            NAME, "topk_aux_loss", 3, "topk_aux_loss(probs, indices) -> scalar",
            ref_topk_aux_loss, cases_topk_aux_loss,
            "f is a [k, E] table: f[j, e] = fraction of tokens whose j-th choice is e; loss = E * sum_{j,e} "
            "f[j, e] * P[e] (k at balance)",
            hints={"shape": _SCALAR, "dtype": "return the dtype of probs: cast the one-hot counts with .to(probs.dtype)"},
            wrong_answers=(
                WrongAnswer("only the first choice is counted",
                            lambda probs, indices: probs.shape[1] * (_f_top1(indices[:, 0], probs.shape[1], probs.dtype)
                                                                     * probs.mean(0)).sum(),
                            "count every choice: f[j, e] for j = 0 .. k-1, so the loss is k at perfect balance"),
                WrongAnswer("the loss is divided by k",
                            lambda probs, indices: ref_topk_aux_loss(probs, indices) / indices.shape[1],
                            "do not divide by k: this loss is k at perfect balance (the Hugging Face Mixtral form)"),
            ),
        ),
        Question(
            NAME, "router_z_loss", 2, "router_z_loss(logits) -> scalar",
            ref_router_z_loss, cases_router_z_loss,
            "mean over tokens of (logsumexp over experts)^2; use torch.logsumexp so large logits do not overflow",
            hints={
                "nan": "exp overflows for large logits (float32 above ~88, float64 above ~709): use "
                       "torch.logsumexp, which subtracts each row's maximum first",
                "shape": _SCALAR,
                "dtype": "return the dtype of the logits",
            },
            wrong_answers=(
                WrongAnswer("the logsumexp is not squared",
                            lambda logits: torch.logsumexp(logits, dim=-1).mean(),
                            "square each token's logsumexp, then average over the tokens"),
                WrongAnswer("the square of the mean instead of the mean of the squares",
                            lambda logits: torch.logsumexp(logits, dim=-1).mean() ** 2,
                            "square first (per token), then take the mean over the tokens"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "ref_switch_aux_loss", "ref_topk_aux_loss", "ref_router_z_loss"]
