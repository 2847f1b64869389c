"""The question bank: references, cases, hidden-case seeds, tie-aware checks, known
wrong answers, the functions a question builds on. All in this process, no grading
workers: fast, and independent of how student code is run."""

from __future__ import annotations

import math

import pytest
import torch
from _grading_helpers import master

import moe_utils
from moe_utils.grading.bank.ex03_switch_capacity import CAPACITY_GRID, random_capacity_case, ref_expert_capacity
from moe_utils.grading.extract import extract_definitions
from moe_utils.grading.questions import (
    EXERCISE_INFO,
    EXERCISES,
    QUESTIONS,
    REFERENCE_GLOBALS,
    dependency_source,
    find_question,
)
from moe_utils.grading.runner import expected_output, judge_case
from moe_utils.grading.spec import Rand
from moe_utils.grading.worker import call_case, decode, encode

SEEDS = (0, 1, 2**40 + 7)


def judge(q, fn, seed=0, hidden=True):
    """Verdicts of ``fn`` on q's cases, the way the grader reaches them."""
    out = []
    for c in q.cases(hidden=hidden, seed=seed):
        result = decode(encode(call_case(fn, c.args, c.kwargs, c.grad, c.grad_output, memory=q.own_memory)))
        out.append(judge_case(q, c, expected_output(q, c), result))
    return out


def master_namespace(exercise: str, edits: dict | None = None) -> dict:
    ns: dict = {"__name__": "__main__"}
    for snip in extract_definitions(master(exercise)).snippets:
        for stmt in snip.statements:
            exec(compile(stmt, f"<cell {snip.cell}>", "exec", dont_inherit=True), ns)
    return ns


# -- references and cases --------------------------------------------------------------------


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_every_reference_passes_its_own_cases_for_any_seed(q):
    # public cases with published values check the reference against the conventions page
    for seed in SEEDS:
        bad = [v.message for v in judge(q, q.reference, seed) if not v.passed]
        assert not bad, bad


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_hidden_inputs_come_from_the_seed_and_public_inputs_do_not(q):
    a, b, again = q.cases(seed=11), q.cases(seed=12), q.cases(seed=11)
    assert any(c.public for c in a) and any(not c.public for c in a)
    assert [c.id for c in a] == [f"c{i}" for i in range(len(a))]

    def same(x, y):
        return encode((x.args, x.kwargs)) == encode((y.args, y.kwargs))

    assert all(same(x, y) for x, y in zip(a, again))
    assert all(same(x, y) for x, y in zip(a, b) if x.public)
    assert any(not same(x, y) for x, y in zip(a, b) if not x.public), "no hidden case depends on the seed"


def test_exercise_totals():
    assert {e: sum(q.points for q in qs) for e, qs in EXERCISES.items()} == {
        "ex01_router_topk": 8, "ex02_balance_losses": 8, "ex03_switch_capacity": 10,
        "ex04_mixtral_block": 6, "ex05_dispatch_metadata": 10, "ex08_routing_security": 12,
        "ex09_beyond_topk": 10, "ex10_expert_parallel": 15}
    assert all(EXERCISE_INFO[e].moe_utils_allowed == () for e in EXERCISES)


@pytest.mark.parametrize("exercise", sorted(EXERCISES))
def test_masters_pass_every_case_for_several_seeds(exercise):
    ns = master_namespace(exercise)
    for q in EXERCISES[exercise]:
        for seed in SEEDS:
            bad = [v.message for v in judge(q, ns[q.name], seed) if not v.passed]
            assert not bad, (q.name, seed, bad)


def test_references_agree_with_moe_utils():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(12, 6, generator=g), torch.randn(6, 5, generator=g)
    probs = find_question("router_probs").reference(find_question("router_logits").reference(x, w))
    router = moe_utils.TopKRouter(6, 5, k=2)
    with torch.no_grad():
        router.gate.weight.copy_(w.t())
    routing = router(x)
    torch.testing.assert_close(probs, routing.probs)
    idx, wts = find_question("top_k_routing").reference(probs, 2)
    assert torch.equal(idx, routing.indices)
    torch.testing.assert_close(wts, routing.weights)
    top1 = probs.argmax(-1)
    torch.testing.assert_close(find_question("switch_aux_loss").reference(probs, top1, 0.1),
                               moe_utils.switch_load_balancing_loss(probs, top1, 0.1))
    torch.testing.assert_close(find_question("topk_aux_loss").reference(probs, idx), moe_utils.topk_load_balancing_loss(probs, idx))
    logits = torch.randn(7, 4, generator=g)
    torch.testing.assert_close(find_question("router_z_loss").reference(logits), moe_utils.router_z_loss(logits))
    for T, E, cf, k, mc in CAPACITY_GRID:
        assert ref_expert_capacity(T, E, cf, k, mc) == moe_utils.expert_capacity(T, E, cf, k, mc)
    choices = torch.rand(9, 5, generator=g).argsort(-1)[:, :2]
    assert torch.equal(find_question("buffer_positions").reference(choices, 5), moe_utils.buffer_positions(choices, 5))
    layer = moe_utils.mixtral_layer(6, 8, num_experts=5, k=2)
    with torch.no_grad():
        expected = layer(x).output
        mine = find_question("mixtral_block_forward").reference(
            x, layer.router.gate.weight.t(), layer.experts.w1, layer.experts.w3, layer.experts.w2, k=2)
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-4)


def test_plain_float_capacity_formula_is_accepted_on_every_graded_case():
    # a student who writes floor(cf * k * T / E) in floating point must not lose points,
    # on the fixed grid and on the random hidden case, whatever the seed
    grid = list(CAPACITY_GRID) + [random_capacity_case(Rand(seed)) for seed in range(3000)]
    for T, E, cf, k, mc in grid:
        assert max(mc, math.floor(cf * k * T / E)) == ref_expert_capacity(T, E, cf, k, mc), (T, E, cf, k, mc)


# -- what a question builds on -----------------------------------------------------------------


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_dependency_source_holds_only_the_references_a_question_builds_on(q):
    source, binding = dependency_source(q)
    assert set(binding) == set(q.builds_on)
    ns = dict(REFERENCE_GLOBALS)
    exec(compile(source, "<reference>", "exec", dont_inherit=True), ns)
    defined = {k for k, v in ns.items() if callable(v) and k not in REFERENCE_GLOBALS}
    assert q.reference.__name__ not in defined
    by_name = {o.name: o for o in EXERCISES[q.exercise]}
    for dep, ref_name in binding.items():
        dq = by_name[dep]
        assert ref_name == dq.reference.__name__
        c = dq.cases(hidden=False)[0]
        torch.testing.assert_close(ns[ref_name](*c.args, **c.kwargs), dq.reference(*c.args, **c.kwargs))


# -- tie-aware checks ------------------------------------------------------------------------


def _verdict(q, case, out):
    result = decode(encode({"out": out, "args_after": list(case.args), "kwargs_after": dict(case.kwargs)}))
    return judge_case(q, case, expected_output(q, case), result)


def test_top_k_tie_case_accepts_either_tied_expert_and_nothing_else():
    q = find_question("top_k_routing")
    case = next(c for c in q.cases(hidden=False) if "ties" in c.name)
    probs, k = case.args
    ref_idx, ref_w = q.reference(probs, k)
    other = ref_idx.clone()
    other[0, 1] = 2  # row 0 = [0.5, 0.25, 0.25, 0]: expert 1 or 2 second
    other[1] = torch.tensor([3, 1])  # row 1: all tied
    assert _verdict(q, case, (ref_idx, ref_w)).passed
    assert _verdict(q, case, (other, ref_w)).passed
    twice = ref_idx.clone()
    twice[1] = torch.tensor([2, 2])
    assert not _verdict(q, case, (twice, ref_w)).passed
    wrong = ref_idx.clone()
    wrong[0, 1] = 3  # probability 0: not tied with the second best
    assert not _verdict(q, case, (wrong, ref_w)).passed
    swapped = ref_idx.clone()
    swapped[0] = torch.tensor([1, 0])  # best first is part of the convention
    assert not _verdict(q, case, (swapped, ref_w)).passed
    assert not _verdict(q, case, (ref_idx, torch.full_like(ref_w, 0.5))).passed


def test_switch_gate_tie_case_accepts_either_tied_expert():
    q = find_question("switch_gate")
    case = next(c for c in q.cases(hidden=False) if "ties" in c.name)
    (probs,) = case.args
    idx, gate = q.reference(probs)
    alt = torch.tensor([1, 3])  # row 0: experts 0/1 tie; row 1: all four tie
    assert _verdict(q, case, (alt, gate)).passed
    assert not _verdict(q, case, (torch.tensor([2, 3]), gate)).passed


def test_value_masking_top_k_fails_only_the_tie_cases():
    def masking(probs, k):
        top_p, top_i = probs.topk(k, dim=-1)
        kept = torch.where(probs >= top_p[:, -1:], probs, torch.zeros_like(probs))
        return top_i, top_p / kept.sum(dim=-1, keepdim=True)

    q = find_question("top_k_routing")
    for seed in SEEDS:
        failed = [v.name for v in judge(q, masking, seed) if not v.passed]
        assert failed and all("ties" in name for name in failed), failed


def test_float32_overflow_case_defeats_a_naive_log_sum_exp():
    q = find_question("router_z_loss")
    case = next(c for c in q.cases(hidden=False) if "large float32" in c.name)
    (logits,) = case.args
    assert logits.dtype == torch.float32 and float(logits.max()) > 800  # exp overflows even in float64
    assert torch.isinf(torch.exp(logits.double())).any()
    naive = [lambda x: torch.log(torch.exp(x).sum(-1)).pow(2).mean(),
             lambda x: torch.log(torch.exp(x.double()).sum(-1)).pow(2).mean().float()]
    for fn in naive:
        assert not _verdict(q, case, fn(logits)).passed
    assert _verdict(q, case, torch.logsumexp(logits, dim=-1).pow(2).mean()).passed
    # and the expected value is right: float64 with the max subtracted
    m = logits.double().max(-1, keepdim=True).values
    lse = ((logits.double() - m).exp().sum(-1).log() + m[:, 0])
    torch.testing.assert_close(expected_output(q, case)[0].double(), (lse * lse).mean(), rtol=1e-6, atol=0)


# -- known wrong answers and hints ----------------------------------------------------------------


@pytest.mark.parametrize("q", [q for q in QUESTIONS if q.wrong_answers], ids=lambda q: q.name)
def test_every_known_wrong_answer_is_wrong_and_is_named(q):
    for wrong in q.wrong_answers:
        verdicts = judge(q, wrong.fn, seed=3)
        failed = [v for v in verdicts if not v.passed]
        assert failed, f"{wrong.what!r} passes every case of {q.name}"
        first = failed[0]
        assert "this is a known mistake:" in first.message, first.message
        named = [w for w in q.wrong_answers if f"known mistake: {w.what}" in first.message]
        assert named and named[0].hint == first.hint


@pytest.mark.parametrize("q", QUESTIONS, ids=lambda q: q.name)
def test_every_failure_kind_has_a_hint(q):
    from moe_utils.grading.spec import FAILURE_KINDS

    for kind in FAILURE_KINDS:
        assert len(q.hint_for(kind)) > 20
    assert q.hint_for("values") == q.hint


def test_rand_draws_are_a_function_of_the_seed():
    a, b = Rand(5), Rand(5)
    assert torch.equal(a.randn(3, 4), b.randn(3, 4)) and torch.equal(a.choices(6, 5, 2), b.choices(6, 5, 2))
    c = a.choices(50, 8, 3)
    assert all(len(set(row.tolist())) == 3 for row in c)
    assert torch.equal(a.perm(9).sort().values, torch.arange(9))
