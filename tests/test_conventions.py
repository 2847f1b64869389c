"""docs/conventions.md: its numbers are right, and nothing in the repository points elsewhere.

The page's test-vector table is parsed and recomputed here in float64 from the logits
alone, without moe_utils, and compared with ``tests/_moe_vectors.py`` (which the unit tests
and the grader use). A second test refuses any reference to a document the repository
does not contain (the course once cited pages that lived outside it).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import _moe_vectors as V
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "conventions.md"


def _table() -> dict[str, str]:
    text = PAGE.read_text()
    section = text.split("## Test vectors", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\|\s*(.+?)\s*\|\s*`(.+?)`\s*\|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def _numbers(s: str) -> list[float]:
    out = []
    for tok in re.findall(r"-?\d+(?:\.\d+)?(?:/\d+)?|\b[TF]\b", s):
        if tok in ("T", "F"):
            out.append(1.0 if tok == "T" else 0.0)
        elif "/" in tok:
            a, b = tok.split("/")
            out.append(float(a) / float(b))
        else:
            out.append(float(tok))
    return out


def _float64_reference() -> dict[str, list[float]]:
    """Everything from the logits, with math.exp and plain loops (no torch, no moe_utils)."""
    h = V.LOGITS
    T, E = len(h), len(h[0])
    p = []
    for row in h:
        m = max(row)
        e = [math.exp(v - m) for v in row]
        p.append([v / sum(e) for v in e])
    top1 = [max(range(E), key=lambda j: p[t][j]) for t in range(T)]
    f = [sum(1 for i in top1 if i == e) / T for e in range(E)]
    P = [sum(p[t][e] for t in range(T)) / T for e in range(E)]
    C = math.floor(1.0 * T / E)
    seen = [0] * E
    pos = []
    for i in top1:
        pos.append(seen[i])
        seen[i] += 1
    top2 = [sorted(range(E), key=lambda j: -p[t][j])[:2] for t in range(T)]

    def renorm(t):
        a, b = (p[t][j] for j in top2[t])
        return [a / (a + b), b / (a + b)]

    f2 = [[sum(1 for t in range(T) if top2[t][j] == e) / T for e in range(E)] for j in range(2)]
    lse = [max(r) + math.log(sum(math.exp(v - max(r)) for v in r)) for r in h]
    return {
        "top-1 indices": top1,
        "`f`": f,
        "`P`": P,
        "Switch loss / `alpha`": [E * sum(a * b for a, b in zip(f, P))],
        "router z-loss": [sum(v * v for v in lse) / T],
        "`CF = 1`, `min_capacity = 0`: `C`": [C],
        "buffer positions": pos,
        "kept": [1.0 if q < C else 0.0 for q in pos],
        "top-2 renormalised weights, row 0": renorm(0),
        "top-2 renormalised weights, row 3": renorm(3),
        "top-k loss (`k = 2`, no coefficient)": [E * sum(f2[j][e] * P[e] for j in range(2) for e in range(E))],
    }


def test_the_conventions_page_test_vectors_equal_an_independent_float64_computation():
    table, ref = _table(), _float64_reference()
    assert set(ref) <= set(table), f"rows missing from the page: {set(ref) - set(table)}"
    for name, want in ref.items():
        got = _numbers(table[name])
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert abs(g - w) <= 5e-7 * max(1.0, abs(w)), (name, got, want)


def test_the_unit_tests_use_the_numbers_of_the_page():
    table = _table()
    pairs = {
        "top-1 indices": V.TOP1, "`f`": V.F, "`P`": V.P, "Switch loss / `alpha`": [V.SWITCH_AUX_OVER_ALPHA],
        "router z-loss": [V.Z_LOSS], "buffer positions": V.POSITIONS, "kept": [float(k) for k in V.KEPT],
        "top-2 renormalised weights, row 0": V.TOP2_ROW0, "top-2 renormalised weights, row 3": V.TOP2_ROW3,
        "top-k loss (`k = 2`, no coefficient)": [V.TOPK_AUX], "`CF = 1`, `min_capacity = 0`: `C`": [V.CAPACITY_CF1],
    }
    for name, values in pairs.items():
        assert _numbers(table[name]) == pytest.approx([float(v) for v in values], abs=1e-12), name


# ---------------------------------------------------------------- references must resolve inside the repository

# pages that lived outside the repository; spelt in pieces so that no file names them
FORBIDDEN = tuple("".join(parts) for parts in (("MOE_", "REFERENCE"), ("DES", "IGN.md"), ("STY", "LE.md")))
DOC = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.md)\b")
LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def _tracked_text_files() -> list[Path]:
    try:
        names = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        names = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts]
    keep = (".md", ".py", ".ipynb", ".toml", ".txt", ".cfg", ".json")
    return [ROOT / n for n in names if n.endswith(keep) and (ROOT / n).is_file() and not n.startswith("benchmarks/results")]


def _prose(path: Path) -> str:
    if path.suffix == ".ipynb":
        nb = json.loads(path.read_text())
        return "\n".join("".join(c["source"]) for c in nb["cells"])  # sources only, not outputs
    return path.read_text(errors="replace")


def test_no_file_points_to_a_document_the_repository_does_not_contain():
    files = _tracked_text_files()
    names = {p.name for p in files} | {str(p.relative_to(ROOT)) for p in files}
    problems = []
    for path in files:
        if path.name == "test_conventions.py":  # its examples name missing pages on purpose
            continue
        text = _prose(path)
        for bad in FORBIDDEN:
            if bad in text:
                problems.append(f"{path.relative_to(ROOT)} mentions {bad}")
        for ref in DOC.findall(text):
            if ref not in names and Path(ref).name not in names:
                problems.append(f"{path.relative_to(ROOT)} refers to {ref}, which is not in the repository")
        if path.suffix in (".md", ".ipynb"):
            for link in LINK.findall(text):
                target = (path.parent / link.split("#")[0]).resolve()
                if link.split("#")[0] and not target.exists():
                    problems.append(f"{path.relative_to(ROOT)} links to {link}, which does not exist")
    assert not problems, "\n".join(problems)


def test_the_reference_check_can_fail(tmp_path):
    fake = f"see {FORBIDDEN[0]}.md and [the guide](missing/guide.md) and notes/PLAN.md"
    assert DOC.findall(fake) == [f"{FORBIDDEN[0]}.md", "missing/guide.md", "notes/PLAN.md"]
    assert LINK.findall(fake) == ["missing/guide.md"]
