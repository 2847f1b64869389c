"""MoE layers: invariants against dense FFNs, residual pass-through, jitter, losses, gradients."""

from __future__ import annotations

import pytest
import torch
from _moe_vectors import (
    SWITCH_AUX_OVER_ALPHA,
    TOL32,
    TOPK_AUX,
    Z_LOSS,
    E,
    T,
    identity_input,
    load_vector_into_router,
)

from moe_utils import DenseFFN, ExpertBank, MoELayer, SwitchRouter, TopKRouter, mixtral_layer, switch_layer

# ---------------------------------------------------------------- test vectors through layers


def test_switch_layer_aux_and_z_loss_match_test_vector():
    layer = switch_layer(T, 4, E, eval_capacity_factor=1.0, min_capacity=0, aux_loss_coef=1e-2, z_loss_coef=1e-3)
    load_vector_into_router(layer.router)
    out = layer.eval()(identity_input())
    assert out.aux_loss.item() == pytest.approx(1e-2 * SWITCH_AUX_OVER_ALPHA, abs=1e-2 * TOL32)
    assert out.z_loss.item() == pytest.approx(1e-3 * Z_LOSS, abs=1e-3 * TOL32)
    assert out.routing.kept.squeeze(1).tolist() == [True, True, True, False, True, False]


def test_mixtral_layer_topk_aux_matches_test_vector_with_coefficient():
    layer = mixtral_layer(T, 4, num_experts=E, k=2, aux_loss_coef=0.02)
    load_vector_into_router(layer.router)
    out = layer(identity_input())
    assert out.aux_loss.item() == pytest.approx(0.02 * TOPK_AUX, abs=0.02 * TOL32)


def test_switch_aux_counts_choices_before_capacity_dropping():
    layer = switch_layer(T, 4, E, eval_capacity_factor=1.0, min_capacity=0, aux_loss_coef=1.0)
    load_vector_into_router(layer.router)
    out = layer.eval()(identity_input())
    assert not out.routing.kept.all()
    # with f taken after dropping ([2, 1, 1] / 6 instead of [4, 1, 1] / 6) the value would be lower
    assert out.aux_loss.item() == pytest.approx(SWITCH_AUX_OVER_ALPHA, abs=TOL32)


# ---------------------------------------------------------------- dense equivalences


def test_one_expert_top1_mixtral_layer_equals_dense_swiglu():
    d, f = 8, 16
    dense = DenseFFN(d, f, kind="swiglu").double()
    layer = mixtral_layer(d, f, num_experts=1, k=1).double()
    layer.experts.load_expert(0, dense.ffn)
    x = torch.randn(3, 5, d, dtype=torch.float64)
    assert torch.allclose(layer(x).output, dense(x), atol=1e-12)


def test_one_expert_switch_layer_equals_dense_gelu_ffn():
    d, f = 8, 16
    layer = switch_layer(d, f, 1).double()
    dense = DenseFFN(d, f, kind="gelu").double()
    dense.ffn = layer.experts.expert_module(0)  # the other direction: bank -> module
    x = torch.randn(2, 6, d, dtype=torch.float64)
    out = layer.train()(x)
    assert out.routing.kept.all()
    assert torch.allclose(out.output, dense(x), atol=1e-12)


def test_k_equals_e_renormalised_is_probability_weighted_sum_of_all_experts():
    d, f, num_experts = 6, 10, 4
    layer = mixtral_layer(d, f, num_experts=num_experts, k=num_experts).double()
    x = torch.randn(9, d, dtype=torch.float64)
    probs = (x @ layer.router.gate.weight.detach().t()).softmax(dim=-1)  # [T, E], float64
    expected = torch.einsum("te,ted->td", probs, layer.experts.forward_all(x))
    # the router runs in float32, so agreement is to float32 precision
    assert torch.allclose(layer(x).output, expected, atol=1e-5)


def test_upcycled_layer_with_renormalised_topk_equals_dense_mlp():
    d, f = 8, 12
    dense = DenseFFN(d, f, kind="swiglu").double()
    layer = MoELayer(TopKRouter(d, 4, k=2), ExpertBank.from_dense(dense.ffn, 4), aux_loss="topk").double()
    x = torch.randn(10, d, dtype=torch.float64)
    assert torch.allclose(layer(x).output, dense(x), atol=1e-6)


# ---------------------------------------------------------------- capacity, residual, permutation


def _overloaded_switch_layer(d=8, num_experts=4):
    layer = switch_layer(d, 16, num_experts, eval_capacity_factor=0.5, min_capacity=0).eval()
    with torch.no_grad():  # bias the router towards expert 0 so that it overflows
        layer.router.gate.weight[0] += 0.5
    return layer


def test_dropped_tokens_pass_through_residual_unchanged():
    layer = _overloaded_switch_layer()
    x = torch.rand(32, 8) + 0.1
    out = layer(x)
    dropped = ~out.routing.kept.squeeze(1)
    assert dropped.any() and (~dropped).any()
    block = x + out.output  # the Transformer block adds the residual
    assert torch.equal(block[dropped], x[dropped])
    assert (out.output[~dropped].abs().sum(dim=-1) > 0).all()


def test_kept_tokens_get_gate_times_expert_of_clean_input():
    layer = _overloaded_switch_layer()
    x = torch.rand(32, 8) + 0.1
    out = layer(x)
    r = out.routing
    for t in range(32):
        if r.kept[t, 0]:
            e = int(r.indices[t, 0])
            expected = r.weights[t, 0] * layer.experts.expert_module(e)(x[t : t + 1])[0]
            assert torch.allclose(out.output[t], expected, atol=1e-6)


def test_switch_layer_keeps_exactly_capacity_tokens_of_overloaded_expert_earliest_first():
    layer = _overloaded_switch_layer()
    x = torch.rand(32, 8) + 0.1
    r = layer(x).routing
    C = r.capacity
    assert C == 4  # floor(0.5 * 32 / 4)
    for e in range(4):
        tokens = [t for t in range(32) if r.indices[t, 0] == e]
        assert [t for t in tokens if r.kept[t, 0]] == tokens[:C]
    assert r.tokens_per_expert().max() > C


def test_token_permutation_commutes_with_dropless_layer():
    layer = mixtral_layer(8, 16, num_experts=4, k=2)
    x = torch.randn(24, 8)
    perm = torch.randperm(24)
    assert torch.allclose(layer(x[perm]).output, layer(x).output[perm], atol=1e-6)


def test_leading_dimensions_are_flattened_into_tokens():
    layer = mixtral_layer(8, 16, num_experts=4, k=2)
    x = torch.randn(3, 5, 8)
    out = layer(x)
    assert out.output.shape == (3, 5, 8)
    assert out.routing.num_tokens == 15
    assert torch.allclose(out.output.reshape(15, 8), layer(x.reshape(15, 8)).output, atol=1e-6)


# ---------------------------------------------------------------- jitter


def test_jitter_changes_routing_between_calls_but_experts_see_clean_input():
    layer = switch_layer(8, 16, 4, capacity_factor=2.0, jitter_eps=0.2).train()
    x = torch.randn(32, 8)
    a, b = layer(x), layer(x)
    assert not torch.allclose(a.routing.logits, b.routing.logits)
    for out in (a, b):
        r = out.routing
        clean_logits = x @ layer.router.gate.weight.detach().t()
        assert not torch.allclose(r.logits, clean_logits, atol=1e-4), "the router must see jittered input"
        for t in range(32):
            e = int(r.indices[t, 0])
            gate = r.probs[t, e] * r.kept[t, 0]
            expected = gate * layer.experts.expert_module(e)(x[t : t + 1])[0]
            assert torch.allclose(out.output[t], expected, atol=1e-6)


# ---------------------------------------------------------------- gradients


def _router_grad(router, d=8, num_experts=4):
    layer = MoELayer(router, ExpertBank(num_experts, d, 16, kind="gelu"), aux_loss=None)
    x = torch.randn(16, d)
    layer(x).output.pow(2).sum().backward()
    return router.gate.weight.grad


def test_renormalised_top1_gives_router_zero_gradient():
    grad = _router_grad(TopKRouter(8, 4, k=1, renormalize=True))
    assert grad is not None, "the router is in the graph; its gradient is zero, not missing"
    assert grad.abs().max().item() < 1e-6


def test_switch_gate_gives_router_nonzero_gradient():
    grad = _router_grad(SwitchRouter(8, 4, drop_tokens=False))
    assert grad is not None and grad.abs().max().item() > 1e-3


def test_aux_and_z_losses_give_router_gradient():
    layer = switch_layer(8, 16, 4, z_loss_coef=1e-3)
    out = layer(torch.randn(16, 8))
    (out.aux_loss + out.z_loss).backward()
    assert layer.router.gate.weight.grad.abs().max().item() > 0
    assert layer.experts.w1.grad is None


# ---------------------------------------------------------------- precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["switch", "mixtral"])
def test_low_precision_layer_keeps_float32_router(dtype, preset):
    layer = switch_layer(16, 32, 4) if preset == "switch" else mixtral_layer(16, 32, 4, k=2)
    layer = layer.to(dtype)
    out = layer(torch.randn(2, 8, 16).to(dtype))
    assert out.output.dtype == dtype
    assert out.routing.logits.dtype == torch.float32
    assert torch.isfinite(out.output.float()).all()
    assert torch.isfinite(out.aux_loss) and torch.isfinite(out.z_loss)


# ---------------------------------------------------------------- empty batch


@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8)])
@pytest.mark.parametrize("preset", ["switch", "mixtral"])
def test_layers_return_empty_output_and_zero_losses_for_empty_batch(shape, preset):
    layer = (
        switch_layer(8, 16, 4, z_loss_coef=1e-3) if preset == "switch" else mixtral_layer(8, 16, 4, z_loss_coef=1e-3)
    )
    for mode in (True, False):
        out = layer.train(mode)(torch.zeros(shape))
        assert out.output.shape == shape
        assert out.routing.num_tokens == 0
        assert out.aux_loss.item() == 0.0 and out.z_loss.item() == 0.0
