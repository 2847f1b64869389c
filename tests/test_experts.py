"""Expert FFNs and the stacked ExpertBank, checked against formulas written out in float64."""

from __future__ import annotations

import math

import pytest
import torch

from moe_utils import ExpertBank, FeedForward, SwiGLU


def _silu(z):
    return z * (1.0 / (1.0 + torch.exp(-z)))


def _gelu_erf(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def test_swiglu_equals_w2_of_silu_w1x_times_w3x():
    m = SwiGLU(6, 10).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    W1, W3, W2 = m.w1.weight.detach(), m.w3.weight.detach(), m.w2.weight.detach()  # [out, in]
    expected = (_silu(x @ W1.t()) * (x @ W3.t())) @ W2.t()
    assert torch.allclose(m(x), expected, atol=1e-12)


def test_feedforward_uses_exact_erf_gelu_and_no_bias_by_default():
    m = FeedForward(6, 10).double()
    assert m.fc1.bias is None and m.fc2.bias is None
    x = torch.randn(5, 6, dtype=torch.float64) * 3
    expected = _gelu_erf(x @ m.fc1.weight.detach().t()) @ m.fc2.weight.detach().t()
    assert torch.allclose(m(x), expected, atol=1e-12)


def test_expert_accepts_leading_batch_dimensions():
    m = SwiGLU(4, 8)
    x = torch.randn(2, 3, 4)
    assert m(x).shape == (2, 3, 4)
    assert torch.allclose(m(x)[1, 2], m(x[1, 2]), atol=1e-6)


@pytest.mark.parametrize("kind,n_matrices", [("swiglu", 3), ("gelu", 2)])
def test_expert_bank_has_one_stacked_parameter_per_matrix(kind, n_matrices):
    E, d, f = 4, 6, 10
    bank = ExpertBank(E, d, f, kind=kind)
    params = dict(bank.named_parameters())
    assert len(params) == n_matrices
    assert params["w1"].shape == (E, d, f)
    assert params["w2"].shape == (E, f, d)
    if kind == "swiglu":
        assert params["w3"].shape == (E, d, f)
    assert bank.num_parameters_per_expert() * E == sum(p.numel() for p in params.values())


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_bank_expert_equals_its_standalone_module(kind):
    bank = ExpertBank(3, 6, 10, kind=kind).double()
    x = torch.randn(7, 6, dtype=torch.float64)
    for e in range(3):
        module = bank.expert_module(e)
        assert isinstance(module, SwiGLU if kind == "swiglu" else FeedForward)
        assert sum(p.numel() for p in module.parameters()) == bank.num_parameters_per_expert()
        assert torch.allclose(bank.forward_expert(e, x), module(x), atol=1e-12)


def test_bank_forward_expert_matches_written_out_swiglu_of_stacked_slices():
    bank = ExpertBank(3, 5, 7, kind="swiglu").double()
    x = torch.randn(4, 5, dtype=torch.float64)
    e = 2
    w1, w3, w2 = bank.w1.detach()[e], bank.w3.detach()[e], bank.w2.detach()[e]
    expected = (_silu(x @ w1) * (x @ w3)) @ w2
    assert torch.allclose(bank.forward_expert(e, x), expected, atol=1e-12)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_load_expert_then_forward_expert_equals_loaded_module(kind):
    bank = ExpertBank(4, 6, 10, kind=kind).double()
    module = (SwiGLU(6, 10) if kind == "swiglu" else FeedForward(6, 10)).double()
    before = bank.forward_expert(0, torch.ones(1, 6, dtype=torch.float64))
    bank.load_expert(2, module)
    x = torch.randn(5, 6, dtype=torch.float64)
    assert torch.allclose(bank.forward_expert(2, x), module(x), atol=1e-12)
    # other slots untouched
    assert torch.equal(bank.forward_expert(0, torch.ones(1, 6, dtype=torch.float64)), before)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_forward_all_equals_each_expert_separately(kind):
    bank = ExpertBank(5, 6, 8, kind=kind).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    all_out = bank.forward_all(x)
    assert all_out.shape == (9, 5, 6)
    for e in range(5):
        assert torch.allclose(all_out[:, e], bank.expert_module(e)(x), atol=1e-12)


def test_from_dense_makes_exact_copies():
    dense = SwiGLU(6, 10).double()
    bank = ExpertBank.from_dense(dense, 4).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    for e in range(4):
        assert torch.allclose(bank.forward_expert(e, x), dense(x), atol=1e-12)


def test_load_expert_rejects_wrong_kind_and_biases():
    with pytest.raises(TypeError, match="module"):
        ExpertBank(2, 4, 8, kind="swiglu").load_expert(0, FeedForward(4, 8))
    with pytest.raises(TypeError, match="module"):
        ExpertBank(2, 4, 8, kind="gelu").load_expert(0, SwiGLU(4, 8))
    with pytest.raises(ValueError, match="bias"):
        ExpertBank(2, 4, 8, kind="gelu").load_expert(0, FeedForward(4, 8, bias=True))


def test_forward_expert_rejects_out_of_range_expert_id():
    bank = ExpertBank(2, 4, 8)
    with pytest.raises(ValueError, match="e must be"):
        bank.forward_expert(2, torch.randn(1, 4))


def test_expert_bank_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        ExpertBank(2, 4, 8, kind="relu")
