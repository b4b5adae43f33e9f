"""Start and stop a Voila server for tests, and launch Debian's chromium through playwright.

Voila runs in its own process group on 127.0.0.1 and a free port, with
``--Voila.port_retries=0`` (so it never silently moves to another port); readiness is
polled on a static asset (``voila/static/voila.js``), because a GET of the page itself
starts a kernel. Stopping SIGTERMs the whole group (Voila shuts its kernels down), then
SIGKILLs whatever is left. Chromium is Debian's ``/usr/bin/chromium``: playwright never
downloads a browser of its own here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from pets_widgets.ui.serve import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
LOOPBACK = ("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")


def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"voila exited early with rc={proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError) as exc:
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s (last error: {last})")


def stop_process_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the process group started with ``start_new_session=True``, then SIGKILL."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    # kernels Voila started live in the same group: make sure none is left behind
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group is still running (zombies excepted)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            return True
    return False


@contextlib.contextmanager
def voila_server(notebook: Path, log_path: Path, timeout: float = 90.0,
                 extra_args: Sequence[str] = ()) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Serve ``notebook`` with Voila; yield ``(url, process)``; always stop it."""
    notebook = Path(notebook).resolve()
    port = free_port()
    cmd = [sys.executable, "-m", "voila", "--no-browser", f"--port={port}",
           "--Voila.ip=127.0.0.1", "--Voila.port_retries=0", *extra_args, notebook.name]
    env = dict(os.environ)
    env.pop("MPLBACKEND", None)  # Agg in a kernel makes figures vanish
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=notebook.parent, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            root = f"http://127.0.0.1:{port}/"
            wait_http_ok(root + "voila/static/voila.js", timeout, proc)
            yield root, proc
        finally:
            stop_process_group(proc)


def route_loopback_only(page: object) -> None:
    """Abort every request that is not to loopback (the page links a CDN stylesheet)."""
    page.route("**/*", lambda r: r.continue_()  # type: ignore[attr-defined]
               if r.request.url.startswith(LOOPBACK) else r.abort())


def descendants(pid: int) -> set[int]:
    """Process ids of every live descendant of ``pid`` (children, grandchildren...)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    """The subset of ``pids`` still running (zombies excepted)."""
    out = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(pid)
    return out
