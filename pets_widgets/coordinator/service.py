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
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd
import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from pets_widgets.core.errors import (
    IntegrityError,
    SiteAttestationError,
    SiteError,
    SiteIntegrityError,
)
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import AggregateRequest, EncryptedAggregate

#: Seconds a site may take to answer one query, and to come up, by default.
DEFAULT_TIMEOUT = 60.0
DEFAULT_START_TIMEOUT = 180.0
#: Seconds to open a connection to a site (a reply may take up to the site's timeout).
CONNECT_SECONDS = 10.0
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
        self._session = requests.Session()
        # Retry only a connection that was refused or dropped before the request was sent
        # (nothing reached the site); a slow reply is the site's answer, never asked twice.
        retry = Retry(total=2, connect=2, read=False, status=0, other=0, redirect=0,
                      backoff_factor=0.05, raise_on_status=False)
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))
        self._session.headers["Authorization"] = f"token {token}"
        # Passed with every request: a Session's own verify loses to $REQUESTS_CA_BUNDLE.
        self._verify: str | bool = ca_file if ca_file is not None else True
        if client_cert is not None:
            self._session.cert = (client_cert, client_key) if client_key else client_cert
        self._lock = threading.Lock()
        self._nonce: tuple[str, float] | None = None
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
        if self._process is not None and not self.url:
            url = self._process.url(self.start_timeout)
            if url is None:
                raise SiteError(self.name, "its service stopped while starting "
                                f"({self._process.describe()})")
            self.url = url
        while True:
            try:
                info = self._status(max(1.0, deadline - time.monotonic()))
                break
            except SiteError as exc:
                # A service still starting refuses connections (or TLS handshakes), or holds
                # the request until its kernel has loaded the site's rows.
                if (exc.rule not in ("unreachable", "tls", "timeout")
                        or time.monotonic() > deadline):
                    raise
                if self._process is not None and self._process.exited():
                    raise SiteError(self.name, "its service stopped while starting "
                                    f"({self._process.describe()})") from None
                time.sleep(0.1)
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
        if cached is not None and cached[1] > time.time() + NONCE_MARGIN:
            return cached[0]
        return str(self._status()["nonce"])

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
        late = SiteError(self.name, f"did not answer {op} within {timeout:g} s", rule="timeout")
        deadline = time.monotonic() + timeout
        try:
            response = self._session.request(method, self.url + route, json=body,
                                             timeout=(CONNECT_SECONDS, timeout),
                                             verify=self._verify, stream=True)
            # The read timeout is per read: a site dripping bytes is held to the whole
            # request's deadline and a size cap here.
            chunks, size = [], 0
            with response:
                # read1 returns what has arrived (urllib3 2): a dripping site cannot make one
                # read wait for a full chunk.
                while chunk := response.raw.read1(2**16, decode_content=True):
                    size += len(chunk)
                    if size > MAX_REPLY:
                        raise SiteIntegrityError(self.name, f"its reply to {op} is larger "
                                                 f"than {MAX_REPLY:,} bytes")
                    if time.monotonic() > deadline:
                        raise late
                    chunks.append(chunk)
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
            # (read1 reads the raw stream: its timeouts and breaks are urllib3's own)
            raise late from None
        except requests.exceptions.SSLError:
            raise SiteError(self.name, "refused the TLS connection (certificate)",
                            rule="tls") from None
        except requests.ConnectionError:
            raise SiteError(self.name, f"cannot be reached at {self.url}",
                            rule="unreachable") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise SiteIntegrityError(self.name, f"its reply to {op} is broken "
                                     f"({type(exc).__name__})") from None
        if response.status_code == 401:
            raise SiteError(self.name, "refused this coordinator's token", rule="token")
        try:
            payload = json.loads(b"".join(chunks))
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            raise SiteIntegrityError(self.name, f"its reply to {op} is not JSON "
                                     f"(HTTP {response.status_code})")
        if response.status_code == 200:
            return payload
        raise _site_error(self.name, response.status_code, payload)


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
_LIVE: set[SiteProcess] = set()


class SiteProcess:
    """A ``site serve`` process this coordinator started (the embedded default only).

    ``port`` 0 lets the service take any free port and announce it on its standard output
    (no race between choosing a port here and binding it there); :meth:`url` waits for that
    announcement. Its log (the gateway's) goes to ``log``.
    """

    def __init__(self, config: Path, port: int, token: str, token_env: str,
                 log: Path | None = None):
        env = {**os.environ, token_env: token, "PETS_PARENT_PID": str(os.getpid())}
        self.config, self.port, self.token, self.token_env = config, port, token, token_env
        self.log = log
        self._announced = threading.Event()
        self._url: str | None = None
        err = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pets_widgets", "site", "serve", "--config",
                 str(config), "--port", str(port)],
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                start_new_session=True)
        finally:
            if log is not None:
                err.close()  # type: ignore[union-attr]
        threading.Thread(target=self._read_announcement, daemon=True,
                         name="pets-site-serve").start()
        _LIVE.add(self)

    def _read_announcement(self) -> None:
        assert self._proc.stdout is not None
        for raw in self._proc.stdout:
            line = raw.decode("utf-8", "replace")
            if self.log is not None:
                with open(self.log, "a", encoding="utf-8") as fh:
                    fh.write(line)
            found = re.search(r"serving at (\S+) ", line)
            if found and self._url is None:
                self._url = found.group(1).rstrip("/")
                self.port = int(self._url.rsplit(":", 1)[1])
                self._announced.set()
        self._announced.set()  # the process ended

    def url(self, timeout: float) -> str | None:
        """The service's URL once it serves, or None if it stopped or took too long."""
        self._announced.wait(timeout)
        return self._url

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


@atexit.register
def _stop_all() -> None:
    for process in list(_LIVE):
        with contextlib.suppress(Exception):
            process.stop(grace=5.0)
