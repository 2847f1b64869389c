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
