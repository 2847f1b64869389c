"""What crosses the boundary between a student's process and the grading process.

The wire format carries tensors (dtype, shape, raw bytes), numbers, strings, None,
tuples, lists and str-keyed dicts; anything else arrives as an ``Opaque`` (type name
and repr). Decoding a message never runs code, and a malformed one is refused. The
grader accepts an answer only with this question's token, for this question, with
exactly one result per case; the last tests forge such messages from inside a
submission, with the grader's own encoder.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import textwrap

import numpy as np
import pytest
import torch
from _grading_helpers import add_cell, mutate, points, student, write

from moe_utils.grading import WorkerPool, grade_notebook
from moe_utils.grading.grader import _judge, _plan
from moe_utils.grading.questions import find_question
from moe_utils.grading.worker import MAGIC, FrameReader, Opaque, WireError, decode, encode

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int8, torch.int16, torch.int32,
          torch.int64, torch.uint8, torch.bool, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tensors_of_every_dtype_and_shape_round_trip(dtype):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(3, 5, generator=g) * 50).to(dtype)
    for t in (base, base[:, 1::2], base.t(), base[0, 0], base[:0], base.reshape(1, 15, 1)):
        back = decode(encode(t))
        assert back.dtype == t.dtype and back.shape == t.shape and torch.equal(back, t)


def test_structures_round_trip_and_keep_their_types():
    value = (1, 2.5, float("inf"), True, None, "text", [torch.arange(3), (4,)], {"a": torch.ones(2)}, -(2**70))
    back = decode(encode(value))
    assert isinstance(back, tuple) and isinstance(back[6], list) and isinstance(back[6][1], tuple)
    assert back[:6] == value[:6] and back[8] == value[8] and type(back[3]) is bool
    assert torch.equal(back[6][0], torch.arange(3)) and torch.equal(back[7]["a"], torch.ones(2))
    assert decode(encode(float("nan"))) != decode(encode(float("nan")))  # a NaN, still
    assert decode(encode(np.int64(3))) == 3 and type(decode(encode(np.int64(3)))) is int
    assert encode(torch.topk(torch.arange(4.0), 2)) == encode((torch.tensor([3.0, 2.0]), torch.tensor([3, 2])))


def test_what_the_format_does_not_carry_arrives_as_an_opaque_value():
    for obj, name in ((np.zeros(3), "ndarray"), ((x for x in "ab"), "generator"), (object(), "object"),
                      (10**400, "int"), ({1: 2}, "dict"), (torch.zeros(2).to_sparse(), "torch.sparse_coo tensor")):
        back = decode(encode(obj))
        assert isinstance(back, Opaque) and back.type_name == name, (back, name)
    nested = []
    for _ in range(100):
        nested = [nested]
    assert "nested" in repr(decode(encode(nested)))

    class Evil:
        def __repr__(self):
            raise RuntimeError("no")

        @property
        def __class__(self):
            raise RuntimeError("no")

    assert isinstance(decode(encode(Evil())), Opaque)


def _frame(head, blob=b""):
    h = json.dumps(head).encode()
    return MAGIC + struct.pack(">Q", len(h)) + h + blob


@pytest.mark.parametrize("data", [
    b"",
    b"not a message at all",
    pickle.dumps({"k": "result"}),
    MAGIC + struct.pack(">Q", 10**9) + b"{}",
    _frame({"v": {"n": 0}}),  # no tensor table
    _frame({"v": {"q": 1}, "t": []}),  # unknown tag
    _frame({"v": {"T": 0}, "t": []}),  # no such tensor
    _frame({"v": {"T": 0}, "t": [["float32", [2, 2], 0, 16]]}, b"\0" * 8),  # data too short
    _frame({"v": {"T": 0}, "t": [["float32", [2, 2], 0, 12]]}, b"\0" * 16),  # size does not match the shape
    _frame({"v": {"T": 0}, "t": [["object", [1], 0, 8]]}, b"\0" * 8),  # no such dtype
    _frame({"v": {"T": 0}, "t": [["float32", [-1], 0, 4]]}, b"\0" * 4),
    _frame({"v": {"d": [[1, {"n": 0}]]}, "t": []}),  # a non-string key
    MAGIC + struct.pack(">Q", 200003) + b"[" * 100000 + b"1" + b"]" * 100000,  # nested beyond any limit
], ids=range(13))
def test_malformed_messages_are_refused(data):
    with pytest.raises(WireError):
        decode(data)


def test_decoding_never_runs_code(tmp_path):
    flag = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(flag), "w"))

    for data in (pickle.dumps(Payload()), MAGIC + struct.pack(">Q", 2) + b"{}" + pickle.dumps(Payload())):
        with pytest.raises(WireError):
            decode(data)
    assert not flag.exists()


def test_frame_reader_splits_a_stream_and_refuses_oversized_frames():
    r = FrameReader(max_size=100)
    data = struct.pack(">Q", 3) + b"abc" + struct.pack(">Q", 2) + b"de"
    for i in range(len(data)):
        r.feed(data[i:i + 1])
    assert r.next() == b"abc" and r.next() == b"de" and r.next() is None
    r.feed(struct.pack(">Q", 101))
    with pytest.raises(WireError):
        r.next()


# -- the grader's checks on an answer --------------------------------------------------------


class _Pool:
    seed = 5
    plans: dict = {}


@pytest.fixture(scope="module")
def plan():
    return _plan(_Pool(), "ex01_router_topk")


def _answer(plan, name, ids=None, **extra):
    q = find_question(name)
    cases = plan.cases[name]
    ids = [c.id for c in cases] if ids is None else ids
    by_id = {c.id: c for c in cases}
    results = [{"id": i, "out": q.reference(*by_id[i].args, **by_id[i].kwargs) if i in by_id else None,
                "args_after": list(by_id[i].args) if i in by_id else [], "kwargs_after": {}} for i in ids]
    return decode(encode({"k": "result", "q": name, "missing": False, "results": results, "stdout": "",
                          "printed": 0, **extra}))


def test_a_complete_right_answer_passes(plan):
    assert _judge(find_question("router_probs"), plan, _answer(plan, "router_probs"), 2000).status == "pass"


@pytest.mark.parametrize("mangle", ["zero", "missing", "extra", "duplicate", "other_question", "not_a_list"])
def test_an_incomplete_or_misaddressed_answer_fails(plan, mangle):
    q = find_question("router_probs")
    ids = [c.id for c in plan.cases["router_probs"]]
    answer = {
        "zero": lambda: _answer(plan, "router_probs", ids=[]),
        "missing": lambda: _answer(plan, "router_probs", ids=ids[:-1]),
        "extra": lambda: _answer(plan, "router_probs", ids=ids + ["c99"]),
        "duplicate": lambda: _answer(plan, "router_probs", ids=ids[:-1] + ids[:1]),
        "other_question": lambda: {**_answer(plan, "router_probs"), "q": "router_logits"},
        "not_a_list": lambda: {**_answer(plan, "router_probs"), "results": "all passed"},
    }[mangle]()
    res = _judge(q, plan, answer, 2000)
    assert res.status == "fail" and res.points == 0, res


# -- forged messages from inside a submission -----------------------------------------------------

_FORGE = textwrap.dedent("""\
    def _forge(name, mode):
        import os, sys
        w = sys.modules["moe_grading_worker"]  # the grader's own encoder, in this process
        f = sys._getframe()
        while f.f_code.co_name != "child_main":
            f = f.f_back
        job, token, fd = f.f_locals["job"], f.f_locals["token"], f.f_locals["out_fd"]
        cases = job["cases"]
        if mode == "zero":
            cases = []
        if mode == "missing":
            cases = cases[:-1]
        results = [{"id": c["id"], "out": torch.zeros(1), "args_after": list(c["args"]),
                    "kwargs_after": dict(c["kwargs"])} for c in cases]
        msg = {"k": "result", "q": name, "missing": False, "results": results, "stdout": "",
               "printed": 0, "runtime": [], "t": "0" * 32 if mode == "token" else token}
        w.write_frame(fd, w.encode(msg))
        os._exit(0)
    """)


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox="none") as p:
        yield p


@pytest.mark.parametrize("mode", ["token", "zero", "missing", "complete"])
def test_well_formed_forged_answers_get_no_points(pool, tmp_path, mode):
    nb = mutate("ex01_router_topk", {"router_probs": f"def router_probs(logits):\n    _forge('router_probs', {mode!r})"},
                base=student("ex01_router_topk"))
    nb = add_cell(nb, _FORGE)
    report = grade_notebook(write(tmp_path, "ex01_router_topk", nb), pool=pool)
    q = next(q for q in report.questions if q.name == "router_probs")
    assert points(report)["router_probs"] == 0
    expect = {"token": "token", "zero": "incomplete", "missing": "incomplete", "complete": "wrong shape"}[mode]
    assert expect in q.message, q.message
    assert os.path.exists(tmp_path)
