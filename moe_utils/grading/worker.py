"""The grading worker: imports torch once, then forks one child per notebook.

Started by ``moe_utils.grading.grader.WorkerPool`` as
``python -m moe_utils.grading.worker CMD_FD RESULT_FD``. Messages are JSON lines.

* The *zygote* (this process) reads ``{"op": "fork"}`` or ``{"op": "quit"}``. On fork
  it starts a child and waits for it, then reports ``{"event": "exited"}``.
* The *child* owns one notebook: it computes the expected outputs first (before any
  student code runs, so a student's monkeypatching cannot change them), then
  ``load`` executes the extracted definitions statement by statement and ``run``
  grades one question. Output printed by student code is captured. The grader kills
  the child (its whole process group) when a question runs past its time limit and
  forks a fresh one for the next question.

Forking after ``import torch`` is safe here because the zygote never runs a torch
operation (no thread pool exists yet); children set one intra-op thread.
"""

from __future__ import annotations

import io
import json
import os
import sys

__all__ = ["main"]


class _Lines:
    """Unbuffered line reader on a raw fd (a child inherits it with nothing read ahead)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.buf = b""

    def readline(self) -> bytes | None:
        while b"\n" not in self.buf:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line


def _send(fd: int, msg: dict) -> None:
    data = ("\n" + json.dumps(msg) + "\n").encode()
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _child(reader: _Lines, out_fd: int) -> None:
    os.setsid()  # own process group: the grader can kill it and anything it spawned
    import torch

    torch.set_num_threads(1)
    from .questions import questions_for
    from .runner import CappedText, expected_output, run_question

    _send(out_fd, {"event": "ready", "pid": os.getpid()})
    ns: dict = {"__name__": "__student__", "__builtins__": __builtins__}
    questions: dict = {}
    expected: dict = {}
    max_print = 2000
    sys.stdin = io.StringIO("")
    while True:
        line = reader.readline()
        if line is None:
            os._exit(0)
        msg = json.loads(line)
        op = msg.get("op")
        if op == "end":
            os._exit(0)
        if op == "load":
            max_print = int(msg.get("max_print", max_print))
            qs = questions_for(msg["exercise"])
            questions = {q.name: q for q in qs}
            for q in qs:  # before any student code runs
                expected[q.name] = [expected_output(q, c) for c in q.cases(hidden=True)]
            errors = []
            cap = CappedText(max_print)
            for snip in msg["snippets"]:
                for src in snip["statements"]:
                    try:
                        code = compile(src, f"<cell {snip['cell']}>", "exec")
                        saved = sys.stdout, sys.stderr
                        sys.stdout = sys.stderr = cap
                        try:
                            exec(code, ns)
                        finally:
                            sys.stdout, sys.stderr = saved
                    except KeyboardInterrupt:
                        raise
                    except BaseException as exc:  # SystemExit included
                        first = src.strip().splitlines()[0] if src.strip() else ""
                        errors.append(f"cell {snip['cell']}: `{first[:80]}` raised {type(exc).__name__}: {exc}")
            _send(out_fd, {"event": "loaded", "errors": errors, "stdout": cap.getvalue()})
        elif op == "run":
            name = msg["question"]
            q = questions[name]
            if name not in ns:
                _send(out_fd, {"event": "result", "question": name, "missing": True, "cases": [], "stdout": "", "printed": 0})
                continue
            # isolation: the other graded functions are the references while q runs,
            # so one mistake costs one question
            saved = {other: ns.get(other) for other in questions if other != name}
            for other, oq in questions.items():
                if other != name:
                    ns[other] = oq.reference
            cap = CappedText(max_print)
            try:
                results = run_question(ns[name], q, hidden=True, capture=cap, expected=expected[name])
            finally:
                for other, fn in saved.items():
                    if fn is None:
                        ns.pop(other, None)
                    else:
                        ns[other] = fn
            _send(out_fd, {
                "event": "result",
                "question": name,
                "cases": [r.to_dict() for r in results],
                "stdout": cap.getvalue(),
                "printed": cap.total,
            })


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    cmd_fd, out_fd = int(argv[0]), int(argv[1])
    import torch  # noqa: F401  (imported once here, inherited by every child)

    from . import questions, runner  # noqa: F401

    reader = _Lines(cmd_fd)
    _send(out_fd, {"event": "zygote"})
    while True:
        line = reader.readline()
        if line is None:
            return
        if not line.strip():
            continue
        msg = json.loads(line)
        if msg.get("op") == "quit":
            return
        if msg.get("op") == "fork":
            pid = os.fork()
            if pid == 0:
                try:
                    _child(reader, out_fd)
                finally:
                    os._exit(1)
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            _send(out_fd, {"event": "exited", "pid": pid, "code": code})


if __name__ == "__main__":
    main()
