"""Grade exercise notebooks: points per question, never crashing on student code.

``grade_notebook(path)`` extracts the definitions (``extract.py``), hands them to a
worker child process (``worker.py``) and runs each question's public and hidden
cases there under a time limit. An exception, a timeout, ``sys.exit``, a killed
process, wrong shapes or dtypes, in-place edits of the inputs, too much printing,
a syntax error or a missing function each cost that question's points, with a
message, and grading goes on with the next question.
"""

from __future__ import annotations

import csv
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .extract import extract_definitions, read_notebook
from .questions import EXERCISES, QUESTIONS, questions_for

__all__ = [
    "QuestionResult",
    "NotebookReport",
    "WorkerPool",
    "grade_notebook",
    "grade_folder",
    "format_table",
    "write_json",
    "write_junit",
    "write_csv",
    "identify_exercise",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_PRINT = 2000
_PKG_ROOT = str(Path(__file__).resolve().parents[2])
# moe_utils functions that answer a question outright: importing one earns a note in the report
_LIBRARY_ANSWERS = {q.name for q in QUESTIONS} | {
    "*", "capacity_mask", "switch_load_balancing_loss", "topk_load_balancing_loss", "moe_ffn", "moe_ffn_reference",
    "router_logits", "TopKRouter", "SwitchRouter", "SwiGLU", "ExpertBank", "MoELayer", "mixtral_layer", "switch_layer",
}


@dataclass
class QuestionResult:
    name: str
    points: float
    max_points: float
    status: str  # pass | fail | todo | missing | timeout | crashed | not graded
    message: str = ""
    cases: list = field(default_factory=list)
    stdout: str = ""
    seconds: float = 0.0


@dataclass
class NotebookReport:
    notebook: str
    exercise: str | None
    student: str = ""
    score: float = 0.0
    max_score: float = 0.0
    questions: list[QuestionResult] = field(default_factory=list)
    load_errors: list[str] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class WorkerGone(RuntimeError):
    pass


class WorkerPool:
    """One long-lived worker (torch imported once) that forks a child per notebook."""

    def __init__(self, python: str | None = None, start_timeout: float = 180.0):
        self.python = python or sys.executable
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.buf = b""

    # -- process management -------------------------------------------------------
    def _start(self) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen(
            [self.python, "-m", "moe_utils.grading.worker", str(cmd_r), str(res_w)],
            pass_fds=(cmd_r, res_w),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        os.close(cmd_r)
        os.close(res_w)
        self.cmd_w, self.res_r, self.buf = cmd_w, res_r, b""
        msg = self._recv(self.start_timeout, want=("zygote",))
        if msg is None:
            self.close()
            raise WorkerGone("the grading worker did not start")

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()

    def close(self) -> None:
        if self.proc is not None:
            try:
                self._send({"op": "quit"})
            except (OSError, WorkerGone):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                _killpg(self.proc.pid)
                self.proc.wait()
            for fd in (self.cmd_w, self.res_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.proc = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- messages -----------------------------------------------------------------
    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                n = os.write(self.cmd_w, data)
                data = data[n:]
        except (BrokenPipeError, OSError) as exc:
            raise WorkerGone(f"the grading worker is gone ({exc})") from exc

    def _recv(self, timeout: float | None, want: tuple[str, ...]) -> dict | None:
        """The next message whose event is in ``want`` (None on timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue  # blank separator, or a line cut short by a kill
                if isinstance(msg, dict) and msg.get("event") in want:
                    return msg
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return None
            ready, _, _ = select.select([self.res_r], [], [], left)
            if not ready:
                return None
            chunk = os.read(self.res_r, 1 << 16)
            if not chunk:
                raise WorkerGone("the grading worker exited")
            self.buf += chunk

    # -- children -----------------------------------------------------------------
    def fork(self) -> int:
        self.ensure()
        self._send({"op": "fork"})
        msg = self._recv(60.0, want=("ready", "exited"))
        if msg is None or msg["event"] != "ready":
            raise WorkerGone("the grading worker could not start a child process")
        return int(msg["pid"])

    def end_child(self, pid: int, kill: bool = False) -> int | None:
        """Stop a child (politely, or by killing its process group); its exit code."""
        if kill:
            _killpg(pid)
        else:
            try:
                self._send({"op": "end"})
            except WorkerGone:
                return None
        msg = self._recv(10.0, want=("exited",))
        if msg is None and not kill:
            _killpg(pid)
            msg = self._recv(10.0, want=("exited",))
        if msg is None:  # the zygote itself is stuck: start over next time
            self.close()
            return None
        return msg.get("code")

    def request(self, msg: dict, timeout: float, want: tuple[str, ...]) -> dict | None:
        self._send(msg)
        return self._recv(timeout, want=want + ("exited",))


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def identify_exercise(path: str | os.PathLike, metadata: dict | None, defined: list[str]) -> str | None:
    """Notebook metadata ``moe_course.exercise``, else the ``exNN`` file-name prefix,
    else the exercise whose function names the notebook defines most of."""
    meta = (metadata or {}).get("moe_course", {})
    if isinstance(meta, dict) and meta.get("exercise") in EXERCISES:
        return meta["exercise"]
    m = re.search(r"ex(\d\d)", Path(path).name)
    if m:
        for name in EXERCISES:
            if name.startswith(f"ex{m.group(1)}"):
                return name
    best, hits = None, 0
    for name, qs in EXERCISES.items():
        n = sum(q.name in defined for q in qs)
        if n > hits:
            best, hits = name, n
    return best


def _display_path(path: Path, base: Path | None = None) -> str:
    """A path fit for reports: relative to ``base`` or the cwd, never absolute."""
    path = Path(path)
    for root in (base, Path.cwd()):
        if root is None:
            continue
        try:
            return path.resolve().relative_to(Path(root).resolve()).as_posix()
        except ValueError:
            continue
    return path.name


def _summarise(q, msg: dict, max_print: int) -> QuestionResult:
    cases = msg.get("cases", [])
    printed = int(msg.get("printed", 0))
    failed = [c for c in cases if not c["passed"]]
    if msg.get("missing"):
        return QuestionResult(q.name, 0, q.points, "missing", f"no function named `{q.name}` was found")
    if failed:
        first = failed[0]
        if all(c["message"].startswith("not implemented yet") for c in failed):
            return QuestionResult(q.name, 0, q.points, "todo", "not implemented (raises NotImplementedError)", cases)
        where = "public" if first["public"] else "hidden"
        head, _, rest = first["message"].partition("\n")
        text = f"{head}\n  case ({where}): {first['name']}; {len(failed)} of {len(cases)} cases fail"
        text += f"\n{rest}" if rest else ""
        return QuestionResult(q.name, 0, q.points, "fail", text, cases, msg.get("stdout", ""))
    if printed > max_print:
        text = f"all cases agree, but the function printed {printed} characters (limit {max_print}); remove debugging prints"
        return QuestionResult(q.name, 0, q.points, "fail", text, cases, msg.get("stdout", ""))
    return QuestionResult(q.name, q.points, q.points, "pass", "", cases, msg.get("stdout", ""))


def grade_notebook(
    path: str | os.PathLike,
    timeout: float = DEFAULT_TIMEOUT,
    exercise: str | None = None,
    pool: WorkerPool | None = None,
    max_print: int = DEFAULT_MAX_PRINT,
    display_base: Path | None = None,
) -> NotebookReport:
    """Grade one notebook. ``timeout``: seconds per question (and for loading)."""
    own_pool = pool is None
    pool = pool or WorkerPool()
    try:
        pool.ensure()  # start-up (importing torch) is not the notebook's time
    except WorkerGone:
        pass  # retried, and reported per question, below
    start = time.monotonic()
    path = Path(path)
    shown = _display_path(path, display_base)
    nb, err = read_notebook(path)
    ex = extract_definitions(nb) if nb is not None else None
    exercise = exercise or identify_exercise(path, ex.metadata if ex else {}, ex.defined if ex else [])
    report = NotebookReport(shown, exercise)
    if exercise is None:
        report.error = err or "could not tell which exercise this is (no moe_course metadata, no exNN in the file name)"
        report.seconds = round(time.monotonic() - start, 3)
        if own_pool:
            pool.close()
        return report
    qs = questions_for(exercise)
    report.max_score = float(sum(q.points for q in qs))
    if err is not None:
        report.error = err
        report.questions = [QuestionResult(q.name, 0, q.points, "not graded", err) for q in qs]
        report.seconds = round(time.monotonic() - start, 3)
        if own_pool:
            pool.close()
        return report
    report.load_errors = [f"syntax error in {s}" for s in ex.syntax_errors]
    borrowed = sorted(set(ex.library_imports) & _LIBRARY_ANSWERS)
    if borrowed:
        report.load_errors.append(f"imports course reference code from moe_utils: {', '.join(borrowed)} (check the work is the student's own)")
    snippets = [{"cell": s.cell, "statements": s.statements} for s in ex.snippets]
    child: int | None = None
    load_failed: str | None = None
    try:
        for q in qs:
            t0 = time.monotonic()
            if load_failed:
                report.questions.append(QuestionResult(q.name, 0, q.points, "not graded", load_failed))
                continue
            try:
                if child is None:
                    child = pool.fork()
                    msg = pool.request(
                        {"op": "load", "exercise": exercise, "snippets": snippets, "max_print": max_print},
                        timeout, ("loaded",),
                    )
                    if msg is None or msg["event"] == "exited":
                        why = "did not finish" if msg is None else "killed the grading process"
                        load_failed = f"loading your definitions {why} (time limit {timeout:g} s): look for top-level code"
                        if msg is None:
                            pool.end_child(child, kill=True)
                        child = None
                        report.questions.append(QuestionResult(q.name, 0, q.points, "not graded", load_failed))
                        continue
                    for e in msg.get("errors", []):
                        if e not in report.load_errors:
                            report.load_errors.append(e)
                msg = pool.request({"op": "run", "question": q.name}, timeout, ("result",))
                if msg is None:
                    pool.end_child(child, kill=True)
                    child = None
                    res = QuestionResult(q.name, 0, q.points, "timeout",
                                         f"no answer within {timeout:g} s (an infinite loop, or far too slow); the process was stopped")
                elif msg["event"] == "exited":
                    child = None
                    res = QuestionResult(q.name, 0, q.points, "crashed",
                                         f"the grading process died while running `{q.name}` (exit code {msg.get('code')}); "
                                         "os._exit, a segfault or running out of memory?")
                else:
                    res = _summarise(q, msg, max_print)
                    if res.status == "missing" and ex.syntax_errors:
                        res.message += " (a cell with a syntax error was skipped: " + "; ".join(ex.syntax_errors) + ")"
            except WorkerGone as exc:
                pool.close()
                child = None
                res = QuestionResult(q.name, 0, q.points, "crashed", f"the grading process failed: {exc}")
            res.seconds = round(time.monotonic() - t0, 3)
            report.questions.append(res)
        if child is not None:
            pool.end_child(child)
    finally:
        if own_pool:
            pool.close()
    report.score = float(sum(r.points for r in report.questions))
    report.seconds = round(time.monotonic() - start, 3)
    return report


def find_notebooks(folder: Path) -> list[Path]:
    return sorted(
        p for p in Path(folder).rglob("*.ipynb")
        if ".ipynb_checkpoints" not in p.parts and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def student_of(path: Path, folder: Path) -> str:
    """``folder/alice/ex01.ipynb`` -> alice; ``folder/alice.ipynb`` -> alice."""
    rel = Path(path).relative_to(folder)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def grade_folder(folder, timeout: float = DEFAULT_TIMEOUT, exercise: str | None = None,
                 max_print: int = DEFAULT_MAX_PRINT, progress=None) -> list[NotebookReport]:
    folder = Path(folder)
    reports = []
    with WorkerPool() as pool:
        for path in find_notebooks(folder):
            rep = grade_notebook(path, timeout, exercise, pool, max_print, display_base=folder)
            rep.student = student_of(path, folder)
            reports.append(rep)
            if progress:
                progress(rep)
    return reports


# -- reports -------------------------------------------------------------------------


def _first_line(text: str, width: int = 90) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def format_table(report: NotebookReport, verbose: bool = False) -> str:
    out = [f"{report.notebook}  [{report.exercise or 'unknown exercise'}]"]
    if report.error:
        out.append(f"  error: {report.error}")
    for e in report.load_errors:
        out.append(f"  note: {e}")
    w = max([len(q.name) for q in report.questions] + [8])
    out.append(f"  {'question':<{w}}  {'points':>7}  {'status':<10}  message")
    for q in report.questions:
        pts = f"{q.points:g}/{q.max_points:g}"
        out.append(f"  {q.name:<{w}}  {pts:>7}  {q.status:<10}  {_first_line(q.message)}")
        if verbose and q.status != "pass" and q.message:
            out.extend("      " + line for line in q.message.splitlines()[1:])
    out.append(f"  {'total':<{w}}  {f'{report.score:g}/{report.max_score:g}':>7}  ({report.seconds:.1f} s)")
    return "\n".join(out)


def write_json(reports: list[NotebookReport] | NotebookReport, path) -> None:
    data = reports.to_dict() if isinstance(reports, NotebookReport) else {"submissions": [r.to_dict() for r in reports]}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_junit(reports: list[NotebookReport] | NotebookReport, path) -> None:
    reports = [reports] if isinstance(reports, NotebookReport) else reports
    root = ET.Element("testsuites")
    for rep in reports:
        failures = sum(q.status in ("fail", "todo", "missing", "not graded") for q in rep.questions)
        errors = sum(q.status in ("timeout", "crashed") for q in rep.questions)
        suite = ET.SubElement(root, "testsuite", name=f"{rep.student or rep.notebook}:{rep.exercise}",
                              tests=str(len(rep.questions)), failures=str(failures), errors=str(errors),
                              time=f"{rep.seconds:.3f}")
        props = ET.SubElement(suite, "properties")
        for k, v in (("notebook", rep.notebook), ("score", f"{rep.score:g}"), ("max_score", f"{rep.max_score:g}")):
            ET.SubElement(props, "property", name=k, value=v)
        for q in rep.questions:
            case = ET.SubElement(suite, "testcase", classname=str(rep.exercise), name=q.name, time=f"{q.seconds:.3f}")
            if q.status != "pass":
                tag = "error" if q.status in ("timeout", "crashed") else "failure"
                el = ET.SubElement(case, tag, message=_first_line(q.message, 200), type=q.status)
                el.text = q.message
            if q.stdout:
                ET.SubElement(case, "system-out").text = q.stdout
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)


def write_csv(reports: list[NotebookReport], path) -> None:
    names: list[str] = []
    for rep in reports:
        for q in rep.questions:
            col = f"{rep.exercise}.{q.name}" if len({r.exercise for r in reports}) > 1 else q.name
            if col not in names:
                names.append(col)
    multi = len({r.exercise for r in reports}) > 1
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["student", "notebook", "exercise", *names, "total", "max", "problems"])
        for rep in reports:
            pts = {(f"{rep.exercise}.{q.name}" if multi else q.name): f"{q.points:g}" for q in rep.questions}
            problems = [f"{q.name}: {q.status}: {_first_line(q.message, 120)}" for q in rep.questions if q.status != "pass"]
            if rep.error:
                problems.insert(0, rep.error)
            w.writerow([rep.student, rep.notebook, rep.exercise or "", *[pts.get(n, "") for n in names],
                        f"{rep.score:g}", f"{rep.max_score:g}", " | ".join(problems)])
