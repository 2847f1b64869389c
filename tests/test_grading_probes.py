"""Red-team probes (issue 10): submissions that try to cheat the grader or sabotage
other students' grades. Each test is a probe that worked against the first grader;
each now has to fail to cheat.

Probes that start processes mark them (see ``_grading_helpers``), assert they are gone
after grading, and end any that are left, by process id. The fork bomb is 50
sleeping processes and the memory hog 2 GiB: bounded on a shared machine even where
a limit did not work. One worker pool serves the in-process probes (folder mode too);
the command line is run twice (one notebook, a folder), as a lecturer runs it, each
run carrying several probes: every run starts Python, torch and a worker.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from _grading_helpers import (
    ROOT,
    SLEEP,
    add_cell,
    cli,
    end_marked,
    master,
    mutate,
    new_marker,
    notes,
    points,
    student,
    wait_gone,
    write,
)

from moe_utils.grading import EXERCISES, WorkerPool, grade_folder, grade_notebook
from moe_utils.grading.grader import write_csv

EX01, EX02, EX03, EX05 = "ex01_router_topk", "ex02_balance_losses", "ex03_switch_capacity", "ex05_dispatch_metadata"
EX04 = "ex04_mixtral_block"
# "auto" uses bubblewrap where it works; MOE_GRADING_TEST_SANDBOX=none runs the probes without it
SANDBOX = os.environ.get("MOE_GRADING_TEST_SANDBOX", "auto")


def _full(exercise: str) -> dict[str, float]:
    return {q.name: float(q.points) for q in EXERCISES[exercise]}


def _total(exercise: str) -> float:
    return float(sum(q.points for q in EXERCISES[exercise]))


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(sandbox=SANDBOX) as p:
        yield p


@pytest.fixture
def marker():
    m = new_marker()
    yield m
    end_marked(m)


def _detached(code: str, marker: str) -> str:
    """Notebook code that, at load time, starts ``code`` as a detached process (its
    own session, parent gone) that inherits every descriptor of the grading child."""
    return textwrap.dedent(f"""\
        class _Detach:
            import os, sys
            _pid = os.fork()
            if _pid == 0:
                try:
                    os.setsid()
                    if os.fork() == 0:
                        for _fd in range(3, 64):
                            try:
                                os.set_inheritable(_fd, True)
                            except OSError:
                                pass
                        os.execv(sys.executable, [sys.executable, "-c", {code!r}, {marker!r}])
                finally:
                    os._exit(0)
            os.waitpid(_pid, 0)
        """)


# -- finding 1: folder mode, a detached process holding the result pipe ---------------

_SABOTEUR = textwrap.dedent("""\
    import json, os, time
    line = json.dumps({"event": "result", "question": "x", "stdout": "", "printed": 0, "cases": [
        {"name": "random float32", "public": False, "passed": False,
         "message": "output: values differ (max abs diff 0.5)"}]})
    fds = []
    for fd in range(3, 64):
        try:
            os.set_blocking(fd, False)
            fds.append(fd)
        except OSError:
            pass
    end = time.time() + 20
    while time.time() < end:
        for fd in fds:
            try:
                os.write(fd, ("\\n" + line + "\\n").encode())
            except OSError:
                pass
        time.sleep(0.002)
    """)


def test_probe_folder_sabotage_by_a_detached_process_holding_the_result_pipe(pool, tmp_path, marker):
    subs = tmp_path / "subs"
    settle = "class _Settle:\n    import time\n    time.sleep(0.3)  # the writer is up before grading goes on\n"
    write(subs / "a_saboteur", EX01, add_cell(student(EX01), _detached(_SABOTEUR, marker) + settle))
    for name, ex in (("b_alice", EX01), ("c_bob", EX03), ("d_carol", EX05)):
        write(subs / name, ex, master(ex))
    reports = {r.student: r for r in grade_folder(subs, timeout=5.0, pool=pool)}
    assert {s: reports[s].score for s in ("b_alice", "c_bob", "d_carol")} == {
        "b_alice": _total(EX01), "c_bob": _total(EX03), "d_carol": _total(EX05)}, {
        s: [q.message for q in r.questions if q.status != "pass"] for s, r in reports.items()}
    assert reports["a_saboteur"].score == 0
    assert wait_gone(marker) == []


# -- finding 2: the comparison must not run where student code runs --------------------

_RUNNER_REPLACEMENT = textwrap.dedent("""\
    class _Replace:
        import moe_utils.grading.runner as _r

        def _always_pass(fn, q, case, expected=None, capture=None, _r=_r):
            return _r.CaseResult(case.name, case.public, True)

        _r.run_case = _always_pass
    """)


def test_probe_untouched_stub_plus_a_cell_replacing_the_case_runner(pool, tmp_path):
    nb = add_cell(student(EX01), _RUNNER_REPLACEMENT)
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert report.score == 0, points(report)
    assert "moe_utils" in notes(report)


_ZEROS = {
    "router_logits": "def router_logits(x, w_gate):\n    return torch.zeros(x.shape[0], w_gate.shape[1])",
    "router_probs": "def router_probs(logits):\n    return torch.zeros(logits.shape)",
    "top_k_routing": ("def top_k_routing(probs, k):\n    T = probs.shape[0]\n"
                      "    return torch.zeros(T, k, dtype=torch.int64), torch.zeros(T, k, dtype=probs.dtype)"),
    "switch_gate": ("def switch_gate(probs):\n    T = probs.shape[0]\n"
                    "    return torch.zeros(T, dtype=torch.int64), torch.zeros(T, dtype=probs.dtype)"),
}


def test_probe_allclose_and_equal_monkeypatched_at_load_time(pool, tmp_path):
    nb = add_cell(mutate(EX01, _ZEROS), textwrap.dedent("""\
        class _Patch:
            import torch
            torch.allclose = lambda *a, **k: True
            torch.equal = lambda *a, **k: True
        """))
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert report.score == 0, points(report)


_FRAME_READER = textwrap.dedent("""\
    def _from_caller():
        import sys
        f = sys._getframe(2)
        while f is not None:
            e = f.f_locals.get("expected")
            if isinstance(e, tuple) and len(e) == 2:
                v = e[0]
                return tuple(t.clone() for t in v) if isinstance(v, tuple) else v.clone()
            f = f.f_back
        return None
    """)

_FROM_CALLER = {
    "router_logits": "def router_logits(x, w_gate):\n    return _from_caller()",
    "router_probs": "def router_probs(logits):\n    return _from_caller()",
    "top_k_routing": "def top_k_routing(probs, k):\n    return _from_caller()",
    "switch_gate": "def switch_gate(probs):\n    return _from_caller()",
}


def test_probe_function_reading_expected_from_the_callers_stack_frame(pool, tmp_path):
    nb = mutate(EX01, _FROM_CALLER)
    nb["cells"].insert(2, {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
                           "source": _FRAME_READER})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert report.score == 0, points(report)


def test_probe_frame_reader_fails_its_own_self_check_too():
    from moe_utils.grading import check_router_probs

    ns: dict = {}
    exec(_FRAME_READER + "\n" + _FROM_CALLER["router_probs"], ns)
    with pytest.raises(AssertionError):
        check_router_probs(ns["router_probs"])


def _forger(with_cases: bool) -> str:
    case = '[{"name": "forged", "public": True, "passed": True, "message": ""}]' if with_cases else "[]"
    return textwrap.dedent(f"""\
        def _forge(name):
            import json, os
            msg = {{"event": "result", "question": name, "cases": {case}, "stdout": "", "printed": 0}}
            line = ("\\n" + json.dumps(msg) + "\\n").encode()
            for fd in range(3, 64):
                try:
                    os.write(fd, line)
                except OSError:
                    pass
        """)


_FORGING = {
    "router_logits": "def router_logits(x, w_gate):\n    _forge('router_logits')",
    "router_probs": "def router_probs(logits):\n    _forge('router_probs')",
    "top_k_routing": "def top_k_routing(probs, k):\n    _forge('top_k_routing')",
    "switch_gate": "def switch_gate(probs):\n    _forge('switch_gate')",
}


@pytest.mark.parametrize("with_cases", [True, False], ids=["forged_passing_cases", "forged_zero_cases"])
def test_probe_forged_result_messages_on_the_pipe(pool, tmp_path, with_cases):
    nb = add_cell(mutate(EX01, _FORGING, base=student(EX01)), _forger(with_cases))
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert report.score == 0, points(report)


# -- finding 3: references and hidden cases are importable ------------------------------


def test_probe_importing_the_question_bank(pool, tmp_path):
    nb = add_cell(student(EX01), (
        "from moe_utils.grading.questions import (\n"
        "    ref_router_logits as router_logits,\n"
        "    ref_router_probs as router_probs,\n"
        "    ref_switch_gate as switch_gate,\n"
        "    ref_top_k_routing as top_k_routing,\n"
        ")\n"))
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert report.score == 0, points(report)
    assert "moe_utils.grading.questions" in notes(report)


def test_probe_plain_import_moe_utils_then_attribute_access(pool, tmp_path):
    nb = mutate(EX02, {
        "switch_aux_loss": ("import moe_utils\n\n\ndef switch_aux_loss(probs, top1, alpha=1e-2):\n"
                            "    return moe_utils.losses.switch_load_balancing_loss(probs, top1, alpha)"),
        "router_z_loss": "def router_z_loss(logits):\n    return moe_utils.losses.router_z_loss(logits)",
    })
    report = grade_notebook(write(tmp_path, EX02, nb), pool=pool)
    assert "moe_utils" in notes(report)
    assert points(report) == {"switch_aux_loss": 0, "topk_aux_loss": 3, "router_z_loss": 0}


# -- finding 4: reports and the grader's own files; the command line ------------------------


def test_cli_one_notebook_json_and_junit_and_a_detached_process_cannot_rewrite_the_report(tmp_path, marker):
    report_path = tmp_path / "r.json"
    rewriter = textwrap.dedent(f"""\
        import json, os, time
        path = {str(report_path)!r}
        end = time.time() + 15
        while time.time() < end and not os.path.exists(path):
            time.sleep(0.02)
        time.sleep(0.3)
        try:
            data = json.load(open(path))
            data["score"] = data["max_score"]
            open(path, "w").write(json.dumps(data))
        except Exception:
            pass
        """)
    nb = mutate(EX03, {"expert_capacity": ("num_experts))", "num_experts) + 1)")})
    path = write(tmp_path, EX03, add_cell(nb, _detached(rewriter, marker)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's grader, not an installed one
    proc = cli("grade", path.name, "--json", "r.json", "--junit", "r.xml", "--sandbox", "none", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "expert_capacity" in proc.stdout and "8/10" in proc.stdout
    time.sleep(1.5)  # the rewriter, had it survived grading, would have struck by now
    assert wait_gone(marker) == []
    data = json.loads(report_path.read_text())
    assert data["score"] == 8 and data["max_score"] == 10 and data["exercise"] == EX03
    assert {q["name"]: q["status"] for q in data["questions"]}["expert_capacity"] == "fail"
    assert data["grading"]["sandbox"] == "rlimits" and isinstance(data["grading"]["seed"], int)
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("tests") == "4" and suite.get("failures") == "1"
    assert [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None] == ["expert_capacity"]
    assert str(tmp_path) not in report_path.read_text() + (tmp_path / "r.xml").read_text()



def _package_copy(tmp_path: Path) -> tuple[Path, dict]:
    """A copy of moe_utils that a probe may attack; the CLI runs from it."""
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "moe_utils", pkg / "moe_utils", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(pkg), PYTHONDONTWRITEBYTECODE="1")
    return pkg / "moe_utils" / "grading", env


def test_cli_folder_into_csv_json_junit_with_symlinks_pipes_and_attacks_on_the_graders_source(tmp_path):
    grading, env = _package_copy(tmp_path)  # the command runs from a copy the attacks may hit
    appended, emptied = grading / "grader.py", grading / "pool.py"
    before = appended.read_bytes()
    subs = tmp_path / "submitted"
    payload = ("\n\ntry:\n    def _judge(q, plan, result, max_print):\n"
               "        return QuestionResult(q.name, q.points, q.points, 'pass', '')\nexcept Exception:\n    pass\n")
    for name, nb in {
        "alice": master(EX04),
        "bob": student(EX04),
        "carol": mutate(EX04, {"mixtral_block_forward": (
            "(top_p / top_p.sum(dim=-1, keepdim=True)).to(x.dtype)", "top_p.to(x.dtype)")}),
        "dave": mutate(EX04, {"swiglu_expert": "from moe_utils.experts import SwiGLU"}),
        # without a sandbox (the harder case; a sandbox would hide the copy): appending needs
        # the file to grow, which the file-size limit stops; emptying it does not, so that is
        # detected, the submission named, its grade withheld, and the command exits with 3
        "eve": add_cell(master(EX04), f"class _Append:\n    try:\n        open({str(appended)!r}, 'a').write("
                                      f"{payload!r})\n    except Exception:\n        pass\n"),
        "mallory": add_cell(master(EX04), f"class _Empty:\n    open({str(emptied)!r}, 'w').close()\n"),
    }.items():
        write(subs / name, EX04, nb)
    # a symlink to the master must not earn its marks; a named pipe must not hang the grader
    (subs / "erin").mkdir()
    (subs / "erin" / f"{EX04}.ipynb").symlink_to(ROOT / "exercises" / "solutions" / f"{EX04}.ipynb")
    (subs / "frank").symlink_to(subs / "alice", target_is_directory=True)
    (subs / "gina").mkdir()
    os.mkfifo(subs / "gina" / f"{EX04}.ipynb")
    proc = cli("grade", "submitted", "--csv", "grades.csv", "--json", "all.json", "--junit", "all.xml",
               "--sandbox", "none", cwd=tmp_path, env=env, timeout=180)
    assert appended.read_bytes() == before, "a submission appended to the grader's source"
    assert emptied.read_bytes() == b"", "the probe did not empty the file: it tests nothing"
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "while mallory was being graded" in proc.stderr and "while eve was" not in proc.stderr, proc.stderr
    rows = {r["student"]: r for r in csv.DictReader((tmp_path / "grades.csv").open())}
    assert {s: (r["swiglu_expert"], r["mixtral_block_forward"], r["total"], r["max"]) for s, r in rows.items()} == {
        "alice": ("2", "4", "6", "6"),
        "bob": ("0", "0", "0", "6"),
        "carol": ("2", "0", "2", "6"),
        "dave": ("0", "4", "4", "6"),
        "erin": ("0", "0", "0", "6"),
        "eve": ("2", "4", "6", "6"),
        "gina": ("0", "0", "0", "6"),
        "mallory": ("0", "0", "0", "6"),
    }
    assert rows["carol"]["problems"].startswith("mixtral_block_forward: fail")
    assert "moe_utils.experts" in rows["dave"]["flags"] and rows["alice"]["flags"] == ""
    assert "symbolic link" in rows["erin"]["problems"] and "regular file" in rows["gina"]["problems"]
    assert "withheld" in rows["mallory"]["problems"] and "withheld" not in rows["eve"]["problems"]
    assert len(json.loads((tmp_path / "all.json").read_text())["submissions"]) == 8
    assert len(ET.parse(tmp_path / "all.xml").getroot().findall("testsuite")) == 8
    assert "alice" in proc.stdout and "grades.csv" in proc.stdout


# -- findings 5 and 6: a killed parent, forks, memory -------------------------------------


def test_probe_killed_parent_costs_one_question_not_the_run(pool, tmp_path):
    killer = mutate(EX01, {"router_probs": ("return torch.softmax", (
        "import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    return torch.softmax"))})
    subs = tmp_path / "subs"
    write(subs / "a_killer", EX01, killer)
    write(subs / "b_alice", EX01, master(EX01))
    write(subs / "c_bob", EX02, master(EX02))
    reports = grade_folder(subs, pool=pool)
    write_csv(reports, tmp_path / "grades.csv")
    rows = {r["student"]: r for r in csv.DictReader((tmp_path / "grades.csv").open())}
    assert float(rows["b_alice"]["total"]) == _total(EX01)
    assert float(rows["c_bob"]["total"]) == _total(EX02)
    assert float(rows["a_killer"]["total"]) == _total(EX01) - 2  # router_probs only


def test_probe_fork_bomb_of_sleeping_processes_is_gone_after_grading(pool, tmp_path, marker):
    bomb = mutate(EX01, {"router_probs": ("return torch.softmax", textwrap.dedent(f"""\
        if not _FORKED:
            _FORKED.append(1)
            import os
            for _ in range(50):
                try:
                    pid = os.fork()
                except OSError:
                    break
                if pid == 0:
                    try:
                        os.setsid()
                        os.execv({SLEEP!r}, ["sleep", {marker!r}])
                    finally:
                        os._exit(0)
        return torch.softmax""").replace("\n", "\n    "))})
    bomb = add_cell(bomb, "_FORKED = []")
    report = grade_notebook(write(tmp_path, EX01, bomb), pool=pool, timeout=5.0)
    left = wait_gone(marker)
    assert left == [], f"{len(left)} forked processes outlived grading"
    full = _full(EX01)
    assert {q: p for q, p in points(report).items() if q != "router_probs"} == {
        q: p for q, p in full.items() if q != "router_probs"}


def test_probe_memory_hog_is_stopped_by_a_limit(pool, tmp_path):
    hog = mutate(EX01, {"router_logits": ("return x.float()", (
        "if not _HOG:\n"
        "        _HOG.append(None)  # one attempt per process, not one per case\n"
        "        _HOG.append([torch.ones(64 * 2**20) for _ in range(8)])  # 2 GiB, touched\n"
        "    return x.float()"))})
    hog = add_cell(hog, "_HOG = []")
    report = grade_notebook(write(tmp_path, EX01, hog), pool=pool, timeout=20.0)
    assert points(report) == {**_full(EX01), "router_logits": 0}
    q = next(q for q in report.questions if q.name == "router_logits")
    assert q.status in ("fail", "crashed") and "memory" in q.message.lower(), (q.status, q.message)


# -- finding 7: test-case gaps -----------------------------------------------------------


def test_probe_value_masking_top_k_that_breaks_on_ties(pool, tmp_path):
    nb = mutate(EX01, {"top_k_routing": ("return top_i, top_p / top_p.sum(dim=-1, keepdim=True)", (
        "kept = torch.where(probs >= top_p[:, -1:], probs, torch.zeros_like(probs))\n"
        "    return top_i, top_p / kept.sum(dim=-1, keepdim=True)"))})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert points(report) == {**_full(EX01), "top_k_routing": 0}


@pytest.mark.parametrize("naive", [
    "torch.log(torch.exp(logits).sum(dim=-1)).pow(2).mean()",
    "torch.log(torch.exp(logits.double()).sum(dim=-1)).pow(2).mean().to(logits.dtype)",
], ids=["float32", "via_float64"])
def test_probe_naive_log_sum_exp_overflows_in_float32(pool, tmp_path, naive):
    nb = mutate(EX02, {"router_z_loss": ("torch.logsumexp(logits, dim=-1).pow(2).mean()", naive)})
    report = grade_notebook(write(tmp_path, EX02, nb), pool=pool)
    assert points(report) == {**_full(EX02), "router_z_loss": 0}


# -- finding 8: minor ----------------------------------------------------------------------


def test_probe_hang_at_load_time_costs_only_what_it_must(pool, tmp_path):
    nb = add_cell(master(EX02), "class Spin:\n    while True:\n        pass")
    report = grade_notebook(write(tmp_path, EX02, nb), timeout=0.5, pool=pool)
    assert points(report) == _full(EX02), [q.message for q in report.questions]
    # skipped once, for every question (a question that hung again would be "not graded")
    assert [e for e in report.load_errors if "Spin" in e] == ["cell 14: `class Spin:` did not finish within 0.5 s "
                                                               "while loading: skipped (top-level code that should "
                                                               "not run when grading)"]


def test_probe_unreadable_notebook_without_exnn_in_its_name(pool, tmp_path):
    subs = tmp_path / "subs"
    write(subs / "alice", EX02, master(EX02))
    (subs / "bob").mkdir()
    (subs / "bob" / "submission.ipynb").write_text("{ this is not json")
    broken = json.dumps(master(EX02)).replace('"cells": [', '"cells": [[', 1)
    (subs / "carol").mkdir()
    (subs / "carol" / "mywork.ipynb").write_text(broken)
    reports = {r.student: r for r in grade_folder(subs, pool=pool)}
    assert {s: (r.score, r.max_score) for s, r in reports.items()} == {
        "alice": (8, 8), "bob": (0, 8), "carol": (0, 8)}
    assert all(r.error for s, r in reports.items() if s != "alice")


def test_probe_annotations_are_evaluated_like_a_top_to_bottom_run(pool, tmp_path):
    nb = mutate(EX01, {"router_logits": ("x: torch.Tensor, w_gate", "x: torch.Tensr, w_gate")})
    report = grade_notebook(write(tmp_path, EX01, nb), pool=pool)
    assert points(report) == {**_full(EX01), "router_logits": 0}
    assert "Tensr" in notes(report) + " ".join(q.message for q in report.questions)

