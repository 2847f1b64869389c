"""Start a few CPU processes joined in a ``gloo`` process group, from a script, a test or a notebook.

``launch(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` new
processes and returns their return values in rank order. It is
``torch.multiprocessing.start_processes`` with the ``spawn`` start method (it works from a
Jupyter kernel, as long as ``fn`` is importable from a module: functions defined in a
notebook are not), a ``FileStore`` rendezvous in a fresh temporary folder (no port to
pick), and two timeouts so that nothing hangs:

* the process group's own timeout, which fails a collective that waits too long;
* a deadline on the whole run, after which the parent kills every process it started.

If one rank raises, the others are stopped at once and the parent re-raises with that
rank's traceback. On GPUs use ``torchrun`` instead (``python -m moe_utils.expert_parallel``).
"""

from __future__ import annotations

import datetime
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .._checks import check_positive_float, check_positive_int

__all__ = ["launch"]


def _entry(rank: int, fn, world_size: int, args: tuple, folder: str, timeout: float, threads: int) -> None:
    torch.set_num_threads(threads)  # W processes share the machine's cores
    dist.init_process_group(
        "gloo",
        init_method="file://" + os.path.join(folder, "store"),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn, world_size: int, *args, timeout: float = 60.0, threads: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results by rank.

    fn:      a function importable from a module (pickled by name into each process)
    timeout: seconds for the whole run, and for any single collective
    threads: torch threads per process
    Results travel through ``torch.save``/``torch.load(weights_only=True)``, so return
    tensors, numbers, strings, and lists, tuples or dicts of them.
    """
    world_size = check_positive_int("world_size", world_size)
    timeout = check_positive_float("timeout", timeout)
    threads = check_positive_int("threads", threads)
    if getattr(fn, "__module__", "__main__") == "__main__" or "<locals>" in getattr(fn, "__qualname__", ""):
        raise ValueError(
            f"fn must be a module-level function importable by the new processes, got {fn!r}: "
            "define it in a .py module, not in a notebook or a function body"
        )
    with tempfile.TemporaryDirectory(prefix="moe-ep-") as folder:
        ctx = mp.start_processes(
            _entry, args=(fn, world_size, args, folder, timeout, threads), nprocs=world_size, join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            # join() raises (after stopping the other ranks) as soon as one rank fails
            while not ctx.join(timeout=0.1, grace_period=1.0):
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                    raise TimeoutError(f"ranks {alive} of {world_size} still running after {timeout:g} s; stopped them")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join(timeout=5)
        return [torch.load(os.path.join(folder, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
