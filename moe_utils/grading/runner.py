"""Run one question's cases against a function and explain what went wrong.

Shared by the notebook self-checks (``check_<name>``, in the student's own kernel)
and by the autograder's worker process. Nothing here lets a student's exception,
``sys.exit``, wrong type, wrong shape or in-place edit escape: every problem
becomes a ``CaseResult`` with a message that says expected vs got.
"""

from __future__ import annotations

import copy
import inspect
import io
import numbers
import os
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass

import torch

from .questions import Case, Question

__all__ = ["CaseResult", "run_case", "run_question", "expected_output", "CappedText"]


@dataclass
class CaseResult:
    name: str
    public: bool
    passed: bool
    message: str = ""

    def to_dict(self) -> dict:
        return {"name": self.name, "public": self.public, "passed": self.passed, "message": self.message}


class CappedText(io.TextIOBase):
    """A text sink that keeps the first ``limit`` characters and counts the rest."""

    def __init__(self, limit: int = 2000):
        self.limit = limit
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0

    def writable(self) -> bool:
        return True

    def write(self, s) -> int:
        s = str(s)
        self.total += len(s)
        if self.kept < self.limit:
            piece = s[: self.limit - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.total > self.kept:
            text += f"\n... ({self.total - self.kept} more characters not shown)"
        return text


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_clone(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(torch.equal(a, b)) or bool(torch.equal(torch.nan_to_num(a.detach()), torch.nan_to_num(b.detach())))
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return True


def _fmt(t) -> str:
    """A short, readable rendering of an output for a message."""
    if isinstance(t, torch.Tensor):
        head = f"tensor of shape {list(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}"
        if t.numel() == 0:
            return head + ", empty"
        v = t.detach()
        if v.is_floating_point():
            v = v.double()
        if v.numel() <= 24:
            vals = v.tolist()
        else:
            vals = v.reshape(-1)[:12].tolist()
        if isinstance(vals, float):
            vals = round(vals, 7)
        elif isinstance(vals, list):
            vals = _round(vals)
        more = "" if v.numel() <= 24 else " ... (first 12 values)"
        return f"{head}: {vals}{more}"
    if isinstance(t, float):
        return repr(round(t, 7))
    text = repr(t)
    return text if len(text) < 300 else text[:300] + "..."


def _round(vals):
    if isinstance(vals, list):
        return [_round(v) for v in vals]
    if isinstance(vals, float):
        return round(vals, 5)
    return vals


def _kind(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {list(x.shape)} and dtype {str(x.dtype).replace('torch.', '')}"
    return f"a {type(x).__name__}"


def compare(got, expected, case: Case, label: str = "output") -> str | None:
    """None when ``got`` matches ``expected``; otherwise a message naming the difference."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)):
            return f"{label}: expected a tuple of {len(expected)} values, got {_kind(got)}"
        if len(got) != len(expected):
            return f"{label}: expected a tuple of {len(expected)} values, got {len(got)} values"
        for i, (g, e) in enumerate(zip(got, expected)):
            msg = compare(g, e, case, f"{label}[{i}]")
            if msg:
                return msg
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return f"{label}: expected {_kind(expected)}, got {_kind(got)}"
        if got.shape != expected.shape:
            return f"{label}: wrong shape: expected {list(expected.shape)}, got {list(got.shape)}\n  expected: {_fmt(expected)}\n  got:      {_fmt(got)}"
        if got.dtype != expected.dtype:
            return f"{label}: wrong dtype: expected {expected.dtype}, got {got.dtype}"
        if expected.is_floating_point():
            g, e = got.detach().double(), expected.detach().double()
            if not bool(torch.isfinite(g).all()):
                return f"{label}: contains NaN or inf\n  expected: {_fmt(expected)}\n  got:      {_fmt(got)}"
            if not torch.allclose(g, e, atol=case.atol, rtol=case.rtol):
                diff = (g - e).abs()
                where = tuple(int(i) for i in torch.nonzero(diff == diff.max())[0]) if diff.dim() else ()
                return (
                    f"{label}: values differ (max abs diff {float(diff.max()):.3g} at index {list(where)}; "
                    f"tolerance atol={case.atol:g}, rtol={case.rtol:g})\n  expected: {_fmt(expected)}\n  got:      {_fmt(got)}"
                )
            return None
        if not torch.equal(got, expected):
            bad = int((got != expected).sum())
            return f"{label}: {bad} of {expected.numel()} entries differ\n  expected: {_fmt(expected)}\n  got:      {_fmt(got)}"
        return None
    if isinstance(expected, bool):
        return None if got is expected else f"{label}: expected {expected!r}, got {_fmt(got)}"
    if isinstance(expected, int):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            return f"{label}: expected a Python int ({expected}), got {_kind(got)}: {_fmt(got)}"
        return None if int(got) == expected else f"{label}: expected {expected}, got {int(got)}"
    if isinstance(expected, float):
        if not isinstance(got, numbers.Real):
            return f"{label}: expected a float, got {_kind(got)}"
        return None if abs(float(got) - expected) <= case.atol + case.rtol * abs(expected) else f"{label}: expected {expected:.7g}, got {float(got):.7g}"
    return None if got == expected else f"{label}: expected {_fmt(expected)}, got {_fmt(got)}"


def expected_output(q: Question, case: Case):
    """The expected output (and input gradients, for ``grad`` cases) of one case."""
    if case.grad:
        args = list(_clone(case.args))
        for i in case.grad:
            args[i] = args[i].detach().clone().requires_grad_(True)
        out = q.reference(*args, **_clone(case.kwargs))
        scalar = out if case.grad_output is None else out[case.grad_output]
        scalar.sum().backward()
        grads = tuple(args[i].grad.detach().clone() for i in case.grad)
        value = case.expected if case.expected is not None else _detach(out)
        return value, grads
    if case.expected is not None:
        return case.expected, None
    with torch.no_grad():
        return q.reference(*_clone(case.args), **_clone(case.kwargs)), None


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def _arg_name(q: Question, i: int) -> str:
    try:
        names = list(inspect.signature(q.reference).parameters)
        return names[i]
    except (TypeError, ValueError, IndexError):
        return f"argument #{i + 1}"


def _short_traceback(exc: BaseException) -> str:
    """The last frame of the student's code (a notebook cell), for the message."""
    frames = traceback.extract_tb(exc.__traceback__)
    here = os.path.dirname(os.path.abspath(__file__))
    skip = (here, os.path.dirname(torch.__file__))
    mine = [f for f in frames if not f.filename.startswith(skip) and not f.filename.startswith("<frozen")]
    if not mine:
        return ""
    f = mine[-1]
    where = f"{f.filename.strip('<>')}, " if f.filename.startswith("<") else ""
    line = f" `{f.line.strip()}`" if f.line else ""
    return f" (at {where}line {f.lineno}{line})"


def run_case(fn, q: Question, case: Case, expected=None, capture: CappedText | None = None) -> CaseResult:
    """Call ``fn`` on one case and compare. Never raises (except KeyboardInterrupt)."""
    try:
        if expected is None:
            expected = expected_output(q, case)
        value, grads = expected
        args = list(_clone(case.args))
        kwargs = _clone(case.kwargs)
        if case.grad:
            for i in case.grad:
                args[i] = args[i].detach().clone().requires_grad_(True)
        before = _clone((args, kwargs))
    except Exception as exc:  # pragma: no cover - a bug in the grader's own cases
        return CaseResult(case.name, case.public, False, f"grader error while preparing the case: {exc!r}")
    try:
        if capture is not None:
            with redirect_stdout(capture), redirect_stderr(capture):
                got = fn(*args, **kwargs)
        else:
            got = fn(*args, **kwargs)
    except KeyboardInterrupt:
        raise
    except NotImplementedError:
        return CaseResult(case.name, case.public, False, "not implemented yet (the function raises NotImplementedError)")
    except SystemExit as exc:
        return CaseResult(case.name, case.public, False, f"the function called sys.exit({exc.code!r}); return a value instead")
    except BaseException as exc:
        return CaseResult(case.name, case.public, False, f"raised {type(exc).__name__}: {exc}{_short_traceback(exc)}")
    try:
        for i, (a, b) in enumerate(zip(before[0], args)):
            if not _same(a, b):
                arg = _arg_name(q, i)
                return CaseResult(
                    case.name, case.public, False,
                    f"the function modified its input `{arg}` in place; leave inputs untouched "
                    f"(work on a copy, e.g. {arg} = {arg}.clone(), or use out-of-place ops)",
                )
        for key in kwargs:
            if not _same(before[1][key], kwargs[key]):
                return CaseResult(case.name, case.public, False, f"the function modified its input `{key}` in place")
        msg = compare(got, value, case)
        if msg is None and case.grad:
            out = got if case.grad_output is None else got[case.grad_output]
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                msg = "the output carries no gradient (was something detached, or computed with .item()/.tolist()?)"
            else:
                out.sum().backward()
                for pos, g_exp in zip(case.grad, grads):
                    g = args[pos].grad
                    if g is None:
                        msg = f"no gradient reaches the input `{_arg_name(q, pos)}`"
                        break
                    m = compare(g, g_exp, case, f"gradient with respect to `{_arg_name(q, pos)}`")
                    if m:
                        msg = m
                        break
        if msg and q.outputs:
            for i, name in enumerate(q.outputs):
                msg = msg.replace(f"output[{i}]", f"output[{i}] ({name})")
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        msg = f"the output could not be checked ({type(exc).__name__}: {exc})"
    if msg:
        hint = case.hint or q.hint
        return CaseResult(case.name, case.public, False, f"{msg}\n  hint: {hint}")
    return CaseResult(case.name, case.public, True)


def run_question(fn, q: Question, hidden: bool = False, capture: CappedText | None = None, expected: list | None = None) -> list[CaseResult]:
    """Every (public, or also hidden) case of ``q`` against ``fn``."""
    cases = q.cases(hidden=hidden)
    if not callable(fn):
        return [CaseResult(c.name, c.public, False, f"`{q.name}` is {_kind(fn)}, not a function") for c in cases]
    exp = expected if expected is not None else [None] * len(cases)
    return [run_case(fn, q, c, e, capture) for c, e in zip(cases, exp)]
