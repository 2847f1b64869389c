"""Every Triton kernel configuration the dispatch can launch compiles for real GPUs (sm_80, sm_90).

The interpreter tests (``test_dispatch_triton.py``) check the numbers on the CPU; they cannot
see GPU-only failures. Triton compiles without a GPU, down to a cubin with the ``ptxas`` it
ships, so CI compiles every recorded launch for A100 (sm_80) and H100/H200 (sm_90) and checks
its shared memory against the chip's limit. This runs in a subprocess: the interpreter,
switched on for the other tests, would replace the kernels.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("triton.backends.nvidia") is None,
    reason="needs triton with its NVIDIA backend (Linux)",
)


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    return env


def _run(code: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_clean_env(),
                          timeout=timeout)


def test_every_launch_configuration_compiles_for_sm80_and_sm90_within_shared_memory():
    proc = subprocess.run([sys.executable, "-m", "moe_utils.dispatch.triton_aot", "--arch", "80", "90"],
                          capture_output=True, text=True, env=_clean_env(), timeout=1500)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    summary = re.search(r"(\d+) compilations \((\d+) launch configurations x 2 targets\), (\d+) failed", out)
    assert summary, out[-2000:]
    total, launches, failed = map(int, summary.groups())
    # 3 dtypes x every block-table row x (forward, backward) kernels: well over a hundred distinct launches
    assert launches >= 100 and total == 2 * launches and failed == 0
    lines = [ln for ln in out.splitlines() if ln.startswith(("ok  ", "FAIL"))]
    assert len(lines) == total and all(ln.startswith("ok  ") for ln in lines)
    for dtype in ("*fp32", "*fp16", "*bf16"):
        assert any(dtype in ln and "sm_90" in ln for ln in lines), f"no {dtype} launch compiled"
    # Hopper's tensor-core instructions show up in the bfloat16 grouped GEMM for sm_90, not for sm_80
    assert any("wgmma" in ln for ln in lines if "sm_90" in ln and "grouped_gemm_kernel[*bf16" in ln)
    assert not any("wgmma" in ln for ln in lines if "sm_80" in ln)
    for dtype in ("*fp32", "*fp16", "*bf16"):
        for act in (1, 2):  # GELU and SwiGLU epilogues, both forward variants (with/without saved pre-activations)
            assert any(f"grouped_gemm_kernel[{dtype}" in ln and f" ACT={act} " in ln for ln in lines)


def test_the_shared_memory_check_can_fail():
    # a tile far too large for an A100 block: the same check must report it
    code = """
from moe_utils.dispatch.triton_aot import Launch, compile_launch, record_launches
base = next(l for l in record_launches() if l.kernel == "grouped_gemm_kernel"
            and dict(l.constants)["ACT"] == 2 and dict(l.signature)["a_ptr"] == "*bf16")
c = dict(base.constants); c.update(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256)
big = Launch(base.kernel, base.signature, tuple(sorted(c.items())), 8)
r = compile_launch(big, 80)
print("RESULT", r.shared, r.ok, r.error)
"""
    proc = _run(code, timeout=600)
    m = re.search(r"RESULT (\d+) (True|False) (.*)", proc.stdout)
    assert m, proc.stdout[-2000:] + proc.stderr[-2000:]
    shared, ok, error = int(m.group(1)), m.group(2) == "True", m.group(3)
    assert not ok and (shared > 163 * 1024 or error != "None")


def test_recording_refuses_the_interpreter():
    env = dict(_clean_env(), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "moe_utils.dispatch.triton_aot", "--arch", "90"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode != 0 and "TRITON_INTERPRET" in proc.stderr
