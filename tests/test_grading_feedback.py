"""Feedback that teaches: the notebook self-checks, tried as a student would.

* one bug is charged once: a question is checked with the reference versions of the
  functions it builds on;
* the hint fits the failure (exception, shape, dtype, values, a known wrong answer);
* the exception itself carries case, expected, got and hint (nbgrader's Validate
  drops stdout), and Jupyter shows only that message, no grading frames.
"""

from __future__ import annotations

import io
import linecache
from contextlib import redirect_stdout

import pytest
import torch
from _grading_helpers import master, mutate, src

from moe_utils.grading import checks
from moe_utils.grading.extract import extract_definitions


def namespace(nb: dict) -> dict:
    """A student's kernel after running the definitions of a notebook (cell sources
    registered with linecache, as IPython does)."""
    ns: dict = {"__name__": "__main__"}
    ex = extract_definitions(nb)
    for cell, text in ex.cells.items():
        linecache.cache[f"<cell {cell}>"] = (len(text), None, text.splitlines(True), f"<cell {cell}>")
    for snip in ex.snippets:
        for stmt in snip.statements:
            exec(compile(stmt, f"<cell {snip.cell}>", "exec", dont_inherit=True), ns)
    return ns


def failure(check, fn) -> AssertionError:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(AssertionError) as info:
        check(fn)
    return info.value


def hint_of(message: str) -> str:
    return message[message.index("hint:"):]


# -- one bug, one charge ----------------------------------------------------------------


_BUFFER_SWITCH = """\
def switch_layer_forward(x, w_gate, expert_weights, capacity_factor=1.25, min_capacity=4):
    T, E = x.shape[0], w_gate.shape[1]
    probs = torch.softmax(x.float() @ w_gate.float(), dim=-1)
    gate, index = probs.max(dim=-1)
    C = expert_capacity(T, E, capacity_factor, 1, min_capacity)
    slots = torch.full((E, C), -1, dtype=torch.int64)  # token in each buffer slot
    pos = buffer_positions(index[:, None], E)[:, 0]
    for t in range(T):
        if pos[t] < C:
            slots[index[t], pos[t]] = t
    y = x.clone()
    for e in range(E):
        for c in range(C):
            t = int(slots[e, c])
            if t >= 0:
                y[t] = x[t] + gate[t].to(x.dtype) * (x[t] @ expert_weights[e])
    return y
"""


def test_float_capacity_does_not_fail_the_switch_layer_check():
    # the student's expert_capacity returns a float; their buffer-based switch layer is
    # right, and needs an int capacity to size its buffers
    nb = mutate("ex03_switch_capacity", {
        "expert_capacity": ("return max(min_capacity, math.floor(capacity_factor * k * num_tokens / num_experts))",
                            "return max(min_capacity, capacity_factor * k * num_tokens / num_experts)"),
        "switch_layer_forward": _BUFFER_SWITCH,
    })
    ns = namespace(nb)
    with redirect_stdout(io.StringIO()):
        checks.check_switch_layer_forward(ns["switch_layer_forward"])
        with pytest.raises(AssertionError):
            checks.check_expert_capacity(ns["expert_capacity"])
    assert ns["expert_capacity"](6, 3, 1.0, min_capacity=0) == 2.0  # the student's own function is back


def test_buffer_based_switch_layer_is_a_correct_alternative():
    ns = namespace(mutate("ex03_switch_capacity", {"switch_layer_forward": _BUFFER_SWITCH}))
    with redirect_stdout(io.StringIO()):
        checks.check_switch_layer_forward(ns["switch_layer_forward"], hidden=True)


def test_correct_capacity_kept_passes_on_top_of_a_wrong_buffer_positions():
    nb = mutate("ex03_switch_capacity", {"buffer_positions": ("indices.t().reshape(-1)", "indices.reshape(-1)")})
    ns = namespace(nb)
    with redirect_stdout(io.StringIO()):
        checks.check_capacity_kept(ns["capacity_kept"])


# -- hints keyed to the failure -------------------------------------------------------------


def test_wrong_shape_gets_a_shape_hint_not_the_renormalisation_hint():
    nb = mutate("ex01_router_topk", {"top_k_routing": (
        "return top_i, top_p / top_p.sum(dim=-1, keepdim=True)",
        "return top_i, (top_p / top_p.sum(dim=-1, keepdim=True))[:, None]")})
    msg = str(failure(checks.check_top_k_routing, namespace(nb)["top_k_routing"]))
    assert "wrong shape" in msg
    assert "shape" in hint_of(msg) and "divide" not in hint_of(msg) and "renormalis" not in hint_of(msg)


def test_a_known_wrong_answer_is_named():
    nb = mutate("ex01_router_topk", {"router_probs": ("dim=-1)", "dim=0)")})
    msg = str(failure(checks.check_router_probs, namespace(nb)["router_probs"]))
    assert "token axis" in msg or "over the tokens" in msg, msg


def test_an_exception_gets_an_exception_hint_with_the_students_line():
    nb = mutate("ex01_router_topk", {"router_probs": ("return torch.softmax(logits.float(), dim=-1)",
                                                      "return torch.softmax(logits.float(), dim=2)")})
    msg = str(failure(checks.check_router_probs, namespace(nb)["router_probs"]))
    assert "IndexError" in msg and "dim=2" in msg, msg


# -- the message itself ------------------------------------------------------------------------


def test_the_exception_message_carries_case_expected_got_and_hint():
    nb = mutate("ex02_balance_losses", {"switch_aux_loss": ("alpha * E * torch.sum", "alpha * torch.sum")})
    msg = str(failure(checks.check_switch_aux_loss, namespace(nb)["switch_aux_loss"]))
    for part in ("switch_aux_loss", "case", "expected", "got", "hint:"):
        assert part in msg, (part, msg)
    assert "printed above" not in msg


def test_jupyter_shows_only_the_message_not_grading_frames():
    nb = mutate("ex02_balance_losses", {"switch_aux_loss": ("alpha * E * torch.sum", "alpha * torch.sum")})
    exc = failure(checks.check_switch_aux_loss, namespace(nb)["switch_aux_loss"])
    render = getattr(exc, "_render_traceback_", None)
    assert render is not None, "IPython would print the grading frames"
    lines = render()
    text = "\n".join(lines)
    assert "checks.py" not in text and "Traceback" not in text and "hint:" in text


def test_masters_cells_still_call_the_checks_the_same_way():
    # nbgrader compatibility: the test cells call check_<name>(<name>) and, hidden, hidden=True
    nb = master("ex01_router_topk")
    assert any("check_router_probs(router_probs, hidden=True)" in src(c) for c in nb["cells"])


def test_pass_is_printed_for_a_correct_function():
    out = io.StringIO()
    with redirect_stdout(out):
        checks.check_router_probs(lambda logits: torch.softmax(logits.float(), dim=-1))
    assert out.getvalue().startswith("PASS router_probs")
