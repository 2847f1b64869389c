"""Self-checks for the exercise notebooks: ``check_<question>(your_function)``.

Each check runs the question's public cases (seeded random inputs plus the
MOE_REFERENCE.md test vectors) and prints ``PASS`` or the first failing case with
expected vs got and a hint. On failure it then raises ``AssertionError``, so the
same cell works as an nbgrader test cell. ``hidden=True`` also runs the cases the
autograder adds (nbgrader's hidden-test region in the master notebooks uses it).
"""

from __future__ import annotations

from .questions import QUESTIONS, Question
from .runner import run_question

__all__ = [f"check_{q.name}" for q in QUESTIONS] + ["check"]


def _report(q: Question, fn, hidden: bool) -> bool:
    results = run_question(fn, q, hidden=hidden)
    failed = [r for r in results if not r.passed]
    if not failed:
        kind = "public and hidden" if hidden else "public"
        print(f"PASS {q.name}: all {len(results)} {kind} cases agree with the reference")
        return True
    first = failed[0]
    print(f"FAIL {q.name}: {len(failed)} of {len(results)} cases fail. First failing case: {first.name}")
    print("  " + first.message.replace("\n", "\n  "))
    return False


def check(fn, name: str | None = None, hidden: bool = False) -> None:
    """Check ``fn`` against the question it names (``fn.__name__`` unless ``name``)."""
    __tracebackhide__ = True  # IPython and pytest hide this frame in tracebacks
    qname = name or getattr(fn, "__name__", "")
    q = next((q for q in QUESTIONS if q.name == qname), None)
    if q is None:
        raise ValueError(f"name must be one of {[q.name for q in QUESTIONS]}, got {qname!r}")
    if not _report(q, fn, hidden):
        raise AssertionError(f"{q.name} does not pass its checks yet (details printed above)")


def _make(q: Question):
    def _check(fn, hidden: bool = False) -> None:
        __tracebackhide__ = True
        if not _report(q, fn, hidden):
            raise AssertionError(f"{q.name} does not pass its checks yet (details printed above)")

    _check.__name__ = _check.__qualname__ = f"check_{q.name}"
    _check.__doc__ = f"Run the public cases of ``{q.signature}`` and print PASS or what differs."
    return _check


for _q in QUESTIONS:
    globals()[f"check_{_q.name}"] = _make(_q)
