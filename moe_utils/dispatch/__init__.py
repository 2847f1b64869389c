"""Batched expert dispatch: one entry point, ``moe_ffn(x, routing, experts, backend)``.

Backends:

* ``"reference"``: the loop over experts (``reference.py``), the oracle.
* ``"torch"``: sort the slots by expert, one matmul per expert on contiguous rows,
  combine in slot order (``torch_backend.py``); the CPU path and the fallback.
* ``"triton"``: the same plan as Triton grouped-GEMM kernels (``triton_kernels.py``,
  ``triton_backend.py``); CUDA, or CPU through the Triton interpreter when
  ``TRITON_INTERPRET=1`` was set before the kernel module was imported.
* ``"auto"``: ``"triton"`` for CUDA tensors when Triton is installed (float64: ``"torch"``),
  else ``"torch"``.

All backends compute ``y[t] = sum_{j < k, kept[t, j]} w[t, j] * expert_{i[t, j]}(x[t])``
and are differentiable in ``x``, the expert weights and ``routing.weights``.

No backend lets NaN or inf through: a non-finite ``x`` or routing weight raises before the
dispatch, and a non-finite output (NaN/inf in some expert's weights, or an overflow)
raises after it, naming the experts at fault. Each check costs one reduction (and, on a
GPU, one host sync) per call.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..experts import ExpertBank
from ..routers import Routing
from .metadata import DispatchMetadata, dispatch_metadata
from .reference import check_dispatch_inputs, check_dispatch_output, moe_ffn_reference
from .torch_backend import moe_ffn_torch

__all__ = [
    "moe_ffn",
    "moe_ffn_reference",
    "moe_ffn_torch",
    "dispatch_metadata",
    "DispatchMetadata",
    "resolve_backend",
    "BACKENDS",
]

BACKENDS = ("auto", "reference", "torch", "triton")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """The concrete backend ``moe_ffn`` will use for tensors on ``device``.

    Raises ``ValueError`` for an unknown name, or for ``"triton"`` where it cannot run
    (no Triton installed, or CPU tensors without the Triton interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend == "triton":
        if not _triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton); use backend='torch'")
        if device.type != "cuda":
            from . import triton_kernels

            if not triton_kernels.INTERPRETED:
                raise ValueError(
                    f"backend='triton' needs CUDA tensors, got device {device.type!r}; on CPU set the "
                    "environment variable TRITON_INTERPRET=1 before moe_utils.dispatch.triton_kernels is "
                    "first imported (Triton's interpreter), or use backend='torch'"
                    + (" (TRITON_INTERPRET=1 is set now, but the kernels were imported before)"
                       if os.environ.get("TRITON_INTERPRET") == "1" else "")
                )
    return backend


def moe_ffn(x: torch.Tensor, routing: Routing, experts: ExpertBank, backend: str = "auto") -> torch.Tensor:
    """Run the routed experts on ``x: [T, d]`` and combine: returns ``[T, d]``.

    backend: one of ``"auto"``, ``"reference"``, ``"torch"``, ``"triton"`` (module docstring).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    check_dispatch_inputs(x, routing, experts)
    name = resolve_backend(backend, x.device)
    if backend == "auto" and name == "triton" and x.dtype == torch.float64:
        name = "torch"  # the GPU kernels take fp32/fp16/bf16
    if name == "reference":
        return moe_ffn_reference(x, routing, experts)  # checks its output itself
    if name == "torch":
        return check_dispatch_output(moe_ffn_torch(x, routing, experts), experts)
    from .triton_backend import moe_ffn_triton

    return check_dispatch_output(moe_ffn_triton(x, routing, experts), experts)
