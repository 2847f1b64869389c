"""Take a student's definitions out of a notebook without running the notebook.

Only these top-level statements of code cells are kept: imports, ``def``,
``class``, and assignments of literal constants or plain aliases (``E = 8``,
``F = torch.nn.functional``). Everything else (calls to self-checks, experiments,
training loops, prints) is skipped. IPython magics and shell lines (``%time``,
``!pip``, ``x = !ls``, ``%%bash`` cells, ``obj?``) are blanked first so the cell still
parses. A cell that does not parse is reported and skipped; the rest still counts.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field

__all__ = ["Snippet", "Extraction", "extract_definitions", "read_notebook"]

_MAGIC = re.compile(r"^\s*(%|!|\?)|^\s*[\w.]+\s*=\s*[!%]|^\s*[\w.]+\?+\s*$")


@dataclass
class Snippet:
    cell: int  # 1-based index among the notebook's cells
    statements: list[str]  # source of the kept statements, compiled one by one
    linenos: list[int]


@dataclass
class Extraction:
    snippets: list[Snippet] = field(default_factory=list)
    syntax_errors: list[str] = field(default_factory=list)
    defined: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    library_imports: list[str] = field(default_factory=list)  # names imported from moe_utils (not grading)


def read_notebook(path) -> tuple[dict | None, str | None]:
    try:
        with open(path, encoding="utf-8") as fh:
            nb = json.load(fh)
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            return None, "not a Jupyter notebook (no 'cells' list)"
        return nb, None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"the notebook could not be read: {type(exc).__name__}: {exc}"


def _blank_magics(src: str) -> str:
    lines = src.splitlines()
    if lines and lines[0].lstrip().startswith("%%"):
        return ""
    return "\n".join("" if _MAGIC.match(line) else line for line in lines)


def _is_constant(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        pass
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name)


def _keep(stmt: ast.stmt) -> bool:
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return True
    if isinstance(stmt, ast.Assign):
        return all(isinstance(t, ast.Name) for t in stmt.targets) and _is_constant(stmt.value)
    if isinstance(stmt, ast.AnnAssign):
        return isinstance(stmt.target, ast.Name) and stmt.value is not None and _is_constant(stmt.value)
    return False


def _names(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    if isinstance(stmt, ast.Assign):
        return [t.id for t in stmt.targets if isinstance(t, ast.Name)]
    if isinstance(stmt, ast.AnnAssign):
        return [stmt.target.id]
    return []


def extract_definitions(nb: dict) -> Extraction:
    """The kept statements of every code cell of a notebook dict, in order."""
    ex = Extraction(metadata=nb.get("metadata", {}) if isinstance(nb.get("metadata"), dict) else {})
    for i, cell in enumerate(nb.get("cells", []), start=1):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(src) if isinstance(src, list) else str(src)
        src = _blank_magics(src)
        try:
            tree = ast.parse(src, filename=f"<cell {i}>")
        except (SyntaxError, ValueError) as exc:
            line = getattr(exc, "lineno", None)
            ex.syntax_errors.append(f"cell {i}" + (f", line {line}" if line else "") + f": {getattr(exc, 'msg', exc)}")
            continue
        lines = src.splitlines()
        kept, linenos = [], []
        for stmt in tree.body:
            if not _keep(stmt):
                continue
            start = stmt.decorator_list[0].lineno if getattr(stmt, "decorator_list", None) else stmt.lineno
            # keep the original line numbers so tracebacks point into the cell
            if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").startswith("moe_utils") and not (
                stmt.module or ""
            ).startswith("moe_utils.grading"):
                ex.library_imports.extend(a.name for a in stmt.names)
            kept.append("\n" * (start - 1) + "\n".join(lines[start - 1 : stmt.end_lineno]))
            linenos.append(start)
            ex.defined.extend(_names(stmt))
        if kept:
            ex.snippets.append(Snippet(i, kept, linenos))
    return ex
