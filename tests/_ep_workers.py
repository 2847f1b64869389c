"""Functions the expert-parallel tests run on every rank (importable by spawned processes).

Each returns plain data (tensors, numbers, strings) that the test process compares with
its own single-process reference. Expected errors are caught and returned as
``{"error": type name, "message": text}``, so that one process group can go through many
cases, including the failing ones, and must still be usable afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import time

import torch
import torch.distributed as dist

from moe_utils import ExpertBank, TopKRouter
from moe_utils.expert_parallel import Case, ExpertParallelMoE, all_to_all, build_case, run_case


def _caught(fn):
    try:
        return fn()
    except (ValueError, TypeError, RuntimeError) as e:
        return {"error": type(e).__name__, "message": str(e)}


def pinned_all_to_all(rank: int, world: int, group=None) -> dict:
    """Rank r sends (r + j) % 3 rows to rank j; row i for rank j holds [r, j, i]. Backward:
    the upstream gradient of each received row is the row + 0.5, so x.grad must be x + 0.5."""
    send = [(rank + j) % 3 for j in range(world)]
    recv = [(i + rank) % 3 for i in range(world)]
    rows = [[rank, j, i] for j in range(world) for i in range(send[j])]
    x = torch.tensor(rows, dtype=torch.float64).reshape(-1, 3).requires_grad_(True)
    out = all_to_all(x, send, recv, group)
    (out * (out.detach() + 0.5)).sum().backward()
    return {"received": out.detach(), "grad_x": x.grad, "x": x.detach()}


def _fault(name: str, rank: int, world: int, group=None):
    """Misuse on purpose; every rank must come back with an error, none may hang."""
    base = Case((4,) * world, num_experts=2 * world)
    if name == "d_ff differs":
        return ExpertParallelMoE.from_layer(build_case(dataclasses.replace(base, d_ff=12 + (rank == 1)))[0], group)
    if name == "router weights differ":
        layer = build_case(base)[0]
        if rank == 1:
            with torch.no_grad():
                layer.router.gate.weight[0, 0] += 1e-3
        return ExpertParallelMoE.from_layer(layer, group)
    if name == "E not divisible":
        return ExpertParallelMoE.from_layer(build_case(dataclasses.replace(base, num_experts=2 * world + 1))[0], group)
    if name == "wrong expert count on rank 1":
        router = TopKRouter(8, 2 * world, k=2)
        return ExpertParallelMoE(router, ExpertBank(3 if rank == 1 else 2, 8, 12), group)
    if name == "bad x on rank 1":
        layer, x, _ = build_case(base)
        ep = ExpertParallelMoE.from_layer(layer, group)
        return ep(x[:4, :-1] if rank == 1 else x[:4])
    if name == "capacity with unequal T":
        case = dataclasses.replace(base, tokens_per_rank=(8,) + (4,) * (world - 1), capacity_factor=1.0)
        return run_case(rank, world, case, group=group)
    raise ValueError(name)


FAULTS = (
    "d_ff differs",
    "router weights differ",
    "E not divisible",
    "wrong expert count on rank 1",
    "bad x on rank 1",
    "capacity with unequal T",
)


def only_rank0_needs_grad(rank: int, world: int, case: Case, group=None) -> dict:
    """x requires grad on rank 0 only: backward must still run every all-to-all on every rank."""
    layer, x, g = build_case(case)
    ep = ExpertParallelMoE.from_layer(layer, group)
    mine = case.token_slice(rank)
    x_local = x[mine].clone().requires_grad_(rank == 0)
    out = ep(x_local)
    (out.output * g[mine]).sum().backward()
    return {n: getattr(ep.experts, n).grad for n in ("w1", "w3", "w2")}


def run_all(rank: int, world: int, cases: dict, faults: tuple = FAULTS, group=None) -> dict:
    """Every case, the pinned all-to-all, the faults, then one case again (the group still works)."""
    out = {"cases": {name: run_case(rank, world, case, group=group) for name, case in cases.items()}}
    out["pinned"] = pinned_all_to_all(rank, world, group)
    out["faults"] = {name: _caught(lambda name=name: _fault(name, rank, world, group)) for name in faults}
    first = next(iter(cases))
    out["after faults"] = run_case(rank, world, cases[first], group=group)
    out["only rank 0 needs grad"] = only_rank0_needs_grad(rank, world, cases[first], group)
    return out


def two_and_four(rank: int, world: int, cases_2: dict, cases_4: dict, faults_4: tuple) -> dict:
    """One group of 4 processes runs the world-size-2 checks in two subgroups, {0, 1} and {2, 3}
    (an expert-parallel group inside a larger job), then the world-size-4 checks."""
    assert world == 4
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    two = run_all(rank % 2, 2, cases_2, group=pairs[rank // 2])
    dist.barrier()
    return {"2": two, "4": run_all(rank, 4, cases_4, faults_4)}


def fail_or_sleep(rank: int, world: int, folder: str) -> None:
    """Rank 1 raises at once; the others write their pid and sleep (the launcher must kill them)."""
    if rank == 1:
        raise ValueError("rank 1 fails on purpose")
    with open(os.path.join(folder, f"pid{rank}"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def sleep_forever(rank: int, world: int) -> None:
    time.sleep(600)
