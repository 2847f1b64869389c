"""Exercise 09: upcycled experts must be independent copies, not views.

``torch.stack([w] * E)`` and ``w.expand(E, ...)`` hold the same numbers, so a value
comparison cannot tell them apart; but an expanded "expert bank" is one matrix seen E
times (stride 0), so training it could never let the experts drift apart. The grader
asks questions marked ``own_memory`` for outputs that own their memory.

The generic checks (references, master full marks, stub zero, the known wrong answers)
pick the exercise up from the question bank, as for every exercise.
"""

from __future__ import annotations

import pytest
import torch
from _grading_helpers import mutate, points, write

from moe_utils.grading import EXERCISES, WorkerPool, grade_notebook
from moe_utils.grading.worker import _shared_memory

NAME = "ex09_beyond_topk"
STACK = "return tuple(torch.stack([w] * num_experts) for w in (w1, w3, w2))"


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox="none", seed=909) as p:
        yield p


def test_shared_memory_sees_views_expands_and_repeats_but_not_copies():
    w = torch.randn(3, 4)
    assert _shared_memory(w.expand(2, 3, 4).clone(), (w,), {}) == []
    assert _shared_memory(torch.stack([w] * 2), (w,), {}) == []
    assert _shared_memory(w.expand(2, 3, 4), (w,), {}) == [0]  # a view of the input
    assert _shared_memory(w.clone().expand(2, 3, 4), (w,), {}) == [0]  # one memory, stride 0
    assert _shared_memory(w, (), {"w": w}) == [0]  # the input returned as it is
    a = torch.randn(2, 2)
    assert _shared_memory((a, a), (), {}) == [1]  # the same memory twice
    assert _shared_memory((torch.zeros(0), 3.0), (), {}) == []  # nothing to judge


@pytest.mark.parametrize("answer, lost", [
    ("return tuple(w.expand(num_experts, *w.shape) for w in (w1, w3, w2))", True),
    ("return tuple(w.clone().expand(num_experts, -1, -1) for w in (w1, w3, w2))", True),
    ("return tuple(w.expand(num_experts, -1, -1).clone() for w in (w1, w3, w2))", False),
    ("return tuple(w.unsqueeze(0).repeat(num_experts, 1, 1) for w in (w1, w3, w2))", False),
])
def test_experts_that_share_one_memory_lose_the_upcycling_points(pool, tmp_path, answer, lost):
    nb = mutate(NAME, {"upcycle_experts": (STACK, answer)})
    report = grade_notebook(write(tmp_path, NAME, nb), pool=pool)
    full = {q.name: float(q.points) for q in EXERCISES[NAME]}
    assert points(report) == {**full, "upcycle_experts": 0.0 if lost else full["upcycle_experts"]}
    if lost:
        (q,) = [q for q in report.questions if q.name == "upcycle_experts"]
        assert "not own their memory" in q.message and "hint:" in q.message and ".clone()" in q.message, q.message


def test_shared_memory_is_judged_byte_by_byte_and_inside_nested_outputs():
    w1, w3 = torch.randn(3, 4), torch.randn(3, 4)
    # fused weights (one fresh buffer, split on the last axis): interleaved but independent
    w13 = torch.stack([torch.cat([w1, w3], 1)] * 2)
    assert _shared_memory(tuple(w13.split(4, 2)), (w1, w3), {}) == []
    assert _shared_memory(tuple(torch.randn(4, 3).unbind(0)), (), {}) == []
    # an input hidden in a nested output, and numpy sharing an input's memory
    assert _shared_memory(((w1,), torch.ones(2)), (w1,), {}) == [0]
    np_view = torch.from_numpy(w1.numpy()[1:])
    assert _shared_memory(np_view, (w1,), {}) == [0]
    # overlapping slices of one buffer
    buf = torch.randn(10)
    assert _shared_memory((buf[:6], buf[4:]), (), {}) == [1]


def test_fused_weight_answer_keeps_the_upcycling_points(pool, tmp_path):
    fused = ("w13 = torch.stack([torch.cat([w1, w3], 1)] * num_experts)\n"
             "    W1, W3 = w13.split(w1.shape[1], 2)\n"
             "    return W1, W3, torch.stack([w2] * num_experts)")
    nb = mutate(NAME, {"upcycle_experts": (STACK, fused)})
    report = grade_notebook(write(tmp_path, NAME, nb), pool=pool)
    assert points(report) == {q.name: float(q.points) for q in EXERCISES[NAME]}, \
        [q.message for q in report.questions if q.points < q.max_points]
