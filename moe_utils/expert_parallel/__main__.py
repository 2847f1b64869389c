"""Check ``ExpertParallelMoE`` against the single-process layer and time the all-to-all.

On this machine (starts 2 CPU processes in a gloo group)::

    python -m moe_utils.expert_parallel

On GPUs, one process per GPU with NCCL, started by torchrun::

    torchrun --nproc-per-node=8 -m moe_utils.expert_parallel --backend nccl

    # two nodes of 8 GPUs: run on every node; HEAD is the first node's address
    torchrun --nnodes=2 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HEAD:29500 \\
        --rdzv-id=moe-ep -m moe_utils.expert_parallel --backend nccl

Every rank builds the same single-process layer from a seed, runs its tokens through the
expert-parallel layer, computes the single-process reference itself, and the ranks agree
on the largest differences. Exit status 1 if a difference is above tolerance.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

from .check import check_worker
from .launch import launch


def report(result: dict, world_size: int, backend: str, device: str, tokens: int, experts_per_rank: int) -> bool:
    tol = 1e-9 if device == "cpu" else 1e-3  # relative: float64 on CPU, float32 kernels on GPU
    ok = True
    print(f"expert parallelism on {world_size} ranks ({backend}, {device}): {experts_per_rank * world_size} experts, "
          f"top-2, {tokens} tokens per rank; max |difference| / max |single-process value|:")
    for name in ("dropless", "capacity 1.0"):
        d = result[name]
        router_tol = 1e-5 if device == "cpu" else 1e-3  # the router runs in float32
        good = d["routing mismatches"] == 0 and all(
            v <= (router_tol if k == "grad_router" else tol) for k, v in d.items() if k.startswith(("output", "grad"))
        )
        ok &= good
        print(f"  {name:<13} {'ok' if good else 'MISMATCH'}: " + " | ".join(
            f"{k} {v:.1e}" for k, v in d.items() if k.startswith(("output", "grad"))) +
            f" | routing mismatches {int(d['routing mismatches'])}")
    t = result["timing"]
    print("  all-to-all, bytes per rank pair -> time of the slowest rank, algorithmic bandwidth per rank")
    for size, sec in zip(t["sizes"], t["seconds"]):
        print(f"    {size / 1024:>8.0f} KiB  {sec * 1e3:8.3f} ms  {size * (world_size - 1) / sec / 1e9:7.2f} GB/s")
    return ok


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=["gloo", "nccl"], default="gloo")
    p.add_argument("--nproc", type=int, default=2, help="processes to start when not run by torchrun")
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank")
    p.add_argument("--experts-per-rank", type=int, default=2)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:  # not started by torchrun: start CPU processes ourselves
        if args.backend != "gloo":
            p.error("--backend nccl needs one process per GPU: start it with torchrun (see --help)")
        results = launch(check_worker, args.nproc, args.tokens, args.experts_per_rank, "cpu", timeout=300)
        return 0 if report(results[0], args.nproc, "gloo", "cpu", args.tokens, args.experts_per_rank) else 1
    device = "cpu"
    if args.backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    dist.init_process_group(args.backend)  # env:// from torchrun
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        result = check_worker(rank, world, args.tokens, args.experts_per_rank, device)
        ok = report(result, world, args.backend, device.split(":")[0], args.tokens, args.experts_per_rank) if rank == 0 else True
        flag = torch.tensor([0.0 if ok else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
