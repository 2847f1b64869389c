"""The exercise notebooks: masters (nbgrader sources), generated student notebooks,
extraction of definitions, and the static flags a lecturer sees."""

from __future__ import annotations

import json
import re

import pytest
from _grading_helpers import ROOT, SOLUTIONS, STUDENTS, cell_of, master, src

from moe_utils.grading.build import build, student_source
from moe_utils.grading.extract import exercise_in_text, extract_definitions, scan
from moe_utils.grading.questions import EXERCISES

NAMES = sorted(EXERCISES)
NOTEBOOKS = [SOLUTIONS / f"{n}.ipynb" for n in NAMES] + [STUDENTS / f"{n}.ipynb" for n in NAMES]


def test_committed_student_notebooks_match_the_generator():
    assert build(check=True) == [], "run `python -m moe_utils.grading build` and commit exercises/*.ipynb"


def test_solution_region_becomes_hint_and_stub():
    code = "def f(x):\n    ### BEGIN SOLUTION\n    # Hint: add one\n    return x + 1\n    ### END SOLUTION\n"
    assert student_source(code) == "def f(x):\n    # Hint: add one\n    # YOUR CODE HERE\n    raise NotImplementedError"
    assert student_source("check(f)\n### BEGIN HIDDEN TESTS\ncheck(f, hidden=True)\n### END HIDDEN TESTS") == "check(f)"


@pytest.mark.parametrize("exercise", NAMES)
def test_masters_carry_nbgrader_metadata_matching_the_question_bank(exercise):
    nb = master(exercise)
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    assert nb["metadata"]["moe_course"]["exercise"] == exercise
    ids = [c["metadata"]["nbgrader"]["grade_id"] for c in nb["cells"] if "nbgrader" in c["metadata"]]
    assert len(ids) == len(set(ids)), "grade_id must be unique"
    for q in EXERCISES[exercise]:
        sol = cell_of(nb, q.name)["metadata"]["nbgrader"]
        assert sol["solution"] and not sol["grade"] and not sol["locked"] and sol["schema_version"] == 3
        assert "### BEGIN SOLUTION" in src(cell_of(nb, q.name)) and f"def {q.name}(" in src(cell_of(nb, q.name))
        test = cell_of(nb, f"test_{q.name}")
        meta = test["metadata"]["nbgrader"]
        assert meta["grade"] and meta["locked"] and meta["points"] == q.points
        assert f"check_{q.name}({q.name})" in src(test) and "### BEGIN HIDDEN TESTS" in src(test)
        assert f"check_{q.name}({q.name}, hidden=True)" in src(test)


@pytest.mark.parametrize("exercise", NAMES)
def test_student_notebooks_hold_stubs_and_no_solutions(exercise):
    text = (STUDENTS / f"{exercise}.ipynb").read_text()
    assert "BEGIN SOLUTION" not in text and "HIDDEN TESTS" not in text
    nb = json.loads(text)
    for q in EXERCISES[exercise]:
        assert "raise NotImplementedError" in src(cell_of(nb, q.name))
    assert all(c.get("outputs", []) == [] for c in nb["cells"] if c["cell_type"] == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_code_lines_fit_a_projector(path):
    nb = json.loads(path.read_text())
    long = [line for c in nb["cells"] if c["cell_type"] == "code" for line in src(c).splitlines() if len(line) > 88]
    assert not long, long


def test_no_pointer_to_files_a_clone_does_not_have():
    files = [*NOTEBOOKS, ROOT / "exercises" / "README.md", *sorted((ROOT / "moe_utils" / "grading").rglob("*.py")),
             *sorted((ROOT / "tests").glob("test_grading*.py")), ROOT / "tests" / "_grading_helpers.py"]
    bad = re.compile("MOE_" + "REFERENCE|DESIGN" + r"\.md")
    hits = [p.name for p in files if bad.search(p.read_text())]
    assert not hits, hits


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
    assert [i for i, _, _ in ex.statements()] == [0, 1, 2]
    assert ex.describe(2) == "cell 4: `@staticmethod`"
    assert ex.syntax_errors and ex.syntax_errors[0].startswith("cell 6")


def test_the_exercise_is_found_in_the_raw_text_of_a_broken_notebook(tmp_path):
    path = tmp_path / "work.ipynb"
    path.write_text(json.dumps(master("ex02_balance_losses")).replace('"cells": [', '"cells": [[', 1))
    assert exercise_in_text(path, EXERCISES) == "ex02_balance_losses"
    path.write_text("{ not json")
    assert exercise_in_text(path, EXERCISES) is None


# -- what the lecturer is told ---------------------------------------------------------------------


def _flags(source: str, graded=("f",), allowed=()) -> list[str]:
    return scan(extract_definitions({"cells": [{"cell_type": "code", "source": source}]}), list(graded), allowed)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_masters_and_stubs_raise_no_flags(path):
    nb = json.loads(path.read_text())
    exercise = nb["metadata"]["moe_course"]["exercise"]
    assert scan(extract_definitions(nb), [q.name for q in EXERCISES[exercise]]) == []


@pytest.mark.parametrize("source, flagged", [
    ("from moe_utils.grading import check_f\ndef f(x):\n    return x", False),
    ("import moe_utils\ndef f(x):\n    return x", False),  # unused: ex04's "Try it" cell compares with it
    ("import moe_utils\ndef f(x):\n    return moe_utils.losses.router_z_loss(x)", True),
    ("import moe_utils as mu\ndef f(x):\n    return mu.router_z_loss(x)", True),
    ("from moe_utils import router_z_loss", True),
    ("from moe_utils.losses import router_z_loss as f", True),
    ("from moe_utils.grading.questions import ref_router_logits", True),
    ("import moe_utils.grading.runner", True),
    ("def f(x):\n    import importlib\n    return importlib.import_module('moe_' + 'utils').x", True),
    ("def f(x):\n    return __import__('os')", True),
    ("def f(x):\n    import sys\n    return sys.modules['torch']", True),
    ("def f(x):\n    import sys\n    return sys._getframe(1).f_locals['expected']", True),
    ("def f(x):\n    return open('/some/path').read()", True),
    ("def f(x):\n    return eval('x')", True),
    ("import torch\nclass P:\n    torch.allclose = lambda *a, **k: True", True),
    ("import os\ndef f(x):\n    os.kill(os.getppid(), 9)", True),
    ("def f(x):\n    return 'moe_utils/losses.py'", True),
    ("import torch\nimport torch.nn.functional as F\ndef f(x):\n    return F.softmax(torch.stack([x]), dim=-1)", False),
])
def test_scan_flags_references_to_the_course_package_and_dynamic_code(source, flagged):
    assert bool(_flags(source)) == flagged, _flags(source)


def test_scan_respects_the_modules_an_exercise_allows():
    code = "from moe_utils.experts import SwiGLU\ndef f(x):\n    return SwiGLU(4, 8)(x)"
    assert _flags(code)
    assert not _flags(code, allowed=("moe_utils.experts",))


def _run_in_kernels(nbs: dict[str, dict]) -> dict[str, list]:
    """Every cell of each notebook, as nbgrader's autograde runs them (errors kept), in one
    kernel (starting one per notebook cost most of this file's time): a ``%reset -f``
    between notebooks leaves none of the previous one's names behind. The cells of each."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    node = nbformat.v4.new_notebook(metadata=next(iter(nbs.values()))["metadata"])
    node.cells.append(nbformat.v4.new_code_cell("import moe_utils.grading as _g\nprint('GRADING', _g.__file__)"))
    spans = {}
    for name, nb in nbs.items():
        node.cells.append(nbformat.v4.new_code_cell(f"%reset -f\nprint('NOTEBOOK', {name!r})"))
        first = len(node.cells)
        node.cells.extend(nbformat.reads(json.dumps(nb), as_version=4).cells)
        spans[name] = (first, len(node.cells))
    nbclient.NotebookClient(node, timeout=120, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(SOLUTIONS)}}).execute()
    import moe_utils.grading

    assert node.cells[0].outputs[0]["text"].split()[1] == moe_utils.grading.__file__, "the kernel runs another checkout"
    for name, (first, _) in spans.items():
        said = "".join(o.get("text", "") for o in node.cells[first - 1].outputs)  # a stream may arrive in pieces
        assert said == f"NOTEBOOK {name}\n", "a reset cell failed"
    return {name: node.cells[a:b] for name, (a, b) in spans.items()}


_MISTAKE = ("ex03_switch_capacity", {"buffer_positions": ("indices.t().reshape(-1)", "indices.reshape(-1)")})


@pytest.fixture(scope="module")
def kernel_runs():
    from _grading_helpers import mutate

    return _run_in_kernels({**{name: master(name) for name in NAMES}, "mistake": mutate(*_MISTAKE)})


@pytest.mark.slow
def test_masters_run_top_to_bottom_in_a_kernel_with_hidden_tests_passing(kernel_runs):
    for exercise in NAMES:
        cells = kernel_runs[exercise]
        text = "".join(o.get("text", "") for c in cells if c.cell_type == "code" for o in c.outputs)
        errors = [o for c in cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors and text.count("PASS ") == 2 * len(EXERCISES[exercise]), (exercise, text)


@pytest.mark.slow
def test_under_nbgrader_a_mistake_costs_one_question_and_shows_only_the_message(kernel_runs):
    cells = kernel_runs["mistake"]
    failed = {c.metadata["nbgrader"]["grade_id"]: [o for o in c.outputs if o.output_type == "error"]
              for c in cells if c.metadata.get("nbgrader", {}).get("grade", False)}
    assert len(failed) == len(EXERCISES[_MISTAKE[0]]) and [k for k, v in failed.items() if v] == ["test_buffer_positions"]
    (err,) = failed["test_buffer_positions"]
    assert err["ename"] == "CheckFailed" and len(err["traceback"]) == 1
    assert "expected:" in err["traceback"][0] and "hint:" in err["traceback"][0] and "checks.py" not in err["traceback"][0]
