"""The ``service`` backend: sites reached by URL, on the fixed routes of a site service.

A :class:`ServiceSite` holds what a coordinator may hold of a site: its URL, a token, the
verify key its federation file pins, and one kept-alive ``requests.Session``. The service
answers ``GET /status`` and ``POST /aggregate`` and nothing else (``site serve``); there is
no channel to code. Each reply to ``/aggregate`` carries the site's next nonce, so a query
costs one call per site. Every failure becomes a :class:`SiteError` naming the site: a
refused token, a timeout, a connection refused, a malformed or tampered reply.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from pets_widgets.coordinator.http import HttpFailure, request_json, session
from pets_widgets.core.errors import (
    IntegrityError,
    PetsError,
    SiteAttestationError,
    SiteError,
    SiteIntegrityError,
)
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import AggregateRequest, EncryptedAggregate

#: Seconds a site may take to answer one query, and to come up, by default.
DEFAULT_TIMEOUT = 60.0
DEFAULT_START_TIMEOUT = 180.0
#: The largest reply read from a site (an aggregate of a 20,000-cell query is far below).
MAX_REPLY = 32 * 2**20
#: A cached nonce is used only while it has at least this many seconds left.
NONCE_MARGIN = 30.0


class ServiceSite:
    """One site service. ``start()`` checks it is the site the federation pins; ``close()``.

    ``token`` is the service's token (or ``token_env``, the name of the environment variable
    holding it); ``verify_key`` the hex Ed25519 key the site signs with, as its registry
    published it (None: taken from the first ``/status``, for services this process
    started itself); ``ca_file`` the CA that signed the service's TLS certificate and
    ``client_cert``/``client_key`` this coordinator's certificate for mutual TLS.
    ``source`` (when the coordinator knows it: the embedded demo) serves public
    denominators and test oracles only.
    """

    backend = "service"
    parallel = True

    def __init__(self, name: str, url: str, *, token: str | None = None,
                 token_env: str | None = None, verify_key: str | None = None,
                 sites: tuple[str, ...] = (), ca_file: str | None = None,
                 client_cert: str | None = None, client_key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT, start_timeout: float = DEFAULT_START_TIMEOUT,
                 source: Any = None, population: pd.DataFrame | None = None,
                 process: SiteProcess | None = None):
        self.name = name
        self.url = url.rstrip("/")
        if token is None:
            token = os.environ.get(token_env or "", "")
            if not token:
                raise SiteError(name, f"no token: set the environment variable {token_env}")
        self.sites = tuple(sites)
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self.source = source
        self._population = population
        self._pinned = verify_key
        self._verify_key: VerifyKey | None = None
        self._process = process
        self._session = session(f"token {token}", client_cert, client_key)
        self.token = token
        # Passed with every request: a Session's own verify loses to $REQUESTS_CA_BUNDLE.
        self._verify: str | bool = ca_file if ca_file is not None else True
        self._lock = threading.Lock()
        self._nonce: tuple[str, float] | None = None
        self._handed: tuple[str, float] | None = None  # the nonce challenge() last gave
        self.state, self.cause = "new", ""
        self.rows_rounded: int | None = None

    def __repr__(self) -> str:
        return f"ServiceSite({self.name!r}, {self.url}, {self.state})"

    # -- what Federation uses ------------------------------------------------------------
    @property
    def verify_key(self) -> VerifyKey:
        if self._verify_key is None:
            raise SiteError(self.name, "has not been started")
        return self._verify_key

    @property
    def population(self) -> pd.DataFrame | None:
        if self._population is None and self.source is not None:
            self._population = self.source.population(self.name)
        return self._population

    def start(self) -> ServiceSite:
        """Wait for the service to answer ``/status`` and check who it is."""
        with self._lock:
            self._nonce = None  # a nonce of a service started before is of no use
        deadline = time.monotonic() + self.start_timeout
        def stopped(how: str) -> SiteError:
            return SiteError(self.name, f"its service stopped while starting ({how})")

        if self._process is not None and not self.url:
            self.url = announced_url(self._process, self.start_timeout, stopped)
        info = first_answer(self._status, deadline, self._process, stopped)
        key = str(info.get("verify_key", ""))
        if self._pinned is not None and key != self._pinned:
            raise SiteIntegrityError(self.name, "signs with another key than the federation "
                                     "file pins (verify_key)")
        if info.get("name") != self.name:
            raise SiteError(self.name, "its service says it is another site", rule="identity")
        if self.sites and tuple(info.get("sites", ())) != self.sites:
            raise SiteError(self.name, "its data dictionary lists other sites than the "
                                       "federation's", rule="dictionary")
        try:
            self._verify_key = VerifyKey.from_bytes(bytes.fromhex(key))
        except ValueError:
            raise SiteIntegrityError(self.name, "its status has no valid verify key") from None
        self.state = "up"
        return self

    def challenge(self) -> str:
        """The site's next nonce: the one its last reply carried, else a fresh ``/status``."""
        with self._lock:
            cached, self._nonce = self._nonce, None
        if cached is None or cached[1] <= time.time() + NONCE_MARGIN:
            info = self._status()
            cached = (str(info["nonce"]), float(info.get("nonce_expires", 0) or 0))
        with self._lock:
            self._handed = cached
        return cached[0]

    def give_back(self, nonce: str) -> None:
        """A nonce :meth:`challenge` handed out that no request used (the enclave answered
        from a stored release): cached again for the next query."""
        with self._lock:
            if self._handed is not None and self._handed[0] == nonce and self._nonce is None:
                self._nonce = self._handed
            self._handed = None

    def respond(self, request: AggregateRequest) -> EncryptedAggregate:
        reply = self._call("POST", "/aggregate", request.to_body(), self.timeout, "aggregate")
        try:
            aggregate = EncryptedAggregate.from_dict(reply["aggregate"])
            nonce, expires = str(reply["nonce"]), float(reply["nonce_expires"])
        except (KeyError, TypeError, ValueError, IntegrityError) as exc:
            raise SiteIntegrityError(self.name, f"its reply is not an encrypted aggregate "
                                     f"({type(exc).__name__})") from None
        with self._lock:
            self._nonce = (nonce, expires)
        return aggregate

    def status(self) -> dict[str, Any]:
        """State, size rounded to 100 and epsilon used and left, asked of the service."""
        try:
            info = self._status()
        except SiteError as exc:
            self.state, self.cause = "down", exc.cause
            return {"alive": False, "rows": self.rows_rounded, "state": "down",
                    "detail": exc.cause}
        self.state, self.cause = "up", ""
        return {"alive": True, "rows": info.get("rows"), "state": "up", "detail": "",
                "epsilon_used": info.get("epsilon_used"),
                "epsilon_left": info.get("epsilon_left")}

    def close(self) -> None:
        """Close the connection, and stop the service if this process started it."""
        self._session.close()
        if self._process is not None:
            self._process.stop()
        self.state = "closed"

    # -- HTTP ------------------------------------------------------------------------------
    def _status(self, timeout: float | None = None) -> dict[str, Any]:
        info = self._call("GET", "/status", None, timeout or self.timeout, "status")
        if not isinstance(info.get("nonce"), str):
            raise SiteIntegrityError(self.name, "its status carries no nonce")
        self.rows_rounded = info.get("rows") if isinstance(info.get("rows"), int) else None
        return info

    def _call(self, method: str, route: str, body: Mapping[str, Any] | None, timeout: float,
              op: str) -> dict[str, Any]:
        """One request; every failure is a :class:`SiteError` naming this site and why."""
        try:
            status, payload = request_json(self._session, method, self.url + route, body,
                                           timeout=timeout, verify=self._verify,
                                           max_reply=MAX_REPLY, op=op)
        except HttpFailure as exc:
            if exc.rule in ("timeout", "tls", "unreachable"):
                raise SiteError(self.name, str(exc), rule=exc.rule) from None
            raise SiteIntegrityError(self.name, str(exc)) from None
        if status == 401:
            raise SiteError(self.name, "refused this coordinator's token", rule="token")
        if status == 200:
            return payload
        raise _site_error(self.name, status, payload)


def _site_error(site: str, status: int, payload: Mapping[str, Any]) -> SiteError:
    """A site service's JSON error as the error the federation raises."""
    error = str(payload.get("error", ""))[:100]
    rule = str(payload.get("rule", ""))[:100]
    message = str(payload.get("message", ""))[:2000]
    if error in ("AttestationError", "SiteAttestationError"):
        return SiteAttestationError(site, message, rule=rule)
    if error == "SiteRefusal":
        return SiteError(site, f"refused: {message}", rule=rule)
    if error in ("IntegrityError", "PackingError"):
        return SiteIntegrityError(site, message)
    if status == 503:
        return SiteError(site, f"is unavailable: {message}", rule=rule)
    if status == 504:
        return SiteError(site, message, rule=rule)
    if error == "QueryValidationError":
        return SiteError(site, f"the site rejected the request: {message}", rule=rule)
    return SiteError(site, f"{error or 'HTTP ' + str(status)}: {message}", rule=rule)


# --------------------------------------------------------------------------- starting
#: The rules of a failure that only means "not serving yet" while a service starts.
STARTING_RULES = ("unreachable", "tls", "timeout")

Answer = TypeVar("Answer")


def announced_url(process: ServiceProcess, timeout: float,
                  stopped: Callable[[str], Exception]) -> str:
    """The URL a service started here announces, or ``stopped(how)`` raised if it ends first."""
    url = process.url(timeout)
    if url is None:
        raise stopped(process.describe())
    return url


def first_answer(ask: Callable[[float], Answer], deadline: float,
                 process: ServiceProcess | None,
                 stopped: Callable[[str], Exception]) -> Answer:
    """``ask(timeout)`` until the service answers (site and enclave services alike).

    A service still starting refuses connections (or TLS handshakes), or holds the request
    until its kernel is ready: such failures (their ``rule`` in :data:`STARTING_RULES`) are
    retried until ``deadline``; any other is raised, and so is ``stopped(how)`` when a
    process started here has ended."""
    while True:
        try:
            return ask(max(1.0, deadline - time.monotonic()))
        except PetsError as exc:
            if (getattr(exc, "rule", "") not in STARTING_RULES
                    or time.monotonic() > deadline):
                raise
            if process is not None and process.exited():
                raise stopped(process.describe()) from None
            time.sleep(0.1)


# --------------------------------------------------------------------------- many sites
def start_sites(sites: Sequence[Any]) -> None:
    """Start sites in parallel; on any failure stop them all and raise the first error."""
    if not sites:
        return
    with ThreadPoolExecutor(max_workers=len(sites), thread_name_prefix="pets-start") as pool:
        futures = [pool.submit(site.start) for site in sites]
    errors = [f.exception() for f in futures if f.exception() is not None]
    if errors:
        close_sites(sites)
        raise errors[0]  # type: ignore[misc]


def close_sites(sites: Sequence[Any]) -> None:
    """Close sites in parallel (a graceful kernel shutdown takes a few tenths of a second).

    Plain threads rather than an executor: this also runs at interpreter exit, when
    ``concurrent.futures`` no longer accepts work.
    """
    closers = [c for s in sites if (c := getattr(s, "close", None)) is not None]
    if len(closers) <= 1:
        for closer in closers:
            closer()
        return

    def quietly(closer: Any) -> None:
        with contextlib.suppress(Exception):
            closer()

    threads = [threading.Thread(target=quietly, args=(c,), name="pets-stop") for c in closers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30.0)


# --------------------------------------------------------------------------- local services
_LIVE: set[ServiceProcess] = set()


class ServiceProcess:
    """A service process this coordinator started (the embedded default only): ``args`` of
    ``python -m pets_widgets``, with ``env`` added to this process's environment.

    A service started on port 0 takes any free port and announces its URL on its standard
    output (no race between choosing a port here and binding it there); :meth:`url` waits
    for that announcement, :meth:`line` for any other. Its log (the gateway's) goes to
    ``log``.
    """

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path | None = None,
                 port: int = 0):
        env = {**os.environ, **env, "PETS_PARENT_PID": str(os.getpid())}
        self.log = log
        self.port = port
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._ended = False
        self._url: str | None = None
        err = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pets_widgets", *args], env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        finally:
            if log is not None:
                err.close()  # type: ignore[union-attr]
        threading.Thread(target=self._read_announcements, daemon=True,
                         name="pets-serve").start()
        _LIVE.add(self)

    def _read_announcements(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace")
            if self.log is not None:
                with open(self.log, "a", encoding="utf-8") as fh:
                    fh.write(line)
            found = re.search(r"serving at (\S+)", line)
            with self._changed:
                self._lines.append(line)
                if found and self._url is None:
                    self._url = found.group(1).rstrip("/")
                    self.port = int(self._url.rsplit(":", 1)[1])
                self._changed.notify_all()
        with self._changed:
            self._ended = True  # the process ended
            self._changed.notify_all()

    def line(self, pattern: str, timeout: float) -> re.Match[str] | None:
        """The first announcement matching ``pattern``, or None if the process stopped or
        took longer than ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self._lines:
                    if (found := re.search(pattern, line)) is not None:
                        return found
                left = deadline - time.monotonic()
                if self._ended or left <= 0:
                    return None
                self._changed.wait(left)

    def url(self, timeout: float) -> str | None:
        """The service's URL once it serves, or None if it stopped or took too long."""
        return None if self.line(r"serving at (\S+)", timeout) is None else self._url

    @property
    def pid(self) -> int:
        return self._proc.pid

    def exited(self) -> bool:
        return self._proc.poll() is not None

    def describe(self) -> str:
        return f"exit status {self._proc.returncode}" + (
            f"; its log is {self.log}" if self.log is not None else "")

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM (the service shuts its kernel down), then SIGKILL of its whole session."""
        _LIVE.discard(self)
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)  # a kernel left behind, if any
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5.0)


class SiteProcess(ServiceProcess):
    """A ``site serve`` process this coordinator started, with its token in the environment
    variable its configuration names."""

    def __init__(self, config: Path, port: int, token: str, token_env: str,
                 log: Path | None = None):
        self.config, self.token, self.token_env = config, token, token_env
        super().__init__(["site", "serve", "--config", str(config), "--port", str(port)],
                         {token_env: token}, log, port)


@atexit.register
def _stop_all() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop(grace=5.0)
