"""The autograder on whole notebooks: masters get full marks, stubs get zero, each
realistic mistake costs exactly its own question, no student code crashes the
grader, and the reports (table, JSON, JUnit, CSV) say what happened.

Mutants are made from the master notebooks by replacing a piece of one solution,
so they stay in sync with the masters. One worker pool (torch imported once, no
sandbox: the configuration of a CI machine) serves the in-process gradings. Every
report is also checked for a reason on every question that lost points. The command
line, as a lecturer runs it, is tested in ``test_grading_probes.py`` (each run there
carries several probes).
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET

import pytest
from _grading_helpers import SOLUTIONS, STUDENTS, master, mutate, notes, points, write

from moe_utils.grading import EXERCISES, WorkerPool, grade_notebook
from moe_utils.grading.grader import _plan, format_table, write_csv, write_json, write_junit
from moe_utils.grading.worker import encode

NAMES = sorted(EXERCISES)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox="none", seed=1234) as p:
        yield p


def _full(exercise: str) -> dict[str, float]:
    return {q.name: float(q.points) for q in EXERCISES[exercise]}


def _explained(report) -> None:
    """No question loses points without a message, and a pass is worth all its points."""
    for q in report.questions:
        assert q.message.strip() if q.status != "pass" else q.points == q.max_points, (q.name, q.status, q.message)


@pytest.mark.parametrize("exercise", NAMES)
def test_master_gets_full_marks_and_no_flags(pool, exercise):
    report = grade_notebook(SOLUTIONS / f"{exercise}.ipynb", pool=pool)
    _explained(report)
    assert points(report) == _full(exercise), [q.message for q in report.questions if q.status != "pass"]
    assert report.score == report.max_score == sum(q.points for q in EXERCISES[exercise])
    assert report.flags == [] and report.load_errors == [] and report.error is None
    assert report.grading["sandbox"] == "rlimits" and report.grading["seed"] == 1234


@pytest.mark.parametrize("exercise", NAMES)
def test_untouched_student_notebook_gets_zero(pool, exercise):
    report = grade_notebook(STUDENTS / f"{exercise}.ipynb", pool=pool)
    _explained(report)
    assert report.score == 0 and report.max_score > 0
    assert {q.status for q in report.questions} == {"todo"} and report.flags == []


MUTANTS = {
    # name: (exercise, {cell: (old, new)}); the edited cells' questions lose their points
    "router_logits_cast_after_matmul": ("ex01_router_topk", {"router_logits": ("x.float() @ w_gate.float()", "(x @ w_gate).float()")}),
    "softmax_over_tokens": ("ex01_router_topk", {"router_probs": ("dim=-1)", "dim=0)")}),
    "topk_weights_not_renormalised": ("ex01_router_topk", {"top_k_routing": ("top_p / top_p.sum(dim=-1, keepdim=True)", "top_p")}),
    "renormalised_top1_gate": ("ex01_router_topk", {"switch_gate": ("return index, gate", "return index, gate / gate")}),
    "aux_loss_without_E": ("ex02_balance_losses", {"switch_aux_loss": ("alpha * E * torch.sum", "alpha * torch.sum")}),
    "topk_aux_first_choice_only": ("ex02_balance_losses", {"topk_aux_loss": ("F.one_hot(indices, E)", "F.one_hot(indices[:, :1], E)")}),
    "z_loss_not_squared": ("ex02_balance_losses", {"router_z_loss": (".pow(2)", "")}),
    "capacity_off_by_one": ("ex03_switch_capacity", {"expert_capacity": ("num_experts))", "num_experts) + 1)")}),
    "float_capacity": ("ex03_switch_capacity", {"expert_capacity": ("math.floor(capacity_factor * k * num_tokens / num_experts)",
                                                                     "capacity_factor * k * num_tokens / num_experts")}),
    "positions_token_major": ("ex03_switch_capacity", {"buffer_positions": ("indices.t().reshape(-1)", "indices.reshape(-1)")}),
    "dropped_tokens_zeroed": ("ex03_switch_capacity", {"switch_layer_forward": ("return x + moe", "return torch.where(kept[:, None], x + moe, torch.zeros_like(x))")}),
    "swiglu_with_gelu": ("ex04_mixtral_block", {"swiglu_expert": ("F.silu", "F.gelu")}),
    "mixtral_weights_not_renormalised": ("ex04_mixtral_block", {"mixtral_block_forward": ("(top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)", "top_p.to(x.dtype)")}),
    "sort_not_stable": ("ex05_dispatch_metadata", {"sort_slots_by_expert": ("torch.argsort(flat, stable=True)", "torch.argsort(flat, descending=True, stable=True).flip(0)")}),
    "unpermute_with_order_not_inverse": ("ex05_dispatch_metadata", {"unpermute_and_combine": ("y_sorted[inverse]", "y_sorted[order]")}),
    "send_splits_ignore_kept": ("ex10_expert_parallel", {"send_splits": ("indices[kept] // per_rank", "indices.reshape(-1) // per_rank")}),
    "send_splits_owner_modulo": ("ex10_expert_parallel", {"send_splits": ("indices[kept] // per_rank", "indices[kept] % world_size")}),
    "send_splits_no_minlength": ("ex10_expert_parallel", {"send_splits": ("torch.bincount(owner, minlength=world_size)", "torch.bincount(owner)")}),
    "dispatch_order_unsorted": ("ex10_expert_parallel", {"dispatch_order": ("return slots[torch.argsort(experts, stable=True)]", "return slots")}),
    "dispatch_order_with_dropped": ("ex10_expert_parallel", {"dispatch_order": ("torch.nonzero(kept.reshape(-1))[:, 0]", "torch.arange(kept.numel())")}),
    "recv_splits_transposed": ("ex10_expert_parallel", {"recv_splits": ("return mine.sum(dim=1)", "return counts[rank].reshape(world_size, per_rank).sum(dim=1)")}),
    "recv_splits_without_local": ("ex10_expert_parallel", {"recv_splits": ("return mine.sum(dim=1)", "splits = mine.sum(dim=1)\n    splits[rank] = 0\n    return splits")}),
    "local_ids_expert_major": ("ex10_expert_parallel", {"local_expert_ids": ("torch.repeat_interleave(ids, mine.reshape(-1))", "torch.repeat_interleave(torch.arange(per_rank), mine.sum(dim=0))")}),
    "local_ids_global": ("ex10_expert_parallel", {"local_expert_ids": ("return torch.repeat_interleave(ids,", "return rank * per_rank + torch.repeat_interleave(ids,")}),
    "all_to_all_without_local_piece": ("ex10_expert_parallel", {"simulate_all_to_all": ("for i in range(W)])", "for i in range(W) if i != j])")}),
    "all_to_all_splits_transposed": ("ex10_expert_parallel", {"simulate_all_to_all": ("zip(rows, splits)", "zip(rows, splits.T)")}),
    "combine_without_inverse_permutation": ("ex10_expert_parallel", {"combine_back": ("index_copy(0, slots, y_back)", "index_copy(0, torch.arange(len(slots)), y_back)")}),
    "combine_unweighted": ("ex10_expert_parallel", {"combine_back": ("(y_slots.reshape(T, k, d) * w).sum(dim=1)", "y_slots.reshape(T, k, d).sum(dim=1)")}),
    "bytes_counting_local_copies": ("ex10_expert_parallel", {"bytes_per_token": ("k * (1 - local_fraction)", "k")}),
    "bytes_dispatch_only": ("ex10_expert_parallel", {"bytes_per_token": ("(bytes_dispatch + bytes_combine)", "bytes_dispatch")}),
    "seconds_gigabits_as_gigabytes": ("ex10_expert_parallel", {"exchange_seconds": ("link_gbit_per_s * 1e9 / 8", "link_gbit_per_s * 1e9")}),
    "seconds_one_latency": ("ex10_expert_parallel", {"exchange_seconds": ("return 2 * latency_s", "return latency_s")}),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_realistic_mistake_costs_exactly_its_own_question(pool, tmp_path, name):
    exercise, edits = MUTANTS[name]
    report = grade_notebook(write(tmp_path, exercise, mutate(exercise, edits)), pool=pool)
    _explained(report)
    expected = {q: (0.0 if q in edits else p) for q, p in _full(exercise).items()}
    assert points(report) == expected, {q.name: q.message for q in report.questions}
    for q in report.questions:
        if q.name in edits:
            assert q.status == "fail" and "hint:" in q.message


ROBUST = {
    # name: (cell edits on the ex01 master, {question: expected status})
    "infinite_loop": ({"top_k_routing": ("top_p, top_i = probs.topk(k, dim=-1)", "while True:\n        pass")}, {"top_k_routing": "timeout"}),
    "exception": ({"router_probs": ("return torch.softmax", "raise ValueError('oops')\n    return torch.softmax")}, {"router_probs": "fail"}),
    "syntax_error": ({"switch_gate": ("gate, index = probs.max(dim=-1)", "gate, index = probs.max(dim=-1")}, {"switch_gate": "missing"}),
    "input_mutation": ({"switch_gate": ("return index, gate", "probs[torch.arange(len(index)), index] = 0.0\n    return index, gate")}, {"switch_gate": "fail"}),
    "wrong_dtype": ({"top_k_routing": ("return top_i,", "return top_i.int(),")}, {"top_k_routing": "fail"}),
    "wrong_shape": ({"router_probs": ("return torch.softmax(logits.float(), dim=-1)", "return torch.softmax(logits.float(), dim=-1)[:, None]")}, {"router_probs": "fail"}),
    "print_spam": ({"router_logits": ("return x.float()", "print('debug ' * 2000)\n    return x.float()")}, {"router_logits": "fail"}),
    "sys_exit": ({"router_probs": ("return torch.softmax", "import sys\n    sys.exit(3)\n    return torch.softmax")}, {"router_probs": "fail"}),
    "keyboard_interrupt": ({"router_probs": ("return torch.softmax", "raise KeyboardInterrupt\n    return torch.softmax")}, {"router_probs": "fail"}),
    "hard_crash": ({"router_probs": ("return torch.softmax", "import os\n    os._exit(7)\n    return torch.softmax")}, {"router_probs": "crashed"}),
    "segfault": ({"router_probs": ("return torch.softmax", "import ctypes\n    ctypes.string_at(0)\n    return torch.softmax")}, {"router_probs": "crashed"}),
    "reads_stdin": ({"switch_gate": ("return index, gate", "input('k? ')\n    return index, gate")}, {"switch_gate": "fail"}),
    "missing_function": ({"switch_gate": None}, {"switch_gate": "missing"}),
    "returns_none": ({"router_logits": ("return x.float() @ w_gate.float()", "x.float() @ w_gate.float()")}, {"router_logits": "fail"}),
    "returns_numpy": ({"router_logits": ("return x.float() @ w_gate.float()", "return (x.float() @ w_gate.float()).numpy()")}, {"router_logits": "fail"}),
    "returns_a_generator": ({"router_probs": ("return torch.softmax(logits.float(), dim=-1)", "return (r for r in logits)")}, {"router_probs": "fail"}),
    "not_a_function": ({"router_logits": "router_logits = 3"}, {"router_logits": "fail"}),
    "hostile_exception_text": ({"router_probs": ("return torch.softmax", "raise ValueError('\\x1b[2J\\u202eevil\\r\\x07')\n    return torch.softmax")}, {"router_probs": "fail"}),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_bad_student_code_costs_its_question_and_grading_goes_on(pool, tmp_path, name):
    edits, statuses = ROBUST[name]
    report = grade_notebook(write(tmp_path, "ex01_router_topk", mutate("ex01_router_topk", edits)), timeout=1.0, pool=pool)
    _explained(report)
    full = _full("ex01_router_topk")
    assert points(report) == {q: (0.0 if q in statuses else p) for q, p in full.items()}, {q.name: q.message for q in report.questions}
    for q in report.questions:
        if q.name in statuses:
            assert q.status == statuses[q.name] and q.message, (q.status, q.message)
    text = format_table(report, verbose=True) + json.dumps(report.to_dict())
    assert "\x1b" not in text and "\u202e" not in text and "\x07" not in text
    msg = next((q.message for q in report.questions if q.name in statuses), "")
    if name == "syntax_error":
        assert any("syntax error" in e for e in report.load_errors) and "syntax error" in msg
    if name == "print_spam":
        assert "printed" in msg
    if name == "returns_numpy":
        assert "ndarray" in msg
    if name == "not_a_function":
        assert "not a function" in msg
    if name == "exception":
        assert "ValueError: oops" in msg and "cell" in msg and "raise ValueError" in msg


def test_top_level_code_is_not_executed(pool, tmp_path):
    nb = master("ex01_router_topk")
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": "while True:\n    pass\nimport os\nos._exit(1)"})
    report = grade_notebook(write(tmp_path, "ex01_router_topk", nb), timeout=1.0, pool=pool)
    assert report.score == report.max_score


def test_unreadable_notebook_scores_zero_without_crashing(pool, tmp_path):
    path = tmp_path / "ex02_balance_losses.ipynb"
    path.write_text("{ this is not json")
    report = grade_notebook(path, pool=pool)
    assert report.score == 0 and report.max_score == 8 and report.error
    assert all(q.status == "not graded" for q in report.questions)


def test_a_mistake_in_a_function_others_build_on_is_charged_once(pool, tmp_path):
    nb = mutate("ex04_mixtral_block", {"swiglu_expert": ("F.silu", "F.gelu")})
    report = grade_notebook(write(tmp_path, "ex04_mixtral_block", nb), pool=pool)
    assert points(report) == {"swiglu_expert": 0, "mixtral_block_forward": 4}
    assert "known mistake: GELU instead of SiLU" in report.questions[0].message


def test_importing_the_course_package_is_flagged_and_unavailable(pool, tmp_path):
    nb = mutate("ex03_switch_capacity", {"buffer_positions": "from moe_utils import buffer_positions"})
    report = grade_notebook(write(tmp_path, "ex03_switch_capacity", nb), pool=pool)
    assert "moe_utils.buffer_positions" in notes(report)
    assert points(report)["buffer_positions"] == 0


def test_hidden_cases_and_expected_values_are_a_function_of_the_seed():
    class Seeded:
        def __init__(self, seed):
            self.seed, self.plans = seed, {}

    a, b, c = (_plan(Seeded(s), "ex03_switch_capacity") for s in (99, 99, 100))
    assert encode([a.jobs[n]["cases"] for n in a.jobs]) == encode([b.jobs[n]["cases"] for n in b.jobs])
    assert encode([a.expected[n] for n in a.expected]) == encode([b.expected[n] for n in b.expected])
    assert encode([a.jobs[n]["cases"] for n in a.jobs]) != encode([c.jobs[n]["cases"] for n in c.jobs])
    job = a.jobs["capacity_kept"]  # what a student's process is sent: inputs, never expected values
    assert set(job) == {"exercise", "question", "deps_source", "deps", "moe_utils_allowed", "check_names", "cases",
                        "own_memory"}
    assert all(set(case) == {"id", "args", "kwargs", "grad", "grad_output"} for case in job["cases"])


# -- reports ------------------------------------------------------------------------------


def test_reports_are_written_whole_and_leave_no_temporary_files(pool, tmp_path):
    report = grade_notebook(SOLUTIONS / "ex01_router_topk.ipynb", pool=pool)
    write_json(report, tmp_path / "r.json")
    write_junit(report, tmp_path / "r.xml")
    write_csv([report], tmp_path / "r.csv")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.csv", "r.json", "r.xml"]
    assert json.loads((tmp_path / "r.json").read_text())["score"] == 8
    ET.parse(tmp_path / "r.xml")


def test_names_from_submissions_reach_reports_harmless(pool, tmp_path):
    folder = tmp_path / "=HYPERLINK(1)"
    path = write(folder, "ex01_\x1b[2Jrouter", master("ex01_router_topk"))
    report = grade_notebook(path, pool=pool, display_base=tmp_path)
    report.student = "=cmd|calc"
    assert "\x1b" not in report.notebook and report.score == 8
    write_csv([report], tmp_path / "g.csv")
    row = next(csv.DictReader((tmp_path / "g.csv").open()))
    assert row["student"] == "'=cmd|calc" and row["notebook"].startswith("'=HYPERLINK")
