"""Two Triton kernels for batched MoE: a grouped GEMM and a per-expert ``X^T @ dY``.

Both work on the block-aligned layout of ``metadata.py``: padded row ``r`` holds slot
``padded_slots[r]`` (token ``slot // k``), or the sentinel ``num_slots`` for padding,
and row block ``b`` belongs to expert ``block_expert[b]`` (-1: unused block).

``grouped_gemm_kernel``: ``C[rows] = epilogue(A[rows] @ B[e])``, one program per
(row block, column block). Launch grid ``(num_blocks, cdiv(N, BLOCK_N))``.
Compile-time switches (``tl.constexpr``, so each combination compiles to its own kernel):

* ``GATHER``: A's rows are tokens, read row ``slot // TOPK`` (the input ``x``, or ``dy``);
  otherwise A is already in the padded layout (read row ``r``).
* ``SCATTER``: write C's row to ``slot`` (slot order ``[T * k, N]``); otherwise to ``r``.
* ``ACT``: 0 none; 1 GELU (exact, erf); 2 SwiGLU, a second accumulator for ``A @ B2[e]``
  and the epilogue ``silu(acc) * acc2``. B and B2 each come with their own strides, so
  ``w1`` and ``w3`` may have different memory layouts. ``SAVE_PRE`` also stores the pre-activations
  (``acc`` to ``C2``, ``acc2`` to ``C3``), which the backward needs.
* ``SCALE``: multiply each row by its routing weight ``scale[slot]``.
* ``ACCUMULATE``: ``C += ...`` instead of ``C = ...`` (each program owns its tile: no race).

``expert_xty_kernel``: ``dW[e] = X_e^T @ dY_e`` for the weight gradients, one program per
(expert, row tile, column tile) of ``dW``, looping over the expert's row blocks. Launch
grid ``(E, cdiv(K, BLOCK_K), cdiv(N, BLOCK_N))``. ``X_GATHER``/``Y_GATHER``/``Y_SCALE`` mean
what they mean above.

Only padded rows that hold a real slot are ever read or written (masks on every load and
store), so padding costs compute but never memory traffic, and outputs need no zero fill.

Set ``TRITON_INTERPRET=1`` *before* importing this module to run on CPU tensors
(Triton's interpreter: slow, for tests at tiny shapes).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

__all__ = ["grouped_gemm_kernel", "expert_xty_kernel", "INTERPRETED", "ACT_NONE", "ACT_GELU", "ACT_SWIGLU"]

# triton.jit reads TRITON_INTERPRET when the kernels below are decorated, i.e. now
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
ACT_NONE, ACT_GELU, ACT_SWIGLU = 0, 1, 2


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    # IEEE: full fp32 products (what torch does by default) instead of TF32
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def grouped_gemm_kernel(
    a_ptr, b_ptr, b2_ptr, c_ptr, c2_ptr, c3_ptr,  # A rows, B[E, K, N], B2 (SwiGLU), C, C2/C3 (pre-activations)
    rows_ptr, block_expert_ptr, scale_ptr,  # padded_slots [P], block_expert [P / BLOCK_M], routing weights [T * k]
    num_slots, K, N,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_b2e, stride_b2k, stride_b2n,
    stride_cm, stride_cn,
    GATHER: tl.constexpr, SCATTER: tl.constexpr, TOPK: tl.constexpr, ACT: tl.constexpr,
    SAVE_PRE: tl.constexpr, SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
    ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    e = tl.load(block_expert_ptr + pid_m)
    if e < 0:  # a block past the last expert's rows
        return
    r = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # padded rows of this block
    slot = tl.load(rows_ptr + r)
    valid = slot < num_slots  # False on padding rows (sentinel)
    if GATHER:
        a_row = slot // TOPK  # token of the slot
    else:
        a_row = r
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :] * stride_ak  # [BLOCK_M, BLOCK_K]
    b_offs = e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn  # [BLOCK_K, BLOCK_N]
    # B2 has strides of its own: w1 and w3 may be stored in different layouts
    b2_offs = e.to(tl.int64) * stride_b2e + ks[:, None] * stride_b2k + cols[None, :] * stride_b2n
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_TYPE)
    for k0 in range(0, K, BLOCK_K):  # march along the shared dimension
        k_ok = ks < K - k0
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b_mask = k_ok[:, None] & (cols[None, :] < N)
        acc = _dot(a, tl.load(b_ptr + b_offs, mask=b_mask, other=0.0), acc, IEEE)
        if ACT == 2:  # SwiGLU: the up projection shares the loaded A tile
            acc2 = _dot(a, tl.load(b2_ptr + b2_offs, mask=b_mask, other=0.0), acc2, IEEE)
        a_ptrs += BLOCK_K * stride_ak
        b_offs += BLOCK_K * stride_bk
        b2_offs += BLOCK_K * stride_b2k
    # epilogue, still in registers: activation, routing weight, store
    if ACT == 1:
        out = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    elif ACT == 2:
        out = acc * tl.sigmoid(acc) * acc2
    else:
        out = acc
    if SCALE:
        out = out * tl.load(scale_ptr + slot, mask=valid, other=0.0).to(ACC_TYPE)[:, None]
    if SCATTER:
        c_row = slot  # slot order: the top-k combine becomes a sum over k, no atomics
    else:
        c_row = r
    c_offs = c_row[:, None] * stride_cm + cols[None, :] * stride_cn
    c_mask = valid[:, None] & (cols[None, :] < N)
    if ACCUMULATE:
        out += tl.load(c_ptr + c_offs, mask=c_mask, other=0.0).to(ACC_TYPE)
    tl.store(c_ptr + c_offs, out.to(c_ptr.dtype.element_ty), mask=c_mask)
    if SAVE_PRE:
        tl.store(c2_ptr + c_offs, acc.to(c2_ptr.dtype.element_ty), mask=c_mask)
        if ACT == 2:
            tl.store(c3_ptr + c_offs, acc2.to(c3_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def expert_xty_kernel(
    x_ptr, dy_ptr, dw_ptr,  # X rows (K columns), dY rows (N columns), dW [E, K, N]
    rows_ptr, padded_offsets_ptr, scale_ptr,
    num_slots, K, N,
    stride_xm, stride_xk, stride_ym, stride_yn, stride_we, stride_wk, stride_wn,
    X_GATHER: tl.constexpr, Y_GATHER: tl.constexpr, Y_SCALE: tl.constexpr, TOPK: tl.constexpr,
    ACC_TYPE: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    e, pid_k, pid_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(padded_offsets_ptr + e)  # this expert's padded rows: [start, end)
    end = tl.load(padded_offsets_ptr + e + 1)
    ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_K, BLOCK_N), dtype=ACC_TYPE)
    for m0 in range(start, end, BLOCK_M):  # zero iterations for an expert without tokens
        r = m0 + tl.arange(0, BLOCK_M)
        slot = tl.load(rows_ptr + r)
        valid = slot < num_slots
        if X_GATHER:
            x_row = slot // TOPK
        else:
            x_row = r
        if Y_GATHER:
            y_row = slot // TOPK
        else:
            y_row = r
        xt = tl.load(x_ptr + ks[:, None] * stride_xk + x_row[None, :] * stride_xm,
                     mask=(ks[:, None] < K) & valid[None, :], other=0.0)  # X^T tile [BLOCK_K, BLOCK_M]
        dy = tl.load(dy_ptr + y_row[:, None] * stride_ym + ns[None, :] * stride_yn,
                     mask=valid[:, None] & (ns[None, :] < N), other=0.0)  # [BLOCK_M, BLOCK_N]
        if Y_SCALE:
            w = tl.load(scale_ptr + slot, mask=valid, other=0.0).to(ACC_TYPE)
            dy = (dy.to(ACC_TYPE) * w[:, None]).to(xt.dtype)
        acc = _dot(xt, dy, acc, IEEE)
    w_offs = e.to(tl.int64) * stride_we + ks[:, None] * stride_wk + ns[None, :] * stride_wn
    tl.store(dw_ptr + w_offs, acc.to(dw_ptr.dtype.element_ty), mask=(ks[:, None] < K) & (ns[None, :] < N))
