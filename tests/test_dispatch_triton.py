"""The Triton kernels against the loop reference: CPU through Triton's interpreter, tiny shapes.

``conftest.py`` sets ``TRITON_INTERPRET=1`` (before any kernel module is imported) when
there is no GPU. Hidden and FFN sizes (24, 40) are not multiples of the block sizes.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from test_dispatch_torch import assert_matches_reference, gradcheck_dispatch, make_case, run_with_grads

from moe_utils import moe_ffn

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed"),
    pytest.mark.skipif(not CUDA and os.environ.get("TRITON_INTERPRET") != "1", reason="no CUDA and no interpreter"),
]
DEVICE = "cuda" if CUDA else "cpu"


def _to(case, device=DEVICE):
    x, routing, bank = case
    from moe_utils import Routing

    r = Routing(routing.indices.to(device), routing.weights.detach().to(device).requires_grad_(), routing.kept.to(device),
                routing.num_experts)
    return x.detach().to(device).requires_grad_(), r, bank.to(device)


@pytest.mark.parametrize(
    "T,E,k,kind,drop,mode",
    [
        (13, 3, 2, "swiglu", 0.25, "random"),  # dropped slots, odd T
        (7, 8, 4, "swiglu", 0.0, "random"),  # k = 4, experts with no tokens
        (1, 1, 1, "gelu", 0.0, "random"),  # one token, one expert
        (21, 3, 1, "gelu", 0.0, "one"),  # every token on expert 0: two row blocks of one expert
        (0, 3, 2, "swiglu", 0.0, "random"),  # empty batch
    ],
)
def test_triton_matches_reference_output_and_every_gradient(T, E, k, kind, drop, mode):
    assert_matches_reference(*_to(make_case(T, 24, 40, E, k, kind=kind, drop=drop, mode=mode)), "triton")


def test_triton_non_contiguous_input():
    x, routing, bank = _to(make_case(9, 24, 40, 3, 2))
    xt = x.detach().t().contiguous().t().requires_grad_()
    assert not xt.is_contiguous()
    assert_matches_reference(xt, routing, bank, "triton")


def _triton_version() -> tuple[int, ...]:
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2])


@pytest.mark.skipif(CUDA, reason="float64 tl.dot is for the interpreter")
@pytest.mark.skipif(
    importlib.util.find_spec("triton") is not None and _triton_version() < (3, 9),
    reason="the interpreter of triton < 3.9 rejects float64 tl.dot (3.6 asserts); checked on 3.9",
)
@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_triton_gradcheck_float64_in_the_interpreter(kind):
    assert gradcheck_dispatch(kind, "triton", fast_mode=True)


def test_padding_rows_and_dropped_slots_are_never_written():
    from moe_utils.dispatch import dispatch_metadata
    from moe_utils.dispatch import triton_backend as tb

    x, routing, bank = _to(make_case(6, 24, 40, 3, 2, drop=0.3))
    cfg = tb.block_config(12, 3, 40, torch.float32, CUDA)
    meta = dispatch_metadata(routing, block_m=cfg["BLOCK_M"])
    N = meta.num_slots
    h = torch.full((meta.num_rows, 40), float("nan"), device=DEVICE)
    tb.grouped_gemm(x.detach(), bank.w1.detach(), meta, cfg, out=h, gather=True)
    real = meta.padded_slots < N
    assert bool(h[~real].isnan().all()), "a padding row was written"
    rows = meta.padded_slots[real]
    e_of_row = routing.indices.reshape(-1)[rows]
    want = torch.einsum("rd,rdf->rf", x.detach()[rows // 2], bank.w1.detach()[e_of_row])
    torch.testing.assert_close(h[real], want, atol=1e-5, rtol=1e-4)
    ys = torch.full((N, 24), float("nan"), device=DEVICE)
    tb.grouped_gemm(h, bank.w2.detach(), meta, cfg, out=ys, scatter=True)
    kept = routing.kept.reshape(-1)
    assert bool(ys[~kept].isnan().all()), "a dropped slot was written"
    assert not bool(ys[kept].isnan().any())


def test_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    from moe_utils.dispatch import triton_kernels

    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    x, routing, bank = make_case(3, 8, 12, 2, 1)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        moe_ffn(x, routing, bank, backend="triton")


def test_triton_rejects_mixed_dtypes():
    x, routing, bank = _to(make_case(3, 8, 12, 2, 1))
    with pytest.raises(TypeError, match="experts.w1"):
        moe_ffn(x.detach().half(), routing, bank, backend="triton")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_precision_is_close_to_float32_reference(dtype):
    x, routing, bank = _to(make_case(300, 128, 256, 8, 2, drop=0.1))
    want = run_with_grads(x, routing, bank, "reference")
    x16 = x.detach().to(dtype).requires_grad_()
    got = run_with_grads(x16, routing, bank.to(dtype), "triton")
    for name, ref in want.items():
        torch.testing.assert_close(got[name].float(), ref.float(), atol=5e-2, rtol=5e-2, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_runs_are_bitwise_deterministic():
    case = _to(make_case(500, 128, 256, 8, 2))
    a = run_with_grads(*case, "triton")
    b = run_with_grads(*case, "triton")
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs between two runs"


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_float32_matches_reference_at_a_mid_size():
    assert_matches_reference(*_to(make_case(257, 96, 200, 8, 2, drop=0.1)), "triton", atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("kind", ["swiglu", "gelu"])
def test_triton_weights_with_mixed_memory_layouts_give_the_contiguous_result(kind):
    # regression: w3 was read with w1's strides, silently wrong when their layouts differ
    from test_dispatch_torch import with_mixed_layouts

    x, routing, bank = _to(make_case(11, 24, 40, 3, 2, kind=kind, drop=0.2))
    mixed = with_mixed_layouts(bank)
    got = run_with_grads(x, routing, mixed, "triton")
    want = run_with_grads(x, routing, bank, "reference")
    for name, ref in want.items():
        torch.testing.assert_close(got[name], ref, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.skipif(CUDA, reason="the interpreter's bfloat16 problem is CPU-only")
def test_triton_interpreter_refuses_bfloat16_instead_of_returning_garbage():
    x, routing, bank = _to(make_case(6, 24, 40, 3, 2))
    with pytest.raises(TypeError, match="bfloat16"):
        moe_ffn(x.detach().bfloat16(), routing, bank.to(torch.bfloat16), backend="triton")
