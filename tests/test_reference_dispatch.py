"""The loop-over-experts oracle: an independent per-token loop and float64 gradchecks."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils import ExpertBank, Routing, moe_ffn, moe_ffn_reference


def _expert_by_hand(bank: ExpertBank, e: int, x_t: list[float]) -> list[float]:
    """One token through expert e with scalar Python arithmetic (no torch matmuls)."""
    d, f = bank.d_model, bank.d_ff
    w1, w2 = bank.w1.detach()[e].tolist(), bank.w2.detach()[e].tolist()
    w3 = bank.w3.detach()[e].tolist() if bank.w3 is not None else None
    hidden = []
    for j in range(f):
        a = sum(x_t[i] * w1[i][j] for i in range(d))
        if bank.kind == "swiglu":
            b = sum(x_t[i] * w3[i][j] for i in range(d))
            hidden.append(a / (1.0 + math.exp(-a)) * b)
        else:
            hidden.append(0.5 * a * (1.0 + math.erf(a / math.sqrt(2.0))))
    return [sum(hidden[j] * w2[j][o] for j in range(f)) for o in range(d)]


def _moe_by_hand(x: torch.Tensor, routing: Routing, bank: ExpertBank) -> torch.Tensor:
    rows = []
    for t in range(x.shape[0]):
        acc = [0.0] * bank.d_model
        for j in range(routing.k):
            if not routing.kept[t, j]:
                continue
            out = _expert_by_hand(bank, int(routing.indices[t, j]), x[t].tolist())
            w = float(routing.weights[t, j])
            acc = [a + w * o for a, o in zip(acc, out)]
        rows.append(acc)
    return torch.tensor(rows, dtype=torch.float64).reshape(x.shape[0], bank.d_model)


def _random_routing(T, E, k, generator, drop=False):
    idx = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)])
    w = torch.rand(T, k, generator=generator, dtype=torch.float64)
    kept = torch.rand(T, k, generator=generator) > 0.3 if drop else torch.ones(T, k, dtype=torch.bool)
    return Routing(indices=idx, weights=w, kept=kept, num_experts=E)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("drop", [False, True])
def test_reference_equals_per_token_python_loop_float64(kind, drop):
    g = torch.Generator().manual_seed(11)
    T, E, k, d, f = 7, 4, 2, 5, 6
    bank = ExpertBank(E, d, f, kind=kind).double()
    x = torch.randn(T, d, dtype=torch.float64, generator=g)
    routing = _random_routing(T, E, k, g, drop=drop)
    assert torch.allclose(moe_ffn_reference(x, routing, bank), _moe_by_hand(x, routing, bank), atol=1e-12)


def test_reference_gives_zero_for_tokens_with_every_assignment_dropped():
    bank = ExpertBank(3, 4, 6).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    routing = Routing(
        indices=torch.tensor([[0, 1], [1, 2], [2, 0]]),
        weights=torch.full((3, 2), 0.5, dtype=torch.float64),
        kept=torch.tensor([[False, False], [True, False], [True, True]]),
        num_experts=3,
    )
    y = moe_ffn_reference(x, routing, bank)
    assert torch.count_nonzero(y[0]) == 0
    assert torch.count_nonzero(y[1]) > 0


def test_auto_backend_equals_reference():
    g = torch.Generator().manual_seed(12)
    bank = ExpertBank(4, 8, 16)
    x = torch.randn(20, 8, generator=g)
    routing = _random_routing(20, 4, 2, g)
    routing = Routing(routing.indices, routing.weights.float(), routing.kept, 4)
    assert torch.allclose(moe_ffn(x, routing, bank, backend="auto"), moe_ffn_reference(x, routing, bank), atol=1e-5)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
@pytest.mark.parametrize("drop", [False, True])
def test_reference_gradcheck_float64_wrt_x_expert_weights_and_routing_weights(kind, drop):
    g = torch.Generator().manual_seed(13)
    T, E, k, d, f = 5, 3, 2, 3, 4
    bank = ExpertBank(E, d, f, kind=kind).double()
    base = _random_routing(T, E, k, g, drop=drop)
    if not drop:
        base = Routing.fixed(base.indices, base.weights, E)
    x = torch.randn(T, d, dtype=torch.float64, generator=g, requires_grad=True)
    rw = base.weights.clone().requires_grad_(True)
    weights = [p for p in (bank.w1, bank.w3, bank.w2) if p is not None]

    def f_(x_, rw_, *expert_weights):
        # gradcheck perturbs its inputs in place; the expert weights ARE the bank's parameters
        routing = Routing(base.indices, rw_, base.kept, E)
        return moe_ffn_reference(x_, routing, bank)

    assert all(w.requires_grad and w.dtype == torch.float64 for w in weights)
    assert torch.autograd.gradcheck(f_, (x, rw, *weights), eps=1e-6, atol=1e-5)


def test_dropped_assignment_gets_no_gradient():
    bank = ExpertBank(2, 3, 4).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    rw = torch.tensor([[1.0], [1.0]], dtype=torch.float64, requires_grad=True)
    routing = Routing(torch.tensor([[0], [1]]), rw, torch.tensor([[True], [False]]), 2)
    moe_ffn_reference(x, routing, bank).sum().backward()
    assert torch.count_nonzero(x.grad[1]) == 0 and rw.grad[1].item() == 0.0
    assert torch.count_nonzero(bank.w1.grad[1]) == 0
    assert torch.count_nonzero(x.grad[0]) > 0
