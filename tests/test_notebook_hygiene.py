"""Notebook hygiene: strict nbval is only meaningful if outputs are stored and clean.

A notebook stripped of outputs passes ``pytest --nbval`` while checking nothing,
so every code cell of a lecture notebook must carry a stored execution.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LECTURES = sorted((ROOT / "notebooks").glob("*.ipynb"))
MASTERS = sorted((ROOT / "exercises" / "solutions").glob("*.ipynb"))
ADDRESS = re.compile(r"0x[0-9a-fA-F]{8,}")
LOCAL_PATH = re.compile(r"(/home/|/root/|/Users/|/tmp/|/work/|[A-Za-z]:\\\\Users)")


def _ignored(cell) -> bool:
    tags = cell.get("metadata", {}).get("tags", [])
    return "nbval-ignore-output" in tags or "nbval-skip" in tags


def test_there_are_lecture_notebooks():
    names = [p.name for p in LECTURES]
    assert len(LECTURES) >= 6, f"expected notebooks 00..05 at least, found {names}"
    for i in range(6):
        assert any(n.startswith(f"{i:02d}_") for n in names), f"notebook {i:02d}_* missing from {names}"


@pytest.mark.parametrize("path", LECTURES + MASTERS, ids=lambda p: p.name)
def test_kernelspec_is_python3(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_every_code_cell_has_a_stored_execution(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]
    assert code, f"{path.name} has no code cells"
    missing = [i for i, c in enumerate(code) if c.get("execution_count") is None and not _ignored(c)]
    assert not missing, f"{path.name}: code cells {missing} were never executed (outputs stripped?)"
    counts = [c["execution_count"] for c in code if c.get("execution_count") is not None]
    assert counts == sorted(counts), f"{path.name}: cells were executed out of order: {counts}"
    with_output = sum(1 for c in code if c.get("outputs"))
    assert with_output >= len(code) // 3, f"{path.name}: only {with_output}/{len(code)} code cells show output"


@pytest.mark.parametrize("path", LECTURES + MASTERS, ids=lambda p: p.name)
def test_outputs_hold_no_errors_addresses_or_local_paths(path):
    nb = json.loads(path.read_text())
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", f"{path.name} cell {i} stored an error: {out.get('ename')}"
            text = json.dumps({k: v for k, v in out.items() if k != "data"}) + json.dumps(
                out.get("data", {}).get("text/plain", "")
            )
            assert not LOCAL_PATH.search(text), f"{path.name} cell {i} output shows a local path"
            if not _ignored(cell):
                assert not ADDRESS.search(text), f"{path.name} cell {i} output shows a memory address"


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_no_downloads_at_run_time(path):
    nb = json.loads(path.read_text())
    src = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    for bad in ("wget ", "curl ", "from_pretrained(", "hf_hub_download", "urlretrieve", "requests.get("):
        assert bad not in src, f"{path.name} downloads at run time ({bad.strip()})"
    assert not os.path.isabs(path.name)


# ---------------------------------------------------------------- what a lecturer sees on a projector

ALL_NOTEBOOKS = LECTURES + MASTERS + sorted((ROOT / "exercises").glob("*.ipynb"))
COLAB_CELL = '''# Colab or a fresh kernel: install moe_utils only if it is missing (no-op here).
# COURSE_REPO: the course's Git repository; point it at your fork if you changed it.
import importlib.util

COURSE_REPO = "https://github.com/moe-course/moe-course.git"
if importlib.util.find_spec("moe_utils") is None:
    %pip install -q "git+{COURSE_REPO}"'''
VERSIONS_CELL = '''import sys

import torch

import moe_utils

print("python", sys.version.split()[0], "| torch", torch.__version__)
print("moe_utils", moe_utils.__version__)'''
MAX_CODE_LINE = 88  # what JupyterLab shows without cutting at 1280x800 on a projector


def _code_cells(nb):
    return [c for c in nb["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_every_lecture_notebook_starts_with_the_same_two_set_up_cells(path):
    code = _code_cells(json.loads(path.read_text()))
    assert "".join(code[0]["source"]) == COLAB_CELL, f"{path.name}: first code cell is not the Colab cell"
    assert "".join(code[1]["source"]) == VERSIONS_CELL, f"{path.name}: second code cell is not the versions cell"
    assert "nbval-ignore-output" in code[1].get("metadata", {}).get("tags", [])


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_code_lines_fit_the_notebook_width(path):
    long = [
        (i, len(line))
        for i, c in enumerate(json.loads(path.read_text())["cells"]) if c["cell_type"] == "code"
        for line in "".join(c["source"]).splitlines() if len(line) > MAX_CODE_LINE
    ]
    assert not long, f"{path.name}: code lines over {MAX_CODE_LINE} characters (cell, length): {long}"


def _headings(source: str) -> list[str]:
    out, fence = [], False
    for line in source.splitlines():
        if line.strip().startswith("```"):
            fence = not fence
        elif not fence and re.match(r"#{1,6} ", line):
            out.append(line)
    return out


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_each_heading_has_a_markdown_cell_of_its_own(path):
    bad = []
    for i, c in enumerate(json.loads(path.read_text())["cells"]):
        if c["cell_type"] != "markdown":
            continue
        src = "".join(c["source"]).strip()
        if _headings(src) and src != _headings(src)[0]:
            bad.append(i)
    assert not bad, f"{path.name}: cells {bad} hold a heading and more (a heading gets a cell of its own)"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_opening_a_notebook_in_jupyterlab_changes_nothing(path):
    # JupyterLab rewrites a kernelspec that differs from the kernel's own (it used to be
    # "Python 3"), and adds cell ids to nbformat < 4.5: either marks the notebook as changed
    # the moment it opens, before anything runs. Checked against a real JupyterLab 4.6.
    from moe_utils.notebooks import kernelspec

    nb = json.loads(path.read_text())
    assert nb["metadata"].get("kernelspec") == kernelspec(), f"{path.name}: {nb['metadata'].get('kernelspec')}"
    assert (nb["nbformat"], nb["nbformat_minor"]) >= (4, 5) and all("id" in c for c in nb["cells"]), path.name


@pytest.mark.parametrize("path", LECTURES, ids=lambda p: p.name)
def test_figure_text_is_not_too_small_to_read(path):
    src = "\n".join("".join(c["source"]) for c in _code_cells(json.loads(path.read_text())))
    tiny = re.findall(r"fontsize\s*=\s*([0-8](?:\.\d+)?)\b", src)
    assert not tiny, f"{path.name}: font sizes {tiny} are unreadable once the figure is shrunk to the page"
