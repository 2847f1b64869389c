"""Shared helpers of the grading tests: notebooks made from the masters, and
finding (and ending) the processes a probe submission started.

A probe that starts processes gives each of them a unique *marker* on its command
line (``sleep 29.123456789`` or ``python -c ... MARKER``), so a test can find exactly
those processes in /proc, assert they are gone, and end any that are left, by id.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOLUTIONS = ROOT / "exercises" / "solutions"
STUDENTS = ROOT / "exercises"
SLEEP = shutil.which("sleep") or "/bin/sleep"


def master(exercise: str) -> dict:
    return json.loads((SOLUTIONS / f"{exercise}.ipynb").read_text(encoding="utf-8"))


def student(exercise: str) -> dict:
    return json.loads((STUDENTS / f"{exercise}.ipynb").read_text(encoding="utf-8"))


def cell_of(nb: dict, grade_id: str) -> dict:
    for cell in nb["cells"]:
        if cell.get("metadata", {}).get("nbgrader", {}).get("grade_id") == grade_id:
            return cell
    raise KeyError(grade_id)


def src(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def mutate(exercise: str, edits: dict, base: dict | None = None) -> dict:
    """A master (or ``base``) with some solution cells edited: (old, new) replaces
    text that must exist, a string replaces the whole cell, None deletes the cell."""
    nb = copy.deepcopy(base if base is not None else master(exercise))
    for name, edit in edits.items():
        cell = cell_of(nb, name)
        if edit is None:
            nb["cells"].remove(cell)
        elif isinstance(edit, str):
            cell["source"] = edit
        else:
            old, new = edit
            text = src(cell)
            assert old in text, f"mutant out of sync with the master: {old!r} not in {name}"
            cell["source"] = text.replace(old, new)
    return nb


def add_cell(nb: dict, source: str) -> dict:
    nb = copy.deepcopy(nb)
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": source})
    return nb


def write(folder: Path, name: str, nb: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.ipynb"
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def new_marker() -> str:
    """A number no other process on the machine has on its command line."""
    return f"{random.randint(20, 40)}.{random.randint(10**8, 10**9 - 1)}"


def marker_pids(marker: str) -> list[int]:
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if needle in cmd:
            found.append(int(entry))
    return found


def wait_gone(marker: str, seconds: float = 3.0) -> list[int]:
    """The marked processes still alive after waiting up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        left = marker_pids(marker)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def end_marked(marker: str) -> None:
    """End what a probe left behind (only processes carrying its marker)."""
    for _ in range(20):
        pids = marker_pids(marker)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.05)


def cli(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_utils.grading", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def points(report) -> dict[str, float]:
    return {q.name: q.points for q in report.questions}


def notes(report) -> str:
    """Everything a report says to the lecturer besides the points."""
    parts = list(getattr(report, "flags", []) or []) + list(report.load_errors) + [report.error or ""]
    return " | ".join(str(p) for p in parts)
