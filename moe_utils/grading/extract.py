"""Take a student's definitions out of a notebook without running the notebook, and
flag what a lecturer should look at.

Only these top-level statements of code cells are kept: imports, ``def``,
``class``, and assignments of literal constants or plain aliases (``E = 8``,
``F = torch.nn.functional``). Everything else (calls to self-checks, experiments,
training loops, prints) is skipped. IPython magics and shell lines (``%time``,
``!pip``, ``x = !ls``, ``%%bash`` cells, ``obj?``) are blanked first so the cell still
parses. A cell that does not parse is reported and skipped; the rest still counts.

``scan`` reads the kept code (the code that will run) for references to the course
package ``moe_utils`` (an import in any form, a name, a string such as a module name
or a path), for dynamic imports and code execution, stack inspection, and for
processes, signals, files and sockets. It runs in the grading process, on the text.
"""

from __future__ import annotations

import ast
import json
import os
import re
import stat
from dataclasses import dataclass, field

__all__ = ["Snippet", "Extraction", "extract_definitions", "read_notebook", "scan", "exercise_in_text",
           "MAX_NOTEBOOK_BYTES"]

MAX_NOTEBOOK_BYTES = 20 << 20
_MAGIC = re.compile(r"^\s*(%|!|\?)|^\s*[\w.]+\s*=\s*[!%]|^\s*[\w.]+\?+\s*$")


@dataclass
class Snippet:
    cell: int  # 1-based index among the notebook's cells
    statements: list[str]  # source of the kept statements, compiled one by one
    linenos: list[int]
    ids: list[int] = field(default_factory=list)  # statement ids, in notebook order


@dataclass
class Extraction:
    snippets: list[Snippet] = field(default_factory=list)
    syntax_errors: list[str] = field(default_factory=list)
    defined: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    cells: dict[int, str] = field(default_factory=dict)  # cell -> source (magics blanked), for tracebacks
    trees: list = field(default_factory=list)  # (statement id, cell, ast node, first line)

    def statements(self) -> list[tuple[int, int, str]]:
        """(id, cell, source) of every kept statement, in order."""
        return [(i, s.cell, src) for s in self.snippets for i, src in zip(s.ids, s.statements)]

    def describe(self, sid: int) -> str:
        for i, cell, _, first in self.trees:
            if i == sid:
                return f"cell {cell}: `{first}`"
        return f"statement {sid}"


def read_notebook(path) -> tuple[dict | None, str | None]:
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the grader forever
            return None, "not a regular file (a pipe or a device?): not read"
        with open(path, "rb") as fh:
            raw = fh.read(MAX_NOTEBOOK_BYTES + 1)
        if len(raw) > MAX_NOTEBOOK_BYTES:
            return None, f"the notebook is larger than {MAX_NOTEBOOK_BYTES >> 20} MB"
        nb = json.loads(raw.decode("utf-8"))
        if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
            return None, "not a Jupyter notebook (no 'cells' list)"
        return nb, None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return None, f"the notebook could not be read: {type(exc).__name__}: {str(exc)[:200]}"


_EXERCISE_IN_TEXT = re.compile(r'"exercise"\s*:\s*"(ex\d\d_[A-Za-z0-9_]+)"')


def exercise_in_text(path, known) -> str | None:
    """The ``moe_course.exercise`` metadata found in a notebook's raw text, even when
    the JSON does not parse."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(MAX_NOTEBOOK_BYTES).decode("utf-8", errors="replace")
    except OSError:
        return None
    found = {m.group(1) for m in _EXERCISE_IN_TEXT.finditer(text)} & set(known)
    return found.pop() if len(found) == 1 else None


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
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return [(a.asname or a.name).split(".")[0] for a in stmt.names]
    return []


def extract_definitions(nb: dict) -> Extraction:
    """The kept statements of every code cell of a notebook dict, in order."""
    ex = Extraction(metadata=nb.get("metadata", {}) if isinstance(nb.get("metadata"), dict) else {})
    sid = 0
    for i, cell in enumerate(nb.get("cells", []), start=1):
        if not isinstance(cell, dict) or cell.get("cell_type") != "code":
            continue
        src = cell.get("source", "")
        src = "".join(str(s) for s in src) if isinstance(src, list) else str(src)
        src = _blank_magics(src)
        try:
            tree = ast.parse(src, filename=f"<cell {i}>")
        except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
            line = getattr(exc, "lineno", None)
            ex.syntax_errors.append(f"cell {i}" + (f", line {line}" if line else "") + f": {getattr(exc, 'msg', exc)}")
            continue
        lines = src.splitlines()
        snip = Snippet(i, [], [])
        for stmt in tree.body:
            if not _keep(stmt):
                continue
            start = stmt.decorator_list[0].lineno if getattr(stmt, "decorator_list", None) else stmt.lineno
            # keep the original line numbers so tracebacks point into the cell
            snip.statements.append("\n" * (start - 1) + "\n".join(lines[start - 1: stmt.end_lineno]))
            snip.linenos.append(start)
            snip.ids.append(sid)
            ex.trees.append((sid, i, stmt, lines[start - 1].strip()[:80]))
            sid += 1
            if not isinstance(stmt, (ast.Import, ast.ImportFrom)):
                ex.defined.extend(_names(stmt))
        if snip.statements:
            ex.snippets.append(snip)
            ex.cells[i] = src
    return ex


# -- what a lecturer should look at ----------------------------------------------------------

_DYNAMIC_CALLS = {"__import__": "__import__", "exec": "exec", "eval": "eval", "compile": "compile",
                  "globals": "globals()", "vars": "vars()", "breakpoint": "breakpoint()", "open": "file access (open)"}
_DYNAMIC_ATTRS = {  # attribute names that mean one thing whatever object they are on
    "_getframe": "stack inspection (sys._getframe)", "f_back": "stack inspection (f_back)",
    "f_locals": "stack inspection (f_locals)", "f_globals": "stack inspection (f_globals)",
    "tb_frame": "stack inspection (tb_frame)", "gi_frame": "stack inspection (gi_frame)",
    "currentframe": "stack inspection (inspect.currentframe)",
    "__globals__": "__globals__", "__builtins__": "__builtins__", "__code__": "__code__",
    "__subclasses__": "__subclasses__", "get_objects": "gc.get_objects", "get_referrers": "gc.get_referrers",
    "import_module": "importlib", "spec_from_file_location": "importlib",
    "read_text": "file access", "read_bytes": "file access", "write_text": "file access", "write_bytes": "file access",
}
_MODULE_ATTRS = {  # module.attribute pairs
    ("sys", "modules"): "sys.modules", ("sys", "meta_path"): "sys.meta_path", ("sys", "path_hooks"): "sys.path_hooks",
    ("sys", "path"): "sys.path", ("os", "system"): "os.system", ("os", "fork"): "os.fork", ("os", "kill"): "os.kill",
    ("os", "killpg"): "os.killpg", ("os", "setsid"): "os.setsid", ("os", "popen"): "os.popen",
    ("os", "execv"): "os.exec*", ("os", "execvp"): "os.exec*", ("os", "execve"): "os.exec*", ("os", "_exit"): "os._exit",
    ("os", "write"): "os.write", ("os", "open"): "os.open", ("os", "remove"): "os.remove", ("os", "getppid"): "os.getppid",
    ("inspect", "stack"): "stack inspection (inspect.stack)",
}
_SUSPECT_MODULES = {
    "importlib": "importlib", "ctypes": "ctypes", "gc": "gc", "inspect": "inspect", "runpy": "runpy",
    "pkgutil": "pkgutil", "builtins": "builtins", "zipimport": "zipimport", "marshal": "marshal",
    "pickle": "pickle", "subprocess": "subprocess", "multiprocessing": "multiprocessing", "socket": "socket",
    "signal": "signal", "threading": "threading", "resource": "resource", "shutil": "shutil",
}


def _allowed_module(module: str, allowed) -> bool:
    return any(module == a or module.startswith(a + ".") for a in allowed)


def scan(ex: Extraction, graded: list[str], allowed: tuple[str, ...] = ()) -> list[str]:
    """Flags for the lecturer, one per statement that deserves a look.

    ``graded``: the exercise's function names; ``allowed``: moe_utils modules the
    exercise allows. The notebook's ``from moe_utils.grading import check_...`` is fine.
    """
    # names bound to the course package by imports, and what they are
    bound: dict[str, str] = {}
    modules: set[str] = set()  # every name an import binds
    flags: list[str] = []
    for _sid, cell, stmt, first in ex.trees:
        found: list[str] = []
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            module = (stmt.module or "") if isinstance(stmt, ast.ImportFrom) else ""
            modules.update(_names(stmt))
            for alias in stmt.names:
                full = f"{module}.{alias.name}" if module else alias.name
                root = full.split(".")[0]
                if root == "moe_utils":
                    if module == "moe_utils.grading" and alias.name.startswith("check"):
                        continue
                    name = alias.asname or (alias.name if module else alias.name.split(".")[0])
                    if full.startswith("moe_utils.grading") or name in graded or (
                            module and not _allowed_module(module, allowed)):
                        found.append(f"imports {full} (the course package)")
                    bound[name] = full
                elif root in _SUSPECT_MODULES:
                    found.append(f"imports {_SUSPECT_MODULES[root]}")
        else:
            for node in ast.walk(stmt):
                if isinstance(node, ast.Name) and node.id in bound and not _allowed_module(bound[node.id], allowed):
                    found.append(f"uses {bound[node.id]} (the course package)")
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                    for m in mods:
                        if m.split(".")[0] == "moe_utils" and not _allowed_module(m, allowed):
                            found.append(f"imports {m} (the course package)")
                        elif m.split(".")[0] in _SUSPECT_MODULES:
                            found.append(f"imports {_SUSPECT_MODULES[m.split('.')[0]]}")
                elif isinstance(node, ast.Constant) and isinstance(node.value, str) and "moe_utils" in node.value:
                    found.append(f"mentions {node.value[:60]!r} (the course package)")
                elif isinstance(node, ast.Name) and node.id in _DYNAMIC_CALLS:
                    found.append(_DYNAMIC_CALLS[node.id])
                elif isinstance(node, ast.Attribute) and node.attr in _DYNAMIC_ATTRS:
                    found.append(_DYNAMIC_ATTRS[node.attr])
                elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                      and (node.value.id, node.attr) in _MODULE_ATTRS):
                    found.append(_MODULE_ATTRS[(node.value.id, node.attr)])
                elif isinstance(node, ast.Name) and node.id == "moe_utils":
                    found.append("uses moe_utils (the course package)")
                elif isinstance(node, ast.Name) and node.id in ("setattr", "delattr"):
                    found.append(f"{node.id}()")
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                    targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                    for t in targets:
                        root = t
                        while isinstance(root, (ast.Attribute, ast.Subscript)):
                            root = root.value
                        if t is not root and isinstance(root, ast.Name) and root.id in modules:
                            found.append(f"changes {ast.unparse(t)[:60]} (monkeypatching a module)")
        if found:
            flags.append(f"cell {cell}: `{first}`: " + ", ".join(dict.fromkeys(found)))
    return flags
