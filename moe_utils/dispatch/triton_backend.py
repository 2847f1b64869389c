"""The Triton dispatch path: launches of ``triton_kernels.py`` wrapped in an autograd Function.

Forward (SwiGLU; GELU drops ``w3``), with ``P`` padded rows in expert order:

    H  [P, f]      = act(x[tok] @ w1[e], x[tok] @ w3[e])   grouped GEMM, GATHER, ACT (saves h1, h3)
    Ys [T * k, d]  = w[slot] * (H @ w2[e])                 grouped GEMM, SCALE, SCATTER to slot order
    y  [T, d]      = Ys.view(T, k, d).sum(1)                 the top-k combine: a sum, no atomics

Backward, given ``dy: [T, d]``:

    G   [P, f] = dy[tok] @ w2[e]^T                 grouped GEMM on the transposed weight (GATHER)
    dw  [T, k] = <H[row], G[row]>                  routing-weight gradient, per slot
    dA  [P, f] = w[slot] * G;  dh1, dh3 = act'(dA)  element-wise, torch
    dW2 [E, f, d] = H_e^T @ (w * dy[tok])          X^T dY kernel (Y_GATHER, Y_SCALE)
    dW1, dW3      = x[tok]_e^T @ dh1, dh3          X^T dY kernel (X_GATHER)
    dx  [T, d]    = sum over k of (dh1 @ w1^T + dh3 @ w3^T) scattered to slots (ACCUMULATE)

Block sizes come from ``block_config`` (a small table keyed by shape, no autotuning).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl

from ..experts import ExpertBank
from ..routers import Routing
from . import triton_kernels as K
from .metadata import DispatchMetadata, dispatch_metadata

__all__ = ["moe_ffn_triton", "block_config", "grouped_gemm", "expert_xty", "TritonMoEFunction"]

_ACC = {torch.float64: tl.float64}  # everything else accumulates in float32


def block_config(num_slots: int, num_experts: int, n: int, dtype: torch.dtype, cuda: bool) -> dict:
    """Block sizes by shape. Untuned first guesses for GPU (to be checked against the benchmark).

    BLOCK_M: rows per program, one expert per block, so it should not exceed the average
    rows per expert by much (padding is wasted work): 16 for decode-sized batches, 64 above.
    BLOCK_N, BLOCK_K: output columns and shared-dimension step; 16-bit types fit twice the
    tile of fp32 in shared memory. The interpreter wants few, large programs.
    """
    if not cuda:
        return {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4}
    rows_per_expert = num_slots / max(num_experts, 1)
    block_m = 16 if rows_per_expert < 32 else (32 if rows_per_expert < 128 else 64)
    wide = dtype in (torch.float16, torch.bfloat16)
    block_n = 128 if n >= 128 and wide else 64
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": 64 if wide else 32, "num_warps": 4 if block_m < 64 else 8}


def _consts(dtype: torch.dtype) -> dict:
    return {"ACC_TYPE": _ACC.get(dtype, tl.float32), "IEEE": dtype == torch.float32}


def grouped_gemm(a, b, meta: DispatchMetadata, cfg: dict, *, out, b2=None, pre=(None, None), gather=False,
                 scatter=False, act=K.ACT_NONE, scale=None, accumulate=False, transpose_b=False):
    """Launch ``grouped_gemm_kernel``: ``out[rows] (+)= epilogue(a[rows] @ b[e])``.

    a: [T, K] token rows (``gather``) or [P, K] padded rows; b: [E, K, N] (or [E, N, K] with
    ``transpose_b``); out: [T * k, N] (``scatter``) or [P, N]; pre: outputs for the
    pre-activations (SwiGLU/GELU backward); scale: [T * k] routing weights.
    """
    def strides(t):  # (expert, shared dim K, output dim N) strides of a weight stack
        return (t.stride(0), t.stride(2), t.stride(1)) if transpose_b else (t.stride(0), t.stride(1), t.stride(2))

    b2 = b if b2 is None else b2
    if b2.shape != b.shape:
        raise ValueError(f"b2 must have the shape of b {tuple(b.shape)}, got {tuple(b2.shape)}")
    Kdim, N = a.shape[1], out.shape[1]
    grid = (meta.num_blocks, triton_cdiv(N, cfg["BLOCK_N"]))
    if meta.num_blocks == 0 or N == 0:
        return out
    K.grouped_gemm_kernel[grid](
        a, b, b2, out,
        pre[0] if pre[0] is not None else out, pre[1] if pre[1] is not None else out,
        meta.padded_slots, meta.block_expert, scale if scale is not None else out,
        meta.num_slots, Kdim, N,
        a.stride(0), a.stride(1), *strides(b), *strides(b2), out.stride(0), out.stride(1),
        GATHER=gather, SCATTER=scatter, TOPK=meta.k, ACT=act, SAVE_PRE=pre[0] is not None,
        SCALE=scale is not None, ACCUMULATE=accumulate, **_consts(a.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
    )
    return out


def expert_xty(x, dy, meta: DispatchMetadata, cfg: dict, *, out, x_gather=False, y_gather=False, scale=None):
    """Launch ``expert_xty_kernel``: ``out[e] = x_e^T @ (scale * dy)_e`` for every expert e.

    x: [T, K] (``x_gather``) or [P, K]; dy: [T, N] (``y_gather``) or [P, N]; out: [E, K, N].
    """
    E, Kdim, N = out.shape
    grid = (E, triton_cdiv(Kdim, cfg["BLOCK_K"]), triton_cdiv(N, cfg["BLOCK_N"]))
    K.expert_xty_kernel[grid](
        x, dy, out, meta.padded_slots, meta.padded_offsets, scale if scale is not None else out,
        meta.num_slots, Kdim, N,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), out.stride(0), out.stride(1), out.stride(2),
        X_GATHER=x_gather, Y_GATHER=y_gather, Y_SCALE=scale is not None, TOPK=meta.k, **_consts(x.dtype),
        BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"],
    )
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


class TritonMoEFunction(torch.autograd.Function):
    """y = MoE-FFN(x) with Triton kernels; gradients for x, w (routing weights), w1, w3, w2."""

    @staticmethod
    def forward(ctx, x, w, w1, w3, w2, meta, cfg, kind):
        T, d = x.shape
        P, f = meta.num_rows, w1.shape[2]
        act = K.ACT_SWIGLU if kind == "swiglu" else K.ACT_GELU
        w_flat = w.reshape(-1).contiguous()  # [T * k] routing weights, slot order
        train = any(ctx.needs_input_grad)
        h = x.new_empty(P, f)
        h1 = x.new_empty(P, f) if train else None
        h3 = x.new_empty(P, f) if train and kind == "swiglu" else None
        grouped_gemm(x, w1, meta, cfg, out=h, b2=w3, pre=(h1, h3), gather=True, act=act)
        y_slots = x.new_zeros(T * meta.k, d)  # dropped slots are never written: they stay 0
        grouped_gemm(h, w2, meta, cfg, out=y_slots, scatter=True, scale=w_flat)
        ctx.meta, ctx.cfg, ctx.kind = meta, cfg, kind
        ctx.save_for_backward(x, w_flat, w1, w3, w2, h, h1, h3)
        return y_slots.view(T, meta.k, d).sum(1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, w_flat, w1, w3, w2, h, h1, h3 = ctx.saved_tensors
        meta, cfg, kind = ctx.meta, ctx.cfg, ctx.kind
        T, d = x.shape
        P, f = meta.num_rows, w1.shape[2]
        # G = dy[tok] @ w2[e]^T: the gradient of the activation before the routing weight
        g = grouped_gemm(gy, w2, meta, cfg, out=x.new_empty(P, f), gather=True, transpose_b=True)
        # routing weights: dL/dw[slot] = <H[row], G[row]>, 0 for dropped slots
        cd = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype  # element-wise math dtype
        row = meta.slot_row.clamp(min=0)
        gw = (h[row].to(cd) * g[row].to(cd)).sum(-1)
        gw = torch.where(meta.slot_row >= 0, gw, 0.0).to(w_flat.dtype).view(T, meta.k)
        # dA = w * G, then through the activation (padding rows hold junk that no kernel reads)
        w_row = torch.cat([w_flat, w_flat.new_zeros(1)])[meta.padded_slots]  # sentinel -> 0
        ga = g.to(cd) * w_row.to(cd).unsqueeze(1)
        if kind == "swiglu":
            gh1 = torch.ops.aten.silu_backward(ga * h3.to(cd), h1.to(cd)).to(x.dtype)
            gh3 = (ga * F.silu(h1.to(cd))).to(x.dtype)
        else:
            gh1 = torch.ops.aten.gelu_backward(ga, h1.to(cd)).to(x.dtype)
            gh3 = None
        gw2 = expert_xty(h, gy, meta, cfg, out=torch.empty_like(w2), y_gather=True, scale=w_flat)
        gw1 = expert_xty(x, gh1, meta, cfg, out=torch.empty_like(w1), x_gather=True)
        gw3 = expert_xty(x, gh3, meta, cfg, out=torch.empty_like(w3), x_gather=True) if gh3 is not None else None
        # dx: grouped GEMM with transposed w1 (and w3, accumulated), scattered to slots, summed over k
        gx_slots = x.new_zeros(T * meta.k, d)
        grouped_gemm(gh1, w1, meta, cfg, out=gx_slots, scatter=True, transpose_b=True)
        if gh3 is not None:
            grouped_gemm(gh3, w3, meta, cfg, out=gx_slots, scatter=True, transpose_b=True, accumulate=True)
        gx = gx_slots.view(T, meta.k, d).sum(1)
        return gx, gw, gw1, gw3, gw2, None, None, None


def moe_ffn_triton(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> torch.Tensor:
    """The Triton MoE FFN. x: [T, d] -> y: [T, d]. Inputs are checked by ``moe_ffn``."""
    if x.dtype == torch.float64 and x.is_cuda:
        raise TypeError("backend='triton' on CUDA supports float32, float16 and bfloat16, got float64")
    if x.dtype == torch.bfloat16 and not x.is_cuda:
        # Triton's interpreter computes bfloat16 tl.dot wrongly (no error, wrong numbers)
        raise TypeError(
            "backend='triton' on the CPU (Triton's interpreter) cannot compute in bfloat16: its bfloat16 "
            "matrix products are wrong; use float32 or float16 there, or backend='torch'"
        )
    cfg = block_config(x.shape[0] * routing.k, experts.num_experts, experts.d_ff, x.dtype, x.is_cuda)
    meta = dispatch_metadata(routing, block_m=cfg["BLOCK_M"])
    w = routing.weights.to(x.dtype)
    return TritonMoEFunction.apply(x, w, experts.w1, experts.w3, experts.w2, meta, cfg, experts.kind)
