"""Command line: ``python -m moe_utils.grading {build,grade,list} ...``.

``python -m moe_utils.grading NOTEBOOK`` (no sub-command) is short for ``grade NOTEBOOK``.
Exit status of ``grade``: 0 when graded (whatever the scores), 2 for bad arguments,
3 when the grader's own files changed during the run (the grade of a submission whose
code was running at the time is withheld; restore the files before grading again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .build import EXERCISES_DIR, SOLUTIONS_DIR, build
from .grader import (
    DEFAULT_MAX_PRINT,
    DEFAULT_TIMEOUT,
    GUARD,
    SANDBOX_HIDE,
    format_table,
    grade_folder,
    grade_notebook,
    write_csv,
    write_json,
    write_junit,
)
from .pool import WorkerGone, WorkerPool
from .questions import EXERCISE_INFO, EXERCISES
from .worker import not_dumpable


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m moe_utils.grading", description="MoE course exercises: build and grade")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="write the student notebooks from the masters")
    b.add_argument("--solutions", type=Path, default=SOLUTIONS_DIR, help="folder of master notebooks")
    b.add_argument("--out", type=Path, default=EXERCISES_DIR, help="folder for the student notebooks")
    b.add_argument("--check", action="store_true", help="only report stale student notebooks (exit 1 if any)")
    g = sub.add_parser("grade", help="grade one notebook, or every notebook in a folder")
    g.add_argument("path", type=Path, help="a notebook, or a folder of submissions (searched recursively)")
    g.add_argument("--json", type=Path, help="write the full report as JSON")
    g.add_argument("--junit", type=Path, help="write a JUnit XML report (one test case per question)")
    g.add_argument("--csv", type=Path, help="folder mode: write one row per submission (default grades.csv)")
    g.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per question (default %(default)s)")
    g.add_argument("--exercise", choices=sorted(EXERCISES), help="grade as this exercise (default: from the notebook)")
    g.add_argument("--max-print", type=int, default=DEFAULT_MAX_PRINT, help="characters a function may print (default %(default)s)")
    g.add_argument("--sandbox", choices=["auto", "bwrap", "none"], default="auto",
                   help="run submissions in bubblewrap: auto (when installed, the default), bwrap (required), none")
    g.add_argument("--memory-mb", type=int, default=1024, help="memory a question may use, MiB (default %(default)s)")
    g.add_argument("--max-procs", type=int, default=32, help="processes a question may start (default %(default)s)")
    g.add_argument("--seed", type=int, help="seed of the hidden cases (default: a fresh secret one per run)")
    g.add_argument("-v", "--verbose", action="store_true", help="show the full message of every failing question")
    sub.add_parser("list", help="list the exercises, questions and points")
    return p


def _tampering(reports) -> bool:
    """Say loudly which files of the grader changed, and while whose code ran; True if any did."""
    bad = [r for r in reports if r.tampered]
    outside = list(dict.fromkeys(GUARD.outside + GUARD.changed()))  # the last check: after every student process
    for r in bad:
        who = r.student or r.notebook
        print(f"WARNING: the grader's own files changed while {who} was being graded ({', '.join(r.tampered[:5])}); "
              "its grade is withheld. If you (an editor, git) did not change them, that submission did: restore "
              "them (git checkout) before grading again.", file=sys.stderr)
    if outside:
        print(f"WARNING: the grader's own files changed during this run while no submission's code was running "
              f"({', '.join(outside[:5])}). Restore them (git checkout), or commit the change, before grading "
              "again.", file=sys.stderr)
    return bool(bad or outside)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] not in ("build", "grade", "list", "-h", "--help"):
        argv = ["grade", *argv]
    args = _parser().parse_args(argv)
    if args.cmd == "build":
        stale = build(args.solutions, args.out, check=args.check)
        verb = "out of date" if args.check else "written"
        for name in stale:
            print(f"{verb}: {name}")
        if not stale:
            print("student notebooks are up to date")
        return 1 if (args.check and stale) else 0
    if args.cmd == "list":
        for ex, qs in EXERCISES.items():
            allowed = ", ".join(EXERCISE_INFO[ex].moe_utils_allowed) or "none"
            print(f"{ex}  ({sum(q.points for q in qs)} points; moe_utils modules allowed: {allowed})")
            for q in qs:
                print(f"  {q.points} pt  {q.signature}")
        return 0
    if not args.path.exists():
        print(f"error: {args.path} does not exist", file=sys.stderr)
        return 2
    # the expected values and the hidden-case seed live in this process: keep other processes
    # of this user (a submission without a sandbox) from reading its memory
    not_dumpable()
    options = {"sandbox": args.sandbox, "memory_mb": args.memory_mb, "max_procs": args.max_procs, "seed": args.seed}
    hide = [str(args.path.resolve() if args.path.is_dir() else args.path.resolve().parent), *SANDBOX_HIDE]
    try:
        pool = WorkerPool(hide=hide, **options)
        with pool:
            if args.path.is_dir():
                def progress(rep):
                    print(f"{rep.student:<24} {rep.exercise or '?':<24} {rep.score:g}/{rep.max_score:g}  "
                          f"({rep.seconds:.1f} s)", flush=True)

                reports = grade_folder(args.path, args.timeout, args.exercise, args.max_print, progress=progress,
                                       pool=pool)
            else:
                reports = [grade_notebook(args.path, args.timeout, args.exercise, pool, max_print=args.max_print)]
                print(format_table(reports[0], verbose=args.verbose))
    except (WorkerGone, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # every student process has ended here (the pool is closed): now the reports
    tampered = _tampering(reports)
    mode = reports[0].grading.get("sandbox", "") if reports else ""
    if args.path.is_dir():
        if not reports:
            print(f"error: no notebooks under {args.path}", file=sys.stderr)
            return 2
        csv_path = args.csv or Path("grades.csv")
        write_csv(reports, csv_path)
        print(f"{len(reports)} submissions graded ({mode}); CSV: {csv_path}")
        if args.json:
            write_json(reports, args.json)
    else:
        if args.json:
            write_json(reports[0], args.json)
        if args.csv:
            write_csv(reports, args.csv)
    if args.junit:
        write_junit(reports if args.path.is_dir() else reports[0], args.junit)
    return 3 if tampered else 0


if __name__ == "__main__":
    sys.exit(main())
