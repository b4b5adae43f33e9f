"""The engine of the services: Kernel Gateway's notebook-http personality, hardened.

A service (the site's, the enclave's) is a notebook whose annotated cells are its routes
(``# GET /status``...). :class:`ServiceGatewayApp` serves those routes and nothing else:
``/api/kernels``, ``/api/kernelspecs`` and ``/api/sessions`` answer 404, so a client holding
a token can call the routes and cannot run code. Every request first meets the guard (the
token in the Authorization header only, the route's own method, a JSON body in UTF-8), and
the server limits request bodies, slow and idle clients; one kernel answers requests one at
a time, so a service's state needs no locking across kernels.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import json
import os
import secrets
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kernel_gateway.gatewayapp import KernelGatewayApp
from tornado import httpserver
from tornado.ioloop import PeriodicCallback
from traitlets.config import Config

#: Set by a coordinator that starts this service itself: its process id.
PARENT_ENV = "PETS_PARENT_PID"
#: Seconds a client may keep a connection idle, or take to send a request's body.
IDLE_SECONDS = 75.0
BODY_SECONDS = 30.0
#: Seconds between the kernel pool's subscription to its kernel and the first request.
SUBSCRIBE_SECONDS = 0.5


class ServiceGatewayApp(KernelGatewayApp):
    """Kernel Gateway with the limits a service needs, serving only once its kernel is
    ready, and a clean stop on SIGINT and SIGTERM.

    ``authorize(token)`` decides whether a request's token may reach the routes (the site
    compares it with its one token; the enclave looks it up among its analysts'); ``what``
    names the service in its log.
    """

    max_body = 64 * 2**10
    announce = ""
    exit_code = 0
    what = "service"
    authorize: Callable[[str], bool] | None = None

    def init_http_server(self) -> None:
        # The server is made here and listens only once the site's kernel is seeded (see
        # _serve_when_ready). Its tornado limits: a body larger than max_body is refused
        # before it reaches the kernel, and slow or idle clients are cut off.
        self.http_server = httpserver.HTTPServer(
            self.web_app, xheaders=self.trust_xheaders, ssl_options=self._build_ssl_options(),
            max_body_size=self.max_body, max_buffer_size=self.max_body + 2**16,
            body_timeout=BODY_SECONDS, idle_connection_timeout=IDLE_SECONDS)

    async def _serve_when_ready(self) -> None:
        """Listen once the kernel pool is ready, and a moment later than that.

        The pool subscribes to its kernel's output (ZeroMQ PUB/SUB) only when seeding ends;
        a request waiting at that moment can have its reply published before the
        subscription is in place, and then waits forever. Nothing can connect before the
        subscription has settled, so no request meets that race.
        """
        await self.personality.kernel_pool.managed_pool_initialized
        await asyncio.sleep(SUBSCRIBE_SECONDS)
        port = int(self.config.KernelGatewayApp.port)
        try:
            self.http_server.listen(port, self.ip)
        except OSError as exc:
            self.log.critical("cannot listen on %s:%s (%s)", self.ip, port, exc)
            self.exit_code = 1
            self.stop()
            return
        if port == 0:  # the operating system's choice, reported in the announcement
            port = next(iter(self.http_server._sockets.values())).getsockname()[1]
        if self.announce:
            print(self.announce.format(port=port), flush=True)
        self._kernel_watch = PeriodicCallback(self._check_kernel, 1000)
        self._kernel_watch.start()

    async def _check_kernel(self) -> None:
        """Stop (exit status 1) when the service's kernel has died: the gateway would hold every
        request forever, and a supervisor (systemd's Restart=on-failure) starts a fresh one."""
        for kernel_id in list(self.kernel_manager.list_kernel_ids()):
            alive = self.kernel_manager.get_kernel(kernel_id).is_alive()
            if inspect.isawaitable(alive):
                alive = await alive
            if not alive:
                self.log.critical("the %s's kernel died; stopping so it can be restarted",
                                  self.what)
                self.exit_code = 1
                self.stop()
                return

    def init_webapp(self) -> None:
        from kernel_gateway.notebook_http.handlers import NotebookAPIHandler

        NotebookAPIHandler.prepare = _guard  # this process serves one service, nothing else
        super().init_webapp()
        self.web_app.settings["pets_authorize"] = self.authorize

    def init_signal(self) -> None:
        # Stop at once on Ctrl-C as on SIGTERM (no "shut down? y/n" prompt): the kernels are
        # shut down by the personality before the loop stops.
        signal.signal(signal.SIGINT, self._signal_stop)
        signal.signal(signal.SIGTERM, self._signal_stop)

    def start_app(self) -> None:
        super().start_app()
        self.io_loop.add_callback(self._serve_when_ready)
        parent = os.environ.get(PARENT_ENV)
        if parent and parent.isdigit():
            # Started by a coordinator for the embedded default: stop when it is gone (a
            # killed notebook kernel must not leave its services behind).
            def orphaned() -> None:
                if os.getppid() != int(parent):
                    self.stop()

            self._watch = PeriodicCallback(orphaned, 1000)
            self._watch.start()

    def start(self) -> None:
        self.start_app()
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        self.io_loop.start()


def _guard(handler: Any) -> None:
    """What every request meets before a kernel is touched (installed as the notebook-http
    handlers' ``prepare``): the token, in the Authorization header only, accepted by the
    app's ``authorize``; only the route's own method; a JSON body in UTF-8. Every refusal is JSON
    with a rule, like the routes' own errors."""
    request = handler.request
    authorize = handler.settings.get("pets_authorize")
    header = request.headers.get("Authorization", "")
    given = header[len("token "):] if header.startswith("token ") else ""
    if ("token" in request.query_arguments or "token" in request.body_arguments
            or authorize is None or not given or not authorize(given)):
        return _refuse(handler, 401, "token", "give the service's token as the header "
                       "Authorization: token <token> (and nowhere else)")
    if request.method not in handler.sources:
        return _refuse(handler, 405, "method", "this route takes " +
                       " and ".join(sorted(handler.sources)))
    try:
        request.body.decode("utf-8")
        bytes(request.query, "latin-1").decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError):
        return _refuse(handler, 400, "encoding", "the request is not UTF-8")
    if request.method == "POST":
        kind = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return _refuse(handler, 415, "content_type", "the body must be JSON "
                           "(Content-Type: application/json)")
        request.headers["Content-Type"] = "application/json"  # the gateway compares exactly
    return None


def _refuse(handler: Any, status: int, rule: str, message: str) -> None:
    handler.set_status(status)
    handler.set_header("Content-Type", "application/json")
    handler.finish(json.dumps({"error": "RequestRefused", "rule": rule, "message": message}))


def gateway_config(notebook: Path, host: str, port: int, *, certfile: Path | None = None,
                   keyfile: Path | None = None, client_ca: Path | None = None) -> Config:
    """The Kernel Gateway settings of a service on ``notebook``'s annotated cells (tokens are
    checked by the app's ``authorize``, never given on a command line)."""
    c = Config()
    app = c.KernelGatewayApp
    app.api = "kernel_gateway.notebook_http"
    app.seed_uri = str(notebook)
    app.ip, app.port, app.port_retries = host, port, 0
    # The gateway's own token check is replaced by the guard's (a random value no client
    # ever sees, so nothing falls back to an empty token).
    app.auth_token = secrets.token_hex(32)
    app.prespawn_count = 1
    if certfile is not None and keyfile is not None:
        app.certfile, app.keyfile = str(certfile), str(keyfile)
    if client_ca is not None:
        app.client_ca = str(client_ca)
    c.NotebookHTTPPersonality.allow_notebook_download = False
    # The gateway and its kernel talk over CurveZMQ-encrypted ZeroMQ through Unix sockets in
    # a private folder: no TCP port to collide with another service's kernel, or to reach.
    c.KernelManager.transport = "ipc"
    c.KernelManager.transport_encryption = "required"
    # A dead kernel is not restarted behind the gateway's back (its pool would wait for it
    # forever): the service stops instead (see ServiceGatewayApp._check_kernel).
    c.KernelManager.autorestart = False
    return c


def private_runtime(prefix: str) -> str:
    """A fresh folder (0700, removed at exit) for the kernel's connection file and sockets,
    set as this process's ``JUPYTER_RUNTIME_DIR``."""
    runtime = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, runtime, True)
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime
    os.environ.pop("KG_AUTH_TOKEN", None)
    return runtime


def run(app: ServiceGatewayApp) -> int:
    """Initialise and run ``app`` until it stops; its exit code."""
    app.initialize([])
    app.start()
    return int(app.exit_code)
