"""Self-checks for the exercise notebooks: ``check_<question>(your_function)``.

A check runs the question's public cases (the published test vectors of
``docs/conventions.md`` and seeded random inputs) and prints ``PASS``, or raises
``CheckFailed`` (an ``AssertionError``, so the same cell works as an nbgrader test
cell) whose message names the failing case, expected against got, and a hint. The
message is the whole story: nbgrader's Validate shows the exception, not what was
printed, and Jupyter shows only the message, no grading frames.
``hidden=True`` adds hidden cases drawn from a fresh random seed (the nbgrader
hidden-test region of the masters uses it).

While a question is checked, the functions it builds on (``Question.builds_on``)
are the references, so a mistake in ``buffer_positions`` does not also fail
``capacity_kept``. The student's function is called before any expected value
exists, so nothing it could find on the stack gives the answer away. This is
feedback, not grading: the autograder (``python -m moe_utils.grading``) runs the
student's code in a separate process and compares there.
"""

from __future__ import annotations

from .questions import EXERCISES, QUESTIONS, find_question
from .runner import CaseResult, expected_output, judge_case
from .spec import new_seed
from .worker import call_case, decode, encode

__all__ = [f"check_{q.name}" for q in QUESTIONS] + ["check", "CheckFailed"]

_MISSING = object()


class CheckFailed(AssertionError):
    """A self-check that does not pass: the message has everything."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def _inputs(name: str, hidden: bool, seed: int) -> list[tuple]:
    """Only the inputs (the calls that will be made), no expected values."""
    return [(c.args, c.kwargs, c.grad, c.grad_output) for c in find_question(name).cases(hidden=hidden, seed=seed)]


def _references(name: str) -> dict:
    q = find_question(name)
    by_name = {o.name: o for o in EXERCISES[q.exercise]}
    return {dep: by_name[dep].reference for dep in q.builds_on}


def _gather(fn, calls: list[tuple], deps: dict, memory: bool = False) -> list[dict]:
    """Call ``fn`` on every case, with the functions it builds on as references."""
    scope = getattr(fn, "__globals__", None)
    saved = {}
    if isinstance(scope, dict):
        saved = {dep: scope.get(dep, _MISSING) for dep in deps}
        scope.update(deps)
    try:
        out = []
        for args, kwargs, grad, grad_output in calls:
            res = call_case(fn, args, kwargs, grad, grad_output, memory=memory)
            try:
                out.append(decode(encode(res)))  # exactly what the autograder would see
            except ValueError as exc:
                out.append({"error": {"kind": "exception", "type": "ValueError",
                                      "message": f"the output could not be read ({exc})", "where": ""}})
        return out
    finally:
        for dep, old in saved.items():
            if old is _MISSING:
                scope.pop(dep, None)
            else:
                scope[dep] = old


def _verdict(name: str, hidden: bool, seed: int, results: list[dict]) -> tuple[list[CaseResult], list]:
    q = find_question(name)
    cases = q.cases(hidden=hidden, seed=seed)
    return [judge_case(q, c, expected_output(q, c), r) for c, r in zip(cases, results)], cases


def report(name: str, verdicts: list[CaseResult], hidden: bool) -> str | None:
    """None when every case passes; otherwise the message for the student."""
    failed = [v for v in verdicts if not v.passed]
    if not failed:
        return None
    if all(v.kind == "todo" for v in failed):
        return f"{name} is not implemented yet (it raises NotImplementedError)"
    first = next(v for v in failed if v.kind != "todo")
    which = "public" if first.public else "hidden"
    head = (f"{name}: {len(failed)} of {len(verdicts)} {'public and hidden' if hidden else 'public'} cases fail."
            f"\n  first failing case ({which}): {first.name}")
    return head + "\n  " + first.message.replace("\n", "\n  ")


def check(fn, name: str | None = None, hidden: bool = False) -> None:
    """Check ``fn`` against the question it names (``fn.__name__`` unless ``name``)."""
    __tracebackhide__ = True  # pytest hides this frame
    qname = name or getattr(fn, "__name__", "")
    if qname not in {q.name for q in QUESTIONS}:
        raise ValueError(f"name must be one of {[q.name for q in QUESTIONS]}, got {qname!r}")
    seed = new_seed()
    if not callable(fn):
        raise CheckFailed(f"{qname}: expected a function, got a {type(fn).__name__}")
    memory = find_question(qname).own_memory
    results = _gather(fn, _inputs(qname, hidden, seed), _references(qname), memory)
    verdicts, _ = _verdict(qname, hidden, seed, results)
    message = report(qname, verdicts, hidden)
    if message is not None:
        raise CheckFailed(message)
    kind = "public and hidden" if hidden else "public"
    print(f"PASS {qname}: all {len(verdicts)} {kind} cases agree with the reference")


class _Check:
    """``check_<name>(fn, hidden=False)``: an object, so no question data sits in the
    frames above the student's function while it runs."""

    def __init__(self, name: str):
        self.name = name
        self.__name__ = self.__qualname__ = f"check_{name}"
        q = find_question(name)
        self.__doc__ = f"Run the public cases of ``{q.signature}``; print PASS or raise with what differs."

    def __call__(self, fn, hidden: bool = False) -> None:
        __tracebackhide__ = True
        check(fn, self.name, hidden)

    def __repr__(self) -> str:
        return f"<self-check {self.__name__}>"


for _q in QUESTIONS:
    globals()[f"check_{_q.name}"] = _Check(_q.name)
