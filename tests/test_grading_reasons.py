"""Every point a question loses comes with a reason a TA can read, and what the
machine did is not charged to the student.

* A busy machine: busy-loop processes ("burners", started and always killed by the
  test, each ending by itself within a minute anyway) share one CPU with every
  student process. Time limits count a question's own time (wall-clock time minus
  the time it waited for the CPU), so a correct master keeps full marks under a limit
  far below what the busy CPU stretches it to (wall-clock limits gave "not graded:
  loading your definitions did not finish ... look for top-level code"), while a
  loop and a sleep still run out of time. A machine too busy to finish at all gives
  "not graded", saying so.
* A worker that does not start gives "not graded", never a crash blamed on the code.
* The grader's own files changing while a submission's code runs withhold its grade,
  with that reason on every question; a change while none of its code runs costs it
  nothing (the lead's edits to the package during a test run once zeroed three
  questions with empty messages).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time

import pytest
from _grading_helpers import ROOT, SOLUTIONS, master, mutate, points, write

from moe_utils.grading import EXERCISES, WorkerPool, grade_notebook, grader
from moe_utils.grading.grader import SourceGuard

EX01, EX03 = "ex01_router_topk", "ex03_switch_capacity"
BURNERS = 20  # on one CPU: a student process gets about a twenty-first of it
TIGHT = 0.25  # seconds (a master question takes about 0.04 s here): far below the wall-clock time a master's questions take on the busy CPU
_BURN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox="none", seed=77) as p:
        p.ensure()
        yield p


@contextlib.contextmanager
def busy_cpu(pool: WorkerPool):
    """One CPU shared by BURNERS busy loops and every process the pool's worker starts."""
    cpu = max(os.sched_getaffinity(0))
    procs = []
    try:
        for _ in range(BURNERS):
            # each in its own session: with autogroup scheduling, a session shares the CPU as one
            procs.append(subprocess.Popen([sys.executable, "-c", _BURN], start_new_session=True))
            os.sched_setaffinity(procs[-1].pid, {cpu})
        pool.ensure()
        before = os.sched_getaffinity(pool.zygote_host_pid)
        os.sched_setaffinity(pool.zygote_host_pid, {cpu})  # the children it forks inherit this
        try:
            yield cpu
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(pool.zygote_host_pid, before)
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()


def _explained(report) -> None:
    for q in report.questions:
        assert q.message.strip() if q.status != "pass" else q.points == q.max_points, (q.name, q.status, q.message)


def _full(exercise: str) -> dict[str, float]:
    return {q.name: float(q.points) for q in EXERCISES[exercise]}


needs_scheduler = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or not os.path.exists("/proc/self/schedstat"),
    reason="needs Linux CPU affinity and scheduler statistics (without them, time limits are wall-clock time)")


@pytest.mark.slow
@needs_scheduler
def test_on_a_busy_cpu_a_master_keeps_full_marks_and_loops_and_sleeps_still_time_out(pool, tmp_path):
    nb = mutate(EX01, {
        "router_probs": ("return torch.softmax", "while True:\n        pass\n    return torch.softmax"),
        "switch_gate": ("return index, gate", "import time\n    time.sleep(60)\n    return index, gate"),
        "top_k_routing": ("top_p / top_p.sum(dim=-1, keepdim=True)", "top_p"),
    })
    path = write(tmp_path, EX01, nb)
    with busy_cpu(pool):
        master_report = grade_notebook(SOLUTIONS / f"{EX01}.ipynb", pool=pool, timeout=TIGHT)
        report = grade_notebook(path, pool=pool, timeout=TIGHT)
    assert master_report.score == master_report.max_score, {q.name: (q.status, q.message) for q in master_report.questions}
    _explained(master_report)
    _explained(report)
    by_name = {q.name: q for q in report.questions}
    assert {n: q.status for n, q in by_name.items()} == {
        "router_logits": "pass", "router_probs": "timeout", "top_k_routing": "fail", "switch_gate": "timeout"}
    # the loop shared the CPU with the burners: the time it waited is said, and was not counted
    assert "not counted" in by_name["router_probs"].message, by_name["router_probs"].message
    assert "hint:" in by_name["top_k_routing"].message


@pytest.mark.slow
@needs_scheduler
def test_a_machine_too_busy_to_finish_is_not_graded_and_says_so(pool, tmp_path):
    # router_logits spends 0.3 s of CPU once, well within its 3 s; this pool waits 3.5 s of
    # wall-clock time for that, far more than it takes on a quiet CPU, but on the busy CPU
    # (a twenty-first of it) it would take about 6 s
    spin = ("if not _SPUN:\n        _SPUN.append(1)\n        import time\n        t = time.process_time()\n"
            "        while time.process_time() - t < 0.3:\n            pass\n    return x.float()")
    nb = mutate(EX01, {"router_logits": ("return x.float()", spin)})
    nb["cells"].append({"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                        "source": "_SPUN = []"})
    path = write(tmp_path, EX01, nb)
    saved = pool.wait_factor, pool.wait_grace
    pool.wait_factor, pool.wait_grace = 1.0, 0.5
    try:
        quiet = grade_notebook(path, pool=pool, timeout=3.0)
        with busy_cpu(pool):
            busy = grade_notebook(path, pool=pool, timeout=3.0)
    finally:
        pool.wait_factor, pool.wait_grace = saved
    assert quiet.score == quiet.max_score, [q.message for q in quiet.questions]
    assert points(busy) == {**_full(EX01), "router_logits": 0}
    q = busy.questions[0]
    assert q.status == "not graded" and "waiting for a CPU" in q.message and "--timeout" in q.message, q.message
    _explained(busy)


@pytest.mark.parametrize("options, reason", [
    ({"start_timeout": 0.01}, "did not start within 0.01 s"),
    ({"python": shutil.which("false") or "/bin/false"}, "exited while starting"),
], ids=["too_slow", "exits"])
def test_a_worker_that_does_not_start_is_not_graded_not_blamed_on_the_code(options, reason):
    with WorkerPool(sandbox="none", **options) as p:
        report = grade_notebook(SOLUTIONS / f"{EX03}.ipynb", pool=p)
    assert report.score == 0 and len(report.questions) == len(EXERCISES[EX03])
    for q in report.questions:
        assert q.status == "not graded" and reason in q.message and "top-level" not in q.message, q.message
    assert report.load_errors == []


# -- the grader's own files -------------------------------------------------------------------


@pytest.fixture
def guarded_copy(tmp_path, monkeypatch):
    """The grader watches a copy of the package (so a test can change it), not the checkout."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "moe_utils", pkg / "moe_utils", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(grader, "GUARD", SourceGuard(pkg / "moe_utils"))
    return pkg / "moe_utils" / "viz.py"


def test_grader_files_changed_while_its_code_runs_withhold_the_grade_and_every_question_says_why(
        pool, tmp_path, guarded_copy):
    # a file-size limit of 0 stops every write, but not emptying a file
    attack = f"open({str(guarded_copy)!r}, 'w').close()\n    return torch.softmax"
    nb = mutate(EX01, {"router_probs": ("return torch.softmax", attack)})
    report = grade_notebook(write(tmp_path / "nb", EX01, nb), pool=pool)
    assert report.tampered == ["moe_utils/viz.py"] and report.score == 0
    assert "withheld" in report.error
    for q in report.questions:
        assert q.status == "not graded" and q.points == 0 and "changed while this submission's code was running" in q.message
    assert "Before that check: pass, 1/1" in report.questions[0].message  # router_logits, graded before the change


def test_grader_files_changed_between_its_questions_cost_nothing_and_are_noted(pool, tmp_path, guarded_copy,
                                                                               monkeypatch):
    judge = grader._judge

    def judge_then_edit(*args, **kwargs):  # runs after a question's processes ended, before the next starts
        guarded_copy.write_bytes(guarded_copy.read_bytes() + b"\n# an edit by someone else\n")
        monkeypatch.setattr(grader, "_judge", judge)
        return judge(*args, **kwargs)

    monkeypatch.setattr(grader, "_judge", judge_then_edit)
    report = grade_notebook(write(tmp_path, EX01, master(EX01)), pool=pool)
    assert report.score == report.max_score and report.tampered == [] and report.error is None
    assert any("none of this submission's code was running (moe_utils/viz.py)" in n for n in report.grading["notes"])
    assert grader.GUARD.outside == ["moe_utils/viz.py"]  # the command still warns and exits with status 3


def test_the_guard_sees_a_same_size_rewrite_whose_times_were_set_back(tmp_path):
    root = tmp_path / "moe_utils"
    root.mkdir()
    target = root / "grader.py"
    target.write_text("POINTS = 1\n")
    guard = SourceGuard(root)
    guard.racy_ns = 0  # as if the file had been written long ago: its cached hash is trusted
    assert guard.changed() == []
    st = target.stat()
    time.sleep(0.05)  # past the file system clock's tick (what ``racy_ns`` is for)
    target.write_text("POINTS = 9\n")  # same size, same inode
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert guard.changed() == ["moe_utils/grader.py"]  # the change time gave it away
    assert guard.changed() == []
    (root / "new.py").write_text("")
    target.unlink()
    assert guard.changed() == ["moe_utils/grader.py", "moe_utils/new.py"]


# -- starving itself on purpose -------------------------------------------------------------

# an endless loop that starts a CPU-burning helper (each handing over to a fresh process before
# its CPU limit) and then lowers its own priority: its main thread spends most of its time
# "waiting for a CPU", which a clock that forgives all waiting would not charge
_STARVE_LOOP = '''
import os, time, torch
def router_logits(x, w_gate):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    if os.fork() == 0:
        end = time.monotonic() + 30
        while time.monotonic() < end:
            t = time.process_time()
            while time.process_time() - t < 3 and time.monotonic() < end:
                pass
            if os.fork() != 0:
                os._exit(0)
        os._exit(0)
    os.nice(19)
    while True:
        pass
'''

# correct but slow: 1.5 s of CPU per call done by a helper process at normal priority while the
# main thread spins at the lowest priority on the same CPU (before the fix: full marks in 14 s
# of wall-clock time against a 2 s limit)
_STARVE_SLOW = '''
import os, time, pickle, struct, torch
_srv = []
def _rd(fd, n):
    b = b""
    while len(b) < n:
        try:
            c = os.read(fd, n - len(b))
        except BlockingIOError:
            continue
        if not c:
            raise EOFError
        b += c
    return b
def router_probs(logits):
    if not _srv:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        a_r, a_w = os.pipe(); b_r, b_w = os.pipe()
        if os.fork() == 0:
            while True:
                n, = struct.unpack('>Q', _rd(a_r, 8))
                x = pickle.loads(_rd(a_r, n))
                t = time.process_time()
                while time.process_time() - t < 1.5:
                    pass
                out = pickle.dumps(torch.softmax(torch.tensor(x).float(), dim=-1).tolist())
                os.write(b_w, struct.pack('>Q', len(out)) + out)
        os.nice(19)
        os.set_blocking(b_r, False)
        _srv.extend([a_w, b_r])
    a_w, b_r = _srv
    msg = pickle.dumps(logits.double().tolist())
    os.write(a_w, struct.pack('>Q', len(msg)) + msg)
    n, = struct.unpack('>Q', _rd(b_r, 8))
    return torch.tensor(pickle.loads(_rd(b_r, n)), dtype=torch.float32).reshape(logits.shape)
'''


@pytest.mark.slow
@needs_scheduler
def test_code_that_starves_itself_is_charged_wall_clock_time(pool, tmp_path):
    nb = mutate(EX01, {"router_logits": _STARVE_LOOP, "router_probs": _STARVE_SLOW})
    start = time.monotonic()
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool, timeout=2.0)
    took = time.monotonic() - start
    by_name = {q.name: q for q in report.questions}
    assert by_name["router_logits"].status == "timeout", by_name["router_logits"].message
    assert by_name["router_probs"].status == "timeout", by_name["router_probs"].message
    assert points(report) == {**_full(EX01), "router_logits": 0, "router_probs": 0}
    # each of the two costs about its 2 s limit, not the 3 x 2 + 10 s given to a busy machine
    assert took < 30, took
