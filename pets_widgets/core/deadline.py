"""A service's limit on the work of one request (its configuration's ``[service] deadline``).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class DeadlineExceeded(Exception):
    """A service's own work on one request passed its deadline."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the work inside after ``seconds`` (SIGALRM: a service's kernel runs each
    request on its main thread). Elsewhere (another thread) the work simply runs to its end.
    Code inside must leave nothing half done when interrupted (the ledger's transactions
    roll back; a reservation is returned by the releaser's own handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: object) -> None:
        raise DeadlineExceeded(f"the service's work passed its deadline of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
