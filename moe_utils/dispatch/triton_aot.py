"""Compile every Triton kernel configuration the dispatch can launch, ahead of time, for real GPUs.

Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on the CPU, but it cannot see
what only a GPU compiler sees: a tile that does not fit in shared memory, an operation the
code generator rejects for one dtype, a layout that only fails on Hopper's ``wgmma`` path.
Triton compiles without a GPU, though: ``triton.compile(ASTSource(...), target=GPUTarget(...))``
runs the whole pipeline down to ``ptxas`` (which Triton ships) and returns a cubin.

Which configurations? Not a hand-written list that could drift from the code: the
launches are *recorded* by running ``TritonMoEFunction`` forward and backward on tiny CPU
tensors with the two kernels replaced by recorders, once per dtype (float32, float16,
bfloat16), expert kind (SwiGLU, GELU), top-k (2; also 1 in bfloat16), training or inference, and row of the
``block_config`` table (every BLOCK_M, BLOCK_N, BLOCK_K, num_warps it can return on CUDA).
Each distinct launch (kernel, argument types, compile-time constants, warps) is then
compiled for each target and its shared memory checked against the chip's per-block limit.

From the shell (``TRITON_INTERPRET`` must be unset: the interpreter replaces the kernels)::

    python -m moe_utils.dispatch.triton_aot                 # sm_80 and sm_90, all configurations
    python -m moe_utils.dispatch.triton_aot --arch 90 --show-ptx 1
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import torch

__all__ = ["Launch", "CompileResult", "SHARED_MEMORY_LIMIT", "record_launches", "compile_launch", "main"]

# Largest shared memory one thread block may use (opt-in maximum), CUDA C++ Programming Guide,
# table "Technical Specifications per Compute Capability": 163 KB on 8.0 (A100), 227 KB on 9.0 (H100/H200).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
_PTR = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
        torch.int32: "*i32"}


@dataclass(frozen=True)
class Launch:
    """One distinct kernel launch: argument types (pointer dtypes, scalar widths), constants, warps."""

    kernel: str
    signature: tuple[tuple[str, str], ...]
    constants: tuple[tuple[str, object], ...]
    num_warps: int

    def describe(self) -> str:
        c = dict(self.constants)
        dt = dict(self.signature).get("a_ptr", dict(self.signature).get("x_ptr"))
        keys = [k for k in c if k not in ("ACC_TYPE",)]
        return f"{self.kernel}[{dt} " + " ".join(f"{k}={c[k]}" for k in keys) + f" warps={self.num_warps}]"


@dataclass
class CompileResult:
    launch: Launch
    arch: int
    shared: int = 0
    registers: int | None = None
    spill_bytes: int | None = None
    wgmma: bool = False
    error: str | None = None
    seconds: float = 0.0
    ptx: str = field(default="", repr=False)

    @property
    def ok(self) -> bool:
        return self.error is None and self.shared <= SHARED_MEMORY_LIMIT[self.arch]


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **consts)`` records, runs nothing."""

    def __init__(self, jit_fn, sink: set):
        self.fn, self.sink = jit_fn, sink

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **consts):
            sig = []
            for name, a in zip(self.fn.arg_names, args):
                if isinstance(a, torch.Tensor):
                    sig.append((name, _PTR[a.dtype]))
                else:  # Triton passes Python ints as i32 when they fit
                    sig.append((name, "i32" if -(2**31) <= int(a) < 2**31 else "i64"))
            const = tuple(sorted((k, _const_key(v)) for k, v in consts.items()))
            self.sink.add(Launch(self.fn.__name__, tuple(sig), const, int(num_warps)))

        return launch


def _const_key(v):
    return str(v) if not isinstance(v, (bool, int, float, str)) else v  # tl.float32 -> "fp32"


def _check_not_interpreted():
    from . import triton_kernels as K

    if K.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set when the kernels were imported: the interpreter replaces them, so "
            "nothing can be compiled. Run this in a process without TRITON_INTERPRET."
        )


def record_launches(dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> list[Launch]:
    """Every distinct launch ``TritonMoEFunction`` makes, over dtypes, kinds, k, train/eval and block table."""
    from ..routers import Routing
    from . import triton_backend as tb
    from . import triton_kernels as K
    from .metadata import dispatch_metadata

    _check_not_interpreted()
    sink: set = set()
    saved = (K.grouped_gemm_kernel, K.expert_xty_kernel)
    K.grouped_gemm_kernel, K.expert_xty_kernel = _Recorder(saved[0], sink), _Recorder(saved[1], sink)
    try:
        E, d = 4, 16
        for dtype in dtypes:
            cfgs = {}  # every row of the CUDA block table: rows per expert x output width
            for rows_per_expert in (8, 64, 256):
                for d_ff in (64, 256):
                    cfg = tb.block_config(rows_per_expert * E, E, d_ff, dtype, cuda=True)
                    cfgs[tuple(sorted(cfg.items()))] = cfg
            for cfg in cfgs.values():
                for kind in ("swiglu", "gelu"):
                    # TOPK only enters as ``slot // TOPK``: k = 2 everywhere, k = 1 (Switch) for bfloat16
                    for k in (1, 2) if dtype == torch.bfloat16 else (2,):
                        for train in (True, False):
                            T, f = 6, 8
                            idx = torch.stack([torch.randperm(E)[:k] for _ in range(T)])
                            routing = Routing.fixed(idx, torch.rand(T, k), E)
                            meta = dispatch_metadata(routing, block_m=cfg["BLOCK_M"])
                            x = torch.randn(T, d, dtype=dtype, requires_grad=train)
                            w = torch.rand(T, k, dtype=dtype, requires_grad=train)
                            w1 = torch.randn(E, d, f, dtype=dtype, requires_grad=train)
                            w3 = torch.randn(E, d, f, dtype=dtype, requires_grad=train) if kind == "swiglu" else None
                            w2 = torch.randn(E, f, d, dtype=dtype, requires_grad=train)
                            with torch.set_grad_enabled(train):
                                y = tb.TritonMoEFunction.apply(x, w, w1, w3, w2, meta, cfg, kind)
                                if train:
                                    y.sum().backward()
    finally:
        K.grouped_gemm_kernel, K.expert_xty_kernel = saved
    return sorted(sink, key=lambda launch: (launch.kernel, launch.signature, launch.constants, launch.num_warps))


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """Registers per thread and spill (local memory) bytes, read from the cubin with Triton's cuobjdump."""
    try:
        from triton import knobs

        cuobjdump = knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):  # older Triton: no knobs
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as fh:
        fh.write(cubin)
        path = fh.name
    try:
        out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    finally:
        os.unlink(path)
    reg = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def compile_launch(launch: Launch, arch: int, keep_ptx: bool = False) -> CompileResult:
    """Compile one recorded launch for ``sm_<arch>`` (e.g. 80, 90) and read back its resources."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import triton_kernels as K

    _check_not_interpreted()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (no warning)
    fn = getattr(K, launch.kernel)
    sig = dict(launch.signature)
    consts = {}
    for name, value in launch.constants:
        if name == "ACC_TYPE":
            value = {"fp32": tl.float32, "fp64": tl.float64}[value]
        consts[name] = value
        sig[name] = "constexpr"
    signature = {name: sig[name] for name in fn.arg_names}
    res = CompileResult(launch, arch)
    start = time.perf_counter()
    try:
        k = triton.compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": launch.num_warps})
        res.shared = int(k.metadata.shared)
        res.wgmma = "wgmma" in k.asm["ptx"]
        res.registers, res.spill_bytes = _resource_usage(k.asm["cubin"])
        if keep_ptx:
            res.ptx = k.asm["ptx"]
    except Exception as err:  # a compile error is a finding, reported per launch
        res.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
    res.seconds = time.perf_counter() - start
    return res


def _compile_batch(jobs):
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    return [compile_launch(launch, arch) for launch, arch in jobs]


def compile_all(archs=(80, 90), workers: int | None = None, only: str | None = None,
                max_launches: int | None = None) -> list[CompileResult]:
    """Record every launch and compile it for every arch, ``workers`` processes at a time.

    ``only`` keeps the launches whose description contains that text; ``max_launches`` the
    first so many of them (a quick look, e.g. in a notebook)."""
    launches = record_launches()
    if only:
        launches = [launch for launch in launches if only in launch.describe()]
    if max_launches is not None:
        launches = launches[:max_launches]
    if not launches:
        raise ValueError(f"no recorded launch matches only={only!r}")
    jobs = [(launch, arch) for arch in archs for launch in launches]
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    if workers == 1:
        return _compile_batch(jobs)
    chunks = [jobs[i::workers] for i in range(workers)]
    with ProcessPoolExecutor(workers) as pool:
        results = [r for batch in pool.map(_compile_batch, chunks) for r in batch]
    return sorted(results, key=lambda r: (r.arch, jobs.index((r.launch, r.arch))))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m moe_utils.dispatch.triton_aot", description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_MEMORY_LIMIT),
                   help="compute capabilities to compile for (80: A100, 90: H100/H200)")
    p.add_argument("--workers", type=int, default=None, help="parallel compile processes (default: all cores)")
    p.add_argument("--show-ptx", type=int, default=0, metavar="N", help="print the first lines of N kernels' PTX")
    p.add_argument("--only", default=None, help="compile only launches whose description contains this text")
    p.add_argument("--max-launches", type=int, default=None, help="compile at most this many launches")
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    try:
        _check_not_interpreted()
    except RuntimeError as err:
        p.error(str(err))
    start = time.perf_counter()
    try:
        results = compile_all(tuple(a.arch), a.workers, a.only, a.max_launches)
    except ValueError as err:
        p.error(str(err))
    bad = [r for r in results if not r.ok]
    for r in results:
        status = "ok  " if r.ok else "FAIL"
        regs = "?" if r.registers is None else r.registers
        spill = "?" if r.spill_bytes is None else r.spill_bytes
        print(f"{status} sm_{r.arch} shared {r.shared:>6} B (limit {SHARED_MEMORY_LIMIT[r.arch]}) regs {regs:>3} "
              f"spill {spill:>4} B {'wgmma ' if r.wgmma else ''}{r.launch.describe()}"
              + (f"  ERROR {r.error}" if r.error else ""))
    for r in results[: a.show_ptx]:
        print(f"--- PTX of {r.launch.describe()} (sm_{r.arch}) ---")
        print("\n".join(compile_launch(r.launch, r.arch, keep_ptx=True).ptx.splitlines()[:40]))
    n_launch = len({r.launch for r in results})
    print(f"{len(results)} compilations ({n_launch} launch configurations x {len(a.arch)} targets), "
          f"{len(bad)} failed, in {time.perf_counter() - start:.0f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
