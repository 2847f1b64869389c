"""Make the student notebooks from the master notebooks.

``exercises/solutions/exNN_*.ipynb`` (masters, with solutions) ->
``exercises/exNN_*.ipynb`` (what students get):

* every ``### BEGIN SOLUTION`` ... ``### END SOLUTION`` region becomes its ``# Hint:``
  lines (kept from inside the region), ``# YOUR CODE HERE`` and
  ``raise NotImplementedError``, at the region's indentation;
* every ``### BEGIN HIDDEN TESTS`` ... ``### END HIDDEN TESTS`` region is removed;
* outputs and execution counts are cleared; nbgrader metadata is kept.

The result is a pure function of the masters, so a test can rebuild in memory and
compare with the committed files.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

__all__ = ["student_source", "student_notebook", "build", "EXERCISES_DIR", "SOLUTIONS_DIR"]

EXERCISES_DIR = Path(__file__).resolve().parents[2] / "exercises"
SOLUTIONS_DIR = EXERCISES_DIR / "solutions"

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
BEGIN_HIDDEN, END_HIDDEN = "### BEGIN HIDDEN TESTS", "### END HIDDEN TESTS"


def student_source(src: str) -> str:
    """Replace solution regions by hints + a stub; drop hidden-test regions."""
    out: list[str] = []
    mode = None
    hints: list[str] = []
    indent = ""
    for line in src.split("\n"):
        s = line.strip()
        if mode is None and s == BEGIN:
            mode, hints, indent = "solution", [], line[: len(line) - len(line.lstrip())]
        elif mode is None and s == BEGIN_HIDDEN:
            mode = "hidden"
        elif mode == "solution" and s == END:
            out.extend(indent + h for h in hints)
            out.append(indent + "# YOUR CODE HERE")
            out.append(indent + "raise NotImplementedError")
            mode = None
        elif mode == "hidden" and s == END_HIDDEN:
            mode = None
        elif mode == "solution":
            if s.lower().startswith("# hint"):
                hints.append(s)
        elif mode is None:
            out.append(line)
    if mode is not None:
        raise ValueError(f"unterminated {'solution' if mode == 'solution' else 'hidden tests'} region in:\n{src}")
    while out and not out[-1].strip():
        out.pop()
    return "\n".join(out)


def student_notebook(master: dict) -> dict:
    nb = copy.deepcopy(master)
    for cell in nb["cells"]:
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else src
        if cell["cell_type"] == "code":
            cell["source"] = student_source(src)
            cell["outputs"] = []
            cell["execution_count"] = None
        else:
            cell["source"] = src
    return nb


def _dumps(nb: dict) -> str:
    # the layout nbformat writes: 1-space indent, sorted keys, trailing newline
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def build(solutions: Path = SOLUTIONS_DIR, out: Path = EXERCISES_DIR, check: bool = False) -> list[str]:
    """Write (or, with ``check``, compare) every student notebook; returns the stale names."""
    stale = []
    masters = sorted(Path(solutions).glob("ex*.ipynb"))
    if not masters:
        raise FileNotFoundError(f"no master notebooks (ex*.ipynb) in {Path(solutions).name}/")
    for master in masters:
        text = _dumps(student_notebook(json.loads(master.read_text(encoding="utf-8"))))
        target = Path(out) / master.name
        current = target.read_text(encoding="utf-8") if target.exists() else None
        if current != text:
            stale.append(master.name)
            if not check:
                target.write_text(text, encoding="utf-8")
    return stale
