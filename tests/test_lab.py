"""``make lab`` is safe by default: a random token (never a published one), no news pop-up.

Starts the real JupyterLab server through the Makefile, as a learner would, on a free port.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "jupyter").exists(),
                                reason="needs make and the course environment (.venv)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_lab(*make_args: str):
    """Start ``make lab`` on a free port; return (process, port, token printed or None, log so far)."""
    port = _free_port()
    proc = subprocess.Popen(["make", "-s", "lab", f"PORT={port}", *make_args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    log, token, deadline = [], None, time.time() + 120
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        log.append(line)
        m = re.search(rf"http://127\.0\.0\.1:{port}/lab\?token=([0-9A-Za-z_-]+)", line)
        if m:
            token = m.group(1)
        if "Use Control-C to stop this server" in line:  # printed once the server listens
            break
    return proc, port, token, "".join(log)


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def _get(url: str) -> tuple[int, str]:
    """(HTTP status, body); retries while the server is still coming up (connection refused)."""
    deadline = time.time() + 60
    while True:
        try:
            with urllib.request.urlopen(url, timeout=20) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, ""
        except urllib.error.URLError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_make_lab_uses_a_random_token_and_turns_off_the_news_prompt():
    proc, port, token, log = _start_lab()
    try:
        assert token, f"no URL with a token printed:\n{log}"
        assert token != "moe-course" and len(token) >= 32, token  # Jupyter's random token, not a published one
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/api/contents/notebooks")[0] == 403  # no token, no access
        status, body = _get(f"{base}/api/contents/notebooks?token={token}")
        assert status == 200 and "05_mixtral_top2.ipynb" in body
        status, body = _get(f"{base}/lab/api/settings/@jupyterlab/apputils-extension:notification?token={token}")
        assert status == 200
        props = json.loads(body)["schema"]["properties"]  # overrides.json changes the schema defaults
        assert props["fetchNews"]["default"] == "false" and props["checkForUpdates"]["default"] is False
    finally:
        _stop(proc)


def test_make_lab_token_option_still_fixes_the_token():
    proc, port, token, log = _start_lab("TOKEN=a-token-of-my-own")
    try:
        assert "is running at" in log, log
        assert _get(f"http://127.0.0.1:{port}/api/contents/notebooks")[0] == 403
        assert _get(f"http://127.0.0.1:{port}/api/contents/notebooks?token=a-token-of-my-own")[0] == 200
    finally:
        _stop(proc)
