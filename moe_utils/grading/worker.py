"""Everything that runs on the student's side of the autograder, and nothing else.

The grading process (``pool.py``) starts a *zygote*: ``python -I -B -c BOOT``, which
receives this file's source over its control socket (the bytes the grader read when
it started, never re-read from a path a submission could write), imports torch once
and then forks one *child* per question. A child holds only:

* its own two pipes (the job in, the answer out), stdin/stdout/stderr on /dev/null;
* its own session and process group, limits on address space, CPU time, file size
  (0: it cannot create or grow files) and, for non-root users, processes;
* a fresh empty working directory;
* the job: the submission's extracted definitions, the question's name, the case
  inputs, and the source of the reference versions of the functions the question
  builds on. No expected values, no comparisons, no other question's reference.

The child loads the definitions, calls the function on every case and sends back
what it returned (plus the inputs as they were afterwards, and gradients), in a
format that cannot run code when it is read: a JSON header and raw tensor bytes
(``encode``/``decode``). The grading process compares. The zygote is a child
subreaper: whatever a child starts stays under it and is killed, with a stop-then-
kill sweep, when the question ends; a watchdog kills a question that starts more
than ``max_procs`` processes.

This module imports only the standard library and torch. The notebook self-checks
use ``call_case`` and the wire format from here too, so both paths see the same thing.
"""

from __future__ import annotations

import builtins
import ctypes
import io
import json
import linecache
import math
import numbers
import os
import select
import signal
import socket
import struct
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout

import torch

__all__ = [
    "encode",
    "decode",
    "WireError",
    "Opaque",
    "FrameReader",
    "write_frame",
    "call_case",
    "CappedText",
    "MAX_FRAME",
    "zygote_main",
]

MAGIC = b"MOEw"
MAX_FRAME = 16 << 20  # bytes of one message (the exercises' inputs and outputs are KBs)
MAX_DEPTH = 24  # nesting of an output (tuples in tuples ...)
MAX_ITEMS = 100_000  # values in one message
_DTYPES = {
    "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
    "complex64": torch.complex64, "complex128": torch.complex128, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# -- the wire format ------------------------------------------------------------------


class WireError(ValueError):
    """A message that is not well formed."""


class Opaque:
    """An output the wire format does not carry (a numpy array, a generator, ...):
    only its type name and a short repr cross the boundary."""

    def __init__(self, type_name: str, text: str = ""):
        self.type_name = str(type_name)[:100]
        self.text = str(text)[:200]

    def __repr__(self) -> str:
        return f"<{self.type_name}: {self.text}>" if self.text else f"<{self.type_name}>"

    def __eq__(self, other) -> bool:
        return isinstance(other, Opaque) and (self.type_name, self.text) == (other.type_name, other.text)

    __hash__ = None


def _safe(fn, default: str = "?") -> str:
    try:
        return str(fn())
    except BaseException:  # noqa: BLE001 - student objects may raise anything here
        return default


def _enc(obj, blobs: list, state: list, depth: int):
    state[0] += 1
    if state[0] > MAX_ITEMS:
        raise WireError("too many values")
    try:
        return _enc_value(obj, blobs, state, depth)
    except (WireError, RecursionError, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - a student object that fights being inspected
        return {"x": ["value that could not be read", ""]}


def _enc_value(obj, blobs: list, state: list, depth: int):
    if depth > MAX_DEPTH:
        return {"x": ["value nested too deeply", ""]}
    if obj is None:
        return {"n": 0}
    if isinstance(obj, bool):
        return {"b": bool(obj)}
    if isinstance(obj, torch.Tensor):
        try:
            t = obj.detach()
            if t.layout != torch.strided:
                return {"x": [f"{t.layout} tensor", ""]}
            t = t.cpu().resolve_conj().resolve_neg().contiguous()
            name = _DTYPE_NAMES.get(t.dtype)
            if name is None:
                return {"x": [f"tensor of dtype {t.dtype}", ""]}
            state[1] += t.numel() * t.element_size()
            if state[1] > MAX_FRAME:
                raise WireError(f"more than {MAX_FRAME >> 20} MB of tensor data")
            data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        except WireError:
            raise
        except Exception as exc:  # noqa: BLE001
            return {"x": ["tensor that could not be read", _safe(lambda e=exc: e)]}
        blobs.append((name, [int(s) for s in t.shape], data))
        return {"T": len(blobs) - 1}
    if isinstance(obj, numbers.Integral):
        try:
            value = int(obj)
            if abs(value) < 1 << 256:
                return {"i": value}
        except Exception:  # noqa: BLE001
            pass
        return {"x": [type(obj).__name__, "an integer too large to compare"]}
    if isinstance(obj, numbers.Real):
        try:
            return {"f": float(obj)}
        except Exception:  # noqa: BLE001
            return {"x": [type(obj).__name__, ""]}
    if isinstance(obj, str):
        return {"s": obj[:20000]}
    if isinstance(obj, (tuple, list)):
        try:
            items = list(obj)[:10000]
        except Exception:  # noqa: BLE001
            return {"x": [_safe(lambda: type(obj).__name__), ""]}
        return {"u" if isinstance(obj, tuple) else "l": [_enc(o, blobs, state, depth + 1) for o in items]}
    if type(obj) is dict and all(type(k) is str for k in obj):
        return {"d": [[k[:200], _enc(v, blobs, state, depth + 1)] for k, v in list(obj.items())[:10000]]}
    return {"x": [_safe(lambda: type(obj).__name__), _safe(lambda: repr(obj), "")[:200]]}


def encode(obj) -> bytes:
    """``obj`` (tensors, numbers, strings, None, tuples, lists, dicts with str keys)
    as bytes: MAGIC, header length, JSON header, raw tensor data. Anything else is
    sent as an ``Opaque`` (type name and repr)."""
    blobs: list = []
    tree = _enc(obj, blobs, [0, 0], 0)
    table, offset = [], 0
    for name, shape, data in blobs:
        table.append([name, shape, offset, len(data)])
        offset += len(data)
    header = json.dumps({"v": tree, "t": table}, allow_nan=True, separators=(",", ":")).encode()
    out = b"".join([MAGIC, struct.pack(">Q", len(header)), header] + [d for _, _, d in blobs])
    if len(out) > MAX_FRAME:
        raise WireError(f"message of {len(out)} bytes is over the limit of {MAX_FRAME}")
    return out


def _tensor(entry, blob: bytes) -> torch.Tensor:
    if not (isinstance(entry, list) and len(entry) == 4):
        raise WireError("bad tensor entry")
    name, shape, offset, nbytes = entry
    if name not in _DTYPES or not isinstance(shape, list) or len(shape) > 16:
        raise WireError("bad tensor dtype or shape")
    if not all(type(s) is int and 0 <= s < 1 << 40 for s in shape) or type(offset) is not int or type(nbytes) is not int:
        raise WireError("bad tensor layout")
    dtype = _DTYPES[name]
    numel = math.prod(shape)
    if numel * torch.empty((), dtype=dtype).element_size() != nbytes or offset < 0 or offset + nbytes > len(blob):
        raise WireError("tensor size does not match its data")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    raw = torch.frombuffer(bytearray(blob[offset: offset + nbytes]), dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def _dec(node, tensors: list, depth: int):
    if depth > MAX_DEPTH + 1 or not isinstance(node, dict) or len(node) != 1:
        raise WireError("bad value")
    (tag, val), = node.items()
    if tag == "n":
        return None
    if tag == "b" and type(val) is bool:
        return val
    if tag == "i" and type(val) is int:
        return val
    if tag == "f" and type(val) in (float, int):
        return float(val)
    if tag == "s" and type(val) is str:
        return val
    if tag in ("u", "l") and type(val) is list:
        items = [_dec(v, tensors, depth + 1) for v in val]
        return tuple(items) if tag == "u" else items
    if tag == "d" and type(val) is list:
        out = {}
        for pair in val:
            if not (type(pair) is list and len(pair) == 2 and type(pair[0]) is str):
                raise WireError("bad dict entry")
            out[pair[0]] = _dec(pair[1], tensors, depth + 1)
        return out
    if tag == "T" and type(val) is int and 0 <= val < len(tensors):
        return tensors[val]
    if tag == "x" and type(val) is list and len(val) == 2 and all(type(v) is str for v in val):
        return Opaque(*val)
    raise WireError(f"bad value tag {tag!r}")


def decode(data: bytes):
    """The inverse of ``encode``. Never runs code: a malformed message raises WireError."""
    if len(data) > MAX_FRAME or len(data) < 12 or data[:4] != MAGIC:
        raise WireError("not a message of the grading protocol")
    (hlen,) = struct.unpack(">Q", data[4:12])
    if hlen > len(data) - 12:
        raise WireError("truncated message")
    try:
        head = json.loads(data[12: 12 + hlen].decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise WireError(f"unreadable header ({type(exc).__name__})") from None
    if not (isinstance(head, dict) and set(head) == {"v", "t"} and isinstance(head["t"], list)):
        raise WireError("bad header")
    if len(head["t"]) > MAX_ITEMS:
        raise WireError("too many tensors")
    blob = data[12 + hlen:]
    tensors = [_tensor(e, blob) for e in head["t"]]
    try:
        return _dec(head["v"], tensors, 0)
    except RecursionError:
        raise WireError("value nested too deeply") from None


def write_frame(fd: int, payload: bytes) -> None:
    data = struct.pack(">Q", len(payload)) + payload
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _read_exact(fd: int, n: int) -> bytes | None:
    parts, got = [], 0
    while got < n:
        chunk = os.read(fd, min(n - got, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class FrameReader:
    """Length-prefixed frames from a byte stream, fed in pieces (``feed``)."""

    def __init__(self, max_size: int = MAX_FRAME):
        self.buf = bytearray()
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        self.buf += data

    def next(self) -> bytes | None:
        if len(self.buf) < 8:
            return None
        (n,) = struct.unpack(">Q", self.buf[:8])
        if n > self.max_size:
            raise WireError(f"a message of {n} bytes is over the limit")
        if len(self.buf) < 8 + n:
            return None
        frame = bytes(self.buf[8: 8 + n])
        del self.buf[: 8 + n]
        return frame


# -- calling a student's function on one case -------------------------------------------


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
    return obj


def _detach(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach()
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_detach(o) for o in obj)
    return obj


_HERE = os.path.abspath(__file__) if "__file__" in globals() else "<grader>"
_TORCH_DIR = os.path.dirname(torch.__file__)
_SKIP_FILES = {_HERE, "<grader>", "<reference>", _HERE[:-1] if _HERE.endswith(".pyc") else _HERE}


def _where(exc: BaseException) -> str:
    """Where in the student's code the exception came from: 'cell 4, line 12: `code`'."""
    try:
        frames = traceback.extract_tb(exc.__traceback__)
    except Exception:  # noqa: BLE001
        return ""
    mine = [f for f in frames if f.filename not in _SKIP_FILES and not f.filename.startswith(_TORCH_DIR)
            and not f.filename.startswith("<frozen") and "contextlib" not in f.filename]
    if not mine:
        return ""
    f = mine[-1]
    where = f.filename.strip("<>") + ", " if f.filename.startswith("<cell") else ""
    code = f" `{f.line.strip()[:120]}`" if f.line else ""
    return f"{where}line {f.lineno}{code}"


def _exception(exc: BaseException) -> dict:
    return {"kind": "exception", "type": _safe(lambda: type(exc).__name__)[:100],
            "message": _safe(lambda: exc, "")[:500], "where": _where(exc)}


def _grads(out, args, grad, grad_output) -> dict:
    try:
        o = out if grad_output is None else out[grad_output]
        if not isinstance(o, torch.Tensor) or not o.requires_grad:
            return {"status": "no_grad"}
        o.sum().backward()
        return {"status": "ok", "grads": [None if args[i].grad is None else args[i].grad.detach() for i in grad]}
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001
        return {"status": "error", "error": _exception(exc)}


def _tensors_in(obj, found: list, depth: int = 0) -> list:
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif depth < 8 and isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors_in(o, found, depth + 1)
    elif depth < 8 and isinstance(obj, dict):
        for o in obj.values():
            _tensors_in(o, found, depth + 1)
    return found


_MAX_CHECKED_BYTES = 1 << 24  # larger outputs are not judged on memory


def _byte_addresses(t: torch.Tensor) -> torch.Tensor | None:
    """Every byte address ``t``'s elements occupy (int64), repeats included; None where
    that cannot be read (not a strided CPU tensor, or too large to list)."""
    if t.layout != torch.strided or t.device.type != "cpu" or not t.numel():
        return None
    size = t.element_size()
    if t.numel() * size > _MAX_CHECKED_BYTES:
        return None
    storage = t.untyped_storage()
    n = storage.nbytes() // size
    index = torch.arange(n, dtype=torch.int64).as_strided(t.shape, t.stride(), t.storage_offset())
    first = storage.data_ptr() + index.reshape(-1) * size
    return (first[:, None] + torch.arange(size, dtype=torch.int64)).reshape(-1)


def _shared_memory(out, args, kwargs) -> list[int]:
    """Positions of the outputs (0 for a single one; a tuple's items) holding a tensor
    that does not own its memory: one whose bytes overlap an input's or an earlier
    output's (a view, a slice, numpy sharing), or that uses a byte twice (``expand``).
    Byte by byte, so separate slices of one fresh buffer are independent. Only
    questions asking for independent copies (``Question.own_memory``) are judged on it."""
    try:
        taken = [a for a in (_byte_addresses(t) for t in _tensors_in([args, kwargs], [])) if a is not None]
        seen = torch.cat(taken) if taken else torch.empty(0, dtype=torch.int64)
        flagged = []
        for i, item in enumerate(out if isinstance(out, (list, tuple)) else (out,)):
            bad = False
            for t in _tensors_in(item, []):
                addr = _byte_addresses(t)
                if addr is None:
                    continue
                if addr.unique().numel() < addr.numel() or torch.isin(addr, seen).any():
                    bad = True
                seen = torch.cat([seen, addr])
            if bad:
                flagged.append(i)
        return flagged
    except Exception:  # noqa: BLE001 - an output we cannot inspect is not judged on memory
        return []


def call_case(fn, args, kwargs, grad=(), grad_output=None, capture=None, interruptible=True, memory=False) -> dict:
    """Call ``fn`` on copies of one case's inputs. Returns {"out", "args_after",
    "kwargs_after", "grad"} (and "shared" when ``memory``: see ``_shared_memory``) or
    {"error": {...}}; never raises (a KeyboardInterrupt only when ``interruptible``, the
    notebook's stop button)."""
    args = list(_clone(tuple(args)))
    kwargs = _clone(dict(kwargs))
    for i in grad:
        args[i] = args[i].detach().clone().requires_grad_(True)
    try:
        if capture is not None:
            with redirect_stdout(capture), redirect_stderr(capture):
                out = fn(*args, **kwargs)
        else:
            out = fn(*args, **kwargs)
    except KeyboardInterrupt as exc:
        if interruptible:
            raise
        return {"error": _exception(exc)}
    except NotImplementedError:
        return {"error": {"kind": "not_implemented"}}
    except SystemExit as exc:
        return {"error": {"kind": "exit", "code": _safe(lambda e=exc: repr(e.code))[:100]}}
    except BaseException as exc:  # noqa: BLE001
        return {"error": _exception(exc)}
    res = {"out": out, "args_after": [_detach(a) for a in args], "kwargs_after": {k: _detach(v) for k, v in kwargs.items()}}
    if memory:
        res["shared"] = _shared_memory(out, args, kwargs)
    if grad:
        res["grad"] = _grads(out, args, tuple(grad), grad_output)
    return res


# -- the child: one question of one submission -------------------------------------------

_FUTURE_FLAGS = 0
for _name in ("annotations", "generator_stop", "barry_as_FLUFL"):
    _feature = getattr(__import__("__future__"), _name, None)
    if _feature is not None:
        _FUTURE_FLAGS |= _feature.compiler_flag


def _make_stub_module(guard, name: str, attrs: dict, exercise: str):
    """``moe_utils`` or ``moe_utils.grading`` as a submission sees it while graded: the
    self-check names exist and do nothing; every other attribute is unavailable."""
    mod = type(sys)(name)
    mod.__dict__.update(attrs)
    mod.__path__ = []  # a package: submodule imports come to the guard

    def __getattr__(attr: str, _name=name):
        if attr.startswith("__"):
            raise AttributeError(attr)
        guard.log.append(f"used {_name}.{attr}")
        raise AttributeError(f"{_name}.{attr} is not available while grading {exercise} (see exercises/README.md)")

    mod.__getattr__ = __getattr__
    return mod


class _ImportGuard:
    """A meta-path finder: ``moe_utils.grading`` is a stub (self-check calls do nothing),
    ``moe_utils`` modules the exercise does not allow raise ImportError, and every
    import of the course package by the submission is logged."""

    def __init__(self, exercise: str, allowed: list[str], check_names: list[str]):
        self.exercise = exercise
        self.allowed = allowed
        self.log: list[str] = []
        noop = {n: (lambda *a, **k: None) for n in check_names + ["check"]}
        self.grading = _make_stub_module(self, "moe_utils.grading", noop, exercise)
        self.root = None if allowed else _make_stub_module(self, "moe_utils", {"grading": self.grading}, exercise)

    def _from_student(self) -> bool:
        f = sys._getframe(2)
        while f is not None:
            name = f.f_globals.get("__name__", "")
            if name == "__student__":
                return True
            if name.startswith("moe_utils"):
                return False
            f = f.f_back
        return False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "moe_utils" and not fullname.startswith("moe_utils."):
            return None
        student = self._from_student()
        if fullname == "moe_utils.grading":
            return _spec(fullname, self.grading)  # the self-check imports: fine
        if fullname.startswith("moe_utils.grading."):
            self.log.append(f"tried to import {fullname} (blocked)")
            raise ImportError(f"{fullname} is not available to submissions (the grader's own code)")
        if self.root is not None:  # the exercise allows no part of moe_utils
            if fullname == "moe_utils":
                return _spec(fullname, self.root)
            self.log.append(f"tried to import {fullname} (blocked)")
            raise ImportError(f"{fullname} is not available while grading {self.exercise}: write the code "
                              "yourself (see exercises/README.md)")
        if not student or fullname == "moe_utils" or any(fullname == a or fullname.startswith(a + ".")
                                                         for a in self.allowed):
            if student and fullname != "moe_utils":
                self.log.append(f"imported {fullname} (allowed)")
            return None  # the real module
        self.log.append(f"tried to import {fullname} (blocked)")
        raise ImportError(f"{fullname} is not available while grading {self.exercise} (see exercises/README.md)")


class _StubLoader:
    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        pass


def _spec(name, module):
    import importlib.util

    return importlib.util.spec_from_loader(name, _StubLoader(module), is_package=True)


def _audit(watch: list[str], log: list[str]):
    seen: set = set()
    installed = tuple({os.path.abspath(p).rstrip("/") + "/" for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                                       os.path.dirname(_TORCH_DIR))})

    def hook(event, args):
        try:
            if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
                path = os.fsdecode(args[0])
                full = os.path.abspath(path)
                if full.startswith(installed):
                    return
                hit = next((w for w in watch if full == w or full.startswith(w.rstrip("/") + "/")), None)
                if (hit or full.endswith(".ipynb")) and full not in seen and len(seen) < 20:
                    seen.add(full)
                    rel = os.path.relpath(full, os.path.dirname(hit)) if hit else os.path.basename(full)
                    log.append(f"opened {rel}")
            elif event in ("os.system", "subprocess.Popen", "os.exec", "os.posix_spawn", "os.fork", "os.kill",
                           "os.killpg", "socket.connect", "ctypes.dlopen") and event not in seen:
                seen.add(event)
                log.append(f"called {event}")
        except Exception:  # noqa: BLE001
            pass

    return hook


def _limits(lim: dict) -> None:
    """setrlimit, each as far as this system allows (macOS refuses some)."""
    import resource

    def cap(which, value):
        try:
            resource.setrlimit(which, (int(value), int(value)))
        except (ValueError, OSError):
            pass

    cap(resource.RLIMIT_CORE, 0)
    cap(resource.RLIMIT_FSIZE, 0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails instead of killing
    try:
        cpu = int(lim["cpu_s"])
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except (ValueError, OSError):
        pass
    if lim.get("as_bytes"):
        cap(resource.RLIMIT_AS, lim["as_bytes"])
    if os.geteuid() != 0 and lim.get("nproc"):
        cap(resource.RLIMIT_NPROC, lim["nproc"])


def child_main(job_fd: int, out_fd: int) -> None:
    """Run one question of one submission; the zygote forked us and set us up."""
    raw = _read_exact(job_fd, 8)
    job = decode(_read_exact(job_fd, struct.unpack(">Q", raw)[0])) if raw else None
    os.close(job_fd)
    if not isinstance(job, dict):
        os._exit(2)
    token = job["token"]

    def send(msg: dict) -> None:
        msg["t"] = token
        write_frame(out_fd, encode(msg))

    torch.set_num_threads(1)
    guard = _ImportGuard(job["exercise"], list(job["moe_utils_allowed"]), list(job["check_names"]))
    sys.meta_path.insert(0, guard)
    for name in [m for m in sys.modules if m == "moe_utils" or m.startswith("moe_utils.")]:
        del sys.modules[name]
    sys.addaudithook(_audit(list(job["watch"]), guard.log))

    deps: dict = {"__name__": "__reference__", "__builtins__": builtins, "torch": torch,
                  "F": torch.nn.functional, "math": math, "Fraction": __import__("fractions").Fraction}
    exec(compile(job["deps_source"], "<reference>", "exec", dont_inherit=True), deps)
    for cell, text in job["cells"]:
        linecache.cache[f"<cell {cell}>"] = (len(text), None, text.splitlines(True), f"<cell {cell}>")

    ns: dict = {"__name__": "__student__", "__builtins__": builtins}
    flags = 0
    errors: list[str] = []
    loading = CappedText(int(job["max_print"]))
    skip = set(job["skip"])
    for sid, cell, src in job["statements"]:
        if sid in skip:
            continue
        send({"k": "stmt", "i": sid})
        try:
            code = compile(src, f"<cell {cell}>", "exec", flags=flags, dont_inherit=True)
            with redirect_stdout(loading), redirect_stderr(loading):
                exec(code, ns)
            flags |= code.co_flags & _FUTURE_FLAGS
        except BaseException as exc:  # noqa: BLE001 - SystemExit and KeyboardInterrupt included
            first = src.strip().splitlines()[0] if src.strip() else ""
            errors.append(f"cell {cell}: `{first[:80]}` raised {_safe(lambda e=exc: type(e).__name__)}: "
                          f"{_safe(lambda e=exc: e, '')[:300]}")
    send({"k": "loaded", "errors": errors})

    name = job["question"]
    for student_name, ref_name in job["deps"].items():
        ns[student_name] = deps[ref_name]
    fn = ns.get(name)
    cap = CappedText(int(job["max_print"]))
    results = []
    if fn is not None and callable(fn):
        for case in job["cases"]:
            r = call_case(fn, case["args"], case["kwargs"], tuple(case["grad"]), case["grad_output"], cap,
                          interruptible=False, memory=bool(job.get("own_memory")))
            r["id"] = case["id"]
            results.append(r)
    elif fn is not None:
        kind = _safe(lambda: type(fn).__name__)
        results = [{"id": c["id"], "error": {"kind": "not_callable", "type": kind}} for c in job["cases"]]
    msg = {"k": "result", "q": name, "missing": fn is None, "results": results, "stdout": cap.getvalue(),
           "printed": cap.total, "runtime": guard.log[:50]}
    try:
        send(msg)
    except (WireError, MemoryError) as exc:  # too large or too many values: say so for every case
        results.clear()
        error = {"kind": "exception", "type": "OutputTooLarge", "where": "",
                 "message": f"the outputs cannot be sent to the grader ({exc})"}
        msg["results"] = [{"id": c["id"], "error": error} for c in job["cases"]]
        send(msg)


# -- the zygote --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4
_PR_SET_CHILD_SUBREAPER = 36


def _prctl(option: int, value: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def not_dumpable() -> bool:
    """Make this process non-dumpable: other processes of the same (non-root) user can
    then neither ptrace it nor read its memory through /proc (Linux)."""
    return _prctl(_PR_SET_DUMPABLE, 0)


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process this /proc shows."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2:].split()
        if len(rest) > 2:
            table[int(entry)] = (int(rest[1]), rest[0].decode())
    return table


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, state) of every process below ``root``."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        out.append((pid, table[pid][1]))
        todo.extend(children.get(pid, []))
    return out


_REAPED: dict[int, int] = {}  # exit codes of reaped children, by pid


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _REAPED[pid] = os.waitstatus_to_exitcode(status)


def sweep(root: int) -> set[int]:
    """Stop, then kill, every process below ``root`` until none is left; their pids."""
    killed: set[int] = set()
    for _ in range(200):
        live = [p for p, state in descendants(root) if state not in ("Z", "X")]
        if not live:
            break
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in live:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
        killed.update(live)
        _reap()
        time.sleep(0.005)
    _reap()
    return killed


class _Control:
    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = b""

    def send(self, msg: dict) -> None:
        self.sock.sendall((json.dumps(msg) + "\n").encode())

    def recv(self, timeout: float | None):
        """(message, fds) or (None, []) on timeout; raises EOFError when the grader is gone."""
        fds: list[int] = []
        while b"\n" not in self.buf:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                return None, []
            data, new_fds, _, _ = socket.recv_fds(self.sock, 1 << 16, 4)
            fds.extend(new_fds)
            if not data:
                raise EOFError
            self.buf += data
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line), fds


def _vm_size() -> int:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _start_child(msg: dict, fds: list[int], ctrl: _Control) -> None:
    """In the forked child: own session, only the job pipes, limits; then run."""
    job_fd, out_fd = fds
    try:
        os.setsid()
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        ctrl_fd = ctrl.sock.detach()
        os.set_inheritable(out_fd, False)  # a program the code starts does not get the answer pipe
        keep = {0, 1, 2, job_fd, out_fd}
        entries = os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else [str(ctrl_fd)]
        for entry in entries:
            fd = int(entry)
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:
                    pass
        _limits(msg["limits"])
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.chdir(msg["cwd"])
        os.environ["HOME"] = os.environ["TMPDIR"] = msg["cwd"]
        sys.stdin = io.StringIO("")
        sys.dont_write_bytecode = True
        child_main(job_fd, out_fd)
    except BaseException:  # noqa: BLE001
        pass
    finally:
        os._exit(0)


def zygote_main(ctrl_fd: int) -> None:
    """Serve the grader: fork a child per ``spawn``; kill all it started on ``end``."""
    ctrl = _Control(socket.socket(fileno=ctrl_fd))
    subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    me = os.getpid()
    ctrl.send({"event": "ready", "pid": me, "subreaper": subreaper, "vm_size": _vm_size()})
    while True:
        try:
            msg, fds = ctrl.recv(None)
        except EOFError:
            sweep(me)
            return
        op = msg.get("op")
        if op == "quit":
            sweep(me)
            ctrl.send({"event": "bye"})
            return
        if op != "spawn" or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            continue
        limits = msg["limits"]
        limits["as_bytes"] = _vm_size() + int(limits["memory_bytes"]) if limits.get("memory_bytes") else 0
        if os.geteuid() != 0:
            mine = sum(1 for e in os.listdir("/proc") if e.isdigit() and _owner(e) == os.getuid())
            limits["nproc"] = mine + int(limits["max_procs"])
        msg["limits"] = limits
        pid = os.fork()
        if pid == 0:
            _start_child(msg, fds, ctrl)
        for fd in fds:
            os.close(fd)
        ctrl.send({"event": "spawned", "pid": pid, "limits": limits})
        _watch(ctrl, me, pid, int(limits["max_procs"]))


def _owner(pid: str) -> int:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return -1


def _watch(ctrl: _Control, me: int, child: int, max_procs: int) -> None:
    """While a question runs: reap, count processes, obey ``end``."""
    code = None
    reason = ""
    tick = 0.05
    while True:
        try:
            msg, fds = ctrl.recv(tick)
        except EOFError:
            sweep(me)
            os._exit(0)
        for fd in fds:
            os.close(fd)
        if code is None:
            _reap()
            code = _REAPED.pop(child, None)
            if code is not None:  # tell the grader at once: orphans may still hold the answer pipe open
                ctrl.send({"event": "exited", "code": code})
        if msg is not None and msg.get("op") in ("end", "kill", "quit"):
            if code is None and msg.get("op") == "end":  # it has answered: let it exit by itself
                for _ in range(100):
                    _reap()
                    if child in _REAPED:
                        break
                    time.sleep(0.01)
            code = _REAPED.pop(child, code)
            if code is None:  # not reaped yet, so its pid is still its own: its process group, then it
                for kill in (os.killpg, os.kill):
                    try:
                        kill(child, signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
            killed = sweep(me)  # then everything below the zygote (Linux /proc)
            killed.discard(child)
            code = _REAPED.pop(child, code)
            _REAPED.clear()
            ctrl.send({"event": "ended", "code": code, "swept": len(killed), "reason": reason})
            if msg.get("op") == "quit":
                os._exit(0)
            return
        if not reason:
            live = [p for p, s in descendants(me) if s not in ("Z", "X")]
            if len(live) > max_procs:
                reason = f"started more than {max_procs} processes"
                sweep(me)
        tick = min(0.2, tick * 1.5)


BOOT = """\
import os, socket, sys, types
fd = int(sys.argv[1])
s = socket.socket(fileno=fd)
n = int.from_bytes(s.recv(8, socket.MSG_WAITALL), "big")
src = b""
while len(src) < n:
    part = s.recv(n - len(src))
    if not part:
        sys.exit(3)
    src += part
s.detach()
mod = types.ModuleType("moe_grading_worker")
sys.modules[mod.__name__] = mod
exec(compile(src, "<grader>", "exec", dont_inherit=True), mod.__dict__)
mod.zygote_main(fd)
"""
