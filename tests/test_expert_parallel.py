"""Expert parallelism across real processes (gloo on CPU) against the single-process MoELayer.

One group of 4 processes runs every case (the world-size-2 cases in two subgroups of 2
at the same time), so the file pays the process start-up once. Each case's output and every gradient (input, router, each expert's
weights) are compared with a reference computed here in the test process: the
single-process ``MoELayer`` on the concatenated batch, and for the capacity mode a
dropped set found by a per-token loop in the course's priority order, with the routing
group of one rank's tokens. The router runs in float32 (course convention), everything
else in float64; the tolerances allow for float32 rounding of the router logits, which
may differ between batch sizes on another CPU.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _ep_workers import FAULTS, fail_or_sleep, sleep_forever, two_and_four

from moe_utils import ExpertBank, MoELayer, Routing, TopKRouter
from moe_utils.expert_parallel import (
    Case,
    ExpertParallelMoE,
    build_case,
    launch,
    max_differences,
    reference_case,
    token_rank_matrix,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60  # seconds for a whole process group, and for any single collective in it

E2, E4 = 4, 8  # experts at world size 2 and 4: two per rank
CASES_2 = {
    "random routing, top-2": Case((16, 16), num_experts=E2, k=2),
    "top-1 TopKRouter": Case((10, 6), num_experts=E2, k=1),
    "top-1 Switch gate, GELU experts": Case((12, 12), num_experts=E2, k=1, router="switch", kind="gelu"),
    "every token to expert 0, top-1": Case((10, 10), num_experts=E2, k=1, router="switch", expert_bias=(20, 0, 0, 0)),
    "every token's first choice expert 0, top-2": Case((9, 11), num_experts=E2, k=2, expert_bias=(20, 0, 0, 0)),
    "expert 1 gets no token": Case((12, 12), num_experts=E2, k=2, expert_bias=(0, -20, 0, 0)),
    "rank 1 receives nothing": Case((12, 12), num_experts=E2, k=2, expert_bias=(0, 0, -20, -20)),
    "rank 0 has T = 0": Case((0, 14), num_experts=E2, k=2),
    "no rank has a token": Case((0, 0), num_experts=E2, k=2),
    "float32": Case((8, 8), num_experts=E2, k=2, dtype="float32"),
    "capacity, Switch top-1, CF 1": Case((12, 12), num_experts=E2, k=1, router="switch", capacity_factor=1.0,
                                          expert_bias=(2, 0, 0, 0)),
    "capacity, top-2, CF 1": Case((12, 12), num_experts=E2, k=2, capacity_factor=1.0, expert_bias=(1, 1, 0, 0)),
    "capacity, top-2, CF 1.5, min 4": Case((10, 10), num_experts=E2, k=2, capacity_factor=1.5, min_capacity=4,
                                           expert_bias=(3, 0, 0, 0)),
}
CASES_4 = {
    "random routing, top-2, uneven T": Case((5, 0, 7, 3), num_experts=E4, k=2),
    "one expert per rank, top-2": Case((6, 6, 6, 6), num_experts=4, k=2),
    "top-1 Switch gate, GELU experts": Case((6, 6, 6, 6), num_experts=E4, k=1, router="switch", kind="gelu"),
    "every token to expert 7, top-1": Case((5, 6, 7, 8), num_experts=E4, k=1, router="switch",
                                           expert_bias=(0,) * 7 + (20,)),
    "ranks 0 and 2 receive nothing": Case((8, 8, 8, 8), num_experts=E4, k=2,
                                          expert_bias=(-20, -20, 0, 0, -20, -20, 0, 0)),
    "capacity, Switch top-1, CF 1": Case((8, 8, 8, 8), num_experts=E4, k=1, router="switch", capacity_factor=1.0,
                                          expert_bias=(2,) + (0,) * 7),
    "capacity, top-2, CF 1": Case((8, 8, 8, 8), num_experts=E4, k=2, capacity_factor=1.0,
                                  expert_bias=(2, 1.5, 0, 0, 0, 0, 1.5, 0)),
}


@pytest.fixture(scope="module")
def four_processes():
    start = time.perf_counter()
    results = launch(two_and_four, 4, CASES_2, CASES_4, FAULTS[-2:], timeout=TIMEOUT)
    print(f"\n4 processes, every case: {time.perf_counter() - start:.1f} s")
    return results


@pytest.fixture(scope="module", params=["ranks 0-1", "ranks 2-3"])
def world2(four_processes, request):
    """The world-size-2 results of one subgroup, by rank in the subgroup."""
    first = 0 if request.param == "ranks 0-1" else 2
    return [four_processes[first]["2"], four_processes[first + 1]["2"]]


@pytest.fixture(scope="module")
def world4(four_processes):
    return [rank["4"] for rank in four_processes]


# ---------------------------------------------------------------- the reference


def kept_by_loop(indices: torch.Tensor, num_experts: int, group: int, capacity: int, token_major=False):
    """Capacity dropping by hand: in each group of ``group`` tokens, all first choices in token
    order, then all second choices, ...; an expert keeps its first ``capacity`` assignments.
    ``token_major=True`` is the wrong order (token 0's choices, then token 1's, ...)."""
    T, k = indices.shape
    kept = torch.zeros(T, k, dtype=torch.bool)
    for start in range(0, T, group):
        used = [0] * num_experts
        tokens = range(start, start + group)
        order = [(t, j) for t in tokens for j in range(k)] if token_major else [(t, j) for j in range(k) for t in tokens]
        for t, j in order:
            e = int(indices[t, j])
            if used[e] < capacity:
                kept[t, j] = True
                used[e] += 1
    return kept


class _FixedKept(torch.nn.Module):
    """Wraps a router and replaces its ``kept`` with one computed by ``kept_by_loop``."""

    def __init__(self, router, group, capacity):
        super().__init__()
        self.router, self.group, self.capacity = router, group, capacity
        self.d_model, self.num_experts = router.d_model, router.num_experts

    def forward(self, x):
        r = self.router(x)
        kept = kept_by_loop(r.indices, r.num_experts, self.group, self.capacity)
        return Routing(r.indices, r.weights, kept, r.num_experts, r.probs, r.logits)


def reference(case: Case) -> list[dict]:
    """The single-process MoELayer on the whole batch, cut into each rank's share."""
    layer, x, g = build_case(case)
    gate = layer.router.gate
    if case.capacity_factor is not None:
        T = case.tokens_per_rank[0]
        C = max(case.min_capacity, math.floor(case.capacity_factor * case.k * T / case.num_experts + 1e-9))
        layer = MoELayer(_FixedKept(layer.router, T, C), layer.experts, aux_loss=None)
    x.requires_grad_(True)
    out = layer(x)
    (out.output * g).sum().backward()
    E_local = case.num_experts // case.world_size
    refs = []
    for r in range(case.world_size):
        rows, mine = slice(r * E_local, (r + 1) * E_local), case.token_slice(r)
        refs.append({
            "output": out.output[mine].detach(), "grad_x": x.grad[mine], "grad_router": gate.weight.grad,
            "indices": out.routing.indices[mine], "kept": out.routing.kept[mine],
            **{f"grad_{n}": getattr(layer.experts, n).grad[rows] for n in ("w1", "w3", "w2")
               if getattr(layer.experts, n) is not None},
        })
    return refs


def assert_matches(results: list[dict], case: Case) -> None:
    refs = reference(case)
    tol = dict(rtol=1e-5, atol=1e-6) if case.dtype == "float64" else dict(rtol=1e-4, atol=1e-5)
    for r, (got, ref) in enumerate(zip(results, refs)):
        assert torch.equal(got["indices"], ref["indices"]), f"rank {r}: routing differs"
        assert torch.equal(got["kept"], ref["kept"]), f"rank {r}: dropped set differs"
        for name in ("output", "grad_x", "grad_w1", "grad_w3", "grad_w2"):
            if name in ref:
                torch.testing.assert_close(got[name], ref[name], **tol, msg=lambda m, n=name, r=r: f"rank {r} {n}: {m}")
    # each rank's router gradient covers its own tokens; their sum is the single-process gradient
    total = torch.stack([got["grad_router"] for got in results]).sum(0)
    torch.testing.assert_close(total, refs[0]["grad_router"], rtol=1e-5, atol=1e-6 * float(total.abs().max()) + 1e-12)


# ---------------------------------------------------------------- equal to the single-process layer


@pytest.mark.parametrize("name", list(CASES_2))
def test_world_size_2_matches_single_process_layer(world2, name):
    assert_matches([rank["cases"][name] for rank in world2], CASES_2[name])


@pytest.mark.parametrize("name", list(CASES_4))
def test_world_size_4_matches_single_process_layer(world4, name):
    assert_matches([rank["cases"][name] for rank in world4], CASES_4[name])


def test_the_edge_cases_are_what_their_names_say(world2, world4):
    c2 = {name: [rank["cases"][name] for rank in world2] for name in CASES_2}
    c4 = {name: [rank["cases"][name] for rank in world4] for name in CASES_4}
    every_index = lambda res: torch.cat([r["indices"] for r in res])
    assert (every_index(c2["every token to expert 0, top-1"]) == 0).all()
    assert int(c2["every token to expert 0, top-1"][1]["rows_received"].sum()) == 0
    assert (every_index(c2["every token's first choice expert 0, top-2"])[:, 0] == 0).all()
    assert not (every_index(c2["expert 1 gets no token"]) == 1).any()
    assert int(c2["rank 1 receives nothing"][1]["rows_received"].sum()) == 0
    assert c2["rank 0 has T = 0"][0]["output"].shape == (0, 8)
    assert int(c2["rank 0 has T = 0"][0]["rows_received"].sum()) > 0  # no tokens, but expert work
    assert (every_index(c4["every token to expert 7, top-1"]) == 7).all()
    for r in (0, 2):
        assert int(c4["ranks 0 and 2 receive nothing"][r]["rows_received"].sum()) == 0
    for res in (c2["capacity, Switch top-1, CF 1"], c2["capacity, top-2, CF 1"], c4["capacity, top-2, CF 1"]):
        assert sum(int((~r["kept"]).sum()) for r in res) > 0, "a capacity case should drop something"
    for case, res in ((CASES_2["capacity, top-2, CF 1"], c2["capacity, top-2, CF 1"]),
                      (CASES_4["capacity, top-2, CF 1"], c4["capacity, top-2, CF 1"])):
        # first choices before second choices matters here: token-major priority drops other slots
        T, idx = case.tokens_per_rank[0], every_index(res)
        wrong = kept_by_loop(idx, case.num_experts, T, math.floor(case.k * T / case.num_experts), token_major=True)
        assert not torch.equal(torch.cat([r["kept"] for r in res]), wrong)


def test_rows_sent_and_received_are_the_token_to_rank_matrix(world4):
    case = CASES_4["random routing, top-2, uneven T"]
    res = [rank["cases"]["random routing, top-2, uneven T"] for rank in world4]
    matrix = token_rank_matrix(torch.cat([r["indices"] for r in res]), torch.cat([r["kept"] for r in res]),
                               list(case.tokens_per_rank), case.num_experts)
    assert torch.equal(torch.stack([r["rows_sent"] for r in res]), matrix)
    assert torch.equal(torch.stack([r["rows_received"] for r in res]), matrix.T)
    assert int(matrix.sum()) == case.k * sum(case.tokens_per_rank)  # dropless: every slot travels


def test_capacity_mode_sends_E_times_C_rows_whatever_the_routing(world2):
    # Switch top-1 skewed to expert 0, top-2 skewed to experts 0 and 1: E_local * C rows per rank either way
    for name in ("capacity, Switch top-1, CF 1", "capacity, top-2, CF 1"):
        case = CASES_2[name]
        C = max(case.min_capacity, math.floor(case.capacity_factor * case.k * 12 / case.num_experts))
        for rank in world2:
            assert rank["cases"][name]["rows_sent"].tolist() == [case.num_experts // 2 * C] * 2
            assert rank["cases"][name]["rows_received"].tolist() == [case.num_experts // 2 * C] * 2


def test_aux_loss_is_the_loss_of_each_rank_tokens(world2):
    case = CASES_2["random routing, top-2"]
    layer, x, _ = build_case(case)
    for r, rank in enumerate(world2):
        expected = float(layer(x[case.token_slice(r)]).aux_loss.detach())
        assert rank["cases"]["random routing, top-2"]["aux_loss"] == pytest.approx(expected, rel=1e-5)


def test_group_still_works_after_the_faults(world2, world4):
    for world, cases in ((world2, CASES_2), (world4, CASES_4)):
        first = next(iter(cases))
        assert_matches([rank["after faults"] for rank in world], cases[first])


def test_backward_completes_when_only_rank_0_needs_input_gradients(world2):
    case = CASES_2["random routing, top-2"]
    refs = reference(case)
    for r, rank in enumerate(world2):
        for n in ("w1", "w3", "w2"):
            torch.testing.assert_close(rank["only rank 0 needs grad"][n], refs[r][f"grad_{n}"], rtol=1e-5, atol=1e-6)


def test_module_reference_and_differences_agree_with_the_tests(world2):
    # notebook 10 prints max_differences(results, reference_case(case)): check that path too
    case = CASES_2["capacity, top-2, CF 1"]
    res = [rank["cases"]["capacity, top-2, CF 1"] for rank in world2]
    mod = reference_case(case)
    for a, b in zip(mod, reference(case)):
        assert torch.equal(a["kept"], b["kept"])
    diffs = max_differences(res, mod)
    assert set(diffs) == {"output", "grad_x", "grad_router", "grad_w1", "grad_w3", "grad_w2"}
    assert max(diffs.values()) < 1e-5
    broken = [dict(r, output=r["output"] + 1.0) for r in res]
    assert max_differences(broken, mod)["output"] == pytest.approx(1.0)


# ---------------------------------------------------------------- the all-to-all itself


def _check_pinned(world):
    W = len(world)
    for rank, res in enumerate(world):
        p = res["pinned"]
        expected = [[i, rank, n] for i in range(W) for n in range((i + rank) % 3)]  # from rank i, rows for me
        assert p["received"].tolist() == expected
        assert torch.equal(p["grad_x"], p["x"] + 0.5)  # every row's gradient came back to its sender


def test_all_to_all_moves_rows_and_gradients_to_the_right_ranks_2(world2):
    _check_pinned(world2)


def test_all_to_all_moves_rows_and_gradients_to_the_right_ranks_4(world4):
    _check_pinned(world4)


# ---------------------------------------------------------------- clear errors


def test_errors_are_raised_on_every_rank_and_name_the_problem(world2, world4):
    w2 = [rank["faults"] for rank in world2]
    assert all("d_ff: [12, 13]" in f["d_ff differs"]["message"] for f in w2)
    assert all("router weights" in f["router weights differ"]["message"] for f in w2)
    assert all("d_ff" not in f["router weights differ"]["message"] for f in w2)
    assert all(f["E not divisible"]["error"] == "ValueError" and "num_experts=5 must be divisible by the world size 2"
               in f["E not divisible"]["message"] for f in w2)
    assert "experts must hold" in w2[1]["wrong expert count on rank 1"]["message"]
    assert "rank(s) [1] rejected their arguments" in w2[0]["wrong expert count on rank 1"]["message"]
    assert "last dimension" in w2[1]["bad x on rank 1"]["message"]
    assert "rank(s) [1] raised an error before the all-to-all" in w2[0]["bad x on rank 1"]["message"]
    for world in (world2, world4):
        for rank in world:
            f = rank["faults"]["capacity with unequal T"]
            assert f["error"] == "ValueError" and "same capacity" in f["message"]
    assert [rank["faults"]["bad x on rank 1"]["error"] for rank in world4] == ["RuntimeError", "ValueError"] + \
        ["RuntimeError"] * 2


def test_process_group_not_initialised_is_a_clear_error():
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE(TopKRouter(8, 4, k=2), ExpertBank(2, 8, 12))
    with pytest.raises(RuntimeError, match="init_process_group"):
        ExpertParallelMoE.from_layer(build_case(Case((2, 2)))[0])


# ---------------------------------------------------------------- the launcher never hangs


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_launch_stops_every_rank_when_one_fails(tmp_path):
    start = time.perf_counter()
    with pytest.raises(Exception, match="rank 1 fails on purpose"):
        launch(fail_or_sleep, 2, str(tmp_path), timeout=TIMEOUT)
    assert time.perf_counter() - start < TIMEOUT / 2
    pids = [int(p.read_text()) for p in tmp_path.glob("pid*")]
    assert pids and all(_gone(pid) for pid in pids)  # rank 0 was asleep: the launcher killed it
    assert not multiprocessing.active_children()


def test_launch_kills_every_rank_at_the_deadline():
    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="still running"):
        launch(sleep_forever, 2, timeout=1)
    assert time.perf_counter() - start < 10
    assert not multiprocessing.active_children()


def test_launch_refuses_a_function_the_new_processes_cannot_import():
    def local(rank, world):
        return rank

    with pytest.raises(ValueError, match="module-level function"):
        launch(local, 2)


# ---------------------------------------------------------------- the documented torchrun command


def test_torchrun_command_of_the_readme_runs_and_checks(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           "-m", "moe_utils.expert_parallel", "--backend", "gloo", "--tokens", "32"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dropless      ok" in proc.stdout and "capacity 1.0  ok" in proc.stdout
