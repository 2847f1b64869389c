"""Grade exercise notebooks: points per question, decided in this process.

``grade_notebook(path)`` extracts the definitions (``extract.py``, never running the
notebook) and, for each question, has a fresh student process (``pool.py``,
``worker.py``) load them and call the function on the question's cases. That
process only returns outputs; this one holds the cases' expected values (the
hidden cases are drawn from a secret seed here), checks that every case answered
exactly once, compares (``runner.py``) and scores. An exception, a timeout,
``sys.exit``, a killed process, wrong shapes or dtypes, in-place edits of the
inputs, too much printing, a syntax error or a missing function each cost that
question's points, with a message, and grading goes on with the next question.
Every question that does not pass says why; what the machine did (a worker that did
not start, a machine too busy to finish) is reported as "not graded", never charged
to the student as a timeout or a crash.

Reports are written after every student process has ended, each file atomically.
The grader's own source files are hashed when it starts and checked before and
after every question: a change while a submission's code ran withholds that
submission's grade (every question "not graded", saying why), a change while none
ran is noted, and either way the command exits with status 3.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .extract import Extraction, exercise_in_text, extract_definitions, read_notebook, scan
from .pool import Outcome, WorkerGone, WorkerPool
from .questions import EXERCISE_INFO, EXERCISES, QUESTIONS, dependency_source, questions_for
from .runner import expected_output, judge_case
from .spec import Case, Question

__all__ = [
    "QuestionResult",
    "NotebookReport",
    "WorkerPool",
    "SourceGuard",
    "grade_notebook",
    "grade_folder",
    "format_table",
    "write_json",
    "write_junit",
    "write_csv",
    "identify_exercise",
    "DEFAULT_TIMEOUT",
    "DEFAULT_MAX_PRINT",
]

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_PRINT = 2000
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # moe_utils/
REPO_DIR = PACKAGE_DIR.parent
SOLUTIONS_DIR = REPO_DIR / "exercises" / "solutions"
# what a sandbox hides from student processes besides the submissions: the masters, and
# the grader itself (the references and the question bank)
SANDBOX_HIDE = [str(SOLUTIONS_DIR), str(PACKAGE_DIR / "grading")]
CHECK_NAMES = [f"check_{q.name}" for q in QUESTIONS]
_MAX_SKIPPED = 3  # top-level statements that may hang before loading gives up


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
    flags: list[str] = field(default_factory=list)  # for the lecturer: course package use, suspicious code
    error: str | None = None
    tampered: list[str] = field(default_factory=list)  # grader files that changed while its code ran
    seconds: float = 0.0
    grading: dict = field(default_factory=dict)  # sandbox mode, seed, notes

    def to_dict(self) -> dict:
        return asdict(self)


# -- the grader's own files ------------------------------------------------------------------


class SourceGuard:
    """Hashes of the course package's source files, taken when the grader starts.

    A file is hashed again only when its status changes (inode, size, modification or
    change time, in nanoseconds), or while it changed within the last two seconds (a
    second change within the file system's clock tick keeps the times): any write updates
    the change time, which not even ``os.utime`` can set back, so the checks before and
    after every question cost a few stat calls, not reading the package.
    """

    racy_ns = 2_000_000_000  # a file changed this recently is hashed again anyway

    def __init__(self, root: Path = PACKAGE_DIR):
        self.root = Path(root)
        self._known: dict[str, tuple] = {}  # name -> (status, hash)
        self.snapshot = self._hashes()
        self.outside: list[str] = []  # changes seen while no submission's code was running

    def _hashes(self) -> dict[str, str]:
        out = {}
        for path in sorted(self.root.rglob("*.py")):
            name = path.relative_to(self.root.parent).as_posix()
            try:
                st = path.stat()
                key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                known = self._known.get(name)
                recent = time.time_ns() - st.st_ctime_ns < self.racy_ns
                if known is None or known[0] != key or recent:
                    known = (key, hashlib.sha256(path.read_bytes()).hexdigest())
                    self._known[name] = known
                out[name] = known[1]
            except OSError:
                self._known.pop(name, None)
                out[name] = "unreadable"
        return out

    def changed(self) -> list[str]:
        """Files changed, added or removed since the last check (then the new baseline)."""
        now = self._hashes()
        diff = sorted(k for k in set(now) | set(self.snapshot) if now.get(k) != self.snapshot.get(k))
        self.snapshot = now
        return diff


GUARD = SourceGuard()


# -- what to run: per exercise and seed -------------------------------------------------------


@dataclass
class _Plan:
    cases: dict[str, list[Case]]
    expected: dict[str, list]
    jobs: dict[str, dict]


def _question_seed(seed: int, q: Question) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{q.qid}".encode()).digest()[:8], "big") >> 2


def _plan(pool: WorkerPool, exercise: str) -> _Plan:
    if exercise in pool.plans:
        return pool.plans[exercise]
    info = EXERCISE_INFO[exercise]
    plan = _Plan({}, {}, {})
    for q in info.questions:
        cases = q.cases(hidden=True, seed=_question_seed(pool.seed, q))
        if not cases:
            raise ValueError(f"{q.qid} has no cases")
        plan.cases[q.name] = cases
        plan.expected[q.name] = [expected_output(q, c) for c in cases]
        deps_source, deps = dependency_source(q)
        plan.jobs[q.name] = {
            "exercise": exercise, "question": q.name, "deps_source": deps_source, "deps": deps,
            "moe_utils_allowed": list(info.moe_utils_allowed), "check_names": CHECK_NAMES, "own_memory": q.own_memory,
            "cases": [{"id": c.id, "args": tuple(c.args), "kwargs": dict(c.kwargs), "grad": list(c.grad),
                       "grad_output": c.grad_output} for c in cases],
        }
    pool.plans[exercise] = plan
    return plan


# -- one notebook ------------------------------------------------------------------------------


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


_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _clean(text, limit: int = 4000) -> str:
    """Text from a student's process, safe for a terminal, CSV and XML."""
    text = _CONTROL.sub("?", str(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _signal_name(code) -> str:
    import signal

    try:
        return signal.Signals(-int(code)).name
    except (TypeError, ValueError):
        return ""


def _busy_machine(out: Outcome, limit: float) -> str:
    """Why a question was not graded when the machine, not the code, ran out of time."""
    if out.status == "unavailable":
        return f"not graded: {out.detail or 'the grading worker did not answer'}; grade it again"
    return (f"not graded: no answer after {out.wall:.1f} s, although the code had used only {out.charged:.1f} s of "
            f"its {limit:g} s: it spent {out.waited:.1f} s waiting for a CPU that other work held (the machine is "
            "overloaded); grade it again on a quieter machine, or with a longer --timeout")


def _timed_out(out: Outcome, timeout: float) -> str:
    waited = f"; {out.waited:.1f} s spent waiting for a busy CPU were not counted" if out.waited >= 0.05 else ""
    return (f"no answer within {timeout:g} s (an infinite loop, a sleep, or far too slow{waited}); "
            "the process was stopped")


def _died(q: Question, out: Outcome, timeout: float, memory_mb: int) -> QuestionResult:
    if out.status == "zygote_died":
        msg = ("the grading process that ran this question was killed or stopped (did the code signal its parent "
               "process?); the question is lost and grading went on")
    elif out.reason:
        msg = f"the code {out.reason}; they were all stopped"
    else:
        sig = _signal_name(out.code) if isinstance(out.code, int) and out.code < 0 else ""
        why = {"SIGXCPU": f"it used more than its CPU time ({int(2 * timeout) + 2} s)",
               "SIGKILL": f"it was killed (more than the {memory_mb} MiB of memory allowed?)",
               "SIGSEGV": "a segmentation fault"}.get(sig, f"exit code {out.code}")
        msg = (f"the process running `{q.name}` died ({why}); os._exit, a crash, or running out of memory?")
    return QuestionResult(q.name, 0, q.points, "crashed", msg)


def _judge(q: Question, plan: _Plan, result: dict, max_print: int) -> QuestionResult:
    cases, expected = plan.cases[q.name], plan.expected[q.name]
    if result.get("q") != q.name:
        return QuestionResult(q.name, 0, q.points, "fail", "the answer was for another question")
    if result.get("missing") is True:
        return QuestionResult(q.name, 0, q.points, "missing", f"no function named `{q.name}` was found")
    answers = result.get("results")
    if not isinstance(answers, list) or not all(isinstance(a, dict) for a in answers):
        return QuestionResult(q.name, 0, q.points, "fail", "the answer was not a list of case results")
    ids = [a.get("id") for a in answers]
    want = [c.id for c in cases]
    if not want or len(ids) != len(set(ids)) or sorted(map(str, ids)) != sorted(want):
        missing = sorted(set(want) - set(map(str, ids)))
        extra = sorted(set(map(str, ids)) - set(want))
        return QuestionResult(q.name, 0, q.points, "fail",
                              f"the answer was incomplete: {len(ids)} results for {len(want)} cases "
                              f"(missing {missing[:5]}, unexpected {extra[:5]})")
    by_id = {a["id"]: a for a in answers}
    verdicts = [judge_case(q, c, e, by_id[c.id]) for c, e in zip(cases, expected)]
    stdout = str(result.get("stdout", ""))
    printed = result.get("printed", 0)
    printed = printed if isinstance(printed, int) else max_print + 1
    failed = [v for v in verdicts if not v.passed]
    dicts = [v.to_dict() for v in verdicts]
    if failed:
        if all(v.kind == "todo" for v in failed):
            return QuestionResult(q.name, 0, q.points, "todo", "not implemented (raises NotImplementedError)", dicts)
        first = next(v for v in failed if v.kind != "todo")
        where = "public" if first.public else "hidden"
        head, _, rest = first.message.partition("\n")
        text = f"{head}\n  case ({where}): {first.name}; {len(failed)} of {len(verdicts)} cases fail"
        text += f"\n{rest}" if rest else ""
        return QuestionResult(q.name, 0, q.points, "fail", text, dicts, stdout)
    if printed > max_print:
        text = f"all cases agree, but the function printed {printed} characters (limit {max_print}); remove debugging prints"
        return QuestionResult(q.name, 0, q.points, "fail", text, dicts, stdout)
    return QuestionResult(q.name, q.points, q.points, "pass", "", dicts, stdout)


def grade_notebook(
    path: str | os.PathLike,
    timeout: float = DEFAULT_TIMEOUT,
    exercise: str | None = None,
    pool: WorkerPool | None = None,
    max_print: int = DEFAULT_MAX_PRINT,
    display_base: Path | None = None,
) -> NotebookReport:
    """Grade one notebook. ``timeout``: seconds per question, and for loading."""
    path = Path(path)
    own_pool = pool is None
    if own_pool:
        pool = WorkerPool(hide=[str(path.resolve().parent), *SANDBOX_HIDE])
    try:
        return _grade(path, timeout, exercise, pool, max_print, display_base)
    finally:
        if own_pool:
            pool.close()


def _grade(path: Path, timeout: float, exercise: str | None, pool: WorkerPool, max_print: int,
           display_base: Path | None) -> NotebookReport:
    start_error = ""
    try:
        pool.ensure()  # start-up (importing torch) is not the notebook's time
    except WorkerGone as exc:
        start_error = f"not graded: {exc}; grade it again"
    start = time.monotonic()
    nb, err = read_notebook(path)
    ex = extract_definitions(nb) if nb is not None else None
    if exercise is None:
        exercise = identify_exercise(path, ex.metadata if ex else {}, ex.defined if ex else [])
    if exercise is None and nb is None:
        exercise = exercise_in_text(path, EXERCISES)
    report = NotebookReport(_display_path(path, display_base), exercise)
    report.grading = {"sandbox": pool.mode or "not started", "seed": pool.seed, "notes": list(pool.notes)}
    if exercise is None:
        report.error = err or "could not tell which exercise this is (no moe_course metadata, no exNN in the file name)"
    else:
        report.max_score = float(sum(q.points for q in questions_for(exercise)))
        if err is not None:
            report.error = err
            report.questions = [QuestionResult(q.name, 0, q.points, "not graded", err) for q in questions_for(exercise)]
        elif start_error:
            report.error = start_error
            report.questions = [QuestionResult(q.name, 0, q.points, "not graded", start_error)
                                for q in questions_for(exercise)]
        else:
            _run_questions(report, ex, exercise, pool, timeout, max_print, path)
    if report.tampered:
        _withhold(report)
    _every_loss_explained(report)
    report.score = float(sum(q.points for q in report.questions))
    report.seconds = round(time.monotonic() - start, 3)
    _sanitise(report)
    return report


def _withhold(report: NotebookReport) -> None:
    """The grader's files changed while this submission's code ran: no points, and why."""
    files = ", ".join(report.tampered[:5])
    report.error = (f"the grader's own files changed while this submission's code was running ({files}): its "
                    "grade is withheld. If you (an editor, git) changed them, grade it again; if not, this "
                    "submission did: restore them (git checkout) before grading anything again")
    for q in report.questions:
        before = f"{q.status}, {q.points:g}/{q.max_points:g}"
        detail = f": {q.message}" if q.message else ""
        q.message = (f"not graded: the grader's own files ({files}) changed while this submission's code was "
                     f"running, so its grade is withheld (see the report's error). Before that check: {before}"
                     f"{detail}")
        q.points, q.status = 0, "not graded"


def _every_loss_explained(report: NotebookReport) -> None:
    """No question loses points without a reason a TA can read (a last safety net)."""
    for q in report.questions:
        bug = "(a grader bug; please report it with the notebook)"
        if q.status == "pass" and q.points != q.max_points:
            q.status = "not graded"
            q.message = q.message or f"not graded: the points were taken away without a reason {bug}"
        if q.status != "pass" and not str(q.message).strip():
            q.message = f"{q.status}: no reason was recorded {bug}"


def _run_questions(report: NotebookReport, ex: Extraction, exercise: str, pool: WorkerPool, timeout: float,
                   max_print: int, path: Path) -> None:
    qs = questions_for(exercise)
    info = EXERCISE_INFO[exercise]
    report.load_errors = [f"syntax error in {s}" for s in ex.syntax_errors]
    report.flags = scan(ex, [q.name for q in qs], info.moe_utils_allowed)
    plan = _plan(pool, exercise)
    base = {"statements": ex.statements(), "cells": sorted(ex.cells.items()), "max_print": max_print,
            "watch": [str(REPO_DIR), str(path.resolve().parent)]}
    skip: list[int] = []
    load_given_up = ""
    for q in qs:
        t0 = time.monotonic()
        if load_given_up:
            report.questions.append(QuestionResult(q.name, 0, q.points, "not graded", load_given_up))
            continue
        while True:
            out = _watched_run(report, pool, {**plan.jobs[q.name], **base, "skip": list(skip)}, timeout)
            stuck = out.status in ("load_timeout", "died", "zygote_died") and out.loaded is None
            if stuck and out.statement is not None and out.statement not in skip and len(skip) < _MAX_SKIPPED:
                # a top-level statement hung or ended the process while loading: load again without it
                skip.append(out.statement)
                what = (f"did not finish within {timeout:g} s" if out.status == "load_timeout"
                        else "ended the process")
                report.load_errors.append(f"{ex.describe(out.statement)} {what} while loading: skipped "
                                          "(top-level code that should not run when grading)")
                continue
            break
        if out.loaded:
            for e in out.loaded.get("errors", []) if isinstance(out.loaded.get("errors"), list) else []:
                if str(e) not in report.load_errors:
                    report.load_errors.append(str(e))
        if out.status == "ok":
            try:
                res = _judge(q, plan, out.result, max_print)
            except Exception as exc:  # noqa: BLE001 - an answer the grader cannot check is not a crash of the run
                res = QuestionResult(q.name, 0, q.points, "not graded",
                                     f"the grader could not check this answer ({type(exc).__name__}: {exc}); "
                                     "please report it with the notebook")
            runtime = out.result.get("runtime")
            for note in runtime if isinstance(runtime, list) else []:
                flag = f"at run time: {note}"
                if flag not in report.flags:
                    report.flags.append(flag)
            if res.status == "missing" and ex.syntax_errors:
                res.message += " (a cell with a syntax error was skipped: " + "; ".join(ex.syntax_errors) + ")"
        elif out.status in ("unavailable", "overloaded"):
            res = QuestionResult(q.name, 0, q.points, "not graded", _busy_machine(out, timeout))
            if out.status == "unavailable" or out.loaded is None:
                # no worker, or loading never finished: do not wait again question after question
                load_given_up = res.message
        elif out.loaded is None and out.status in ("load_timeout", "died", "zygote_died"):
            load_given_up = (f"loading your definitions did not finish within {timeout:g} s" if out.status ==
                             "load_timeout" else "loading your definitions ended the process")
            load_given_up += ": look for top-level code"
            res = QuestionResult(q.name, 0, q.points, "not graded", load_given_up)
        elif out.status == "timeout":
            res = QuestionResult(q.name, 0, q.points, "timeout", _timed_out(out, timeout))
        elif out.status == "invalid":
            res = QuestionResult(q.name, 0, q.points, "fail",
                                 f"the student process's answer could not be used: {out.detail} (did the code write "
                                 "to the grader's pipe?)")
        else:
            res = _died(q, out, timeout, pool.memory_mb)
        if out.swept:
            report.flags.append(f"while `{q.name}` ran: {out.swept} process(es) it started were still running "
                                "when the question ended, and were killed")
        res.seconds = round(time.monotonic() - t0, 3)
        report.questions.append(res)
    report.grading["sandbox"] = pool.mode
    report.grading["notes"] = list(pool.notes) + [n for n in report.grading.get("notes", []) if n not in pool.notes]


def _watched_run(report: NotebookReport, pool: WorkerPool, job: dict, timeout: float) -> Outcome:
    """``pool.run``, with the grader's files checked just before and just after: a change
    seen after is this submission's doing (or happened while its code ran), one seen
    before happened while none of its code was running."""
    for name in GUARD.changed():
        GUARD.outside.append(name)
        note = f"the grader's own files changed while none of this submission's code was running ({name})"
        if note not in report.grading.setdefault("notes", []):
            report.grading["notes"].append(note)
    out = pool.run(job, timeout, timeout)
    for name in GUARD.changed():
        if name not in report.tampered:
            report.tampered.append(name)
    return out


def _sanitise(report: NotebookReport) -> None:
    report.notebook = _clean(report.notebook, 300)
    report.load_errors = [_clean(e, 600) for e in report.load_errors]
    report.flags = [_clean(f, 600) for f in report.flags[:60]]
    report.error = _clean(report.error, 1000) if report.error else report.error
    for q in report.questions:
        q.message = _clean(q.message)
        q.stdout = _clean(q.stdout)
        for c in q.cases:
            c["message"] = _clean(c.get("message", ""), 2000)
            c["hint"] = _clean(c.get("hint", ""), 600)


# -- a folder --------------------------------------------------------------------------------


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
                 max_print: int = DEFAULT_MAX_PRINT, progress=None, pool: WorkerPool | None = None,
                 **pool_options) -> list[NotebookReport]:
    """Grade every notebook under ``folder``. ``pool_options``: see ``WorkerPool``."""
    folder = Path(folder)
    reports = []
    own = pool is None
    pool = pool or WorkerPool(hide=[str(folder.resolve()), *SANDBOX_HIDE], **pool_options)
    try:
        for path in find_notebooks(folder):
            if _through_symlink(path, folder):
                rep = _unread(path, folder, exercise, "is a symbolic link inside the submissions folder: not "
                                                      "graded (it could point at someone else's work or a solution)")
            else:
                rep = grade_notebook(path, timeout, exercise, pool, max_print, display_base=folder)
            rep.student = _clean(student_of(path, folder), 200)
            reports.append(rep)
            if progress:
                progress(rep)
    finally:
        if own:
            pool.close()
    _settle_unknown_exercises(reports)
    return reports


def _through_symlink(path: Path, folder: Path) -> bool:
    """Whether reaching ``path`` from ``folder`` goes through a symbolic link."""
    here = Path(folder)
    for part in Path(path).relative_to(folder).parts:
        here = here / part
        if here.is_symlink():
            return True
    return False


def _unread(path: Path, folder: Path, exercise: str | None, why: str) -> NotebookReport:
    exercise = exercise or identify_exercise(path, {}, [])
    rep = NotebookReport(_display_path(path, folder), exercise, error=why)
    if exercise:
        rep.max_score = float(sum(q.points for q in questions_for(exercise)))
        rep.questions = [QuestionResult(q.name, 0, q.points, "not graded", why) for q in questions_for(exercise)]
    return rep


def _settle_unknown_exercises(reports: list[NotebookReport]) -> None:
    """An unreadable notebook without an exNN name is scored against the folder's exercise."""
    known = {r.exercise for r in reports if r.exercise}
    if len(known) != 1:
        return
    exercise = known.pop()
    for rep in reports:
        if rep.exercise is None:
            rep.exercise = exercise
            rep.max_score = float(sum(q.points for q in questions_for(exercise)))
            why = rep.error or "could not tell which exercise this is"
            rep.error = f"{why} (scored as {exercise}, the exercise of every other submission in the folder)"
            rep.questions = [QuestionResult(q.name, 0, q.points, "not graded", why) for q in questions_for(exercise)]


# -- reports ---------------------------------------------------------------------------------


def _first_line(text: str, width: int = 90) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= width else line[: width - 3] + "..."


def format_table(report: NotebookReport, verbose: bool = False) -> str:
    out = [f"{report.notebook}  [{report.exercise or 'unknown exercise'}]"]
    if report.error:
        out.append(f"  error: {report.error}")
    for f in report.flags:
        out.append(f"  FLAG: {f}")
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


def _cell(text: str) -> str:
    """A CSV text cell a spreadsheet will not run as a formula (names come from submissions)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _atomic_write(path, data: bytes) -> None:
    """Write a report file all at once: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_json(reports: list[NotebookReport] | NotebookReport, path) -> None:
    data = reports.to_dict() if isinstance(reports, NotebookReport) else {"submissions": [r.to_dict() for r in reports]}
    _atomic_write(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


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
        for k, v in (("notebook", rep.notebook), ("score", f"{rep.score:g}"), ("max_score", f"{rep.max_score:g}"),
                     ("flags", " | ".join(rep.flags))):
            ET.SubElement(props, "property", name=k, value=v)
        for q in rep.questions:
            case = ET.SubElement(suite, "testcase", classname=str(rep.exercise), name=q.name, time=f"{q.seconds:.3f}")
            if q.status != "pass":
                tag = "error" if q.status in ("timeout", "crashed") else "failure"
                el = ET.SubElement(case, tag, message=_first_line(q.message, 200), type=q.status)
                el.text = q.message
            if q.stdout:
                ET.SubElement(case, "system-out").text = q.stdout
    buf = io.BytesIO()
    ET.ElementTree(root).write(buf, encoding="utf-8", xml_declaration=True)
    _atomic_write(path, buf.getvalue())


def write_csv(reports: list[NotebookReport], path) -> None:
    multi = len({r.exercise for r in reports}) > 1
    names: list[str] = []
    for rep in reports:
        for q in rep.questions:
            col = f"{rep.exercise}.{q.name}" if multi else q.name
            if col not in names:
                names.append(col)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["student", "notebook", "exercise", *names, "total", "max", "problems", "flags"])
    for rep in reports:
        pts = {(f"{rep.exercise}.{q.name}" if multi else q.name): f"{q.points:g}" for q in rep.questions}
        problems = [f"{q.name}: {q.status}: {_first_line(q.message, 120)}" for q in rep.questions if q.status != "pass"]
        if rep.error:
            problems.insert(0, rep.error)
        text = [_cell(t) for t in (rep.student, rep.notebook, rep.exercise or "")]
        w.writerow([*text, *[pts.get(n, "") for n in names], f"{rep.score:g}", f"{rep.max_score:g}",
                    _cell(" | ".join(problems)), _cell(" | ".join(rep.flags))])
    _atomic_write(path, buf.getvalue().encode("utf-8"))
