"""Helpers for tests that start kernels and gateways: leak checks, fault injection, a gateway.

Every process a test starts is a child of the pytest process; ``kernel_children`` lists the
ones still running so each test module can check it left none behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from pets_widgets.coordinator.remote import RemoteSite
from pets_widgets.ui.serve import free_port

MARKERS = ("ipykernel", "kernelgateway", "site serve")


def kernel_children() -> list[psutil.Process]:
    """Kernel and gateway processes started (directly or not) by this test process."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if proc.status() != psutil.STATUS_ZOMBIE and any(
                    m in " ".join(proc.cmdline()) for m in MARKERS):
                found.append(proc)
    return found


def assert_no_kernel_children(timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while kernel_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = kernel_children()
    assert not left, f"leftover processes: {[(p.pid, p.cmdline()[:4]) for p in left]}"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# --------------------------------------------------------------------------- faults
_INSTALL = """\
import pets_widgets.site.kernel_entry as _k
if not hasattr(_k, "_test_original"):
    _k._test_original = _k._HANDLERS["respond"]
def _test_fault(args):
{body}
_k._HANDLERS["respond"] = _test_fault
"""
_RESTORE = """\
import pets_widgets.site.kernel_entry as _k
if hasattr(_k, "_test_original"):
    _k._HANDLERS["respond"] = _k._test_original
"""


def run_in_kernel(site: RemoteSite, code: str, timeout: float = 30.0) -> object:
    """Test-only: run arbitrary code in a site kernel (the coordinator never does this)."""
    return site._execute(code, timeout)


@contextlib.contextmanager
def faulty_respond(site: RemoteSite, body: str) -> Iterator[None]:
    """Replace the site kernel's ``respond`` handler by ``body`` (a function body of
    ``args``; ``_k._test_original(args)`` is the real handler) inside the block."""
    run_in_kernel(site, _INSTALL.format(body=textwrap.indent(textwrap.dedent(body), "    ")))
    try:
        yield
    finally:
        if site.state == "up" and site._alive():
            run_in_kernel(site, _RESTORE)


# --------------------------------------------------------------------------- gateway
@dataclass
class Gateway:
    url: str
    token: str
    proc: subprocess.Popen[bytes]


@contextlib.contextmanager
def kernel_gateway(tmp: Path, timeout: float = 60.0) -> Iterator[Gateway]:
    """A Jupyter Kernel Gateway on 127.0.0.1 with a random token, in its own process group;
    its kernels use CurveZMQ and it writes its runtime files under ``tmp``."""
    token, port = secrets.token_hex(16), free_port()
    env = {**os.environ, "KG_AUTH_TOKEN": token, "JUPYTER_RUNTIME_DIR": str(tmp)}
    cmd = [sys.executable, "-m", "jupyter", "kernelgateway", "--KernelGatewayApp.ip=127.0.0.1",
           f"--KernelGatewayApp.port={port}", "--KernelGatewayApp.port_retries=0",
           "--KernelManager.transport_encryption=required"]
    with open(tmp / "gateway.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the gateway exited with {proc.returncode}")
            try:
                urllib.request.urlopen(url + "api", timeout=2)
                break
            except urllib.error.HTTPError:  # 401: it listens
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield Gateway(url, token, proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
