"""Helpers the notebooks share, and a CLI that re-executes notebooks in place.

In a notebook::

    from moe_utils.notebooks import setup, compare
    DEVICE = setup(seed=0)          # seeds torch/random/numpy; CPU unless MOE_DEVICE=cuda
    compare("my router", mine, ref) # prints exact / approx / max diff (Karpathy's ``cmp``)

From the shell (what ``make execute`` runs)::

    python -m moe_utils.notebooks notebooks/*.ipynb   # executes in place, prints run times
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time

import torch

__all__ = ["setup", "compare", "execute_notebook", "kernelspec"]


def setup(seed: int = 0, threads: int | None = None) -> str:
    """Seed everything and pick the device.

    Returns ``"cuda"`` only when the environment variable ``MOE_DEVICE=cuda`` is set
    and a GPU is available, so committed outputs always come from the CPU path.
    """
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass
    if threads is not None:
        torch.set_num_threads(threads)
    want = os.environ.get("MOE_DEVICE", "cpu").lower()
    if want not in ("cpu", "cuda"):
        raise ValueError(f"MOE_DEVICE must be 'cpu' or 'cuda', got {want!r}")
    return "cuda" if want == "cuda" and torch.cuda.is_available() else "cpu"


def compare(name: str, got: torch.Tensor, expected: torch.Tensor, atol: float = 1e-6, rtol: float = 1e-5) -> bool:
    """Print whether ``got`` matches ``expected`` (Karpathy's ``cmp``); returns True if so.

    The printed line is stable across float summation orders (it reports the
    tolerance met, not the last digits), so it is safe in an nbval-checked cell.
    On a mismatch it prints the largest difference and where it is.
    """
    got = torch.as_tensor(got)
    expected = torch.as_tensor(expected)
    if got.shape != expected.shape:
        print(f"{name:<28} MISMATCH: shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
        return False
    g, e = got.double(), expected.double()
    if bool(torch.allclose(g, e, atol=atol, rtol=rtol)):
        print(f"{name:<28} ok (within atol={atol:g}, rtol={rtol:g})")
        return True
    diff = (g - e).abs()
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    print(f"{name:<28} MISMATCH: max diff {diff.max().item():.3e} at index {where}")
    return False


def execute_notebook(path: str, timeout: int = 600) -> float:
    """Execute a notebook in place with nbclient (cwd = its folder); returns seconds."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no wall-clock stamps in cell metadata: clean diffs
        resources={"metadata": {"path": os.path.dirname(os.path.abspath(path))}},
    )
    start = time.perf_counter()
    client.execute()
    elapsed = time.perf_counter() - start
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    nb.metadata["kernelspec"] = kernelspec()
    nbformat.write(nb, path)
    return elapsed


def kernelspec() -> dict:
    """The ``kernelspec`` notebook metadata exactly as JupyterLab writes it for the course's
    ``python3`` kernel. Storing anything else (an older display name, say) makes JupyterLab
    rewrite it when the notebook opens, which marks the notebook as changed before anything
    ran and makes it ask to save on close."""
    name = "Python 3 (ipykernel)"
    try:
        from jupyter_client.kernelspec import KernelSpecManager

        name = KernelSpecManager().get_kernel_spec("python3").display_name
    except Exception:  # no Jupyter installed: the name ipykernel >= 6 registers
        pass
    return {"display_name": name, "language": "python", "name": "python3"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Execute notebooks in place and print their run times.")
    parser.add_argument("paths", nargs="+", help="notebooks to execute")
    parser.add_argument("--timeout", type=int, default=600, help="per-cell timeout in seconds")
    args = parser.parse_args(argv)
    for path in args.paths:
        seconds = execute_notebook(path, args.timeout)
        print(f"{seconds:7.1f} s  {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
