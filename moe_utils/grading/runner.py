"""Compare what a student's function returned with the expected output, and explain.

This runs in the grading process (and, for the self-check, in the student's own
kernel); it never calls student code. Its input is what ``worker.call_case``
reported for one case (outputs, the inputs as they were afterwards, gradients, or
the exception), after the wire format: plain tensors, numbers, tuples, ``Opaque``.
Every problem becomes a ``CaseResult`` with a message (expected against got) and a
hint chosen for the kind of failure: an exception, a wrong type, shape or dtype,
NaN, wrong values (naming a known wrong answer when the output matches one),
gradients, or an input changed in place.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass

import torch

from .spec import Case, Question
from .worker import Opaque, _clone

__all__ = ["Mismatch", "CaseResult", "compare", "expected_output", "judge_case", "fmt"]


@dataclass
class Mismatch:
    kind: str  # one of spec.FAILURE_KINDS
    text: str


@dataclass
class CaseResult:
    name: str
    public: bool
    passed: bool
    message: str = ""  # what differs, then the hint
    kind: str = ""  # failure kind, "todo" for NotImplementedError
    id: str = ""
    hint: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def fmt(t) -> str:
    """A short, readable rendering of an output for a message."""
    if isinstance(t, torch.Tensor):
        head = f"tensor of shape {list(t.shape)}, dtype {str(t.dtype).replace('torch.', '')}"
        if t.numel() == 0:
            return head + ", empty"
        v = t.detach()
        if v.is_floating_point():
            v = v.double()
        vals = v.tolist() if v.numel() <= 24 else v.reshape(-1)[:12].tolist()
        vals = round(vals, 7) if isinstance(vals, float) else _round(vals)
        more = "" if v.numel() <= 24 else " ... (first 12 values)"
        return f"{head}: {vals}{more}"
    if isinstance(t, float):
        return repr(round(t, 7))
    if isinstance(t, Opaque):
        return repr(t)
    if isinstance(t, tuple):
        return "(" + ", ".join(fmt(x) for x in t[:6]) + (", ...)" if len(t) > 6 else ")")
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
    if isinstance(x, Opaque):
        return f"a {x.type_name}"
    if x is None:
        return "None"
    return f"a {type(x).__name__}"


def compare(got, expected, case: Case, label: str = "output") -> Mismatch | None:
    """None when ``got`` matches ``expected``; otherwise what differs, and its kind."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)):
            return Mismatch("type", f"{label}: expected a tuple of {len(expected)} values, got {_kind(got)}")
        if len(got) != len(expected):
            return Mismatch("type", f"{label}: expected a tuple of {len(expected)} values, got {len(got)} values")
        for i, (g, e) in enumerate(zip(got, expected)):
            miss = compare(g, e, case, f"{label}[{i}]")
            if miss:
                return miss
        return None
    if isinstance(expected, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            return Mismatch("type", f"{label}: expected {_kind(expected)}, got {_kind(got)}")
        if got.shape != expected.shape:
            return Mismatch("shape", f"{label}: wrong shape: expected {list(expected.shape)}, got {list(got.shape)}"
                                     f"\n  expected: {fmt(expected)}\n  got:      {fmt(got)}")
        if got.dtype != expected.dtype:
            return Mismatch("dtype", f"{label}: wrong dtype: expected {expected.dtype}, got {got.dtype}")
        if expected.is_floating_point() or expected.is_complex():
            g, e = got.detach().to(torch.complex128 if expected.is_complex() else torch.float64), expected.detach()
            e = e.to(g.dtype)
            if not bool(torch.isfinite(g).all()):
                return Mismatch("nan", f"{label}: contains NaN or inf\n  expected: {fmt(expected)}\n  got:      {fmt(got)}")
            if not torch.allclose(g, e, atol=case.atol, rtol=case.rtol):
                diff = (g - e).abs()
                where = [int(i) for i in torch.nonzero(diff == diff.max())[0]] if diff.dim() else []
                return Mismatch("values", f"{label}: values differ (max abs diff {float(diff.max()):.3g} at index "
                                          f"{where}; tolerance atol={case.atol:g}, rtol={case.rtol:g})"
                                          f"\n  expected: {fmt(expected)}\n  got:      {fmt(got)}")
            return None
        if not torch.equal(got, expected):
            bad = int((got != expected).sum())
            return Mismatch("values", f"{label}: {bad} of {expected.numel()} entries differ"
                                      f"\n  expected: {fmt(expected)}\n  got:      {fmt(got)}")
        return None
    if isinstance(expected, bool):
        return None if got is expected else Mismatch("values", f"{label}: expected {expected!r}, got {fmt(got)}")
    if isinstance(expected, int):
        if isinstance(got, bool) or not isinstance(got, numbers.Integral):
            return Mismatch("type", f"{label}: expected a Python int ({expected}), got {_kind(got)}: {fmt(got)}")
        return None if int(got) == expected else Mismatch("values", f"{label}: expected {expected}, got {int(got)}")
    if isinstance(expected, float):
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            return Mismatch("type", f"{label}: expected a float, got {_kind(got)}")
        ok = abs(float(got) - expected) <= case.atol + case.rtol * abs(expected)
        return None if ok else Mismatch("values", f"{label}: expected {expected:.7g}, got {float(got):.7g}")
    return None if got == expected else Mismatch("values", f"{label}: expected {fmt(expected)}, got {fmt(got)}")


def expected_output(q: Question, case: Case):
    """(value, input gradients or None) of one case, from the published value or the reference."""
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
        return _detach(q.reference(*_clone(case.args), **_clone(case.kwargs))), None


def _detach(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detach(o) for o in out)
    return out


def _arg_names(q: Question) -> list[str]:
    import inspect

    try:
        return list(inspect.signature(q.reference).parameters)
    except (TypeError, ValueError):
        return []


def _unchanged(before, after) -> bool:
    if isinstance(before, torch.Tensor):
        if not isinstance(after, torch.Tensor) or after.shape != before.shape or after.dtype != before.dtype:
            return False
        if before.is_floating_point():
            return bool(torch.equal(torch.nan_to_num(before.detach()), torch.nan_to_num(after.detach())))
        return bool(torch.equal(before.detach(), after.detach()))
    if isinstance(before, (list, tuple)):
        return isinstance(after, (list, tuple)) and len(after) == len(before) and all(
            _unchanged(b, a) for b, a in zip(before, after))
    return True


def _inplace(q: Question, case: Case, result: dict) -> Mismatch | None:
    names = _arg_names(q)
    after = result.get("args_after")
    if not isinstance(after, (list, tuple)) or len(after) != len(case.args):
        return Mismatch("type", "the grading process did not report the inputs after the call")
    for i, (b, a) in enumerate(zip(case.args, after)):
        if not _unchanged(b, a):
            arg = names[i] if i < len(names) else f"argument #{i + 1}"
            return Mismatch("inplace", f"the function modified its input `{arg}` in place; leave inputs untouched "
                                       f"(work on a copy, e.g. {arg} = {arg}.clone(), or use out-of-place ops)")
    kw_after = result.get("kwargs_after")
    if not isinstance(kw_after, dict):
        return Mismatch("type", "the grading process did not report the inputs after the call")
    for key, before in case.kwargs.items():
        if not _unchanged(before, kw_after.get(key)):
            return Mismatch("inplace", f"the function modified its input `{key}` in place")
    return None


def _grad_mismatch(q: Question, case: Case, result: dict, grads) -> Mismatch | None:
    g = result.get("grad")
    names = _arg_names(q)
    if not isinstance(g, dict):
        return Mismatch("grad", "no gradient was reported")
    if g.get("status") == "no_grad":
        return Mismatch("grad", "the output carries no gradient (was something detached, or computed with "
                                ".item()/.tolist()?)")
    if g.get("status") == "error":
        err = g.get("error") or {}
        return Mismatch("grad", f"backward() raised {err.get('type', 'an error')}: {err.get('message', '')}")
    got = g.get("grads")
    if not isinstance(got, (list, tuple)) or len(got) != len(case.grad):
        return Mismatch("grad", "the gradients were not reported")
    for pos, g_got, g_exp in zip(case.grad, got, grads):
        arg = names[pos] if pos < len(names) else f"argument #{pos + 1}"
        if g_got is None:
            return Mismatch("grad", f"no gradient reaches the input `{arg}`")
        miss = compare(g_got, g_exp, case, f"gradient with respect to `{arg}`")
        if miss:
            return Mismatch("grad", miss.text)
    return None


def _memory_mismatch(q: Question, result: dict) -> Mismatch | None:
    shared = result.get("shared")
    if not isinstance(shared, list):
        return Mismatch("type", "the grading process did not report the outputs' memory")
    if not shared:
        return None
    names = [f"output[{i}]" for i in shared] if q.outputs else ["the output"]
    which = names[0] + " does not own its memory" if len(names) == 1 else \
        ", ".join(names[:-1]) + f" and {names[-1]} do not own their memory"
    return Mismatch("memory", f"the values are right, but {which} (a view of an input, or one memory repeated "
                              "by expand): the copies are not independent")


def _known_mistake(q: Question, case: Case, got):
    for wrong in q.wrong_answers:
        try:
            with torch.no_grad():
                value = _detach(wrong.fn(*_clone(case.args), **_clone(case.kwargs)))
            if compare(got, value, case) is None:
                return wrong
        except Exception:  # noqa: BLE001 - a wrong answer need not work on every case
            continue
    return None


def judge_case(q: Question, case: Case, expected, result) -> CaseResult:
    """One case's verdict from what the student's process reported (``result``)."""
    value, grads = expected
    base = dict(name=case.name, public=case.public, id=case.id)
    if not isinstance(result, dict):
        return CaseResult(**base, passed=False, kind="type", message="no answer was reported for this case")
    err = result.get("error")
    if isinstance(err, dict):
        kind = err.get("kind")
        if kind == "not_implemented":
            return CaseResult(**base, passed=False, kind="todo",
                              message="not implemented yet (the function raises NotImplementedError)")
        if kind == "exit":
            text = f"the function called sys.exit({err.get('code', '')}); return a value instead"
            return _fail(q, case, base, Mismatch("exception", text))
        if kind == "not_callable":
            return _fail(q, case, base, Mismatch("type", f"`{q.name}` is a {err.get('type', '?')}, not a function"))
        where = f" (at {err['where']})" if err.get("where") else ""
        message = str(err.get("message", ""))
        text = f"raised {err.get('type', 'an exception')}: {message}{where}"
        miss = Mismatch("exception", text)
        if err.get("type") == "MemoryError" or "allocate" in message.lower():
            return _fail(q, case, base, miss, hint="the function needs more memory than the grader allows "
                                                   "(a limit per question): these inputs are small, so look for "
                                                   "a tensor far bigger than needed")
        return _fail(q, case, base, miss)
    miss = _inplace(q, case, result)
    got = result.get("out")
    if miss is None:
        miss = (q.check or compare)(got, value, case)
    if miss is None and q.own_memory:
        miss = _memory_mismatch(q, result)
    if miss is None and case.grad:
        miss = _grad_mismatch(q, case, result, grads)
    if miss is None:
        return CaseResult(**base, passed=True)
    wrong = _known_mistake(q, case, got) if miss.kind in ("type", "shape", "dtype", "nan", "values") else None
    return _fail(q, case, base, miss, wrong=wrong)


def _fail(q: Question, case: Case, base: dict, miss: Mismatch, wrong=None, hint: str | None = None) -> CaseResult:
    text = miss.text
    if q.outputs:
        for i, name in enumerate(q.outputs):
            text = text.replace(f"output[{i}]", f"output[{i}] ({name})")
    if wrong is not None:
        text += f"\n  this is a known mistake: {wrong.what}"
        hint = wrong.hint
    elif hint is None:
        hint = case.hint if (miss.kind == "values" and case.hint) else q.hint_for(miss.kind)
    return CaseResult(**base, passed=False, kind=miss.kind, message=f"{text}\n  hint: {hint}", hint=hint)
