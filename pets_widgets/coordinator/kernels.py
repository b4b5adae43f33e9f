"""The ``kernel`` backend: each site is its own local ipykernel process (jupyter_client).

Kernels are started with ``transport_encryption="required"``, so every ZeroMQ channel
between the coordinator and a site kernel is CurveZMQ-encrypted. All kernel I/O runs on one
private asyncio loop in a daemon thread: it works the same from a plain script and from
inside a Jupyter or Voila kernel whose own loop is already running, and the federation's
worker threads simply wait on it while the kernels (separate processes) work in parallel.

The wait loop has a deadline and asks ``km.is_alive()`` whenever no message has come for a
moment, because a killed kernel otherwise looks like a silent timeout. On the deadline the
kernel is interrupted and the interrupted call's reply is read, so the kernel stays usable;
if the interrupt does not bring it back it is restarted at the next query.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pandas as pd

from pets_widgets.coordinator.remote import (
    DEFAULT_START_TIMEOUT,
    DEFAULT_TIMEOUT,
    INTERRUPT_GRACE,
    KernelDied,
    KernelFailed,
    KernelTimeout,
    RemoteSite,
    TransportError,
)
from pets_widgets.site.sources import Source

T = TypeVar("T")
#: Seconds without a message after which the wait loop checks the kernel process is alive.
POLL = 0.1
#: ipykernel options: no IPython history database (nothing of a site's calls is kept on
#: disk, and many kernels do not contend for one SQLite file in $HOME).
KERNEL_ARGUMENTS = ("--HistoryManager.enabled=False",)


class _Loop:
    """One asyncio loop in a daemon thread, shared by every kernel site of this process."""

    _instance: _Loop | None = None
    _guard = threading.Lock()

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="pets-kernels", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    @classmethod
    def get(cls) -> _Loop:
        with cls._guard:
            if cls._instance is None or not cls._instance.thread.is_alive():
                cls._instance = _Loop()
            return cls._instance

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and wait for it (it has its own deadline; this is a
        safety net that cancels it a little later)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout + 10.0)
        except FutureTimeout:
            future.cancel()
            raise KernelTimeout("the kernel loop did not answer", recovered=False) from None


class KernelSite(RemoteSite):
    """A site in a local ipykernel process, reached over CurveZMQ-encrypted ZeroMQ.

    Its connection files live in a private temporary directory (mode 0700) that exists while
    this object does, so no kernel secret is written under $HOME; the site's signing key is
    where its configuration says, so a restarted kernel reads it back.
    """

    backend = "kernel"

    def __init__(self, name: str, config: str, *, sites: Sequence[str],
                 source: Source | None = None, timeout: float = DEFAULT_TIMEOUT,
                 start_timeout: float = DEFAULT_START_TIMEOUT, kernel_name: str = "python3",
                 transport_encryption: str = "required", population: pd.DataFrame | None = None):
        # A private folder (mode 0700) for the kernel's connection files, which hold its
        # CurveZMQ and message-signing secrets.
        self._dir: str | None = tempfile.mkdtemp(prefix=f"pets-site-{_safe(name)}-")
        self._launches = 0
        super().__init__(name, config, sites=sites, source=source, timeout=timeout,
                         start_timeout=start_timeout, population=population)
        self.kernel_name = kernel_name
        self.transport_encryption = transport_encryption
        self._km: Any = None
        self._kc: Any = None

    @property
    def pid(self) -> int | None:
        """The kernel's process id (for health checks and tests), or None."""
        process = getattr(getattr(self._km, "provisioner", None), "process", None)
        return None if process is None else process.pid

    def close(self) -> None:
        super().close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    # -- transport -------------------------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        _Loop.get().run(self._astart(timeout), timeout)

    async def _astart(self, timeout: float) -> None:
        from jupyter_client.manager import AsyncKernelManager

        if self._dir is None:
            raise TransportError("the site is closed")
        self._launches += 1
        km = AsyncKernelManager(kernel_name=self.kernel_name,
                                transport_encryption=self.transport_encryption,
                                connection_file=str(Path(self._dir) /
                                                    f"kernel-{self._launches}.json"))
        self._km = km
        try:
            await km.start_kernel(extra_arguments=list(KERNEL_ARGUMENTS))
            kc = km.client()
            kc.start_channels()
            self._kc = kc
            await kc.wait_for_ready(timeout=timeout)
        except RuntimeError as exc:  # wait_for_ready: "Kernel died before replying"
            raise TransportError(f"its kernel did not start ({exc})") from None

    def _execute(self, code: str, timeout: float) -> object:
        if self._kc is None:
            raise TransportError("its kernel is not running")
        return _Loop.get().run(self._aexecute(code, timeout), timeout + INTERRUPT_GRACE)

    async def _aexecute(self, code: str, timeout: float) -> object:
        kc, km = self._kc, self._km
        msg_id = kc.execute(code, silent=False, store_history=False, allow_stdin=False,
                            stop_on_error=True)
        deadline = time.monotonic() + timeout
        payload: object = None
        error: str | None = None
        idle = replied = False
        while not (idle and replied):
            left = deadline - time.monotonic()
            if left <= 0:
                recovered = await self._interrupt(msg_id)
                raise KernelTimeout(f"no reply in {timeout:g} s", recovered)
            try:
                if not idle:
                    msg = await kc.get_iopub_msg(timeout=min(POLL, left))
                else:
                    msg = await kc.get_shell_msg(timeout=min(POLL, left))
            except queue.Empty:
                if not await km.is_alive():
                    raise KernelDied(self._exit_text()) from None
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind in ("display_data", "execute_result"):
                data = content.get("data", {})
                if "application/json" in data:
                    payload = data["application/json"]
            elif kind == "error":
                error = f"{content.get('ename')}: {str(content.get('evalue'))[:200]}"
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "execute_reply":
                replied = True
                if content.get("status") != "ok" and error is None:
                    error = f"{content.get('ename')}: {str(content.get('evalue'))[:200]}"
        if error is not None:
            raise KernelFailed(error)
        return payload

    async def _interrupt(self, msg_id: str) -> bool:
        """Interrupt the overdue call and read its reply; True when the kernel is usable."""
        kc, km = self._kc, self._km
        try:
            await km.interrupt_kernel()
        except Exception:
            return False
        deadline = time.monotonic() + INTERRUPT_GRACE
        idle = replied = False
        while not (idle and replied) and time.monotonic() < deadline:
            try:
                if not idle:
                    msg = await kc.get_iopub_msg(timeout=POLL)
                else:
                    msg = await kc.get_shell_msg(timeout=POLL)
            except queue.Empty:
                if not await km.is_alive():
                    return False
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"].get("execution_state") == "idle":
                idle = True
            elif msg["msg_type"] == "execute_reply":
                replied = True
        return idle and replied

    def _exit_text(self) -> str:
        process = getattr(getattr(self._km, "provisioner", None), "process", None)
        code = None if process is None else process.poll()
        return "exit code unknown" if code is None else f"exit code {code}"

    def _alive(self) -> bool:
        if self._km is None:
            return False
        return bool(_Loop.get().run(self._km.is_alive(), 5.0))

    def _shutdown(self) -> None:
        if self._km is None:
            return
        km, kc = self._km, self._kc
        self._km = self._kc = None
        _Loop.get().run(self._ashutdown(km, kc), 15.0)

    @staticmethod
    async def _ashutdown(km: Any, kc: Any) -> None:
        if kc is not None:
            kc.stop_channels()
        try:
            alive = await km.is_alive()
            await asyncio.wait_for(km.shutdown_kernel(now=not alive), 10.0)
        except Exception:
            with contextlib.suppress(Exception):
                await km.shutdown_kernel(now=True)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)[:32]
