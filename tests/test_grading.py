"""The exercise autograder: masters get full marks, stubs get zero, each realistic
mistake costs exactly its own question, and no student code can crash the grader.

Mutants are made from the master notebooks by replacing a piece of one solution,
so they stay in sync with the masters. One worker pool (torch imported once) serves
every in-process grading here; two tests run the CLI as a user would.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import subprocess
import sys
import xml.etree.ElementTree as ET
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

import moe_utils
from moe_utils.grading import checks
from moe_utils.grading.build import build, student_source
from moe_utils.grading.extract import extract_definitions
from moe_utils.grading.grader import WorkerPool, grade_notebook
from moe_utils.grading.questions import _CAPACITY_GRID, EXERCISES, QUESTIONS, find_question, ref_expert_capacity
from moe_utils.grading.runner import run_question

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "exercises" / "solutions"
STUDENTS = ROOT / "exercises"
NAMES = sorted(EXERCISES)


def _master(exercise: str) -> dict:
    return json.loads((SOLUTIONS / f"{exercise}.ipynb").read_text())


def _cell(nb: dict, grade_id: str) -> dict:
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return cell
    raise KeyError(grade_id)


def _src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def mutate(exercise: str, edits: dict[str, tuple[str, str] | str | None]) -> dict:
    """A master with some solution cells edited: (old, new) replaces text that must
    exist, a string replaces the whole cell, None deletes the cell."""
    nb = copy.deepcopy(_master(exercise))
    for name, edit in edits.items():
        cell = _cell(nb, name)
        if edit is None:
            nb["cells"].remove(cell)
        elif isinstance(edit, str):
            cell["source"] = edit
        else:
            old, new = edit
            src = _src(cell)
            assert old in src, f"mutant out of sync with the master: {old!r} not in {name}"
            cell["source"] = src.replace(old, new)
    return nb


def _write(tmp_path: Path, name: str, nb: dict) -> Path:
    path = tmp_path / f"{name}.ipynb"
    path.write_text(json.dumps(nb))
    return path


@pytest.fixture(scope="module")
def pool():
    with WorkerPool() as p:
        yield p


def _points(report) -> dict[str, float]:
    return {q.name: q.points for q in report.questions}


def _full(exercise: str) -> dict[str, float]:
    return {q.name: float(q.points) for q in EXERCISES[exercise]}


# -- the references and the question bank ----------------------------------------------


def test_every_reference_passes_its_own_cases_including_the_published_test_vectors():
    for q in QUESTIONS:
        results = run_question(q.reference, q, hidden=True)
        assert all(r.passed for r in results), [r.message for r in results if not r.passed]
        assert any(c.public for c in q.cases()) and any(not c.public for c in q.cases()), q.name


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
    torch.testing.assert_close(
        find_question("switch_aux_loss").reference(probs, top1, 0.1), moe_utils.switch_load_balancing_loss(probs, top1, 0.1)
    )
    torch.testing.assert_close(find_question("topk_aux_loss").reference(probs, idx), moe_utils.topk_load_balancing_loss(probs, idx))
    logits = torch.randn(7, 4, generator=g)
    torch.testing.assert_close(find_question("router_z_loss").reference(logits), moe_utils.router_z_loss(logits))
    for T, E, cf, k, mc in _CAPACITY_GRID:
        assert ref_expert_capacity(T, E, cf, k, mc) == moe_utils.expert_capacity(T, E, cf, k, mc)
    choices = torch.rand(9, 5, generator=g).argsort(-1)[:, :2]
    assert torch.equal(find_question("buffer_positions").reference(choices, 5), moe_utils.buffer_positions(choices, 5))
    layer = moe_utils.mixtral_layer(6, 8, num_experts=5, k=2)
    with torch.no_grad():
        expected = layer(x).output
        mine = find_question("mixtral_block_forward").reference(
            x, layer.router.gate.weight.t(), layer.experts.w1, layer.experts.w3, layer.experts.w2, k=2
        )
    torch.testing.assert_close(mine, expected, atol=1e-5, rtol=1e-4)


def test_plain_float_capacity_formula_is_accepted_on_every_graded_case():
    # a student who writes floor(cf * k * T / E) in floating point must not lose points
    for T, E, cf, k, mc in _CAPACITY_GRID:
        assert max(mc, math.floor(cf * k * T / E)) == ref_expert_capacity(T, E, cf, k, mc)


# -- notebooks: masters, students, generator ------------------------------------------


def test_committed_student_notebooks_match_the_generator(tmp_path):
    assert build(check=True) == [], "run `python -m moe_utils.grading build` and commit exercises/*.ipynb"


def test_solution_region_becomes_hint_and_stub():
    src = "def f(x):\n    ### BEGIN SOLUTION\n    # Hint: add one\n    return x + 1\n    ### END SOLUTION\n"
    assert student_source(src) == "def f(x):\n    # Hint: add one\n    # YOUR CODE HERE\n    raise NotImplementedError"
    assert student_source("check(f)\n### BEGIN HIDDEN TESTS\ncheck(f, hidden=True)\n### END HIDDEN TESTS") == "check(f)"


@pytest.mark.parametrize("exercise", NAMES)
def test_masters_carry_nbgrader_metadata_matching_the_question_bank(exercise):
    nb = _master(exercise)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["moe_course"]["exercise"] == exercise
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in nb["cells"] if "nbgrader" in c["metadata"]]
    assert len(ids) == len(set(ids)), "grade_id must be unique"
    for q in EXERCISES[exercise]:
        sol = _cell(nb, q.name)["metadata"]["nbgrader"]
        assert sol["solution"] and not sol["grade"] and not sol["locked"] and sol["schema_version"] == 3
        assert "### BEGIN SOLUTION" in _src(_cell(nb, q.name)) and f"def {q.name}(" in _src(_cell(nb, q.name))
        test = _cell(nb, f"test_{q.name}")
        meta = test["metadata"]["nbgrader"]
        assert meta["grade"] and meta["locked"] and meta["points"] == q.points
        assert f"check_{q.name}({q.name})" in _src(test) and "### BEGIN HIDDEN TESTS" in _src(test)


@pytest.mark.parametrize("exercise", NAMES)
def test_student_notebooks_hold_stubs_and_no_solutions(exercise):
    text = (STUDENTS / f"{exercise}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    nb = json.loads(text)
    for q in EXERCISES[exercise]:
        assert "raise NotImplementedError" in _src(_cell(nb, q.name))
    assert all(c.get("outputs", []) == [] for c in nb["cells"] if c["cell_type"] == "code")


def test_extraction_keeps_definitions_and_skips_magics_and_top_level_code():
    nb = {"cells": [
        {"cell_type": "code", "source": "%matplotlib inline\nimport torch\n!pip install x\nfiles = !ls\nE = 8\ntorch.ones(1)\n"},
        {"cell_type": "code", "source": "%%bash\necho hi"},
        {"cell_type": "code", "source": "while True:\n    pass\n"},
        {"cell_type": "code", "source": "@staticmethod\ndef f(x):\n    return x\nprint(f(1))\ny = f(2)\n"},
        {"cell_type": "markdown", "source": "def g(): pass"},
        {"cell_type": "code", "source": "def broken(:\n"},
    ]}
    ex = extract_definitions(nb)
    assert ex.defined == ["E", "f"]
    assert [len(s.statements) for s in ex.snippets] == [2, 1]
    assert ex.syntax_errors and ex.syntax_errors[0].startswith("cell 6")


# -- self-checks in the student's kernel ----------------------------------------------


def test_self_check_prints_pass_for_a_correct_function():
    buf = io.StringIO()
    with redirect_stdout(buf):
        checks.check_router_probs(lambda logits: torch.softmax(logits.float(), dim=-1))
    assert buf.getvalue().startswith("PASS router_probs")


def test_self_check_shows_expected_vs_got_and_a_hint_then_raises():
    buf = io.StringIO()
    with redirect_stdout(buf), pytest.raises(AssertionError):
        checks.check_router_probs(lambda logits: torch.softmax(logits.float(), dim=0))
    out = buf.getvalue()
    assert out.startswith("FAIL router_probs") and "expected:" in out and "got:" in out and "hint:" in out


def test_hard_coded_test_vector_answer_fails_the_random_cases():
    published = torch.softmax(torch.tensor([[2.0, 1.0, 0.0]]), -1)
    results = run_question(lambda logits: published.expand(logits.shape[0], 3).clone(), find_question("router_probs"))
    assert not all(r.passed for r in results)


# -- the autograder on whole notebooks ------------------------------------------------


@pytest.mark.parametrize("exercise", NAMES)
def test_master_gets_full_marks(pool, exercise):
    report = grade_notebook(SOLUTIONS / f"{exercise}.ipynb", pool=pool)
    assert _points(report) == _full(exercise), [q.message for q in report.questions if q.status != "pass"]
    assert report.score == report.max_score == sum(q.points for q in EXERCISES[exercise])


@pytest.mark.parametrize("exercise", NAMES)
def test_untouched_student_notebook_gets_zero(pool, exercise):
    report = grade_notebook(STUDENTS / f"{exercise}.ipynb", pool=pool)
    assert report.score == 0 and report.max_score > 0
    assert {q.status for q in report.questions} == {"todo"}


MUTANTS = {
    # name: (exercise, {cell: (old, new)}, questions that must lose their points)
    "router_logits_cast_after_matmul": ("ex01_router_topk", {"router_logits": ("x.float() @ w_gate.float()", "(x @ w_gate).float()")}),
    "softmax_over_tokens": ("ex01_router_topk", {"router_probs": ("dim=-1)", "dim=0)")}),
    "topk_weights_not_renormalised": ("ex01_router_topk", {"top_k_routing": ("top_p / top_p.sum(dim=-1, keepdim=True)", "top_p")}),
    "renormalised_top1_gate": ("ex01_router_topk", {"switch_gate": ("return index, gate", "return index, gate / gate")}),
    "aux_loss_without_E": ("ex02_balance_losses", {"switch_aux_loss": ("alpha * E * torch.sum", "alpha * torch.sum")}),
    "topk_aux_first_choice_only": ("ex02_balance_losses", {"topk_aux_loss": ("F.one_hot(indices, E)", "F.one_hot(indices[:, :1], E)")}),
    "z_loss_not_squared": ("ex02_balance_losses", {"router_z_loss": (".pow(2)", "")}),
    "capacity_off_by_one": ("ex03_switch_capacity", {"expert_capacity": ("num_experts))", "num_experts) + 1)")}),
    "positions_token_major": ("ex03_switch_capacity", {"buffer_positions": ("indices.t().reshape(-1)", "indices.reshape(-1)")}),
    "dropped_tokens_zeroed": ("ex03_switch_capacity", {"switch_layer_forward": ("return x + moe", "return torch.where(kept[:, None], x + moe, torch.zeros_like(x))")}),
    "mixtral_weights_not_renormalised": ("ex04_mixtral_block", {"mixtral_block_forward": ("(top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)", "top_p.to(x.dtype)")}),
    "sort_not_stable": ("ex05_dispatch_metadata", {"sort_slots_by_expert": ("torch.argsort(flat, stable=True)", "torch.argsort(flat, descending=True, stable=True).flip(0)")}),
    "unpermute_with_order_not_inverse": ("ex05_dispatch_metadata", {"unpermute_and_combine": ("y_sorted[inverse]", "y_sorted[order]")}),
}


@pytest.mark.parametrize("name", sorted(MUTANTS))
def test_realistic_mistake_costs_exactly_its_own_question(pool, tmp_path, name):
    exercise, edits = MUTANTS[name]
    report = grade_notebook(_write(tmp_path, exercise, mutate(exercise, edits)), pool=pool)
    expected = {q: (0.0 if q in edits else p) for q, p in _full(exercise).items()}
    assert _points(report) == expected, {q.name: q.message for q in report.questions}
    for q in report.questions:
        if q.name in edits:
            assert q.status == "fail" and "hint:" in q.message


ROBUST = {
    # name: (cell edits on the ex01 master, {question: expected status}, timeout)
    "infinite_loop": ({"top_k_routing": ("top_p, top_i = probs.topk(k, dim=-1)", "while True:\n        pass")}, {"top_k_routing": "timeout"}),
    "exception": ({"router_probs": ("return torch.softmax", "raise ValueError('oops')\n    return torch.softmax")}, {"router_probs": "fail"}),
    "syntax_error": ({"switch_gate": ("gate, index = probs.max(dim=-1)", "gate, index = probs.max(dim=-1")}, {"switch_gate": "missing"}),
    "input_mutation": ({"switch_gate": ("return index, gate", "probs[torch.arange(len(index)), index] = 0.0\n    return index, gate")}, {"switch_gate": "fail"}),
    "wrong_dtype": ({"top_k_routing": ("return top_i,", "return top_i.int(),")}, {"top_k_routing": "fail"}),
    "wrong_shape": ({"router_probs": ("return torch.softmax(logits.float(), dim=-1)", "return torch.softmax(logits.float(), dim=-1)[:, None]")}, {"router_probs": "fail"}),
    "print_spam": ({"router_logits": ("return x.float()", "print('debug ' * 2000)\n    return x.float()")}, {"router_logits": "fail"}),
    "sys_exit": ({"router_probs": ("return torch.softmax", "import sys\n    sys.exit(3)\n    return torch.softmax")}, {"router_probs": "fail"}),
    "hard_crash": ({"router_probs": ("return torch.softmax", "import os\n    os._exit(7)\n    return torch.softmax")}, {"router_probs": "crashed"}),
    "reads_stdin": ({"switch_gate": ("return index, gate", "input('k? ')\n    return index, gate")}, {"switch_gate": "fail"}),
    "missing_function": ({"switch_gate": None}, {"switch_gate": "missing"}),
    "returns_none": ({"router_logits": ("return x.float() @ w_gate.float()", "x.float() @ w_gate.float()")}, {"router_logits": "fail"}),
}


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_bad_student_code_costs_its_question_and_grading_goes_on(pool, tmp_path, name):
    edits, statuses = ROBUST[name]
    report = grade_notebook(_write(tmp_path, "ex01_router_topk", mutate("ex01_router_topk", edits)), timeout=2.0, pool=pool)
    full = _full("ex01_router_topk")
    assert _points(report) == {q: (0.0 if q in statuses else p) for q, p in full.items()}, {q.name: q.message for q in report.questions}
    for q in report.questions:
        if q.name in statuses:
            assert q.status == statuses[q.name] and q.message, (q.status, q.message)
    if name == "syntax_error":
        assert any("syntax error" in e for e in report.load_errors)
        assert "syntax error" in next(q for q in report.questions if q.name == "switch_gate").message
    if name == "print_spam":
        assert "printed" in next(q for q in report.questions if q.name == "router_logits").message


def test_top_level_code_is_not_executed(pool, tmp_path):
    nb = _master("ex01_router_topk")
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": "while True:\n    pass\nimport os\nos._exit(1)"})
    report = grade_notebook(_write(tmp_path, "ex01_router_topk", nb), timeout=2.0, pool=pool)
    assert report.score == report.max_score


def test_unreadable_notebook_scores_zero_without_crashing(pool, tmp_path):
    path = tmp_path / "ex02_balance_losses.ipynb"
    path.write_text("{ this is not json")
    report = grade_notebook(path, pool=pool)
    assert report.score == 0 and report.max_score == 8 and report.error
    assert all(q.status == "not graded" for q in report.questions)


# -- the command line and its reports -------------------------------------------------


def _cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_utils.grading", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_grades_one_notebook_with_json_and_junit(tmp_path):
    nb = mutate("ex03_switch_capacity", {"expert_capacity": ("num_experts))", "num_experts) + 1)")})
    path = _write(tmp_path, "ex03_switch_capacity", nb)
    proc = _cli("grade", path.name, "--json", "r.json", "--junit", "r.xml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "expert_capacity" in proc.stdout and "8/10" in proc.stdout
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["score"] == 8 and data["max_score"] == 10 and data["exercise"] == "ex03_switch_capacity"
    assert {q["name"]: q["status"] for q in data["questions"]}["expert_capacity"] == "fail"
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    assert [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None] == ["expert_capacity"]
    assert str(tmp_path) not in (tmp_path / "r.json").read_text() + (tmp_path / "r.xml").read_text()


def test_cli_grades_a_folder_into_csv(tmp_path):
    subs = tmp_path / "submitted"
    for student, nb in {
        "alice": _master("ex04_mixtral_block"),
        "bob": json.loads((STUDENTS / "ex04_mixtral_block.ipynb").read_text()),
        "carol": mutate("ex04_mixtral_block", {"mixtral_block_forward": ("(top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)", "top_p.to(x.dtype)")}),
    }.items():
        (subs / student).mkdir(parents=True)
        _write(subs / student, "ex04_mixtral_block", nb)
    proc = _cli("grade", "submitted", "--csv", "grades.csv", "--json", "all.json", "--junit", "all.xml", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {r["student"]: r for r in csv.DictReader((tmp_path / "grades.csv").open())}
    assert {s: (r["swiglu_expert"], r["mixtral_block_forward"], r["total"], r["max"]) for s, r in rows.items()} == {
        "alice": ("2", "4", "6", "6"),
        "bob": ("0", "0", "0", "6"),
        "carol": ("2", "0", "2", "6"),
    }
    assert rows["carol"]["problems"].startswith("mixtral_block_forward: fail")
    assert len(json.loads((tmp_path / "all.json").read_text())["submissions"]) == 3
    assert len(ET.parse(tmp_path / "all.xml").getroot().findall("testsuite")) == 3


@pytest.mark.slow
def test_masters_run_top_to_bottom_in_a_kernel_with_hidden_tests_passing():
    # what nbgrader's autograde does with a master: run every cell, hidden tests included
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    for exercise in NAMES:
        nb = nbformat.read(SOLUTIONS / f"{exercise}.ipynb", as_version=4)
        nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                                resources={"metadata": {"path": str(SOLUTIONS)}}).execute()
        text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
        assert text.count("PASS ") == 2 * len(EXERCISES[exercise]) and "FAIL" not in text, text


def test_importing_the_course_reference_is_flagged(pool, tmp_path):
    nb = mutate("ex03_switch_capacity", {"buffer_positions": "from moe_utils import buffer_positions"})
    report = grade_notebook(_write(tmp_path, "ex03_switch_capacity", nb), pool=pool)
    assert any("buffer_positions" in note and "moe_utils" in note for note in report.load_errors)
    assert not any("moe_utils" in note for note in grade_notebook(SOLUTIONS / "ex04_mixtral_block.ipynb", pool=pool).load_errors)


def test_definitions_that_never_finish_loading_cost_points_not_the_grader(pool, tmp_path):
    nb = _master("ex02_balance_losses")
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": "class Spin:\n    while True:\n        pass"})
    report = grade_notebook(_write(tmp_path, "ex02_balance_losses", nb), timeout=2.0, pool=pool)
    assert report.score == 0 and {q.status for q in report.questions} == {"not graded"}
    assert "loading" in report.questions[0].message
    # and the pool still works afterwards
    assert grade_notebook(SOLUTIONS / "ex02_balance_losses.ipynb", pool=pool).score == 8
