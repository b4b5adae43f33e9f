"""The ``gateway`` backend: a site kernel behind Jupyter Kernel Gateway, on another machine.

The gateway's documented API is used as it is: ``POST /api/kernels`` starts the site's
kernel, ``/api/kernels/<id>/channels`` is its websocket, ``POST .../interrupt`` interrupts
it and ``DELETE`` stops it; every request carries ``Authorization: token <t>`` (the only form
Kernel Gateway 3 accepts, and the header jupyter_server's own gateway client leaves off the
websocket). Messages are built and parsed by :class:`jupyter_client.session.Session`; the
websocket is websocket-client's. Before each receive the socket is set to ``TCP_QUICKACK``
(Linux): the gateway does not disable Nagle, which otherwise adds about 40 ms to every call.

The token is read from the environment variable the configuration names, when the site
starts; it never appears in a file, an error message or ``repr``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

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
from pets_widgets.core.errors import SiteError
from pets_widgets.site.sources import Source

#: Seconds a websocket receive waits before the loop checks its deadline.
POLL = 0.25
#: Seconds between REST liveness checks while waiting for a reply.
ALIVE_EVERY = 2.0


class GatewaySite(RemoteSite):
    """A site whose kernel runs behind a Jupyter Kernel Gateway at ``url``.

    ``token_env`` names the environment variable holding the gateway's token. ``config`` is
    the path of the site's configuration on the gateway's machine: the kernel reads its data,
    signing key, floors and trust from there.
    """

    backend = "gateway"

    def __init__(self, name: str, config: str, *, url: str, token_env: str,
                 sites: Sequence[str], source: Source | None = None,
                 timeout: float = DEFAULT_TIMEOUT, start_timeout: float = DEFAULT_START_TIMEOUT,
                 kernel_name: str = "python3", quickack: bool = True,
                 population: pd.DataFrame | None = None):
        super().__init__(name, config, sites=sites, source=source, timeout=timeout,
                         start_timeout=start_timeout, population=population)
        self.url = url if url.endswith("/") else url + "/"
        self.token_env = token_env
        self.kernel_name = kernel_name
        self.quickack = quickack and hasattr(socket, "TCP_QUICKACK")
        self.kernel_id: str | None = None
        self._token: str | None = None
        self._ws: Any = None
        self._session: Any = None

    def __repr__(self) -> str:
        return f"GatewaySite({self.name!r}, {self.url}, {self.state})"

    # -- REST --------------------------------------------------------------------------------------
    def _read_token(self) -> str:
        token = os.environ.get(self.token_env)
        if not token:
            raise SiteError(self.name, f"the environment variable {self.token_env} that should "
                                       f"hold the token of the gateway at {self.url} is not set")
        return token

    def _http(self, method: str, path: str, body: object = None,
              timeout: float = 30.0) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        request.add_header("Authorization", f"token {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as exc:
            return exc.code, None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise TransportError(f"the gateway at {self.url} cannot be reached "
                                 f"({type(reason).__name__})") from None

    def _refused(self, status: int) -> SiteError:
        if status in (401, 403):
            return SiteError(self.name, f"the gateway at {self.url} refused the token in "
                                        f"${self.token_env} (HTTP {status})")
        return SiteError(self.name, f"the gateway at {self.url} answered HTTP {status}")

    # -- transport ---------------------------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        import websocket
        from jupyter_client.session import Session

        self._token = self._read_token()
        # No "env" in the body: with one, the gateway gives the kernel a minimal environment
        # (no HOME, no PYTHONPATH); without, it inherits the gateway's, less its token.
        status, model = self._http("POST", "api/kernels", {"name": self.kernel_name},
                                   timeout=timeout)
        if status != 201 or not isinstance(model, dict) or "id" not in model:
            raise self._refused(status)
        self.kernel_id = str(model["id"])
        self._session = Session(key=b"", username="pets_widgets")  # the gateway re-signs
        self._connect(websocket, timeout)

    def _connect(self, websocket: Any, timeout: float) -> None:
        base = urllib.parse.urlsplit(self.url)
        scheme = "wss" if base.scheme == "https" else "ws"
        ws_url = (f"{scheme}://{base.netloc}{base.path}api/kernels/{self.kernel_id}/channels"
                  f"?session_id={self._session.session}")
        try:
            self._ws = websocket.create_connection(
                ws_url, header=[f"Authorization: token {self._token}"], timeout=timeout)
        except websocket.WebSocketBadStatusException as exc:
            raise self._refused(exc.status_code) from None
        except (OSError, websocket.WebSocketException) as exc:
            raise TransportError(f"the websocket of the gateway at {self.url} failed "
                                 f"({type(exc).__name__})") from None

    def _execute(self, code: str, timeout: float) -> object:
        import websocket
        from jupyter_client.jsonutil import json_default

        if self._ws is None:
            raise TransportError("its gateway kernel is not connected")
        msg = self._session.msg("execute_request", {
            "code": code, "silent": False, "store_history": False, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        msg["channel"] = "shell"
        msg_id = msg["header"]["msg_id"]
        try:
            self._ws.send(json.dumps(msg, default=json_default))
        except (OSError, websocket.WebSocketException) as exc:
            raise TransportError(f"the websocket of the gateway at {self.url} closed "
                                 f"({type(exc).__name__})") from None
        deadline = time.monotonic() + timeout
        last_check = time.monotonic()
        payload: object = None
        error: str | None = None
        idle = replied = False
        while not (idle and replied):
            now = time.monotonic()
            if now >= deadline:
                raise KernelTimeout(f"no reply in {timeout:g} s", self._interrupt(msg_id))
            if now - last_check > ALIVE_EVERY:
                last_check = now
                if not self._alive():
                    raise KernelDied("the gateway reports the kernel gone")
            message = self._receive(min(POLL, deadline - now))
            if message is None or message.get("parent_header", {}).get("msg_id") != msg_id:
                if message is not None and message.get("msg_type") == "status":
                    state = message.get("content", {}).get("execution_state")
                    if state in ("restarting", "dead"):
                        raise KernelDied(f"the gateway reports the kernel {state}")
                continue
            kind, content = message["msg_type"], message.get("content", {})
            if kind in ("display_data", "execute_result"):
                data = content.get("data", {})
                if "application/json" in data:
                    payload = data["application/json"]
            elif kind == "error":
                error = f"{content.get('ename')}: {str(content.get('evalue'))[:200]}"
            elif kind == "status" and content.get("execution_state") == "idle":
                idle = True
            elif kind == "status" and content.get("execution_state") in ("restarting", "dead"):
                raise KernelDied(f"the gateway reports the kernel {content['execution_state']}")
            elif kind == "execute_reply":
                replied = True
                if content.get("status") != "ok" and error is None:
                    error = f"{content.get('ename')}: {str(content.get('evalue'))[:200]}"
        if error is not None:
            raise KernelFailed(error)
        return payload

    def _receive(self, wait: float) -> dict[str, Any] | None:
        """One JSON message from the websocket, or None when nothing came within ``wait``."""
        import websocket

        try:
            self._ws.settimeout(max(wait, 0.01))
            if self.quickack:
                self._ws.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            frame = self._ws.recv()
        except websocket.WebSocketTimeoutException:
            return None
        except (OSError, websocket.WebSocketException) as exc:
            raise TransportError(f"the websocket of the gateway at {self.url} closed "
                                 f"({type(exc).__name__})") from None
        if isinstance(frame, bytes):  # binary frames carry only buffers (widgets)
            return None
        try:
            message = json.loads(frame)
        except ValueError:
            return None
        return message if isinstance(message, dict) else None

    def _interrupt(self, msg_id: str) -> bool:
        """Interrupt the overdue call through REST and read its reply; True when usable."""
        try:
            status, _ = self._http("POST", f"api/kernels/{self.kernel_id}/interrupt", {})
        except TransportError:
            return False
        if status != 204:
            return False
        deadline = time.monotonic() + INTERRUPT_GRACE
        idle = replied = False
        while not (idle and replied) and time.monotonic() < deadline:
            try:
                message = self._receive(POLL)
            except TransportError:
                return False
            if message is None or message.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            content = message.get("content", {})
            if message["msg_type"] == "status" and content.get("execution_state") == "idle":
                idle = True
            elif message["msg_type"] == "execute_reply":
                replied = True
        return idle and replied

    def _alive(self) -> bool:
        """The gateway still has the kernel, and did not restart it under us (a restarted
        kernel is alive but has lost its site: it must be started again)."""
        if self.kernel_id is None:
            return False
        if self._lock.acquire(blocking=False):  # only one thread reads the websocket
            try:
                if self._restarted_while_idle():
                    return False
            finally:
                self._lock.release()
        status, model = self._http("GET", f"api/kernels/{self.kernel_id}", timeout=5.0)
        return status == 200 and isinstance(model, dict) and \
            model.get("execution_state") not in ("dead", "restarting")

    def _restarted_while_idle(self) -> bool:
        """Read what arrived between calls; True when it says the kernel was restarted."""
        if self._ws is None or self._ws.sock is None:
            return False
        restarted = False
        while select.select([self._ws.sock], [], [], 0)[0]:
            try:
                message = self._receive(POLL)
            except TransportError:
                return True
            if message is None:
                break
            if message.get("msg_type") == "status" and message.get("content", {}).get(
                    "execution_state") in ("restarting", "dead"):
                restarted = True
        return restarted

    def _shutdown(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):  # already closed
                ws.close()
        kernel_id, self.kernel_id = self.kernel_id, None
        if kernel_id is not None and self._token is not None:
            with contextlib.suppress(TransportError):
                self._http("DELETE", f"api/kernels/{kernel_id}", timeout=15.0)
