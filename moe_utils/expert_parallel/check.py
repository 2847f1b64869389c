"""Check the expert-parallel layer against the single-process ``MoELayer``, and time the all-to-all.

A ``Case`` fixes everything from a seed: a single-process ``MoELayer``, a global batch
``x: [sum(tokens_per_rank), d]`` cut into consecutive per-rank pieces, and the upstream
gradient ``g`` of the loss ``sum(y * g)``. Then:

* ``run_case(rank, world_size, case)`` (on every rank, e.g. through ``launch``): cut the
  layer with ``ExpertParallelMoE.from_layer``, run this rank's tokens forward and
  backward, and return the output and every gradient;
* ``reference_case(case)`` (one process): the same for the single-process layer, sliced
  into the per-rank layout (router gradient: the total, to compare with the sum over
  ranks; expert gradients: each rank's experts);
* ``max_differences(results, references)``: the largest absolute difference per quantity.

``time_all_to_all(rank, world_size, sizes)`` measures one all-to-all per message size.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..capacity import capacity_mask, expert_capacity
from ..experts import ExpertBank
from ..layers import MoELayer
from ..routers import Routing, SwitchRouter, TopKRouter
from .layer import ExpertParallelMoE

__all__ = [
    "Case", "build_case", "run_case", "run_cases", "reference_case", "max_differences", "time_all_to_all", "check_worker",
]

WEIGHTS = ("w1", "w3", "w2")
SIZES = tuple(2**p for p in range(10, 25, 2))  # all-to-all bytes per rank pair: 1 KiB ... 16 MiB


@dataclass(frozen=True)
class Case:
    """One expert-parallel check (every field has a default except the token split).

    tokens_per_rank: tokens on rank 0, 1, ... (its length is the world size; 0 is allowed)
    router:          "topk" (``TopKRouter``, Mixtral) or "switch" (``SwitchRouter`` in eval
                     mode, no jitter, k = 1)
    expert_bias:     E numbers added to the router logits (feature 0 of x is set to 1 and
                     column 0 of the gate weight to the bias): +20 forces an expert, -20 forbids it
    capacity_factor: None (dropless) or the capacity factor of the per-rank routing group
                     (on the ``ExpertParallelMoE`` for "topk", on the router for "switch")
    """

    tokens_per_rank: tuple[int, ...]
    num_experts: int = 4
    k: int = 2
    d_model: int = 8
    d_ff: int = 12
    kind: str = "swiglu"
    router: str = "topk"
    expert_bias: tuple[float, ...] | None = None
    capacity_factor: float | None = None
    min_capacity: int = 1
    dtype: str = "float64"
    seed: int = 0

    @property
    def world_size(self) -> int:
        return len(self.tokens_per_rank)

    def token_slice(self, rank: int) -> slice:
        start = sum(self.tokens_per_rank[:rank])
        return slice(start, start + self.tokens_per_rank[rank])


class _GroupCapacity(torch.nn.Module):
    """A dropless router followed by capacity in groups of ``group_size`` tokens (the reference
    for the capacity mode of ``ExpertParallelMoE``, whose routing group is one rank)."""

    def __init__(self, router, group_size: int, capacity_factor: float, min_capacity: int):
        super().__init__()
        self.inner, self.group_size = router, group_size
        self.capacity_factor, self.min_capacity = capacity_factor, min_capacity
        self.d_model, self.num_experts = router.d_model, router.num_experts

    def forward(self, x):
        r = self.inner(x)
        C = expert_capacity(self.group_size, r.num_experts, self.capacity_factor, r.k, self.min_capacity)
        kept, pos = capacity_mask(r.indices, r.num_experts, C, group_size=self.group_size)
        return Routing(r.indices, r.weights, kept, r.num_experts, r.probs, r.logits, capacity=C, positions=pos)


def build_case(case: Case, device: str = "cpu") -> tuple[MoELayer, torch.Tensor, torch.Tensor]:
    """The single-process layer, the global batch x [T, d] and the loss weights g [T, d]."""
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(case.seed)
    E, d = case.num_experts, case.d_model
    if case.router == "topk":
        router = TopKRouter(d, E, k=case.k)
        aux = "topk"
    elif case.router == "switch":
        if case.k != 1:
            raise ValueError(f"router='switch' routes top-1: k must be 1, got {case.k}")
        cf = case.capacity_factor if case.capacity_factor is not None else 1.0
        router = SwitchRouter(d, E, capacity_factor=cf, eval_capacity_factor=cf, min_capacity=case.min_capacity,
                              jitter_eps=0.0, drop_tokens=case.capacity_factor is not None)
        aux = "switch"
    else:
        raise ValueError(f"router must be 'topk' or 'switch', got {case.router!r}")
    layer = MoELayer(router, ExpertBank(E, d, case.d_ff, kind=case.kind), aux_loss=aux).to(dtype).eval()
    x = torch.randn(sum(case.tokens_per_rank), d, dtype=dtype)
    g = torch.randn(sum(case.tokens_per_rank), d, dtype=dtype)
    if case.expert_bias is not None:
        x[:, 0] = 1.0
        with torch.no_grad():
            layer.router.gate.weight[:, 0] = torch.tensor(case.expert_bias, dtype=dtype)
    return layer.to(device), x.to(device), g.to(device)


def _results(out, x, grad_router, bank, rows) -> dict:
    return {
        "output": out.detach().cpu(),
        "grad_x": x.grad.detach().cpu(),
        "grad_router": grad_router.detach().cpu(),
        **{f"grad_{n}": getattr(bank, n).grad[rows].detach().cpu() for n in WEIGHTS if getattr(bank, n) is not None},
    }


def run_case(rank: int, world_size: int, case: Case, device: str = "cpu", group=None) -> dict:
    """This rank's part of ``case`` through ``ExpertParallelMoE``: output and every gradient.

    rank, world_size: this process's rank and the size of ``group`` (None: the default group).
    """
    if world_size != case.world_size:
        raise ValueError(f"case has {case.world_size} ranks in tokens_per_rank, the process group has {world_size}")
    layer, x, g = build_case(case, device)
    ep_cf = case.capacity_factor if case.router == "topk" else None
    ep = ExpertParallelMoE.from_layer(layer, group, capacity_factor=ep_cf, min_capacity=case.min_capacity)
    mine = case.token_slice(rank)
    x_local = x[mine].clone().requires_grad_(True)
    out = ep(x_local)
    (out.output * g[mine]).sum().backward()
    res = _results(out.output, x_local, ep.router.gate.weight.grad, ep.experts, slice(None))
    res.update(
        indices=out.routing.indices.cpu(), kept=out.routing.kept.cpu(), aux_loss=float(out.aux_loss.detach()),
        rows_sent=out.rows_sent, rows_received=out.rows_received,
    )
    return res


def run_cases(rank: int, world_size: int, cases: list[Case], sizes: tuple[int, ...] = (), repeats: int = 5) -> dict:
    """``run_case`` for every case, then ``time_all_to_all`` for ``sizes``: one process group for many checks.

    Returns ``{"cases": [result per case], "timing": {...}}`` (no "timing" without sizes).
    """
    out = {"cases": [run_case(rank, world_size, case) for case in cases]}
    if sizes:
        out["timing"] = time_all_to_all(rank, world_size, list(sizes), repeats)
    return out


def reference_case(case: Case, device: str = "cpu") -> list[dict]:
    """The single-process layer on the whole batch, cut into the per-rank layout of ``run_case``."""
    layer, x, g = build_case(case, device)
    if case.capacity_factor is not None:  # the same routing group as the expert-parallel layer: one rank
        T = case.tokens_per_rank[0]
        if case.router == "switch":
            layer.router.group_size = T
        else:
            layer.router = _GroupCapacity(layer.router, T, case.capacity_factor, case.min_capacity)
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out.output * g).sum().backward()
    E_local = case.num_experts // case.world_size
    gate = layer.router.inner.gate if isinstance(layer.router, _GroupCapacity) else layer.router.gate
    refs = []
    for r in range(case.world_size):
        mine = case.token_slice(r)
        res = _results(out.output[mine], x, gate.weight.grad, layer.experts, slice(r * E_local, (r + 1) * E_local))
        res.update(grad_x=res["grad_x"][mine], indices=out.routing.indices[mine].cpu(), kept=out.routing.kept[mine].cpu())
        refs.append(res)
    return refs


def max_differences(results: list[dict], references: list[dict], relative: bool = False) -> dict[str, float]:
    """Largest |expert-parallel - single-process| per quantity, over all ranks.

    The router gradient is compared as the sum over ranks (what data parallelism adds up).
    ``relative=True`` divides each by the largest |reference| value of that quantity.
    """
    diffs = {}
    for name in references[0]:
        if name in ("indices", "kept") or not torch.is_tensor(references[0][name]):
            continue
        if name == "grad_router":
            got, ref = [torch.stack([r[name] for r in results]).sum(0)], [references[0][name]]
        else:
            got, ref = [r[name] for r in results], [r[name] for r in references]
        diff = max((float((a - b).abs().max()) if b.numel() else 0.0) for a, b in zip(got, ref))
        scale = max((float(b.abs().max()) if b.numel() else 0.0) for b in ref)
        diffs[name] = diff / scale if relative and scale > 0 else diff
    return diffs


def time_all_to_all(rank: int, world_size: int, sizes: list[int], repeats: int = 5, device: str = "cpu") -> dict:
    """Seconds for one ``all_to_all_single`` in which every rank sends ``size`` bytes to every rank.

    For each size: one warm-up, then ``repeats`` timed runs, each started after a barrier;
    the time of a run is the slowest rank's (an all-to-all ends when the last rank is done).
    Returns ``{"sizes": sizes, "seconds": median per size}``.
    """
    medians = []
    for size in sizes:
        n = max(1, size // 4)  # float32 values per destination
        send = torch.ones(world_size * n, dtype=torch.float32, device=device)
        recv = torch.empty_like(send)
        runs = []
        for i in range(repeats + 1):
            dist.barrier()
            start = time.perf_counter()
            dist.all_to_all_single(recv, send)
            if device != "cpu":
                torch.cuda.synchronize()
            took = torch.tensor([time.perf_counter() - start], dtype=torch.float64, device=device)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            if i:
                runs.append(float(took))
        medians.append(statistics.median(runs))
    return {"sizes": list(sizes), "seconds": medians}


def check_worker(rank: int, world_size: int, tokens: int, experts_per_rank: int, device: str = "cpu",
                 sizes: tuple[int, ...] = SIZES) -> dict:
    """Dropless and capacity cases against the reference, then the all-to-all timings (every rank)."""
    dtype = "float64" if device == "cpu" else "float32"
    out = {}
    for name, cf in (("dropless", None), ("capacity 1.0", 1.0)):
        case = Case((tokens,) * world_size, num_experts=experts_per_rank * world_size, k=2, d_model=64, d_ff=128,
                    capacity_factor=cf, dtype=dtype)
        res = run_case(rank, world_size, case, device)
        ref = reference_case(case, device)[rank]
        g = res["grad_router"].to(device)
        dist.all_reduce(g)  # the router gradient is the sum over ranks
        res["grad_router"] = g.cpu()
        diffs = max_differences([res], [ref], relative=True)
        diffs["routing mismatches"] = float((res["kept"] != ref["kept"]).sum() + (res["indices"] != ref["indices"]).sum())
        table = torch.tensor(list(diffs.values()), dtype=torch.float64, device=device)
        dist.all_reduce(table, op=dist.ReduceOp.MAX)
        out[name] = dict(zip(diffs, table.tolist()))
    out["timing"] = time_all_to_all(rank, world_size, list(sizes), device=device)
    return out
