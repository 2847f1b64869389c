"""The torch dispatch path (``backend="torch"``, the CPU default) against the loop reference."""

from __future__ import annotations

import pytest
import torch

from moe_utils import ExpertBank, Routing, mixtral_layer, moe_ffn
from moe_utils.dispatch import BACKENDS, moe_ffn_reference, resolve_backend


def make_case(T, d, f, E, k, kind="swiglu", dtype=torch.float32, drop=0.0, mode="random", seed=0):
    """x [T, d], a Routing (random distinct experts, or all on expert 0 with mode="one"), a bank."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    if mode == "one":
        idx = torch.arange(k).repeat(T, 1)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k, dtype=torch.long)
    w = torch.rand(T, k, generator=g, dtype=torch.float64).to(dtype if dtype == torch.float64 else torch.float32)
    kept = torch.rand(T, k, generator=g) >= drop
    routing = Routing(idx, w.requires_grad_(), kept, E)
    torch.manual_seed(seed)
    bank = ExpertBank(E, d, f, kind=kind).to(dtype)
    return x, routing, bank


def run_with_grads(x, routing, bank, backend):
    """Output and the gradients of a fixed random projection wrt x, routing weights, w1, (w3), w2."""
    y = moe_ffn(x, routing, bank, backend=backend)
    names = ["y", "x", "routing.weights", "w1"] + (["w3"] if bank.w3 is not None else []) + ["w2"]
    if not y.requires_grad:  # the reference on an empty batch builds no graph
        return dict(zip(names, [y.detach()] + [None] * (len(names) - 1)))
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(y.dtype)
    params = [x, routing.weights, bank.w1] + ([bank.w3] if bank.w3 is not None else []) + [bank.w2]
    grads = torch.autograd.grad((y * proj).sum(), params, allow_unused=True)
    return dict(zip(names, [y.detach(), *grads]))


def assert_matches_reference(x, routing, bank, backend, atol=1e-5, rtol=1e-4):
    got = run_with_grads(x, routing, bank, backend)
    want = run_with_grads(x, routing, bank, "reference")
    for name, ref in want.items():
        if ref is None:  # the reference leaves grads of unused tensors at None (e.g. T = 0)
            ref = torch.zeros_like(got[name])
        assert got[name] is not None, f"{backend}: no gradient for {name}"
        torch.testing.assert_close(got[name], ref, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{backend} {n}: {m}")


@pytest.mark.parametrize(
    "T,E,k,kind,drop",
    [(37, 8, 2, "swiglu", 0.0), (19, 3, 1, "gelu", 0.3), (9, 8, 4, "swiglu", 0.2), (1, 1, 1, "gelu", 0.0), (0, 3, 2, "swiglu", 0.0)],
)
def test_torch_path_matches_reference_output_and_every_gradient(T, E, k, kind, drop):
    assert_matches_reference(*make_case(T, 24, 40, E, k, kind=kind, drop=drop), "torch")


def test_torch_path_all_tokens_on_one_expert_and_non_contiguous_input():
    x, routing, bank = make_case(21, 24, 40, 4, 1, mode="one")
    xt = x.detach().t().contiguous().t().requires_grad_()  # same values, column-major strides
    assert not xt.is_contiguous()
    assert_matches_reference(xt, routing, bank, "torch")


class _Dispatch(torch.nn.Module):
    """moe_ffn as a module, so that gradcheck can swap in the expert weights (functional_call)."""

    def __init__(self, bank, backend):
        super().__init__()
        self.bank, self.backend = bank, backend

    def forward(self, x, routing):
        return moe_ffn(x, routing, self.bank, backend=self.backend)


def gradcheck_dispatch(kind, backend, fast_mode=False):
    x, routing, bank = make_case(5, 4, 6, 3, 2, kind=kind, dtype=torch.float64, drop=0.2)
    module = _Dispatch(bank, backend)
    names = [n for n, _ in module.named_parameters()]

    def fn(x, w, *weights):
        r = Routing(routing.indices, w, routing.kept, routing.num_experts)
        return torch.func.functional_call(module, dict(zip(names, weights)), (x, r))

    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]
    return torch.autograd.gradcheck(fn, (x, routing.weights, *weights), fast_mode=fast_mode)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_torch_path_gradcheck_float64(kind):
    assert gradcheck_dispatch(kind, "torch")


def test_torch_path_in_bfloat16_is_close_to_float32_reference():
    x, routing, bank = make_case(33, 32, 48, 4, 2)
    want = moe_ffn_reference(x, routing, bank)
    got = moe_ffn(x.bfloat16(), routing, bank.to(torch.bfloat16), backend="torch")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


def test_auto_is_torch_on_cpu_and_layers_use_it():
    assert resolve_backend("auto", "cpu") == "torch"
    assert set(BACKENDS) == {"auto", "reference", "torch", "triton"}
    layer = mixtral_layer(16, 24, num_experts=4, k=2)
    x = torch.randn(2, 5, 16)
    y_auto = layer(x).output
    layer.backend = "reference"
    torch.testing.assert_close(y_auto, layer(x).output, atol=1e-6, rtol=1e-5)


def test_bad_backend_and_inputs_raise_clear_errors():
    x, routing, bank = make_case(4, 8, 12, 2, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        moe_ffn(x, routing, bank, backend="cuda")
    with pytest.raises(ValueError, match="x must have"):
        moe_ffn(x[:, :5], routing, bank, backend="torch")
    with pytest.raises(TypeError, match="routing"):
        moe_ffn(x, None, bank, backend="torch")
    with pytest.raises(ValueError, match="tokens"):
        moe_ffn(x[:3], routing, bank, backend="torch")


def with_mixed_layouts(bank):
    """The same expert weights, but ``w1`` stored transposed ([E, f, d] memory read as [E, d, f])
    and ``w2`` expert-minor, while ``w3`` stays contiguous: layouts that weights loaded from
    another library can have. Values are unchanged, so every backend must give the same numbers."""
    mixed = ExpertBank(bank.num_experts, bank.d_model, bank.d_ff, kind=bank.kind).to(bank.w1.dtype)
    with torch.no_grad():
        mixed.w1 = torch.nn.Parameter(bank.w1.detach().transpose(1, 2).contiguous().transpose(1, 2))
        mixed.w2 = torch.nn.Parameter(bank.w2.detach().permute(1, 2, 0).contiguous().permute(2, 0, 1))
        if bank.w3 is not None:
            mixed.w3 = torch.nn.Parameter(bank.w3.detach().clone())
    assert not mixed.w1.is_contiguous() and not mixed.w2.is_contiguous()
    assert mixed.w1.stride() != (mixed.w3 if mixed.w3 is not None else bank.w1).stride()
    return mixed


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_weights_with_mixed_memory_layouts_give_the_contiguous_result(backend, kind):
    x, routing, bank = make_case(11, 24, 40, 3, 2, kind=kind, drop=0.2)
    mixed = with_mixed_layouts(bank)
    got = run_with_grads(x, routing, mixed, backend)
    want = run_with_grads(x, routing, bank, "reference")
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
