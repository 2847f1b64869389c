"""Exercise 10 (expert parallelism by hand): its references against the course's
expert-parallel code, the worked example against numbers derived by hand, its known
wrong answers for many seeds, and broken submissions costing one question each.

The generic checks (every reference passes its own cases, the master gets full marks,
the stub zero, each realistic mistake costs exactly its question: ``MUTANTS`` in
``test_grading_grader.py``) pick the exercise up from the question bank.
"""

from __future__ import annotations

import pytest
import torch
from _grading_helpers import mutate, points, write

from moe_utils import ExpertBank, Routing, moe_ffn
from moe_utils.dispatch import dispatch_metadata
from moe_utils.expert_parallel import expert_owner, token_rank_matrix
from moe_utils.grading import EXERCISES, WorkerPool, grade_notebook
from moe_utils.grading.bank import ex10_expert_parallel as ex10
from moe_utils.grading.runner import expected_output, judge_case
from moe_utils.grading.spec import Rand
from moe_utils.grading.worker import call_case, decode, encode

NAME = "ex10_expert_parallel"


def _routing(seed: int, T: int, E: int, k: int, drop: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    indices = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    kept = torch.rand(T, k, generator=g) >= drop
    weights = torch.softmax(torch.randn(T, k, generator=g, dtype=torch.float64), -1)
    return indices, kept, weights


def test_worked_example_numbers_derived_by_hand():
    indices, kept = ex10.example_routing()
    # owners with E_local = 2: expert 0, 1 -> rank 0; 2, 3 -> rank 1; slot 7 (token 3, choice 1) dropped
    assert expert_owner(indices, 4, 2).tolist() == [[1, 0], [0, 1], [0, 1], [1, 0], [1, 0]]
    assert ex10.ref_send_splits(indices, kept, 4, 2).tolist() == [4, 5]
    assert ex10.ref_dispatch_order(indices, kept).tolist() == [1, 4, 2, 9, 0, 5, 8, 3, 6]
    # the count table: rank 0 is the example, rank 1 routes [[1, 0], [0, 3], [1, 2]], all kept
    rank1 = torch.tensor([[1, 0], [0, 3], [1, 2]])
    assert torch.bincount(indices[kept], minlength=4).tolist() == ex10.EXAMPLE_COUNTS[0]
    assert torch.bincount(rank1.reshape(-1), minlength=4).tolist() == ex10.EXAMPLE_COUNTS[1]
    counts = torch.tensor(ex10.EXAMPLE_COUNTS)
    assert [ex10.ref_recv_splits(counts, r, 2).tolist() for r in (0, 1)] == [[4, 4], [5, 2]]
    assert ex10.ref_local_expert_ids(counts, 1, 2).tolist() == [0, 0, 0, 1, 1, 0, 1]
    # combine: row p holds p + 1; token 0's slots 0 and 1 are rows 4 and 1 -> 0.7 * 5 + 0.3 * 1
    y = ex10.ref_combine_back(torch.arange(1.0, 10.0, dtype=torch.float64)[:, None],
                              ex10.ref_dispatch_order(indices, kept), torch.tensor(ex10.EXAMPLE_WEIGHTS, dtype=torch.float64))
    torch.testing.assert_close(y[:, 0], torch.tensor([0.7 * 5 + 0.3 * 1, 0.6 * 3 + 0.4 * 8, 0.9 * 2 + 0.1 * 6, 9.0,
                                                      0.5 * 7 + 0.5 * 4], dtype=torch.float64))
    # the cost model: notebook 10's table (28,672 and 86,016 bytes), and 400 Gb/s = 50e9 B/s
    assert ex10.ref_bytes_per_token(2, 4096, 2, 2, 1 / 8) == 2 * 7 / 8 * 4096 * 4 == 28672
    assert ex10.ref_bytes_per_token(4, 7168, 1, 2, 0.0) == 86016
    assert ex10.ref_exchange_seconds(10**6, 5 * 10**4, 400, 0.0) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("W, E, tokens", [(2, 4, (9, 5)), (2, 8, (9, 5)), (4, 8, (5, 0, 7, 3)), (3, 6, (4, 4, 4)),
                                           (1, 4, (6,))])
def test_references_agree_with_the_course_layer_bookkeeping(W, E, tokens):
    T = sum(tokens)
    indices, kept, weights = _routing(W * 100 + E, T, E, 2)
    matrix = token_rank_matrix(indices, kept, list(tokens), E)  # [W, W], the lecture's count matrix
    starts = [sum(tokens[:r]) for r in range(W)]
    counts = torch.stack([torch.bincount(indices[s:s + n][kept[s:s + n]], minlength=E) for s, n in zip(starts, tokens)])
    for r, (s, n) in enumerate(zip(starts, tokens)):
        ind, kp = indices[s:s + n], kept[s:s + n]
        assert torch.equal(ex10.ref_send_splits(ind, kp, E, W), matrix[r])
        assert torch.equal(ex10.ref_recv_splits(counts, r, W), matrix[:, r])
        meta = dispatch_metadata(Routing(ind, weights[s:s + n], kp, E))
        assert torch.equal(ex10.ref_dispatch_order(ind, kp), meta.sorted_slots[: int(kp.sum())])
        assert ex10.ref_local_expert_ids(counts, r, W).numel() == int(matrix[:, r].sum())


@pytest.mark.parametrize("W, E, k, tokens", [(2, 4, 2, (7, 9)), (4, 8, 2, (5, 0, 7, 3)), (3, 6, 1, (6, 2, 5))])
def test_references_chained_through_a_simulated_all_to_all_equal_moe_ffn_on_the_whole_batch(W, E, k, tokens):
    # one dropless step as ExpertParallelMoE._dropless does it, every rank in this process
    torch.manual_seed(W + E)
    d, E_local, T = 6, E // W, sum(tokens)
    bank = ExpertBank(E, d, 10).double()
    x = torch.randn(T, d, dtype=torch.float64)
    indices, kept, weights = _routing(7 * W + k, T, E, k)
    starts = [sum(tokens[:r]) for r in range(W)]
    ranks = [(x[s:s + n], indices[s:s + n], kept[s:s + n], weights[s:s + n]) for s, n in zip(starts, tokens)]
    orders = [ex10.ref_dispatch_order(ind, kp) for _, ind, kp, _ in ranks]
    splits = torch.stack([ex10.ref_send_splits(ind, kp, E, W) for _, ind, kp, _ in ranks])
    counts = torch.stack([torch.bincount(ind[kp], minlength=E) for _, ind, kp, _ in ranks])
    received = ex10.ref_simulate_all_to_all([xr[o // k] for (xr, *_), o in zip(ranks, orders)], splits)
    outputs = []
    for r in range(W):
        ids = r * E_local + ex10.ref_local_expert_ids(counts, r, W)
        one = torch.ones(len(ids), 1, dtype=torch.float64)
        outputs.append(moe_ffn(received[r], Routing.fixed(ids[:, None], one, E), bank, backend="torch"))
    back = ex10.ref_simulate_all_to_all(outputs, splits.T)
    y = torch.cat([ex10.ref_combine_back(yb, o, w) for yb, o, (*_, w) in zip(back, orders, ranks)])
    whole = moe_ffn(x, Routing(indices, weights, kept, E), bank, backend="torch")
    torch.testing.assert_close(y, whole, atol=1e-12, rtol=1e-12)
    assert int((~kept).sum()) > 0  # some slots are not sent


def _judge(q, fn, seed):
    out = []
    for c in q.cases(hidden=True, seed=seed):
        result = decode(encode(call_case(fn, c.args, c.kwargs, c.grad, c.grad_output)))
        out.append(judge_case(q, c, expected_output(q, c), result))
    return out


@pytest.mark.parametrize("q", EXERCISES[NAME], ids=lambda q: q.name)
def test_each_known_wrong_answer_fails_and_is_named_for_many_seeds(q):
    for wrong in q.wrong_answers:
        for seed in range(6):
            failed = [v for v in _judge(q, wrong.fn, seed) if not v.passed]
            assert failed, (wrong.what, seed)
            assert f"this is a known mistake: {wrong.what}" in failed[0].message, (seed, failed[0].message)


def test_expert_major_ids_are_right_on_some_ranks_so_every_rank_is_checked():
    # on the spec's count table the expert-major order happens to be right for rank 1:
    # the cases must hold several ranks of one table (they do: every rank of a W=4 table)
    q = next(q for q in EXERCISES[NAME] if q.name == "local_expert_ids")
    spec = torch.tensor([[1, 2, 3, 1], [2, 1, 0, 2]])
    wrong = q.wrong_answers[0].fn
    assert torch.equal(wrong(spec, 1, 2), ex10.ref_local_expert_ids(spec, 1, 2))
    assert not torch.equal(wrong(spec, 0, 2), ex10.ref_local_expert_ids(spec, 0, 2))
    ranks = [c.args[1] for c in q.cases(seed=5) if not c.public and c.args[0].shape == (4, 8)]
    assert sorted(ranks) == [0, 1, 2, 3]


def test_hidden_cases_cover_the_edge_cases_of_the_exchange():
    cases = {q.name: q.cases(seed=Rand(0).integer(0, 10**9)) for q in EXERCISES[NAME]}
    # a rank with no tokens, nothing kept, one rank, one expert per rank
    assert any(c.args[0].shape[0] == 0 for c in cases["send_splits"])
    assert any(c.args[0].numel() and not c.args[1].any() for c in cases["dispatch_order"])
    assert any(c.args[-1] == 1 for c in cases["send_splits"]) and any(c.args[-1] == 1 for c in cases["recv_splits"])
    assert any(c.args[1].sum(1).eq(0).any() for c in cases["simulate_all_to_all"])
    assert any(c.grad == (0, 2) for c in cases["combine_back"])
    assert any(c.args[0].shape[0] < c.args[2].numel() for c in cases["combine_back"])  # dropped slots


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox="none", seed=4321) as p:
        yield p


BROKEN = {
    # cell edits on the ex10 master -> the statuses of the questions they break
    "endless loop": {"simulate_all_to_all": ("W = len(rows)", "while True:\n        pass")},
    "exception": {"combine_back": ("d = y_back.shape[1]", "d = y_back.shape[2]")},
    "returns a list": {"send_splits": ("return torch.bincount(owner, minlength=world_size)",
                                       "return torch.bincount(owner, minlength=world_size).tolist()")},
    "returns a tensor": {"exchange_seconds": ("return 2 * latency_s", "return torch.tensor(2 * latency_s)")},
    "edits its input": {"dispatch_order": ("slots = torch.nonzero", "kept[:] = True\n    slots = torch.nonzero")},
}
STATUS = {"endless loop": "timeout"}


def test_broken_code_costs_only_its_own_question(pool, tmp_path):
    full = {q.name: float(q.points) for q in EXERCISES[NAME]}
    for i, (name, edits) in enumerate(BROKEN.items()):
        report = grade_notebook(write(tmp_path / str(i), NAME, mutate(NAME, edits)), timeout=2.0, pool=pool)
        assert points(report) == {q: (0.0 if q in edits else p) for q, p in full.items()}, name
        (broken,) = [q for q in report.questions if q.name in edits]
        assert broken.status == STATUS.get(name, "fail") and broken.message, (name, broken.status)
