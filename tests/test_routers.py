"""Routers: test vectors through the routers, gates, orderings, jitter, capacity, precision."""

from __future__ import annotations

import pytest
import torch
from _moe_vectors import (
    CAPACITY_CF1,
    KEPT,
    POSITIONS,
    TOL32,
    TOP1,
    TOP2_ROW0,
    TOP2_ROW3,
    E,
    T,
    identity_input,
    load_vector_into_router,
    logits64,
    probs64,
)

from moe_utils import NoisyTopKRouter, Routing, SwitchRouter, TopKRouter

# ---------------------------------------------------------------- test vectors


def test_router_logits_of_identity_input_equal_test_vector():
    r = TopKRouter(T, E, k=2)
    load_vector_into_router(r)
    routing = r(identity_input())
    assert torch.allclose(routing.logits.double(), logits64(), atol=TOL32)
    assert torch.allclose(routing.probs.double(), probs64(), atol=TOL32)


def test_topk_router_test_vector_renormalised_top2_rows_0_and_3():
    r = TopKRouter(T, E, k=2)
    load_vector_into_router(r)
    routing = r(identity_input())
    assert routing.indices[:, 0].tolist() == TOP1
    assert torch.allclose(routing.weights[0].double(), torch.tensor(TOP2_ROW0, dtype=torch.float64), atol=TOL32)
    assert torch.allclose(routing.weights[3].double(), torch.tensor(TOP2_ROW3, dtype=torch.float64), atol=TOL32)
    assert routing.kept.all() and routing.capacity is None


def test_switch_router_test_vector_capacity_positions_and_kept():
    r = SwitchRouter(T, E, eval_capacity_factor=1.0, min_capacity=0).eval()
    load_vector_into_router(r)
    routing = r(identity_input())
    assert routing.indices.squeeze(1).tolist() == TOP1
    assert routing.capacity == CAPACITY_CF1
    assert routing.positions.squeeze(1).tolist() == POSITIONS
    assert routing.kept.squeeze(1).tolist() == KEPT
    assert routing.kept_per_expert().tolist() == [2, 1, 1]
    assert routing.tokens_per_expert().tolist() == [4, 1, 1]
    assert routing.dropped_fraction() == pytest.approx(2 / 6)


# ---------------------------------------------------------------- gates


def test_switch_gate_is_max_probability_not_renormalised():
    r = SwitchRouter(T, E).eval()
    load_vector_into_router(r)
    routing = r(identity_input())
    expected = probs64().max(dim=-1).values
    assert torch.allclose(routing.weights.squeeze(1).double(), expected, atol=TOL32)
    assert (routing.weights < 0.999).all(), "a renormalised top-1 gate would be exactly 1"


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_topk_router_weights_sum_to_one(k):
    r = TopKRouter(16, 5, k=k)
    routing = r(torch.randn(32, 16))
    assert torch.allclose(routing.weights.sum(dim=-1), torch.ones(32), atol=1e-6)
    assert (routing.weights > 0).all()


def test_topk_router_without_renormalisation_keeps_raw_probabilities():
    r = TopKRouter(T, E, k=2, renormalize=False)
    load_vector_into_router(r)
    routing = r(identity_input())
    expected = probs64().topk(2, dim=-1).values
    assert torch.allclose(routing.weights.double(), expected, atol=TOL32)


def test_topk_weights_are_sorted_best_first():
    routing = TopKRouter(8, 6, k=3)(torch.randn(20, 8))
    assert (routing.weights[:, :-1] >= routing.weights[:, 1:]).all()


def test_softmax_topk_renormalise_equals_topk_logits_then_softmax_values_and_gradients():
    torch.manual_seed(5)
    h = torch.randn(12, 8, dtype=torch.float64)
    h1 = h.clone().requires_grad_(True)
    h2 = h.clone().requires_grad_(True)
    # ordering A (Mixtral): softmax over all experts, top-k, renormalise
    p = h1.softmax(dim=-1)
    top_p, idx_a = p.topk(2, dim=-1)
    w_a = top_p / top_p.sum(dim=-1, keepdim=True)
    # ordering B: top-k of the logits, softmax over those k
    top_h, idx_b = h2.topk(2, dim=-1)
    w_b = top_h.softmax(dim=-1)
    assert torch.equal(idx_a, idx_b)
    assert torch.allclose(w_a, w_b, atol=1e-14)
    g = torch.randn(12, 2, dtype=torch.float64)
    (w_a * g).sum().backward()
    (w_b * g).sum().backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-14)
    # and the router implements the same function
    r = TopKRouter(8, 8, k=2)
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(8))
    routing = r(h.float())
    assert torch.equal(routing.indices, idx_b)
    assert torch.allclose(routing.weights.double(), w_b.detach(), atol=1e-6)


# ---------------------------------------------------------------- jitter, capacity modes, groups


def test_switch_jitter_only_in_training():
    r = SwitchRouter(16, 4, jitter_eps=0.1)
    x = torch.randn(32, 16)
    clean = x @ r.gate.weight.detach().t()
    r.train()
    a, b = r(x).logits, r(x).logits
    assert not torch.allclose(a, b), "two training calls must draw different jitter"
    assert not torch.allclose(a, clean)
    r.eval()
    c, d = r(x).logits, r(x).logits
    assert torch.equal(c, d)
    assert torch.allclose(c, clean, atol=1e-5)


def test_switch_jitter_multiplies_router_input_within_eps():
    # with d_model = 1, logit[t, e] = x[t] * u[t] * w[e]: the ratio to the clean logit is u[t]
    # for every expert, and u lies in [1 - eps, 1 + eps]
    eps = 0.05
    r = SwitchRouter(1, 3, jitter_eps=eps).train()
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0], [-2.0], [0.5]]))
    x = torch.linspace(0.5, 2.0, 64).unsqueeze(1)
    ratio = (r(x).logits / (x * r.gate.weight.detach().t())).double()
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)
    assert (ratio >= 1 - eps - 1e-6).all() and (ratio <= 1 + eps + 1e-6).all()
    assert ratio.std() > 0


def test_switch_eval_mode_uses_eval_capacity_factor():
    n_tok, num_experts = 40, 4
    r = SwitchRouter(8, num_experts, capacity_factor=1.0, eval_capacity_factor=2.0, min_capacity=0)
    x = torch.randn(n_tok, 8)
    assert r.train()(x).capacity == 10  # floor(1.0 * 40 / 4)
    assert r.eval()(x).capacity == 20  # floor(2.0 * 40 / 4)


def _all_to_expert_zero(router):
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.weight[0] = 1.0


def test_group_size_gives_per_group_capacity():
    num_experts, group, n_groups = 2, 8, 2
    x = torch.rand(group * n_groups, 4) + 0.1  # positive, so every token picks expert 0
    grouped = SwitchRouter(4, num_experts, eval_capacity_factor=1.0, min_capacity=0, group_size=group).eval()
    whole = SwitchRouter(4, num_experts, eval_capacity_factor=1.0, min_capacity=0).eval()
    _all_to_expert_zero(grouped)
    _all_to_expert_zero(whole)
    rg, rw = grouped(x), whole(x)
    assert rg.capacity == 4  # floor(1.0 * 8 / 2) per group
    assert rw.capacity == 8  # floor(1.0 * 16 / 2) for one group of 16
    per_group = [True] * 4 + [False] * 4
    assert rg.kept.squeeze(1).tolist() == per_group * n_groups
    assert rw.kept.squeeze(1).tolist() == [True] * 8 + [False] * 8


def test_group_size_must_divide_number_of_tokens():
    r = SwitchRouter(4, 2, group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        r(torch.randn(12, 4))


def test_switch_without_dropping_keeps_everything():
    r = SwitchRouter(4, 2, drop_tokens=False).eval()
    _all_to_expert_zero(r)
    routing = r(torch.rand(50, 4) + 0.1)
    assert routing.kept.all() and routing.capacity is None


# ---------------------------------------------------------------- precision


ROUTERS = {
    "topk": lambda: TopKRouter(32, 4, k=2),
    "switch": lambda: SwitchRouter(32, 4),
    "noisy": lambda: NoisyTopKRouter(32, 4, k=2),
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_logits_are_float32_for_low_precision_input(dtype, name):
    r = ROUTERS[name]()
    torch.nn.init.normal_(r.gate.weight)
    r = r.to(dtype).eval()
    routing = r(torch.randn(64, 32).to(dtype))
    assert routing.logits.dtype == torch.float32
    assert routing.probs.dtype == torch.float32
    assert routing.weights.dtype == torch.float32


def test_router_logits_are_not_rounded_to_bfloat16():
    # a bf16 matmul cast to float32 afterwards would give only bf16-representable values
    r = TopKRouter(64, 8, k=2).to(torch.bfloat16)
    logits = r(torch.randn(128, 64).to(torch.bfloat16)).logits
    assert not torch.equal(logits, logits.bfloat16().float())


# ---------------------------------------------------------------- noisy top-k


def test_noisy_topk_starts_at_zero_weights():
    r = NoisyTopKRouter(16, 4, k=2)
    assert torch.count_nonzero(r.gate.weight) == 0
    assert torch.count_nonzero(r.noise.weight) == 0
    routing = r.eval()(torch.randn(10, 16))
    assert torch.allclose(routing.probs, torch.full((10, 4), 0.25))


def test_noisy_topk_is_deterministic_in_eval_and_noisy_in_training():
    r = NoisyTopKRouter(16, 4, k=2)
    torch.nn.init.normal_(r.gate.weight)
    x = torch.randn(30, 16)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.indices, b.indices)
    r.train()  # noise weights are zero, so the noise std is softplus(0) = ln 2 > 0
    c, d = r(x), r(x)
    assert not torch.allclose(c.logits, d.logits)


def test_noisy_topk_weights_are_softmax_over_kept_logits():
    r = NoisyTopKRouter(8, 6, k=3)
    torch.nn.init.normal_(r.gate.weight)
    torch.nn.init.normal_(r.noise.weight)
    routing = r.train()(torch.randn(10, 8))
    h = routing.logits.double()
    for t in range(10):
        chosen = routing.indices[t].tolist()
        assert sorted(chosen) == sorted(h[t].topk(3).indices.tolist())
        denom = sum(torch.exp(h[t, e]).item() for e in chosen)
        expected = [torch.exp(h[t, e]).item() / denom for e in chosen]
        assert routing.weights[t].double().tolist() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------- Routing record


def test_routing_fixed_is_dropless_and_counts_tokens():
    routing = Routing.fixed(torch.tensor([[0, 2], [2, 1], [2, 0]]), torch.full((3, 2), 0.5), num_experts=4)
    assert routing.kept.all()
    assert routing.tokens_per_expert().tolist() == [2, 1, 3, 0]
    assert routing.dropped_fraction() == 0.0
    assert routing.num_tokens == 3 and routing.k == 2


def test_routing_combine_weights_zero_where_dropped():
    routing = Routing(
        indices=torch.tensor([[0], [0], [1]]),
        weights=torch.tensor([[0.7], [0.6], [0.9]]),
        kept=torch.tensor([[True], [False], [True]]),
        num_experts=2,
    )
    assert routing.combine_weights.squeeze(1).tolist() == pytest.approx([0.7, 0.0, 0.9])
    assert routing.kept_per_expert().tolist() == [1, 1]
