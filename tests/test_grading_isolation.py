"""What a student's process is given, and what happens to everything it starts.

A probe function reports what it can see from inside (open descriptors, session,
limits, working directory, environment, references and question objects in
memory) by raising an exception whose message the grader then shows. Processes a
probe starts carry a marker on their command line, so the test can check they are
gone and end any that are not (by id). The last tests need bubblewrap and are
skipped where it cannot start a sandbox (CI machines do not have it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import textwrap

import pytest
from _grading_helpers import ROOT, SLEEP, add_cell, end_marked, master, mutate, new_marker, points, wait_gone, write

from moe_utils.grading import WorkerPool, grade_notebook
from moe_utils.grading.grader import SANDBOX_HIDE
from moe_utils.grading.pool import sandbox_command

EX01, EX02, EX03 = "ex01_router_topk", "ex02_balance_losses", "ex03_switch_capacity"


@pytest.fixture(scope="module")
def pool():
    os.environ["MOE_TEST_SECRET"] = "do not pass this on"
    try:
        with WorkerPool(sandbox="none", max_procs=8) as p:
            p.ensure()
            yield p
    finally:
        os.environ.pop("MOE_TEST_SECRET", None)


@pytest.fixture
def marker():
    m = new_marker()
    yield m
    end_marked(m)


def _info(report, question: str) -> dict:
    q = next(q for q in report.questions if q.name == question)
    m = re.search(r"INFO(\{.*?\})( \(at|$)", q.cases[0]["message"] if q.cases else q.message, re.S)
    assert m, q.message
    return json.loads(m.group(1))


_SEE = textwrap.dedent("""\
    def capacity_kept(indices, num_experts, capacity):
        import gc, json, os, resource, sys
        objs = gc.get_objects()
        names = [getattr(o, "__name__", None) for o in objs if callable(o)]
        refs = sorted({n for n in names if isinstance(n, str) and n.startswith("ref_")})
        kinds = sorted({type(o).__name__ for o in objs if type(o).__name__ in ("Question", "Case", "_Plan")})
        info = {
            "refs": refs, "kinds": kinds, "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
            "session": os.getsid(0) == os.getpid(), "group": os.getpgid(0) == os.getpid(),
            "fsize": resource.getrlimit(resource.RLIMIT_FSIZE)[1],
            "as": resource.getrlimit(resource.RLIMIT_AS)[1], "cpu": resource.getrlimit(resource.RLIMIT_CPU)[1],
            "cwd": os.listdir("."), "cwd_path": os.getcwd(), "env": sorted(os.environ),
            "mods": sorted(m for m in sys.modules if m.startswith("moe_utils")),
        }
        raise RuntimeError("INFO" + json.dumps(info))
    """)


def test_the_student_process_holds_inputs_and_nothing_else(pool, tmp_path):
    nb = mutate(EX03, {"capacity_kept": _SEE})
    report = grade_notebook(write(tmp_path, EX03, nb), pool=pool, timeout=5.0)
    info = _info(report, "capacity_kept")
    assert info["refs"] == ["ref_buffer_positions"], "only the reference capacity_kept builds on"
    assert info["kinds"] == [], "no question or case objects (no expected values) in the student's process"
    assert len(info["fds"]) == 5 and info["fds"][:3] == [0, 1, 2]  # stdio, the answer pipe, listdir's own
    assert info["session"] and info["group"]
    assert info["fsize"] == 0 and 0 < info["as"] < 2**60 and 0 < info["cpu"] <= 13
    assert info["cwd"] == [] and not info["cwd_path"].startswith(str(ROOT))
    assert "MOE_TEST_SECRET" not in info["env"]
    assert info["mods"] == ["moe_utils", "moe_utils.grading"]  # the stubs behind the check imports


def test_a_graded_function_cannot_write_files(pool, tmp_path):
    outside = tmp_path / "outside.txt"
    nb = mutate(EX01, {"router_probs": ("return torch.softmax", textwrap.dedent(f"""\
        for p in ("inside.txt", {str(outside)!r}):
            try:
                with open(p, "w") as fh:
                    fh.write("x" * 100)
            except OSError as exc:
                raise RuntimeError(str(exc)) from None
        return torch.softmax""").replace("\n", "\n    "))})
    report = grade_notebook(write(tmp_path / "nb", EX01, nb), pool=pool)
    q = next(q for q in report.questions if q.name == "router_probs")
    assert q.points == 0 and "File too large" in q.message, q.message
    assert not outside.exists() or outside.stat().st_size == 0


def _detach_sleeper(marker: str) -> str:
    return textwrap.dedent(f"""\
        import os
        if os.fork() == 0:
            try:
                os.setsid()
                if os.fork() == 0:
                    os.execv({SLEEP!r}, ["sleep", {marker!r}])
            finally:
                os._exit(0)
        os.wait()
        """)


def test_too_many_processes_stop_the_question(pool, tmp_path, marker):
    nb = mutate(EX01, {"router_probs": ("return torch.softmax", textwrap.dedent(f"""\
        import os, time
        for _ in range(12):
            if os.fork() == 0:
                os.execv({SLEEP!r}, ["sleep", {marker!r}])
        time.sleep(3)
        return torch.softmax""").replace("\n", "\n    "))})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool, timeout=8.0)
    q = next(q for q in report.questions if q.name == "router_probs")
    assert q.points == 0 and q.status in ("crashed", "fail"), (q.status, q.message)
    if os.geteuid() == 0:  # RLIMIT_NPROC does not bind root: the watchdog did it
        assert "more than 8 processes" in q.message
    assert wait_gone(marker) == []
    assert report.score == report.max_score - 2


def test_a_timeout_kills_what_the_function_started(pool, tmp_path, marker):
    body = _detach_sleeper(marker) + "while True:\n    pass\n"
    nb = mutate(EX01, {"router_probs": ("return torch.softmax", body.replace("\n", "\n    ") + "return torch.softmax")})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool, timeout=1.0)
    assert points(report)["router_probs"] == 0
    assert next(q for q in report.questions if q.name == "router_probs").status == "timeout"
    assert wait_gone(marker) == []


def test_processes_started_at_load_time_are_killed_with_each_question(pool, tmp_path, marker):
    nb = add_cell(master(EX02), "class _Daemon:\n    " + _detach_sleeper(marker).replace("\n", "\n    "))
    report = grade_notebook(write(tmp_path, EX02, nb), pool=pool)
    assert report.score == report.max_score
    assert wait_gone(marker) == []
    assert any("were killed" in f for f in report.flags)


def test_killing_its_parent_costs_the_question_and_its_orphans_die_too(pool, tmp_path, marker):
    body = _detach_sleeper(marker) + "import signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    nb = mutate(EX01, {"router_probs": ("return torch.softmax", body.replace("\n", "\n    ") + "return torch.softmax")})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert points(report) == {"router_logits": 1, "router_probs": 0, "top_k_routing": 3, "switch_gate": 2}
    assert "killed" in next(q for q in report.questions if q.name == "router_probs").message
    assert wait_gone(marker) == []
    assert grade_notebook(ROOT / "exercises" / "solutions" / f"{EX01}.ipynb", pool=pool).score == 8


_SPIN = "class Spin{}:\n    while True:\n        pass"


def test_several_hanging_statements_are_skipped(pool, tmp_path):
    two = add_cell(add_cell(master(EX02), _SPIN.format(1)), _SPIN.format(2))
    report = grade_notebook(write(tmp_path, EX02, two), timeout=0.5, pool=pool)
    assert report.score == 8 and sum("Spin" in e for e in report.load_errors) == 2


@pytest.mark.slow
def test_after_three_hanging_statements_loading_gives_up(pool, tmp_path):
    nb = master(EX02)
    for i in range(4):
        nb = add_cell(nb, _SPIN.format(i))
    report = grade_notebook(write(tmp_path, EX02, nb), timeout=0.5, pool=pool)
    assert report.score == 0 and {q.status for q in report.questions} == {"not graded"}
    assert sum("Spin" in e for e in report.load_errors) == 3


def test_a_statement_that_ends_the_process_while_loading_costs_only_itself(pool, tmp_path):
    nb = add_cell(master(EX02), "class _End:\n    import os\n    os._exit(3)")
    report = grade_notebook(write(tmp_path, EX02, nb), pool=pool)
    assert report.score == 8, [q.message for q in report.questions]
    assert any("_End" in e and "ended the process" in e for e in report.load_errors), report.load_errors


def test_an_output_too_large_to_send_fails_its_question(pool, tmp_path):
    nb = mutate(EX01, {"router_logits": ("return x.float() @ w_gate.float()", "return torch.zeros(20_000_000)")})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    q = next(q for q in report.questions if q.name == "router_logits")
    assert q.points == 0 and "cannot be sent" in q.message, q.message
    assert report.score == 7


def test_the_grading_command_makes_its_memory_unreadable_to_other_processes():
    # PR_SET_DUMPABLE 0: same-user processes can no longer ptrace it or read /proc/<pid>/mem
    import ctypes

    from moe_utils.grading.worker import not_dumpable

    pid = os.fork()
    if pid == 0:  # try it in a throwaway child, not in the test process
        try:
            before = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)
            ok = not_dumpable() and ctypes.CDLL(None).prctl(3, 0, 0, 0, 0) == 0
            os._exit(0 if before == 1 and ok else 1)
        finally:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert "not_dumpable()" in (ROOT / "moe_utils" / "grading" / "__main__.py").read_text()


# -- bubblewrap, where it works -------------------------------------------------------------------


def _bwrap_works() -> bool:
    scratch = ROOT / ".pytest-bwrap-probe"
    scratch.mkdir(exist_ok=True)
    try:
        return sandbox_command([], str(scratch)) is not None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


needs_bwrap = pytest.mark.skipif(not shutil.which("bwrap") or not _bwrap_works(),
                                 reason="bubblewrap is not installed or cannot start a sandbox here")


@needs_bwrap
def test_in_bubblewrap_the_repository_is_read_only_the_submissions_hidden_and_no_network(tmp_path):
    target = ROOT / "pyproject.toml"  # writing its own first byte back: harmless even if it worked
    before = target.read_bytes()
    nb = mutate(EX03, {"capacity_kept": textwrap.dedent(f"""\
        def capacity_kept(indices, num_experts, capacity):
            import json, os, socket
            info = {{"folder": os.listdir({str(tmp_path)!r}), "pid1": os.path.exists("/proc/{os.getpid()}"),
                    "bank": os.path.exists({str(ROOT / "moe_utils" / "grading" / "bank")!r}),
                    "masters": os.listdir({str(ROOT / "exercises" / "solutions")!r})}}
            try:
                open({str(target)!r}, "r+b").write({before[:1]!r})
                info["write"] = "written"
            except OSError as exc:
                info["write"] = exc.strerror
            try:
                socket.create_connection(("192.0.2.1", 80), timeout=2)
                info["net"] = "connected"
            except OSError as exc:
                info["net"] = str(exc)
            raise RuntimeError("INFO" + json.dumps(info))
        """)})
    path = write(tmp_path, EX03, nb)
    with WorkerPool(sandbox="bwrap", hide=[str(tmp_path), *SANDBOX_HIDE]) as p:
        report = grade_notebook(path, pool=p)
        assert report.grading["sandbox"] == "bubblewrap"
        info = _info(report, "capacity_kept")
        assert grade_notebook(ROOT / "exercises" / "solutions" / f"{EX03}.ipynb", pool=p).score == 10
    assert target.read_bytes() == before
    assert info["write"] == "Read-only file system"
    assert info["folder"] == [] and info["pid1"] is False
    assert info["bank"] is False and info["masters"] == []  # neither the references nor the solutions
    assert "unreachable" in info["net"].lower() or "not permitted" in info["net"].lower(), info["net"]
