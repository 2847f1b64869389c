"""Inputs that used to give a silently wrong number, a NaN, or an unclear error.

Each test here failed before its fix (issue "Trustworthy on every machine", part 2):
the package now raises a clear error naming the argument, or computes the right value.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_dispatch_torch import make_case

from moe_utils import (
    ExpertBank,
    Routing,
    SwitchRouter,
    expert_capacity,
    mixtral_layer,
    moe_ffn,
    switch_layer,
    switch_load_balancing_loss,
    topk_load_balancing_loss,
)
from moe_utils.accounting import ModelConfig
from moe_utils.data import ByteTokenizer
from moe_utils.model import LMConfig, TinyLM

CPU_BACKENDS = ["reference", "torch"]

# ---------------------------------------------------------------- NaN / inf never pass silently


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name,bad", [("w1", float("nan")), ("w2", float("inf")), ("w3", float("-inf"))])
def test_non_finite_expert_weights_raise_and_name_the_expert(backend, name, bad):
    x, routing, bank = make_case(9, 8, 12, 3, 2)
    with torch.no_grad():
        getattr(bank, name)[1, 0, 0] = bad
    routing = Routing.fixed(torch.tensor([[1, 0]] * 9), routing.weights.detach(), 3)  # every token uses expert 1
    with pytest.raises(ValueError, match=rf"experts\.{name} in expert\(s\) \[1\]"):
        moe_ffn(x, routing, bank, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_routing_weight_on_a_dropped_slot_is_refused_on_every_backend(backend):
    # the torch path used to return a NaN row here while the reference returned 0
    x, routing, bank = make_case(5, 8, 12, 3, 1)
    w = torch.ones(5, 1)
    w[0, 0] = float("nan")
    kept = torch.ones(5, 1, dtype=torch.bool)
    kept[0, 0] = False
    with pytest.raises(ValueError, match="routing weights"):
        moe_ffn(x, Routing(routing.indices, w, kept, 3), bank, backend=backend)
    # and a record built first, then poisoned in place, is caught by the dispatch itself
    r = Routing(routing.indices, torch.ones(5, 1), kept, 3)
    r.weights[0, 0] = float("inf")
    with pytest.raises(ValueError, match="routing weights"):
        moe_ffn(x, r, bank, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_nan_input_to_a_hand_made_routing_is_refused(backend):
    x, routing, bank = make_case(4, 8, 12, 3, 1)
    x = x.detach().clone()
    x[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"\bx\b contains"):
        moe_ffn(x, routing, bank, backend=backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_overflow_inside_an_expert_raises_instead_of_returning_inf(backend):
    x, routing, bank = make_case(4, 8, 12, 2, 1)
    bank = bank.half()
    with torch.no_grad():
        bank.w1.fill_(60.0)  # finite weights; x @ w1 overflows float16
        bank.w2.fill_(60.0)
    with pytest.raises(ValueError, match="overflowed"):
        moe_ffn(x.detach().half() * 100, routing, bank, backend=backend)


def test_expert_with_nan_weights_but_no_tokens_does_not_raise():
    # NaN that cannot reach the output is not an error: expert 2 gets no token
    x, routing, bank = make_case(6, 8, 12, 3, 1)
    with torch.no_grad():
        bank.w1[2].fill_(float("nan"))
    r = Routing.fixed(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1), 3)
    for backend in CPU_BACKENDS:
        assert torch.isfinite(moe_ffn(x, r, bank, backend=backend)).all()


# ---------------------------------------------------------------- the Switch loss per routing group


def _per_group_switch_loss_loop(probs: torch.Tensor, top1: torch.Tensor, E: int, G: int, alpha: float) -> float:
    """An independent float64 loop: alpha * E * sum_e f_e P_e inside each group, then the mean."""
    losses = []
    for g in range(probs.shape[0] // G):
        p = probs[g * G:(g + 1) * G].detach().double()
        idx = top1[g * G:(g + 1) * G].tolist()
        f = [sum(1 for i in idx if i == e) / G for e in range(E)]
        P = [float(p[:, e].mean()) for e in range(E)]
        losses.append(alpha * E * sum(fe * pe for fe, pe in zip(f, P)))
    return sum(losses) / len(losses)


def test_grouped_switch_layer_aux_loss_is_the_mean_of_per_group_losses():
    torch.manual_seed(0)
    layer = switch_layer(16, 24, 4, group_size=8, aux_loss_coef=1e-2)
    with torch.no_grad():  # a skewed router, so groups differ
        layer.router.gate.weight.mul_(8)
    out = layer.eval()(torch.randn(4, 8, 16))  # 32 tokens, 4 groups of 8
    want = _per_group_switch_loss_loop(out.routing.probs, out.routing.indices[:, 0], 4, 8, 1e-2)
    whole_batch = _per_group_switch_loss_loop(out.routing.probs, out.routing.indices[:, 0], 4, 32, 1e-2)
    assert abs(want - whole_batch) > 1e-4  # the two conventions differ on this input
    assert out.aux_loss.item() == pytest.approx(want, rel=1e-6)


def test_switch_loss_function_takes_group_size_and_rejects_a_non_divisor():
    g = torch.Generator().manual_seed(1)
    probs = torch.randn(12, 3, generator=g).mul(3).softmax(-1)
    top1 = probs.argmax(-1)
    got = switch_load_balancing_loss(probs, top1, alpha=1.0, group_size=4)
    assert got.item() == pytest.approx(_per_group_switch_loss_loop(probs, top1, 3, 4, 1.0), rel=1e-6)
    assert switch_load_balancing_loss(probs, top1, 1.0).item() == pytest.approx(
        _per_group_switch_loss_loop(probs, top1, 3, 12, 1.0), rel=1e-6
    )
    with pytest.raises(ValueError, match="group_size"):
        switch_load_balancing_loss(probs, top1, 1.0, group_size=5)


# ---------------------------------------------------------------- float64 stays float64


def _mixtral_block_float64_loop(x, gate_w, bank, k):
    """Per-token float64 reference: softmax, top-k, renormalise, sum of SwiGLU experts."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ gate_w.t()
        p = torch.softmax(logits, -1)
        top_p, top_i = p.topk(k)
        w = top_p / top_p.sum()
        for j in range(k):
            e = int(top_i[j])
            h = torch.nn.functional.silu(x[t] @ bank.w1[e]) * (x[t] @ bank.w3[e])
            out[t] += w[j] * (h @ bank.w2[e])
    return out


def test_float64_layer_routes_in_float64_and_matches_a_float64_loop_to_1e12():
    torch.manual_seed(0)
    layer = mixtral_layer(8, 12, 4, k=2).double()
    x = torch.randn(7, 8, dtype=torch.float64)
    out = layer(x)
    assert out.routing.logits.dtype == torch.float64 and out.routing.weights.dtype == torch.float64
    want = _mixtral_block_float64_loop(x, layer.router.gate.weight, layer.experts, 2)
    assert (out.output - want).abs().max().item() < 1e-12


def test_float64_router_passes_an_exact_gradient_check():
    torch.manual_seed(0)
    layer = mixtral_layer(6, 8, 3, k=2).double()
    x = torch.randn(5, 6, dtype=torch.float64)

    def f(gate_weight):
        return torch.func.functional_call(layer, {"router.gate.weight": gate_weight}, (x,)).output

    assert torch.autograd.gradcheck(f, (layer.router.gate.weight.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_routers_still_route_in_float32(dtype):
    r = SwitchRouter(8, 4)
    out = r.to(dtype)(torch.randn(5, 8).to(dtype))
    assert out.logits.dtype == torch.float32


# ---------------------------------------------------------------- values that are not what the function expects


@pytest.mark.parametrize("loss", ["switch", "topk"])
def test_balance_losses_refuse_logits_where_probabilities_are_expected(loss):
    logits = torch.tensor([[2.0, 1.0, 0.0], [1.5, 0.5, 0.2], [0.1, 2.2, 0.3]])
    idx = logits.topk(2, dim=-1).indices
    fn = (lambda p: switch_load_balancing_loss(p, idx[:, 0])) if loss == "switch" else (
        lambda p: topk_load_balancing_loss(p, idx))
    with pytest.raises(ValueError, match="router_probs must hold probabilities.*softmax"):
        fn(logits)
    fn(logits.softmax(-1))  # the same numbers as probabilities are fine


@pytest.mark.parametrize(
    "field,value,exc",
    [("head_dim", -4, ValueError), ("dense_d_ff", 3.5, TypeError), ("n_kv_heads", 0, ValueError), ("d_model", 8.0, TypeError)],
)
def test_accounting_refuses_negative_and_non_integer_sizes(field, value, exc):
    kwargs = dict(name="x", vocab_size=10, d_model=8, n_layers=2, n_heads=2, d_ff=16)
    kwargs[field] = value
    with pytest.raises(exc, match=field):
        ModelConfig(**kwargs)


@pytest.mark.parametrize("shape", [(2, 0), (0, 5)])
def test_tiny_lm_refuses_an_empty_batch_instead_of_a_nan_loss(shape):
    m = TinyLM(LMConfig())
    idx = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match="idx must hold at least one token"):
        m(idx, idx)


@pytest.mark.parametrize("bad", [256, -1])
def test_tiny_lm_refuses_token_ids_outside_the_vocabulary(bad):
    m = TinyLM(LMConfig(vocab_size=256))
    idx = torch.tensor([[1, 2, bad]])
    with pytest.raises(ValueError, match=r"idx must hold token ids in \[0, vocab_size - 1 = 255\]"):
        m(idx)
    with pytest.raises(ValueError, match="targets must hold token ids"):
        m(torch.tensor([[1, 2, 3]]), idx)


def test_decode_refuses_a_bool_tensor_and_bool_values():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="ids"):
        tok.decode(torch.tensor([True, False]))
    with pytest.raises(ValueError, match="ids"):
        tok.decode([True, 65])


# ---------------------------------------------------------------- unclear errors made clear


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_input_and_expert_dtypes_that_differ_name_both(backend):
    x, routing, bank = make_case(4, 8, 12, 2, 1)
    with pytest.raises(TypeError, match=r"experts\.w1 is torch\.float32 .* but x is torch\.float64"):
        moe_ffn(x.detach().double(), routing, bank, backend=backend)


def test_meta_device_tensors_get_a_clear_error():
    bank = ExpertBank(2, 8, 12)
    x = torch.empty(3, 8, device="meta")
    r = Routing.fixed(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), 2)
    with pytest.raises(ValueError, match="meta device"):
        moe_ffn(x, r, bank, backend="torch")
    with pytest.raises(ValueError, match="meta device"):
        mixtral_layer(8, 12, 2, k=1)(x)


def test_astronomical_capacity_factor_is_a_value_error_not_an_overflow():
    with pytest.raises(ValueError, match="capacity_factor.*too large"):
        expert_capacity(1024, 8, 1e308)
    assert expert_capacity(1024, 8, 1e6) == math.floor(1e6 * 1024 / 8)  # large but finite is fine


@pytest.mark.parametrize("make", [
    lambda: mixtral_layer(8, 16, 4, backend="cuda"),
    lambda: switch_layer(8, 16, 4, backend="gpu"),
    lambda: LMConfig(ffn="switch", backend="trition"),
])
def test_unknown_backend_names_fail_at_construction(make):
    with pytest.raises(ValueError, match="backend must be one of"):
        make()
