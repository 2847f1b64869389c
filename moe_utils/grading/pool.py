"""The grading process's side of the student processes.

``WorkerPool`` starts the zygote (``worker.py``; optionally inside bubblewrap), hands
it the worker source it read at start-up, and runs one question at a time: fresh
pipes for the child (passed over the control socket), the job in, frames out, a time
limit for loading and one for the question, and always an ``end`` that makes the
zygote kill everything the child started before the next question (or a report)
begins. If the zygote itself is killed, every process of this run is found by a
marker in its environment and killed, and a fresh zygote starts for the next question.

Time limits count the question's own time, not the machine's: wall-clock time minus
the time the child was ready to run but waited for a CPU (Linux ``schedstat``), so a
busy machine does not turn a correct answer into a timeout while a loop or a sleep
still runs out of time. Waiting for the machine (starting the zygote, its replies)
gets generous wall-clock limits, and running out of those is reported as the
machine's problem (``unavailable``, ``overloaded``), never as the student's.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import worker
from .spec import new_seed
from .worker import FrameReader, WireError, decode, encode

__all__ = ["WorkerPool", "WorkerGone", "WorkerUnavailable", "Outcome", "ChildClock", "WORKER_SOURCE",
           "sandbox_command"]

# read once, when the grader starts (before any submission runs): the zygote executes
# these bytes, never a file a submission could have rewritten since
WORKER_SOURCE: bytes = Path(worker.__file__).read_bytes()
_MARKER_VAR = "MOE_GRADING_RUN"


class WorkerGone(RuntimeError):
    pass


class WorkerUnavailable(WorkerGone):
    """The zygote did not start or did not answer in time: the machine's problem, not
    the submission's."""


@dataclass
class Outcome:
    """What happened to one question's child process.

    ``status``: ok | invalid | load_timeout | timeout (the question's own time ran out) |
    died | zygote_died (the process or its parent died) | unavailable (the zygote did not
    start or answer) | overloaded (its own time had not run out, but it waited for a
    CPU far longer than that)."""

    status: str
    result: dict | None = None
    loaded: dict | None = None
    statement: int | None = None  # the statement that was loading when time ran out
    code: int | None = None
    swept: int = 0
    reason: str = ""
    detail: str = ""
    seconds: float = 0.0
    limits: dict = field(default_factory=dict)
    # when time ran out: the seconds counted against the phase (loading or the calls), the
    # seconds it was ready to run but waited for a CPU (not counted), its wall-clock seconds;
    # otherwise ``waited`` is over the whole question
    charged: float = 0.0
    waited: float = 0.0
    wall: float = 0.0


class ChildClock:
    """The time a question is charged: wall-clock time minus the time its process was
    runnable but waiting for a CPU (``/proc/<pid>/schedstat``, second field). Where
    that file cannot be read (not Linux, no scheduler statistics, the process gone),
    nothing is subtracted: plain wall-clock time.

    Only waiting that other work causes is forgiven. Once the question's process has
    started a process of its own, or lowered its own priority, it could be starving
    itself on purpose, so from then on every wall-clock second counts (``tainted``
    says why)."""

    def __init__(self, pid: int | None, reaper: int | None = None):
        self.pid = pid
        self.reaper = reaper  # the worker, a child subreaper: orphans of the question land there
        self.path = f"/proc/{pid}/schedstat" if pid else None
        self.waited = 0.0
        self.tainted = ""
        self._nice0 = self._nice()
        self._last = self._read()
        if self._last is None:
            self.path = None
        self.start()

    def _nice(self) -> int | None:
        if not self.pid:
            return None
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
            return int(fields[16])  # field 19 of stat, counted after the command name
        except (OSError, ValueError, IndexError):
            return None

    @staticmethod
    def _children(pid: int) -> set[int]:
        out: set[int] = set()
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as fh:
                    out.update(int(c) for c in fh.read().split())
        except (OSError, ValueError):
            pass
        return out

    def _has_children(self) -> bool:
        """The question's process has children, or the worker has any child but it (an
        orphan the question started, reparented to the subreaper)."""
        if self._children(self.pid):
            return True
        return bool(self.reaper) and bool(self._children(self.reaper) - {self.pid})

    def _check_taint(self) -> None:
        if self.tainted or not self.path:
            return
        nice = self._nice()
        if nice is not None and self._nice0 is not None and nice > self._nice0:
            self.tainted = "it lowered its own priority"
        elif self._has_children():
            self.tainted = "it started processes of its own"

    def _read(self) -> float | None:
        if not self.path:
            return None
        try:
            with open(self.path, "rb") as fh:
                return int(fh.read().split()[1]) / 1e9
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        """Stop reading (the process has exited: its pid may be reused)."""
        self.update()
        self.path = None

    def update(self) -> None:
        self._check_taint()
        now = self._read()
        if now is not None and self._last is not None and now >= self._last:
            if not self.tainted:
                self.waited += now - self._last
            self._last = now

    def start(self) -> None:
        """Start a phase (loading, then the calls)."""
        self.update()
        self.t0 = time.monotonic()
        self.w0 = self.waited

    def wall(self) -> float:
        return time.monotonic() - self.t0

    def phase_waited(self) -> float:
        return self.waited - self.w0

    def charged(self) -> float:
        self.update()
        if self.tainted:
            return self.wall()
        return max(0.0, self.wall() - self.phase_waited())


def _env(marker: str, home: str) -> dict:
    keep = ("PATH", "LANG", "LC_ALL", "LD_LIBRARY_PATH", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update({
        _MARKER_VAR: marker, "HOME": home, "TMPDIR": home, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0",
    })
    return env


def _needed_paths(python: str) -> list[str]:
    """What the student process must see: the interpreter, its libraries, torch."""
    import torch

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.realpath(python), os.path.dirname(torch.__file__)}
    paths |= {os.path.realpath(p) for p in list(paths)}
    return sorted(paths)


def sandbox_command(hide: list[str], scratch: str, python: str = sys.executable) -> list[str] | None:
    """The bubblewrap prefix, if bwrap is installed and can start a sandbox here.

    The sandbox sees the whole file system read-only (so the repository too), a
    private /tmp and /dev, its own /proc and no network; ``hide`` folders (the
    submissions, the masters) are replaced by empty ones unless the interpreter or
    torch lives inside them. Only ``scratch`` (the working directories) is writable.
    """
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return None
    cmd = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp",
           "--bind", scratch, scratch, "--unshare-all", "--die-with-parent", "--new-session", "--chdir", scratch]
    needed = _needed_paths(python) + [scratch]
    for path in hide:
        path = os.path.realpath(path)
        inside = [n for n in needed if n == path or n.startswith(path.rstrip("/") + "/")]
        if os.path.isdir(path) and not inside and path != "/":
            cmd += ["--tmpfs", path]
    try:
        ok = subprocess.run([*cmd, "--", python, "-I", "-S", "-c", "pass"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return cmd + ["--"] if ok.returncode == 0 else None


def find_marked(marker: str) -> list[int]:
    """Processes (other than this one) whose environment carries ``marker``."""
    needle = f"{_MARKER_VAR}={marker}".encode()
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.append(int(entry))
    return found


def _ns_pids(pid: int) -> list[int]:
    """The ids of a process in each pid namespace it is in, outermost first (``NSpid``)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("NSpid:"):
                    return [int(x) for x in line.split()[1:]]
    except (OSError, ValueError):
        pass
    return []


def _state(pid: int) -> str:
    """One-letter process state from /proc (R, S, D, T, t, Z, ...), "" if unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
        return stat[stat.rfind(b")") + 2:].split()[0].decode()
    except (OSError, IndexError, UnicodeDecodeError):
        return ""


def kill_marked(marker: str) -> int:
    """Stop, then kill, every process carrying the marker; done after two empty scans in a
    row (a process in the middle of exec can be missed by one)."""
    killed: set[int] = set()
    quiet = 0
    for _ in range(100):
        pids = find_marked(marker)
        if not pids:
            quiet += 1
            if quiet == 2:
                break
            time.sleep(0.02)
            continue
        quiet = 0
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        killed.update(pids)
        time.sleep(0.01)
    return len(killed)


class WorkerPool:
    """One zygote (torch imported once) that forks a child per question.

    ``sandbox``: "auto" (bubblewrap when it is installed and works), "bwrap"
    (required) or "none". ``memory_mb``: address space a child may add to the
    zygote's; ``max_procs``: processes a question may start. ``hide``: folders the
    sandbox hides (the submissions, the masters). ``seed``: the hidden cases' seed
    (secret and fresh per pool unless given).

    Waiting for the machine: ``start_timeout`` seconds for the zygote to start (it
    imports torch) and ``reply_timeout`` for each of its replies (a child started, a
    question ended). A question whose own time has not run out is given up after
    ``wait_factor`` times its limit plus ``wait_grace`` seconds of wall-clock time
    (``overloaded``): only a machine several times too busy gets there (code that
    starts processes of its own is charged wall-clock time, see ``ChildClock``).
    """

    def __init__(self, python: str | None = None, start_timeout: float = 180.0, sandbox: str = "auto",
                 memory_mb: int = 1024, max_procs: int = 32, hide: list | tuple = (), seed: int | None = None,
                 reply_timeout: float = 60.0, wait_factor: float = 3.0, wait_grace: float = 10.0):
        if sandbox not in ("auto", "bwrap", "none"):
            raise ValueError(f"sandbox must be one of 'auto', 'bwrap', 'none', got {sandbox!r}")
        for name, value in (("start_timeout", start_timeout), ("reply_timeout", reply_timeout),
                            ("wait_factor", wait_factor), ("wait_grace", wait_grace)):
            if not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        self.python = python or sys.executable
        self.start_timeout = float(start_timeout)
        self.reply_timeout = float(reply_timeout)
        self.wait_factor = float(wait_factor)
        self.wait_grace = float(wait_grace)
        self.late = False  # whether the last wait for the zygote ran out of time
        self.sandbox = sandbox
        self.memory_mb = memory_mb
        self.max_procs = max_procs
        self.hide = [str(Path(p).resolve()) for p in hide]
        self.seed = new_seed() if seed is None else int(seed)
        self.marker = secrets.token_hex(12)
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.buf = b""
        self.scratch = ""
        self.mode = ""  # "bubblewrap" or "rlimits", once started
        self.notes: list[str] = []
        self.plans: dict = {}  # per exercise: cases and expected values (grader.py)
        self.zygote_pid: int | None = None  # as the zygote sees itself (inside a sandbox: its namespace)
        self.zygote_host_pid: int | None = None  # as this process sees it

    # -- the zygote ----------------------------------------------------------------------
    def _start(self) -> None:
        if not self.scratch or not os.path.isdir(self.scratch):
            self.scratch = tempfile.mkdtemp(prefix="moe-grading-")
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        prefix: list[str] = []
        if self.sandbox != "none":
            prefix = sandbox_command(self.hide, self.scratch, self.python) or []
            if not prefix:
                if self.sandbox == "bwrap":
                    parent.close()
                    child.close()
                    raise WorkerGone("bubblewrap (bwrap) is not installed or cannot create a sandbox here")
                if shutil.which("bwrap") and "bubblewrap" not in " ".join(self.notes):
                    self.notes.append("bubblewrap is installed but could not start a sandbox here; "
                                      "graded without it")
        self.mode = "bubblewrap" if prefix else "rlimits"
        cmd = [*prefix, self.python, "-I", "-B", "-c", worker.BOOT, str(child.fileno())]
        debug = os.environ.get("MOE_GRADING_DEBUG")
        self.proc = subprocess.Popen(
            cmd, pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=None if debug else subprocess.DEVNULL, start_new_session=True,
            env=_env(self.marker, self.scratch), cwd=self.scratch,
        )
        child.close()
        self.sock, self.buf = parent, b""
        exited = False
        try:
            parent.sendall(len(WORKER_SOURCE).to_bytes(8, "big") + WORKER_SOURCE)
            msg = self._recv(self.start_timeout)
        except (OSError, WorkerGone):  # it closed the socket: it exited (or said nonsense)
            msg, exited = None, True
        if msg is None or msg.get("event") != "ready":
            exited = exited or self.proc.poll() is not None
            self._abandon()  # not close(): a worker still importing torch would not answer "quit" until done
            if exited:
                raise WorkerUnavailable("the grading worker exited while starting (run with MOE_GRADING_DEBUG=1 "
                                        "to see its errors)")
            raise WorkerUnavailable(f"the grading worker did not start within {self.start_timeout:g} s (it imports "
                                    "torch; the machine may be overloaded)")
        self.zygote_pid = int(msg["pid"])
        self.zygote_host_pid = self.host_pid(self.zygote_pid)
        if not msg.get("subreaper") and "subreaper" not in " ".join(self.notes):
            self.notes.append("this system cannot make the worker a child subreaper: processes a submission "
                              "detaches are found by their environment instead")

    def host_pid(self, pid: int) -> int | None:
        """This process's id for a process the zygote names ``pid`` (its own, or a child's):
        the same id without a sandbox; inside bubblewrap's pid namespace, looked up among
        the sandbox's processes. None if it is gone."""
        if self.proc is None:
            return None
        if self.mode != "bubblewrap":
            return pid
        table = worker._proc_table()
        parent = self.proc.pid if pid == self.zygote_pid or self.zygote_host_pid is None else self.zygote_host_pid
        if pid == self.zygote_pid:  # the zygote: somewhere below bubblewrap
            candidates = [p for p, _ in worker.descendants(parent)]
        else:  # a child: forked by the zygote itself
            candidates = [p for p, (ppid, _) in table.items() if ppid == parent]
        for host in candidates:
            ids = _ns_pids(host)
            if len(ids) > 1 and ids[-1] == pid:
                return host
        return None

    def _stuck(self) -> str:
        """Why the zygote cannot answer ("" if it may still): dead, or stopped."""
        if self.proc is None or self.proc.poll() is not None:
            return "exited"
        state = _state(self.zygote_host_pid) if self.zygote_host_pid else ""
        if state in ("T", "t"):
            return "stopped"
        if state in ("Z", "X"):
            return "exited"
        return ""

    def _await(self, want: tuple[str, ...], timeout: float) -> dict | None:
        """The zygote's next reply in ``want``; None if it is dead or stopped, or none came
        within ``timeout`` (then ``self.late`` is True)."""
        self.late = False
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv_event(min(0.5, max(0.0, deadline - time.monotonic())), want)
            if msg is not None:
                return msg
            if self._stuck():
                return None
            if time.monotonic() >= deadline:
                self.late = True
                return None

    def ensure(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self._abandon()
            self._start()

    def _abandon(self) -> None:
        """The zygote died or hangs: kill it and everything of this run, by marker."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        kill_marked(self.marker)
        if self.sock is not None:
            self.sock.close()
        self.proc, self.sock, self.buf = None, None, b""
        self.zygote_host_pid = None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None and self.sock is not None:
            try:
                self._send({"op": "quit"})
                self._recv_event(10.0, ("bye",))
                self.proc.wait(timeout=10)
            except (OSError, WorkerGone, subprocess.TimeoutExpired):
                pass
        if self.proc is not None:
            self._abandon()
        kill_marked(self.marker)
        if self.scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)
            self.scratch = ""

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            if self.proc is not None:
                self._abandon()
            if self.scratch:
                shutil.rmtree(self.scratch, ignore_errors=True)
        except Exception:  # noqa: BLE001
            pass

    # -- control messages ----------------------------------------------------------------
    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            if fds:
                socket.send_fds(self.sock, [data], fds)
            else:
                self.sock.sendall(data)
        except OSError as exc:
            raise WorkerGone(f"the grading worker is gone ({exc})") from exc

    def _recv_event(self, timeout: float, want: tuple[str, ...]) -> dict | None:
        """The next control message whose event is in ``want`` (others are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            if msg is None or msg.get("event") in want:
                return msg

    def _recv(self, timeout: float) -> dict | None:
        """The next control message, or None when none arrives within ``timeout``."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            try:
                data = self.sock.recv(1 << 16)
            except OSError as exc:
                raise WorkerGone(str(exc)) from exc
            if not data:
                raise WorkerGone("the grading worker exited")
            self.buf += data
            if len(self.buf) > 1 << 20:
                raise WorkerGone("the grading worker sent nonsense")
        line, self.buf = self.buf.split(b"\n", 1)
        try:
            msg = json.loads(line)
        except ValueError:
            raise WorkerGone("the grading worker sent nonsense") from None
        return msg if isinstance(msg, dict) else None

    # -- one question ----------------------------------------------------------------------
    def run(self, job: dict, load_timeout: float, timeout: float) -> Outcome:
        """Run one question's job in a fresh child; kill all it started; what happened.

        ``load_timeout`` and ``timeout``: the seconds of its own time (see ``ChildClock``)
        the child may take to load the definitions, then to answer every case."""
        t0 = time.monotonic()
        token = secrets.token_hex(16)
        job = dict(job, token=token)
        payload = encode(job)
        limits = {"cpu_s": int(load_timeout + timeout) + 2, "memory_bytes": self.memory_mb << 20,
                  "max_procs": self.max_procs}
        job_w = res_r = -1
        cwd = ""
        try:
            for _attempt in range(2):  # a zygote found dead before the question starts is not its fault
                self.ensure()
                if cwd:
                    shutil.rmtree(cwd, ignore_errors=True)
                cwd = tempfile.mkdtemp(prefix="q-", dir=self.scratch)
                job_r, job_w = os.pipe()
                res_r, res_w = os.pipe()
                self.late = False
                try:
                    self._send({"op": "spawn", "cwd": cwd, "limits": limits}, [job_r, res_w])
                    spawned = self._await(("spawned",), self.reply_timeout)
                except WorkerGone:
                    spawned = None
                finally:
                    os.close(job_r)
                    os.close(res_w)
                if spawned is not None and spawned.get("event") == "spawned":
                    break
                os.close(job_w)
                os.close(res_r)
                job_w = res_r = -1
                self._abandon()
                if self.late:
                    raise WorkerUnavailable(f"the grading worker did not start a process for this question within "
                                            f"{self.reply_timeout:g} s (the machine may be overloaded)")
            else:
                raise WorkerUnavailable("the grading worker could not start a process for this question")
            child = spawned.get("pid")
            clock = ChildClock(self.host_pid(child) if isinstance(child, int) else None, self.zygote_host_pid)
            out = self._converse(job_w, res_r, payload, token, load_timeout, timeout, clock)
            out.limits = spawned.get("limits", {})
            if out.status not in ("timeout", "load_timeout", "overloaded"):
                clock.update()
                out.waited = clock.waited
            self.late = False
            try:
                self._send({"op": "end" if out.status in ("ok", "invalid") else "kill"})
                ended = self._await(("ended",), self.reply_timeout)
            except WorkerGone:
                ended = None
            if ended is None or ended.get("event") != "ended":
                # the child's parent is dead, stopped or stuck: whatever the child sent, the question is lost
                late = self.late
                self._abandon()
                out.result = None
                if late:
                    out.status = "unavailable"
                    out.detail = (f"the grading worker did not confirm within {self.reply_timeout:g} s that this "
                                  "question's processes were stopped (the machine may be overloaded)")
                else:
                    out.status, out.detail = "zygote_died", "the grading process that ran this question was killed"
            else:
                out.code, out.swept, out.reason = ended.get("code"), int(ended.get("swept") or 0), ended.get("reason", "")
        except WorkerUnavailable as exc:
            self._abandon()
            out = Outcome("unavailable", detail=str(exc))
        except WorkerGone as exc:
            self._abandon()
            out = Outcome("zygote_died", detail=str(exc))
        finally:
            for fd in (job_w, res_r):
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            if cwd:
                shutil.rmtree(cwd, ignore_errors=True)
        if self.proc is not None and self.proc.poll() is not None:
            self._abandon()
            if out.status == "died":
                out.status = "zygote_died"
        out.seconds = time.monotonic() - t0
        return out

    def wall_limit(self, limit: float) -> float:
        """Wall-clock seconds after which a phase with ``limit`` seconds of its own time is
        given up as ``overloaded`` (its own time not used up: the machine was too busy)."""
        return self.wait_factor * limit + self.wait_grace

    def _converse(self, job_w: int, res_r: int, payload: bytes, token: str, load_timeout: float,
                  timeout: float, clock: ChildClock) -> Outcome:
        data = memoryview(len(payload).to_bytes(8, "big") + payload)
        os.set_blocking(job_w, False)
        reader = FrameReader()
        limit = load_timeout  # loading: its clock starts when the job has been written
        loaded = None
        statement = None
        exited = False

        def out_of_time() -> Outcome | None:
            charged = clock.charged()
            info = dict(loaded=loaded, statement=statement, charged=charged, waited=clock.phase_waited(),
                        wall=clock.wall())
            if charged >= limit:
                return Outcome("timeout" if loaded else "load_timeout", **info)
            if clock.wall() >= self.wall_limit(limit):
                return Outcome("overloaded", **info)
            return None

        while True:
            if exited:
                wait = 0.0
            else:  # wake up when its time would run out if it got all of it, and re-read the clock
                wait = min(0.25, max(0.0, limit - clock.charged()))
            want_write = [job_w] if data else []
            rd, wr, _ = select.select([res_r] if exited else [res_r, self.sock], want_write, [], wait)
            if exited and not rd:
                return Outcome("died", loaded=loaded, statement=statement)
            if wr:
                try:
                    n = os.write(job_w, data[: 1 << 16])
                    data = data[n:]
                except BlockingIOError:
                    pass
                except OSError:
                    data = memoryview(b"")
                if not data:
                    clock.start()  # the job is in: loading starts now
            if self.sock in rd:
                try:
                    msg = self._recv(0)
                except WorkerGone as exc:  # the zygote died (killed by the code being graded?)
                    return Outcome("zygote_died", loaded=loaded, statement=statement, detail=str(exc))
                if msg is not None and msg.get("event") == "exited":
                    exited = True  # read what the child wrote before it exited, then stop
                    clock.stop()
                    os.set_blocking(res_r, False)
                    continue
            if res_r in rd:
                try:
                    chunk = os.read(res_r, 1 << 20)
                except BlockingIOError:
                    chunk = b""
                if not chunk:
                    return Outcome("died", loaded=loaded, statement=statement)
                reader.feed(chunk)
                while True:
                    try:
                        frame = reader.next()
                        if frame is None:
                            break
                        msg = decode(frame)
                    except WireError as exc:
                        return Outcome("invalid", loaded=loaded, detail=f"unreadable message ({exc})")
                    if not isinstance(msg, dict) or msg.get("t") != token:
                        return Outcome("invalid", loaded=loaded, detail="a message without this question's token")
                    kind = msg.get("k")
                    if kind == "stmt" and loaded is None and isinstance(msg.get("i"), int):
                        statement = msg["i"]
                    elif kind == "loaded" and loaded is None:
                        loaded = msg
                        limit = timeout
                        clock.start()
                    elif kind == "result" and loaded is not None:
                        return Outcome("ok", result=msg, loaded=loaded)
                    else:
                        return Outcome("invalid", loaded=loaded, detail=f"an unexpected message ({str(kind)[:20]!r})")
            if not exited:  # after reading what it sent, so that an answer that came in time counts
                late = out_of_time()
                if late is not None:
                    return late
