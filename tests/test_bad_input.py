"""Bad input: every public entry point raises an error whose message names the argument."""

from __future__ import annotations

import pytest
import torch

from moe_utils import (
    ExpertBank,
    MoELayer,
    NoisyTopKRouter,
    Routing,
    SwitchRouter,
    TopKRouter,
    buffer_positions,
    capacity_mask,
    cv_squared,
    expert_capacity,
    mixtral_layer,
    moe_ffn,
    moe_ffn_reference,
    router_z_loss,
    switch_layer,
    switch_load_balancing_loss,
    topk_load_balancing_loss,
)

# ---------------------------------------------------------------- k


@pytest.mark.parametrize("k", [0, -1, 5])
@pytest.mark.parametrize("make", [TopKRouter, NoisyTopKRouter], ids=["topk", "noisy"])
def test_router_rejects_k_outside_one_to_num_experts(make, k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        make(8, 4, k=k)


@pytest.mark.parametrize("k", [0, 5])
def test_mixtral_layer_rejects_bad_k(k):
    with pytest.raises(ValueError, match=r"\bk\b"):
        mixtral_layer(8, 16, num_experts=4, k=k)


def test_non_integer_k_is_a_type_error():
    with pytest.raises(TypeError, match=r"\bk\b"):
        TopKRouter(8, 4, k=1.5)


def test_expert_capacity_rejects_k_zero():
    with pytest.raises(ValueError, match=r"\bk\b"):
        expert_capacity(16, 4, 1.0, k=0)


# ---------------------------------------------------------------- capacity factor


@pytest.mark.parametrize("cf", [0, 0.0, -1.25, float("nan"), float("inf")])
def test_expert_capacity_rejects_non_positive_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(16, 4, cf)


@pytest.mark.parametrize("cf", [0.0, -1.0])
def test_switch_router_and_layer_reject_non_positive_capacity_factor(cf):
    with pytest.raises(ValueError, match="capacity_factor"):
        SwitchRouter(8, 4, capacity_factor=cf)
    with pytest.raises(ValueError, match="eval_capacity_factor"):
        SwitchRouter(8, 4, eval_capacity_factor=cf)
    with pytest.raises(ValueError, match="capacity_factor"):
        switch_layer(8, 16, 4, capacity_factor=cf)


def test_capacity_factor_given_as_string_is_a_type_error():
    with pytest.raises(TypeError, match="capacity_factor"):
        expert_capacity(16, 4, "1.25")


def test_negative_capacity_and_min_capacity_are_rejected():
    with pytest.raises(ValueError, match="capacity"):
        capacity_mask(torch.zeros(4, 1, dtype=torch.long), 2, -1)
    with pytest.raises(ValueError, match="min_capacity"):
        expert_capacity(16, 4, 1.0, min_capacity=-1)


def test_jitter_eps_must_be_below_one():
    with pytest.raises(ValueError, match="jitter_eps"):
        SwitchRouter(8, 4, jitter_eps=1.0)


# ---------------------------------------------------------------- hidden size


@pytest.mark.parametrize("make", [lambda: TopKRouter(8, 4), lambda: SwitchRouter(8, 4), lambda: NoisyTopKRouter(8, 4)])
def test_router_rejects_hidden_size_mismatch(make):
    with pytest.raises(ValueError, match="d_model=8"):
        make()(torch.randn(5, 7))


@pytest.mark.parametrize("make", [lambda: switch_layer(8, 16, 4), lambda: mixtral_layer(8, 16, 4)])
def test_layer_rejects_hidden_size_mismatch(make):
    with pytest.raises(ValueError, match="d_model=8"):
        make()(torch.randn(2, 5, 7))


def test_expert_rejects_hidden_size_mismatch():
    from moe_utils import FeedForward, SwiGLU

    for m in (SwiGLU(8, 16), FeedForward(8, 16)):
        with pytest.raises(ValueError, match="d_model=8"):
            m(torch.randn(3, 6))


def test_dispatch_rejects_hidden_size_and_token_count_mismatch():
    bank = ExpertBank(2, 8, 16)
    routing = Routing.fixed(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), 2)
    with pytest.raises(ValueError, match="d_model=8"):
        moe_ffn_reference(torch.randn(4, 6), routing, bank)
    with pytest.raises(ValueError, match="T=4"):
        moe_ffn(torch.randn(5, 8), routing, bank)
    with pytest.raises(ValueError, match="num_experts"):
        moe_ffn(torch.randn(4, 8), Routing.fixed(torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1), 3), bank)
    with pytest.raises(ValueError, match="backend"):
        moe_ffn(torch.randn(4, 8), routing, bank, backend="cuda-magic")


def test_moe_layer_rejects_router_bank_mismatch():
    with pytest.raises(ValueError, match="d_model"):
        MoELayer(TopKRouter(8, 4), ExpertBank(4, 6, 16))
    with pytest.raises(ValueError, match="num_experts"):
        MoELayer(TopKRouter(8, 4), ExpertBank(3, 8, 16))
    with pytest.raises(ValueError, match="aux_loss"):
        MoELayer(TopKRouter(8, 4), ExpertBank(4, 8, 16), aux_loss="gshard")
    with pytest.raises(TypeError, match="experts"):
        MoELayer(TopKRouter(8, 4), torch.nn.Linear(8, 8))


# ---------------------------------------------------------------- dtype and rank


@pytest.mark.parametrize(
    "call",
    [
        lambda x: TopKRouter(8, 4)(x),
        lambda x: SwitchRouter(8, 4)(x),
        lambda x: NoisyTopKRouter(8, 4)(x),
        lambda x: switch_layer(8, 16, 4)(x),
        lambda x: mixtral_layer(8, 16, 4)(x),
        lambda x: moe_ffn_reference(
            x, Routing.fixed(torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), 2), ExpertBank(2, 8, 16)
        ),
    ],
    ids=["topk", "switch", "noisy", "switch_layer", "mixtral_layer", "dispatch"],
)
def test_integer_input_is_a_type_error_naming_x(call):
    with pytest.raises(TypeError, match=r"\bx\b"):
        call(torch.ones(5, 8, dtype=torch.int64))


def test_non_tensor_input_is_a_type_error_naming_x():
    with pytest.raises(TypeError, match=r"\bx\b"):
        TopKRouter(8, 4)([[0.0] * 8])


@pytest.mark.parametrize("shape", [(8,), (2, 5, 8)])
def test_router_rejects_wrong_rank(shape):
    for r in (TopKRouter(8, 4), SwitchRouter(8, 4)):
        with pytest.raises(ValueError, match=r"\bx\b.*dimensions"):
            r(torch.randn(shape))


def test_layer_rejects_one_dimensional_input():
    with pytest.raises(ValueError, match=r"\bx\b"):
        mixtral_layer(8, 16, 4)(torch.randn(8))


def test_losses_reject_integer_and_wrong_rank_inputs():
    with pytest.raises(TypeError, match="router_probs"):
        switch_load_balancing_loss(torch.ones(4, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="expert_indices"):
        switch_load_balancing_loss(torch.full((4, 2), 0.5), torch.zeros(4))
    with pytest.raises(ValueError, match="router_probs"):
        topk_load_balancing_loss(torch.full((4,), 0.5), torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="expert_indices"):
        topk_load_balancing_loss(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="expert_indices"):
        switch_load_balancing_loss(torch.full((4, 2), 0.5), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="expert_indices"):
        switch_load_balancing_loss(torch.full((4, 2), 0.5), torch.full((4,), 2, dtype=torch.long))
    with pytest.raises(TypeError, match="router_logits"):
        router_z_loss(torch.ones(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\bv\b"):
        cv_squared(torch.ones(2, 2))


def test_routing_record_validates_its_fields():
    with pytest.raises(ValueError, match="indices"):
        Routing.fixed(torch.tensor([[0], [4]]), torch.ones(2, 1), num_experts=4)
    with pytest.raises(ValueError, match="weights"):
        Routing.fixed(torch.tensor([[0], [1]]), torch.ones(2, 2), num_experts=4)
    with pytest.raises(TypeError, match="kept"):
        Routing(torch.tensor([[0]]), torch.ones(1, 1), torch.ones(1, 1), num_experts=2)
    with pytest.raises(ValueError, match=r"\bk\b"):
        Routing.fixed(torch.tensor([[0, 1, 0]]), torch.ones(1, 3), num_experts=2)


def test_buffer_positions_rejects_out_of_range_ids_and_float_ids():
    with pytest.raises(ValueError, match="indices"):
        buffer_positions(torch.tensor([[0], [3]]), 3)
    with pytest.raises(TypeError, match="indices"):
        buffer_positions(torch.tensor([[0.0], [1.0]]), 3)


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("make", [lambda: TopKRouter(8, 4), lambda: SwitchRouter(8, 4), lambda: NoisyTopKRouter(8, 4)])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_router_rejects_non_finite_input(make, bad):
    x = torch.randn(5, 8)
    x[2, 3] = bad
    with pytest.raises(ValueError, match=r"\bx\b.*non-finite"):
        make()(x)


def test_layer_rejects_nan_input_instead_of_returning_nan():
    x = torch.randn(2, 3, 8)
    x[1, 1, 0] = float("nan")
    for layer in (switch_layer(8, 16, 4), mixtral_layer(8, 16, 4)):
        with pytest.raises(ValueError, match="non-finite"):
            layer(x)


def test_router_rejects_non_finite_logits_from_finite_input():
    r = TopKRouter(8, 4)
    with torch.no_grad():
        r.gate.weight[1, 0] = float("inf")
    with pytest.raises(ValueError, match="router logits"):
        r(torch.randn(5, 8))


def test_router_rejects_overflowing_logits_from_low_precision_input():
    # float16 input: weights large enough that the float32 logits overflow to inf
    r = SwitchRouter(4, 2).eval()
    with torch.no_grad():
        r.gate.weight.fill_(3e38)
    with pytest.raises(ValueError, match="router logits"):
        r(torch.full((3, 4), 10.0))


def test_losses_reject_nan():
    probs = torch.full((4, 2), 0.5)
    probs[0, 0] = float("nan")
    with pytest.raises(ValueError, match="router_probs"):
        switch_load_balancing_loss(probs, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="router_probs"):
        topk_load_balancing_loss(probs, torch.zeros(4, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="router_logits"):
        router_z_loss(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match=r"\bv\b"):
        cv_squared(torch.tensor([1.0, float("nan")]))


# ---------------------------------------------------------------- empty batch


@pytest.mark.parametrize(
    "make", [lambda: TopKRouter(8, 4, k=2), lambda: SwitchRouter(8, 4), lambda: NoisyTopKRouter(8, 4)]
)
@pytest.mark.parametrize("training", [True, False])
def test_router_on_empty_batch_returns_empty_routing(make, training):
    r = make().train(training)
    routing = r(torch.zeros(0, 8))
    assert routing.num_tokens == 0
    assert routing.indices.shape[0] == 0 and routing.weights.shape[0] == 0
    assert routing.probs.shape == (0, 4)
    assert routing.dropped_fraction() == 0.0
    assert routing.tokens_per_expert().tolist() == [0, 0, 0, 0]


def test_grouped_switch_router_on_empty_batch():
    routing = SwitchRouter(8, 4, group_size=4)(torch.zeros(0, 8))
    assert routing.num_tokens == 0


def test_dispatch_on_empty_batch_returns_empty():
    routing = Routing.fixed(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4)
    y = moe_ffn(torch.zeros(0, 8), routing, ExpertBank(4, 8, 16))
    assert y.shape == (0, 8)
