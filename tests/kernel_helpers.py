"""Leak checks for tests that start processes: site services and their kernels, Voila.

Every process a test starts is a child of the pytest process; ``kernel_children`` lists the
ones still running so each test module can check it left none behind.
"""

from __future__ import annotations

import contextlib
import time

import psutil

#: Command-line marks of the processes a test may leave behind by mistake.
MARKERS = ("ipykernel", "kernelgateway", "site serve")


def kernel_children() -> list[psutil.Process]:
    """Kernel and site service processes started (directly or not) by this test process."""
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
    """Resident memory of a process, in MiB."""
    return psutil.Process(pid).memory_info().rss / 2**20
