"""Auxiliary losses: the test vectors of docs/conventions.md and the conventions' invariants."""

from __future__ import annotations

import math

import pytest
import torch
from _moe_vectors import (
    SWITCH_AUX_OVER_ALPHA,
    TOL64,
    TOP1,
    TOPK_AUX,
    Z_LOSS,
    E,
    F,
    P,
    logits64,
    probs64,
)

from moe_utils import cv_squared, router_z_loss, switch_load_balancing_loss, topk_load_balancing_loss


def test_test_vector_probabilities_and_top1_match_reference():
    p = probs64()
    assert p.argmax(dim=-1).tolist() == TOP1
    assert torch.allclose(p.mean(dim=0), torch.tensor(P, dtype=torch.float64), atol=TOL64)


def test_switch_aux_over_alpha_matches_test_vector():
    aux = switch_load_balancing_loss(probs64(), torch.tensor(TOP1), alpha=1.0)
    assert aux.item() == pytest.approx(SWITCH_AUX_OVER_ALPHA, abs=TOL64)


def test_switch_aux_scales_linearly_with_alpha():
    aux = switch_load_balancing_loss(probs64(), torch.tensor(TOP1), alpha=1e-2)
    assert aux.item() == pytest.approx(1e-2 * SWITCH_AUX_OVER_ALPHA, abs=1e-2 * TOL64)


def test_switch_aux_counts_only_first_column_of_topk_indices():
    # f counts top-1 choices; a second column must not change the value
    idx = torch.tensor([[t, (t + 1) % E] for t in TOP1])
    aux = switch_load_balancing_loss(probs64(), idx, alpha=1.0)
    assert aux.item() == pytest.approx(SWITCH_AUX_OVER_ALPHA, abs=TOL64)


def test_switch_aux_equals_written_out_formula_with_reference_f_and_P():
    # E * sum f_i P_i with the table's own f and P (P rounded to 6 decimals)
    expected = E * sum(fi * pi for fi, pi in zip(F, P))
    aux = switch_load_balancing_loss(probs64(), torch.tensor(TOP1), alpha=1.0)
    assert aux.item() == pytest.approx(expected, abs=1e-5)


def test_topk_hf_aux_matches_test_vector():
    p = probs64()
    idx = p.topk(2, dim=-1).indices
    assert topk_load_balancing_loss(p, idx).item() == pytest.approx(TOPK_AUX, abs=TOL64)


def test_z_loss_matches_test_vector():
    assert router_z_loss(logits64()).item() == pytest.approx(Z_LOSS, abs=TOL64)


@pytest.mark.parametrize("num_experts", [2, 8, 64])
def test_uniform_routing_gives_aux_equal_alpha(num_experts):
    T, alpha = 4 * num_experts, 0.01
    probs = torch.full((T, num_experts), 1.0 / num_experts, dtype=torch.float64)
    idx = torch.arange(T) % num_experts
    assert switch_load_balancing_loss(probs, idx, alpha=alpha).item() == pytest.approx(alpha, rel=1e-12)


@pytest.mark.parametrize("num_experts", [2, 8])
def test_uniform_routing_gives_topk_aux_equal_k(num_experts):
    T, k = 4 * num_experts, 2
    probs = torch.full((T, num_experts), 1.0 / num_experts, dtype=torch.float64)
    idx = torch.stack([torch.arange(T) % num_experts, (torch.arange(T) + 1) % num_experts], dim=1)
    assert topk_load_balancing_loss(probs, idx).item() == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize("num_experts", [2, 8])
def test_total_collapse_gives_alpha_times_num_experts(num_experts):
    T, alpha = 10, 0.01
    probs = torch.zeros(T, num_experts, dtype=torch.float64)
    probs[:, 0] = 1.0
    idx = torch.zeros(T, dtype=torch.long)
    assert switch_load_balancing_loss(probs, idx, alpha=alpha).item() == pytest.approx(alpha * num_experts, rel=1e-12)


def test_switch_aux_can_dip_below_alpha():
    # f and P anti-correlated: counts favour expert 0, probabilities favour expert 1
    probs = torch.tensor([[0.4, 0.6], [0.4, 0.6], [0.5, 0.5]], dtype=torch.float64)
    idx = torch.tensor([0, 0, 1])
    assert switch_load_balancing_loss(probs, idx, alpha=1.0).item() < 1.0


def test_switch_aux_gradient_flows_only_through_mean_probability():
    # d/dp[t, e] of alpha * E * sum_e f_e * mean_t p[t, e] is alpha * E * f_e / T
    p = probs64().clone().requires_grad_(True)
    alpha = 0.01
    switch_load_balancing_loss(p, torch.tensor(TOP1), alpha=alpha).backward()
    T = p.shape[0]
    expected_row = torch.tensor([alpha * E * fe / T for fe in F], dtype=torch.float64)
    assert torch.allclose(p.grad, expected_row.expand(T, E), atol=1e-12)


@pytest.mark.parametrize("num_experts", [2, 3, 8, 128])
def test_z_loss_at_zero_logits_is_log_num_experts_squared(num_experts):
    z = router_z_loss(torch.zeros(5, num_experts, dtype=torch.float64))
    assert z.item() == pytest.approx(math.log(num_experts) ** 2, rel=1e-12)


def test_z_loss_equals_per_token_python_loop():
    h = torch.randn(7, 5, dtype=torch.float64)
    rows = h.tolist()
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in rows) / len(rows)
    assert router_z_loss(h).item() == pytest.approx(expected, rel=1e-12)


def test_cv_squared_uses_population_variance():
    # v = [1, 2, 3, 4]: mean 2.5, population variance 1.25 -> 1.25 / 6.25 = 0.2
    # (the sample variance 5/3 would give 0.2667)
    v = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    assert cv_squared(v).item() == pytest.approx(0.2, rel=1e-9)


def test_cv_squared_is_zero_for_equal_values_and_for_fewer_than_two():
    assert cv_squared(torch.full((6,), 3.0)).item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0
    assert cv_squared(torch.zeros(0)).item() == 0.0


def test_cv_squared_of_all_zeros_is_finite():
    assert cv_squared(torch.zeros(4)).item() == 0.0


@pytest.mark.parametrize(
    "loss",
    [
        lambda: switch_load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)),
        lambda: switch_load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)),
        lambda: topk_load_balancing_loss(torch.zeros(0, 4), torch.zeros(0, 2, dtype=torch.long)),
        lambda: router_z_loss(torch.zeros(0, 4)),
    ],
    ids=["switch_1d", "switch_2d", "topk", "z_loss"],
)
def test_losses_on_empty_batch_return_zero_without_nan(loss):
    value = loss()
    assert value.dim() == 0
    assert torch.isfinite(value)
    assert value.item() == 0.0
