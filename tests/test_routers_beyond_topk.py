"""Notebook 09's routers and layers: random, hash, expert choice, bias balancing, shared and
fine-grained experts, sparse upcycling.

Each router is checked against an independent reference (plain Python loops in float64,
hand-worked examples) or an invariant, then pushed through every CPU dispatch backend
(reference loop, torch, Triton via the interpreter that conftest.py switches on).
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
from test_dispatch_torch import assert_matches_reference

from moe_utils import DenseFFN, ExpertBank, FeedForward, MoELayer, SwiGLU, moe_ffn
from moe_utils.layers import SharedExpertMoELayer, deepseek_layer, upcycled_layer
from moe_utils.monitor import max_violation, routing_stats
from moe_utils.routers import (
    BiasBalancedRouter,
    ExpertChoiceRouter,
    HashRouter,
    RandomRouter,
    Routing,
    TopKRouter,
    balanced_hash_table,
    random_hash_table,
)

TRITON = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)


def _set_gate(router, weight: torch.Tensor) -> None:
    with torch.no_grad():
        router.gate.weight.copy_(weight)


# ============================================================================ expert choice


def _expert_choice_loop(probs: torch.Tensor, C: int, group: int) -> dict:
    """Independent reference: {(token, expert): weight}, each expert's C best tokens per group,
    by a Python sort (score descending, then token id ascending, as a stable sort would)."""
    T, E = probs.shape
    chosen = {}
    for g0 in range(0, T, group):
        for e in range(E):
            ranked = sorted(range(g0, g0 + group), key=lambda t: (-float(probs[t, e].detach()), t))
            for t in ranked[:C]:
                chosen[(t, e)] = float(probs[t, e].detach())
    return chosen


def _as_pairs(r: Routing) -> dict:
    out = {}
    for t in range(r.num_tokens):
        for j in range(r.k):
            if r.valid[t, j]:
                out[(t, int(r.indices[t, j]))] = float(r.weights[t, j].detach())
    return out


@pytest.mark.parametrize("T,E,c,group", [(24, 4, 2.0, None), (30, 3, 1.0, None), (32, 8, 2.0, 8), (10, 4, 0.5, None),
                                         (5, 8, 2.0, None)])
def test_expert_choice_every_expert_takes_exactly_c_tokens_and_matches_a_loop(T, E, c, group):
    torch.manual_seed(T + E)
    r = ExpertChoiceRouter(16, E, capacity_factor=c, group_size=group).double()
    x = torch.randn(T, 16, dtype=torch.float64)
    routing = r(x)
    G = group or T
    C = min(G, max(1, math.floor(c * G / E)))  # Zhou et al.: k = n c / e, at least one, at most the group
    assert routing.capacity == C == r.capacity(G)
    n_groups = T // G
    assert routing.kept_per_expert().tolist() == [C * n_groups] * E  # every expert exactly full
    assert routing.tokens_per_expert().tolist() == [C * n_groups] * E  # padding is no load
    assert max_violation(routing.tokens_per_expert()) == 0.0
    probs = (x @ r.gate.weight.detach().t()).softmax(-1)
    assert torch.allclose(routing.probs, probs, atol=1e-12)
    want = _expert_choice_loop(probs, C, G)
    got = _as_pairs(routing)
    assert got.keys() == want.keys()
    assert all(abs(got[p] - want[p]) < 1e-12 for p in want)  # weight = S[t, e], not renormalised
    # slots: a token's experts first, best score first; the rest is padding with weight 0
    for t in range(T):
        n = int(routing.valid[t].sum())
        assert routing.valid[t, :n].all() and not routing.valid[t, n:].any()
        w = routing.weights[t, :n].tolist()
        assert w == sorted(w, reverse=True)
        assert (routing.weights[t, n:] == 0).all() and not routing.kept[t, n:].any()
    assert routing.k == max(1, max(sum(1 for p in want if p[0] == t) for t in range(T)))


def test_expert_choice_a_token_may_get_zero_or_several_experts():
    # gate = identity, so x holds the logits. E = 3, T = 3, c = 1 -> C = 1 token per expert.
    r = ExpertChoiceRouter(3, 3, capacity_factor=1.0).double()
    _set_gate(r, torch.eye(3, dtype=torch.float64))
    x = torch.tensor([[3.0, 2.9, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    # p[0] = (0.512, 0.463, 0.025), p[1] = (0.045, 0.045, 0.909), p[2] = (1/3, 1/3, 1/3): experts 0 and 1
    # both rank token 0 first (0.512 > 1/3 > 0.045 and 0.463 > 1/3 > 0.045), expert 2 ranks token 1 first
    routing = r(x)
    assert _as_pairs(routing).keys() == {(0, 0), (0, 1), (1, 2)}
    assert routing.k == 2 and routing.valid.sum(1).tolist() == [2, 1, 0]
    assert routing.indices[0].tolist() == [0, 1]  # best score first
    assert routing.valid[1].tolist() == [True, False] and not routing.valid[2].any()
    assert routing.no_expert_fraction() == pytest.approx(1 / 3)  # token 2 passes through the residual only
    assert routing.dropped_fraction() == 0.0  # an expert not choosing a token is no capacity drop
    stats = routing_stats(routing)
    assert stats["tokens_per_expert"] == [1, 1, 1] and stats["max_violation"] == 0.0


def test_expert_choice_routing_of_a_token_depends_on_later_tokens():
    # why expert choice breaks causal decoding: appending tokens changes earlier tokens' experts
    r = ExpertChoiceRouter(2, 2, capacity_factor=1.0).double()
    _set_gate(r, torch.tensor([[2.0, 0.0], [0.0, 2.0]], dtype=torch.float64))
    early = torch.tensor([[1.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    before = _as_pairs(r(early))  # T = 2, C = 1: token 1 is expert 1's best so far
    later = torch.tensor([[0.0, 1.0], [0.0, 0.5]], dtype=torch.float64)  # both prefer expert 1
    after = _as_pairs(r(torch.cat([early, later])))  # T = 4, C = 2
    assert (1, 1) in before and (1, 1) not in after  # token 1 lost expert 1 to the later tokens


def test_expert_choice_bad_input_gives_clear_errors():
    for bad in (0, -1.0, 0.0):
        with pytest.raises(ValueError, match="capacity_factor must be a finite number > 0 for expert choice"):
            ExpertChoiceRouter(4, 2, capacity_factor=bad)
    with pytest.raises(ValueError, match="capacity_factor"):
        ExpertChoiceRouter(4, 2, capacity_factor=float("nan"))
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        ExpertChoiceRouter(4, 2, group_size=4)(torch.randn(6, 4))
    with pytest.raises(ValueError, match="aux_loss=None"):
        MoELayer(ExpertChoiceRouter(4, 2), ExpertBank(2, 4, 8), aux_loss="switch")
    empty = ExpertChoiceRouter(4, 2)(torch.zeros(0, 4))
    assert empty.indices.shape == (0, 1) and empty.no_expert_fraction() == 0.0


def test_routing_valid_mask_is_checked():
    idx = torch.zeros(2, 2, dtype=torch.long)
    w = torch.ones(2, 2)
    valid = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="kept must be False in every padding slot"):
        Routing(idx, w, torch.ones(2, 2, dtype=torch.bool), 2, valid=valid)
    with pytest.raises(ValueError, match="valid must have the shape"):
        Routing(idx, w, valid.clone(), 2, valid=valid[:, :1])
    r = Routing(idx, w, valid.clone(), 2, valid=valid)
    assert r.tokens_per_expert().tolist() == [3, 0] and r.dropped_fraction() == 0.0


# ============================================================================ hash routing


def test_hash_routing_is_a_pure_function_of_the_token_id():
    torch.manual_seed(0)
    r = HashRouter.random(8, 4, vocab_size=50, generator=torch.Generator().manual_seed(3))
    ids = torch.randint(0, 50, (64,))
    a = r(torch.randn(64, 8), token_ids=ids)
    b = r(torch.randn(64, 8) * 100, token_ids=ids)  # other hidden states: same routing
    assert torch.equal(a.indices, b.indices) and a.k == 1
    assert a.indices.squeeze(1).tolist() == [int(r.table[i]) for i in ids]
    assert (a.weights == 1).all() and a.kept.all() and a.probs is None
    # the same id anywhere in the batch goes to the same expert
    for v in ids.unique().tolist():
        assert a.indices[ids == v].unique().numel() == 1
    # and the table is a seeded draw: same generator seed, same table
    again = random_hash_table(50, 4, torch.Generator().manual_seed(3))
    assert torch.equal(again, r.table) and 0 <= int(again.min()) and int(again.max()) < 4


def test_balanced_hash_table_greedy_largest_first_on_a_hand_worked_example():
    # counts 10, 7, 5, 3, 1 on 2 experts: 10 -> e0; 7 -> e1; 5 -> e1 (7 < 10); 3 -> e0 (10 < 12);
    # 1 -> e1 (12 < 13); loads 13 / 13
    table = balanced_hash_table(torch.tensor([10, 7, 5, 3, 1]), 2)
    assert table.tolist() == [0, 1, 1, 0, 1]
    # order of ids must not matter, only counts (ties: smaller id first)
    assert balanced_hash_table(torch.tensor([1, 3, 5, 7, 10]), 2).tolist() == [1, 0, 1, 1, 0]
    # a skewed corpus: no expert gets more than the mean plus the largest single count
    counts = torch.tensor([int(1000 / (v + 1)) for v in range(200)])
    table = balanced_hash_table(counts, 8)
    load = torch.zeros(8, dtype=torch.long).index_add_(0, table, counts)
    assert int(load.max()) <= counts.sum() / 8 + int(counts.max())
    assert int(load.max()) == 1000  # the most frequent token alone: more than a fair share
    with pytest.raises(ValueError, match="token_counts must be >= 0"):
        balanced_hash_table(torch.tensor([1, -1]), 2)
    with pytest.raises(TypeError, match="token_counts"):
        balanced_hash_table(torch.tensor([1.0, 2.0]), 2)


def test_hash_router_without_token_ids_gives_a_clear_error():
    r = HashRouter.random(8, 4, vocab_size=16)
    with pytest.raises(ValueError, match=r"HashRouter routes by token id: call it as router\(x, token_ids=ids\)"):
        r(torch.randn(3, 8))
    layer = MoELayer(r, ExpertBank(4, 8, 16), aux_loss=None)
    with pytest.raises(ValueError, match=r"call the layer as layer\(x, token_ids=ids\)"):
        layer(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"token_ids must be in \[0, vocab_size - 1 = 15\]"):
        r(torch.randn(2, 8), token_ids=torch.tensor([3, 16]))
    with pytest.raises(ValueError, match="token_ids must have shape"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer tensor"):
        layer(torch.randn(2, 3, 8), token_ids=torch.zeros(2, 3))
    # with ids, the layer routes each token to table[id]
    ids = torch.tensor([[1, 2, 3], [3, 2, 1]])
    out = layer(torch.randn(2, 3, 8), token_ids=ids)
    assert out.routing.indices.squeeze(1).tolist() == r.table[ids.reshape(-1)].tolist()


# ============================================================================ random routing


def test_random_router_draws_k_distinct_experts_uniformly_with_weights_one_over_k():
    r = RandomRouter(4, 8, k=2, generator=torch.Generator().manual_seed(0))
    routing = r(torch.randn(20_000, 4))
    assert (routing.indices[:, 0] != routing.indices[:, 1]).all()
    assert (routing.weights == 0.5).all() and routing.kept.all()
    share = routing.tokens_per_expert().double() / 40_000
    # binomial sd of a share at n = 40,000 draws: sqrt(1/8 * 7/8 / 40000) ~ 0.0017; 5 sd allowed
    assert (share - 1 / 8).abs().max() < 0.0085
    pairs = torch.bincount(routing.indices[:, 0] * 8 + routing.indices[:, 1], minlength=64).view(8, 8)
    assert pairs.diagonal().sum() == 0 and pairs.sum() - pairs.diagonal().sum() == 20_000
    # fresh draws each call; a seeded generator reproduces them
    again = RandomRouter(4, 8, k=2, generator=torch.Generator().manual_seed(0))(torch.randn(20_000, 4))
    assert torch.equal(again.indices, routing.indices)
    assert not torch.equal(r(torch.randn(20_000, 4)).indices, routing.indices)
    assert sum(p.numel() for p in r.parameters()) == 0


# ============================================================================ bias balancing


def _skewed_router(score_func="softmax", rate=1e-3):
    torch.manual_seed(0)
    r = BiasBalancedRouter(6, 4, k=1, score_func=score_func, update_rate=rate)
    w = torch.zeros(4, 6)
    w[0, 0] = 3.0  # feature 0 is always positive below: expert 0 wins most tokens
    w[1:, 1:4] = torch.eye(3)
    _set_gate(r, w)
    return r


def _skewed_batch(g):
    x = torch.randn(256, 6, generator=g)
    x[:, 0] = x[:, 0].abs() * 0.3 + 0.2
    return x


def test_bias_update_moves_load_toward_balance_on_a_skewed_stream():
    r = _skewed_router(rate=1e-2)
    g = torch.Generator().manual_seed(1)
    vio = []
    for _ in range(300):
        routing = r.train()(_skewed_batch(g))
        vio.append(max_violation(routing.tokens_per_expert()))
        r.after_optimizer_step()
    assert vio[0] > 1.5  # expert 0 holds most of the stream at first
    assert sum(vio[-50:]) / 50 < 0.35 * vio[0]  # balanced by the bias alone: no gradient, no loss
    assert float(r.bias[0]) < 0 and float(r.bias[1:].max()) > 0  # the overloaded expert lost bias


def test_bias_update_rule_is_u_times_sign_of_mean_minus_load():
    r = _skewed_router(rate=1e-3)
    g = torch.Generator().manual_seed(2)
    r.train()
    a, b = r(_skewed_batch(g)), r(_skewed_batch(g))  # two forwards before one step: loads add up
    load = (a.tokens_per_expert() + b.tokens_per_expert()).double()
    want = [1e-3 * (1 if load.mean() > x else -1 if load.mean() < x else 0) for x in load.tolist()]
    step = r.update_bias()
    assert step.tolist() == pytest.approx(want, rel=1e-6)  # the bias is float32
    assert r.bias.tolist() == pytest.approx(want, rel=1e-6)
    assert r.pending_load.sum() == 0 and r.update_bias().abs().sum() == 0  # counted once, then cleared
    r.eval()(_skewed_batch(g))  # evaluation forwards do not count
    assert r.pending_load.sum() == 0


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_bias_selects_but_gates_come_from_unbiased_scores(score_func):
    torch.manual_seed(0)
    r = BiasBalancedRouter(5, 4, k=2, score_func=score_func).double()
    x = torch.randn(30, 5, dtype=torch.float64)
    with torch.no_grad():
        r.bias.copy_(torch.tensor([0.0, 0.0, 10.0, 10.0]))  # forces experts 2 and 3
    routing = r.eval()(x)
    assert sorted(routing.indices[0].tolist()) == [2, 3] and (routing.indices.sort(1).values == torch.tensor([2, 3])).all()
    h = x @ r.gate.weight.detach().t()
    s = h.softmax(-1) if score_func == "softmax" else torch.sigmoid(h)
    sel = s.gather(1, routing.indices)
    assert torch.allclose(routing.weights, sel / sel.sum(1, keepdim=True), atol=1e-12)  # the bias is not in the gate
    assert torch.allclose(routing.probs.sum(1), torch.ones(30, dtype=torch.float64))
    # with zero bias the softmax variant is the Mixtral router
    with torch.no_grad():
        r.bias.zero_()
    if score_func == "softmax":
        mix = TopKRouter(5, 4, k=2).double()
        mix.gate.weight.data.copy_(r.gate.weight.data)
        a, b = r(x), mix(x)
        assert torch.equal(a.indices, b.indices) and torch.allclose(a.weights, b.weights, atol=1e-12)


def test_bias_router_bad_input():
    with pytest.raises(ValueError, match="score_func must be one of"):
        BiasBalancedRouter(4, 4, score_func="relu")
    with pytest.raises(ValueError, match="update_rate"):
        BiasBalancedRouter(4, 4, update_rate=-1e-3)


# ============================================================================ shared + fine-grained


def test_shared_experts_see_every_token():
    torch.manual_seed(0)
    layer = deepseek_layer(8, 16, num_experts=4, k=2, granularity=2, n_shared=1).double()
    with torch.no_grad():  # silence the routed experts: what is left is the shared part
        layer.experts.w2.zero_()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    y = layer(x).output.reshape(-1, 8)
    sw = layer.shared
    x2 = x.reshape(-1, 8)
    want = (torch.nn.functional.silu(x2 @ sw.w1[0]) * (x2 @ sw.w3[0])) @ sw.w2[0]
    assert torch.allclose(y, want, atol=1e-12)
    assert (y.abs().sum(1) > 0).all()  # every token got it


def test_deepseek_layer_keeps_total_and_active_parameters_and_equals_a_loop():
    torch.manual_seed(1)
    d, f, E, k, m, ns = 8, 16, 4, 2, 2, 1
    layer = deepseek_layer(d, f, num_experts=E, k=k, granularity=m, n_shared=ns).double()
    assert layer.experts.num_experts == m * E - ns and layer.router.k == m * k - ns
    assert layer.experts.d_ff == f // m and layer.n_shared == ns
    per = 3 * d * (f // m)
    total = per * (layer.experts.num_experts + layer.n_shared)
    active = per * (layer.router.k + layer.n_shared)
    assert total == E * 3 * d * f and active == k * 3 * d * f  # the top-k layer it replaces
    x = torch.randn(11, d, dtype=torch.float64)
    out = layer(x)
    probs = (x @ layer.router.gate.weight.detach().t()).softmax(-1)
    for t in range(11):  # per token, in float64: shared + renormalised top-3 of 7
        top = sorted(range(7), key=lambda e: -float(probs[t, e]))[:3]
        z = sum(float(probs[t, e]) for e in top)
        want = layer.shared.forward_expert(0, x[t : t + 1])
        for e in top:
            want = want + float(probs[t, e]) / z * layer.experts.forward_expert(e, x[t : t + 1])
        assert torch.allclose(out.output[t : t + 1], want, atol=1e-10)
    assert deepseek_layer(d, f, E, k, granularity=4, n_shared=0).shared is None


def test_deepseek_layer_bad_input_gives_clear_errors():
    with pytest.raises(ValueError, match="n_shared must be an int >= 0"):
        deepseek_layer(8, 16, n_shared=-1)
    with pytest.raises(ValueError, match="granularity=3 must divide the expert width d_ff=16"):
        deepseek_layer(8, 16, granularity=3)
    with pytest.raises(ValueError, match=r"n_shared must be in \[0, granularity \* k - 1 = 3\]"):
        deepseek_layer(8, 16, num_experts=4, k=2, granularity=2, n_shared=4)
    with pytest.raises(TypeError, match="shared must be an ExpertBank"):
        SharedExpertMoELayer(TopKRouter(8, 4), ExpertBank(4, 8, 8), shared=SwiGLU(8, 8))


# ============================================================================ sparse upcycling


@pytest.mark.parametrize("dense_cls", [SwiGLU, lambda d, f: FeedForward(d, f, bias=False)])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_upcycled_layer_equals_the_dense_ffn_at_step_0(dense_cls, k):
    torch.manual_seed(0)
    dense = dense_cls(8, 12).double()
    layer = upcycled_layer(dense, num_experts=4, k=k)
    assert layer.experts.w1.dtype == torch.float64
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    assert torch.allclose(layer(x).output, dense(x), atol=1e-13)  # weights sum to 1: exactly dense
    for e in range(4):  # every expert an exact copy of the dense weights
        copy, orig = layer.experts.expert_module(e).state_dict(), dense.state_dict()
        assert copy.keys() == orig.keys() and all(torch.equal(copy[n], orig[n]) for n in orig)
    with torch.no_grad():  # a copy, not a view: training one expert changes neither the others nor dense
        layer.experts.w2[0].add_(1.0)
    assert not torch.equal(layer.experts.w2[1], layer.experts.w2[0])
    assert torch.allclose(dense(x), upcycled_layer(dense, 4, k)(x).output, atol=1e-13)  # dense untouched


def test_upcycled_switch_gate_scales_the_dense_output_by_p_max():
    torch.manual_seed(0)
    dense = DenseFFN(8, 12).double()
    layer = upcycled_layer(dense, num_experts=4, k=1, renormalize=False)
    x = torch.randn(9, 8, dtype=torch.float64)
    out = layer(x)
    p_max = (x @ layer.router.gate.weight.detach().t()).softmax(-1).max(-1).values
    assert torch.allclose(out.output, p_max.unsqueeze(1) * dense(x), atol=1e-12)
    assert float(p_max.max()) < 0.9  # so the upcycled model is not the dense model at step 0


def test_from_dense_keeps_the_dense_dtype_exactly():
    # bug fix: from_dense built a float32 bank and rounded float64 weights into it
    dense = SwiGLU(4, 6).double()
    with torch.no_grad():
        dense.w1.weight.add_(1e-12)
    bank = ExpertBank.from_dense(dense, 3)
    assert bank.w1.dtype == torch.float64
    assert torch.equal(bank.w1[2], dense.w1.weight.t())


# ============================================================================ every router, every backend


def _routings(T: int, d: int, E: int):
    """One Routing per router kind of notebook 09 for the same x (float32), plus the bank widths."""
    torch.manual_seed(0)
    x = torch.randn(T, d)
    ids = torch.randint(0, 40, (T,))
    bias = BiasBalancedRouter(d, E, k=2)
    with torch.no_grad():
        bias.bias.copy_(torch.linspace(-0.2, 0.2, E))
    fine = deepseek_layer(d, 8, num_experts=E // 2, k=2, granularity=2, n_shared=1)
    return x, {
        "random": RandomRouter(d, E, k=2, generator=torch.Generator().manual_seed(1))(x),
        "hash": HashRouter.random(d, E, 40)(x, token_ids=ids),
        "hash_balanced": HashRouter.balanced(d, E, torch.arange(40) % 7)(x, token_ids=ids),
        "expert_choice": ExpertChoiceRouter(d, E, capacity_factor=2.0)(x),
        "expert_choice_grouped": ExpertChoiceRouter(d, E, capacity_factor=1.0, group_size=T // 3)(x),
        "bias_balanced": bias.eval()(x),
        "deepseek_routed": fine.router(x),
    }


def _leaf(routing: Routing) -> Routing:
    return Routing(routing.indices, routing.weights.detach().clone().requires_grad_(), routing.kept,
                   routing.num_experts, valid=routing.valid)


BACKENDS = ["torch"] + (["triton"] if TRITON else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_new_router_through_every_backend_equals_the_reference_loop(backend):
    T, d, E = 21, 24, 8
    x, routings = _routings(T, d, E)
    assert routings["expert_choice"].valid is not None and not routings["expert_choice"].valid.all()
    for name, routing in routings.items():
        torch.manual_seed(2)
        bank = ExpertBank(routing.num_experts, d, 40)
        try:
            assert_matches_reference(x.clone().requires_grad_(), _leaf(routing), bank, backend)
        except AssertionError as err:
            raise AssertionError(f"router {name}: {err}") from err


def test_reference_loop_on_expert_choice_equals_a_per_token_sum():
    # the oracle itself, against y[t] = sum over the experts that chose t of S[t, e] * expert_e(x_t)
    torch.manual_seed(0)
    T, d, E = 12, 6, 4
    r = ExpertChoiceRouter(d, E, capacity_factor=2.0).double()
    bank = ExpertBank(E, d, 10).double()
    x = torch.randn(T, d, dtype=torch.float64)
    routing = r(x)
    pairs = _expert_choice_loop(routing.probs, routing.capacity, T)
    want = torch.zeros(T, d, dtype=torch.float64)
    for (t, e), w in pairs.items():
        want[t] += w * bank.forward_expert(e, x[t : t + 1])[0]
    for backend in ["reference"] + BACKENDS:
        got = moe_ffn(x if backend != "triton" else x.float(), routing if backend != "triton" else _leaf(routing),
                      bank if backend != "triton" else bank.float(), backend=backend)
        assert torch.allclose(got.double(), want, atol=1e-12 if backend != "triton" else 1e-4), backend
