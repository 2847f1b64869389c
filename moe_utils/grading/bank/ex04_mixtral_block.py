"""ex04_mixtral_block: a SwiGLU expert and a Mixtral sparse MoE block."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..spec import Case, Exercise, Question, Rand, WrongAnswer, randn
from ._vectors import test_logits
from .ex01_router_topk import ref_router_logits, ref_router_probs, ref_top_k_routing

NAME = "ex04_mixtral_block"
F64 = torch.float64


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


def _mixtral_variant(x, w_gate, w1, w3, w2, k=2, mistake=""):
    probs = ref_router_probs(ref_router_logits(x, w_gate))
    top_p, idx = probs.topk(k, dim=-1)
    wts = top_p if mistake == "raw" else top_p / top_p.sum(-1, keepdim=True)
    y = torch.zeros_like(x)
    for j in range(k):
        for t in range(x.shape[0]):
            e = idx[t, j]
            y[t] += wts[t, j].to(x.dtype) * ref_swiglu_expert(x[t], w1[e], w3[e], w2[e])
    return x + y if mistake == "residual" else y


def swiglu_weights(r: Rand, E: int | None, d: int, f: int, dtype=torch.float32):
    lead = () if E is None else (E,)
    w1 = r.randn(*lead, d, f, dtype=dtype, scale=1 / math.sqrt(d))
    w3 = r.randn(*lead, d, f, dtype=dtype, scale=1 / math.sqrt(d))
    w2 = r.randn(*lead, f, d, dtype=dtype, scale=1 / math.sqrt(f))
    return w1, w3, w2


def _fixed_weights(seed: int, E: int | None, d: int, f: int, dtype=torch.float32):
    # the public cases' weights, one seed per matrix as in the first grader
    lead = () if E is None else (E,)
    return (randn(seed, *lead, d, f, dtype=dtype, scale=1 / math.sqrt(d)),
            randn(seed + 1, *lead, d, f, dtype=dtype, scale=1 / math.sqrt(d)),
            randn(seed + 2, *lead, f, d, dtype=dtype, scale=1 / math.sqrt(f)))


def cases_swiglu_expert(h: Rand) -> list[Case]:
    silu1 = 1.0 / (1.0 + math.exp(-1.0))
    return [
        Case("random float32, T=5 d=4 f=6", (randn(111, 5, 4), *_fixed_weights(112, None, 4, 6))),
        Case("known value: x=[1, 0], w1=w3=I, w2=I", (torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.eye(2), torch.eye(2)),
             expected=torch.tensor([[silu1, 0.0]])),
        Case("random float64, T=7 d=8 f=16", (h.randn(7, 8, dtype=F64), *swiglu_weights(h, None, 8, 16, F64)), public=False),
        Case("batched input [2, 3, d], d=4 f=5", (h.randn(2, 3, 4), *swiglu_weights(h, None, 4, 5)), public=False),
    ]


def cases_mixtral_block_forward(h: Rand) -> list[Case]:
    x = test_logits()
    eye = torch.eye(3, dtype=F64)
    return [
        Case("test vector: x = logits, w_gate = I, E=3, k=2", (x, eye, *_fixed_weights(121, 3, 3, 4, F64)), {"k": 2}),
        Case("random float32, T=10 d=8 f=16 E=4 k=2", (randn(122, 10, 8), randn(123, 8, 4), *_fixed_weights(124, 4, 8, 16))),
        Case("random float32, T=6 d=4 f=8 E=8 k=3", (h.randn(6, 4), h.randn(4, 8), *swiglu_weights(h, 8, 4, 8)), {"k": 3},
             public=False),
        Case("k=1 (renormalised weight 1), T=5 d=4 f=6 E=3", (h.randn(5, 4), h.randn(4, 3), *swiglu_weights(h, 3, 4, 6)),
             {"k": 1}, public=False),
        Case("float64, default k, T=12 d=6 f=10 E=6",
             (h.randn(12, 6, dtype=F64), h.randn(6, 6, dtype=F64), *swiglu_weights(h, 6, 6, 10, F64)), public=False),
    ]


EXERCISE = Exercise(
    name=NAME,
    title="A SwiGLU expert and the Mixtral block",
    lecture="05_mixtral_top2",
    questions=[
        Question(
            NAME, "swiglu_expert", 2, "swiglu_expert(x, w1, w3, w2) -> [..., d]",
            ref_swiglu_expert, cases_swiglu_expert,
            "(silu(x @ w1) * (x @ w3)) @ w2; silu(a) = a * sigmoid(a)",
            hints={"shape": "the output has the shape of x, [..., d]: x @ w1 and x @ w3 are [..., f], and w2 ([f, d]) maps back"},
            wrong_answers=(
                WrongAnswer("GELU instead of SiLU", lambda x, w1, w3, w2: (F.gelu(x @ w1) * (x @ w3)) @ w2,
                            "SwiGLU gates with SiLU: silu(a) = a * sigmoid(a) (F.silu)"),
                WrongAnswer("w1 and w3 are swapped", lambda x, w1, w3, w2: (F.silu(x @ w3) * (x @ w1)) @ w2,
                            "the SiLU goes on the gate projection x @ w1; x @ w3 is the linear (up) branch"),
                WrongAnswer("the linear branch x @ w3 is missing", lambda x, w1, w3, w2: F.silu(x @ w1) @ w2,
                            "SwiGLU multiplies silu(x @ w1) elementwise by x @ w3 before the down projection"),
            ),
        ),
        Question(
            NAME, "mixtral_block_forward", 4, "mixtral_block_forward(x, w_gate, w1, w3, w2, k=2) -> y [T, d]",
            ref_mixtral_block_forward, cases_mixtral_block_forward,
            "router in float32: softmax, top-k, renormalise the k weights; y[t] = sum_j w[t, j] * "
            "SwiGLU_{i[t, j]}(x[t]); no residual",
            builds_on=("swiglu_expert",),
            hints={"dtype": "y has the dtype of x: the router runs in float32, so cast the weights with .to(x.dtype)",
                   "shape": "y has the shape of x, [T, d]: sum the k weighted expert outputs of each token"},
            wrong_answers=(
                WrongAnswer("the top-k weights are not renormalised",
                            lambda *a, **kw: _mixtral_variant(*a, **kw, mistake="raw"),
                            "Mixtral divides the k probabilities by their sum before weighting the experts"),
                WrongAnswer("the residual x is added",
                            lambda *a, **kw: _mixtral_variant(*a, **kw, mistake="residual"),
                            "this function is the MoE block alone: the residual is added outside it"),
            ),
        ),
    ],
)

__all__ = ["EXERCISE", "ref_swiglu_expert", "ref_mixtral_block_forward"]
