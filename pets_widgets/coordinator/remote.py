"""Sites in other processes: the part shared by local kernels and Kernel Gateway kernels.

A :class:`RemoteSite` speaks to one site kernel through a transport (subclasses implement
launching, executing one fixed call, liveness, interrupting and stopping). It turns every
transport failure into a :class:`~pets_widgets.core.errors.SiteError` naming the site and the
cause, restarts a dead kernel at the start of the next query (the kernel reloads its rows
from its source and its signing key from its key file, so it signs with the key the enclave
registered), and reports a site it cannot bring back as down.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import pandas as pd

from pets_widgets.core.errors import (
    DataProblem,
    DataValidationError,
    IntegrityError,
    PetsError,
    SiteAttestationError,
    SiteError,
    SiteIntegrityError,
)
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import AggregateRequest, EncryptedAggregate
from pets_widgets.site.kernel_entry import call_code
from pets_widgets.site.sources import Source

#: Seconds a site may take to answer one query call, and to start (load rows) by default.
DEFAULT_TIMEOUT = 60.0
DEFAULT_START_TIMEOUT = 180.0
#: Seconds given to an interrupted call to come back before the kernel is restarted.
INTERRUPT_GRACE = 5.0


class KernelDied(Exception):
    """The site's kernel process is gone (killed, crashed or restarted under us)."""


class KernelTimeout(Exception):
    """The call passed its deadline; ``recovered`` says whether an interrupt ended it."""

    def __init__(self, message: str, recovered: bool):
        super().__init__(message)
        self.recovered = recovered


class TransportError(Exception):
    """The transport failed (connection refused, HTTP error, closed socket); the message
    is safe to show: it names an address or a status, never data."""


class KernelFailed(Exception):
    """The fixed call raised outside the site entry point (e.g. pets_widgets not importable)."""


#: Every remote site started and not yet closed (strong references: a kernel is a process
#: that must be stopped even when its Federation was dropped unclosed), stopped at exit.
_LIVE: set[RemoteSite] = set()
_LIVE_LOCK = threading.Lock()


def _close_all_at_exit() -> None:
    with _LIVE_LOCK:
        sites = list(_LIVE)
    close_sites(sites)


atexit.register(_close_all_at_exit)


_DIED = "its kernel died"


class RemoteSite:
    """One site in its own kernel. ``start()`` before use; ``close()`` (idempotent) after.

    ``config``: the path of the site's own configuration file, as the kernel's machine sees
    it; the kernel reads its source, signing key, budget, floors and trust from there (a
    restarted kernel therefore signs with the registered key). ``source``, when the
    coordinator knows it, serves public denominators and test oracles only.
    ``timeout``: seconds a query call may take before the kernel is interrupted (and
    restarted if the interrupt does not bring it back).
    """

    backend: ClassVar[str] = ""
    #: Federation fans queries out to sites that say so in parallel threads.
    parallel = True

    def __init__(self, name: str, config: str, *, sites: Sequence[str],
                 source: Source | None = None, timeout: float = DEFAULT_TIMEOUT,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 population: pd.DataFrame | None = None):
        self.name = name
        self.config = config
        self.sites = tuple(sites)
        self.source = source
        self.timeout = float(timeout)
        self.start_timeout = float(start_timeout)
        self._start_args = {"config": config}
        self._verify_key: VerifyKey | None = None
        self._lock = threading.RLock()
        self.state = "new"  # new -> up <-> down -> closed
        self.cause = ""
        self.restarts = 0
        self.rows_rounded: int | None = None
        self.kernel_info: dict[str, Any] = {}
        self._population = population

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.state})"

    # -- public surface used by Federation ----------------------------------------------------
    @property
    def verify_key(self) -> VerifyKey:
        if self._verify_key is None:
            raise SiteError(self.name, "has not been started")
        return self._verify_key

    @property
    def population(self) -> pd.DataFrame | None:
        """Public denominators: the configuration's population file, or those derived from
        the source description (no rows involved)."""
        if self._population is None and self.source is not None:
            self._population = self.source.population(self.name)
        return self._population

    def start(self) -> RemoteSite:
        """Launch the kernel and load the site inside it; raises a named error on failure."""
        with self._lock:
            if self.state == "closed":
                raise SiteError(self.name, "is closed")
            with _LIVE_LOCK:
                _LIVE.add(self)
            t0 = time.monotonic()
            try:
                self._launch_named()
                info = self._call("start", self._start_args, self.start_timeout)
                self._check_identity(info)
            except BaseException:
                self._stop_quietly()
                self.state = "new"
                raise
            self._verify_key = VerifyKey.from_bytes(bytes.fromhex(info["verify_key"]))
            self.rows_rounded = int(info["rows"])
            self.kernel_info = {**info, "start_seconds": round(time.monotonic() - t0, 3)}
            self.state, self.cause = "up", ""
            return self

    def _check_identity(self, info: dict[str, Any]) -> None:
        """The kernel's site must be the one the federation lists, in the same study."""
        if info.get("name") != self.name:
            raise SiteError(self.name, "its configuration names another site")
        if tuple(info.get("sites", ())) != self.sites:
            raise SiteError(self.name, "its data dictionary lists other sites than the "
                                       "federation's", rule="dictionary")

    def challenge(self) -> str:
        """First call of every query: brings a dead kernel back first, then asks for a nonce.

        A kernel found dying during the challenge itself (killed between queries, before its
        death was noticed) is restarted once and asked again: nothing has been sent to it
        yet, so nothing is lost or repeated.
        """
        with self._lock:
            self._ensure_up()
            try:
                result = self._call("challenge", {}, self.timeout)
            except SiteError:
                if not self.cause.startswith(_DIED):
                    raise
                self._ensure_up()
                result = self._call("challenge", {}, self.timeout)
            nonce = result.get("nonce")
            if not isinstance(nonce, str):
                raise SiteIntegrityError(self.name, "replied to challenge without a nonce")
            return nonce

    def respond(self, request: AggregateRequest) -> EncryptedAggregate:
        with self._lock:
            if self.state != "up":
                raise SiteError(self.name, f"is down ({self.cause}); it is restarted at the "
                                           "next query")
            result = self._call("respond", {"request": request.to_json()}, self.timeout)
            text = result.get("aggregate")
            if not isinstance(text, str):
                raise SiteIntegrityError(self.name, "replied without an encrypted aggregate")
            try:
                return EncryptedAggregate.from_json(text)
            except IntegrityError as exc:
                raise SiteIntegrityError(self.name, str(exc)) from None

    def status(self) -> dict[str, Any]:
        """Liveness (asked of the transport), size rounded to 100, state, cause, and the
        epsilon the site has answered for and has left (asked of the site itself)."""
        alive = False
        if self.state in ("up", "down"):
            try:
                alive = self._alive()
            except Exception:
                alive = False
        if self.state == "up" and not alive:
            self._mark_down("the kernel is not running")
        info: dict[str, Any] = {"alive": alive, "rows": self.rows_rounded, "state": self.state,
                                "detail": self.cause}
        if self.state == "up" and alive:
            with self._lock, contextlib.suppress(SiteError):
                budget = self._call("status", {}, self.timeout)
                info.update(epsilon_used=budget.get("epsilon_used"),
                            epsilon_left=budget.get("epsilon_left"))
        return info

    def close(self) -> None:
        """Stop the kernel (gracefully when it answers); safe to call twice."""
        with self._lock:
            if self.state == "closed":
                return
            self._stop_quietly()
            self.state = "closed"
            with _LIVE_LOCK:
                _LIVE.discard(self)

    def __enter__(self) -> RemoteSite:
        return self.start() if self.state == "new" else self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the call --------------------------------------------------------------------------------
    def _call(self, op: str, args: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Run the fixed call ``op`` and return its result, or raise a SiteError naming why."""
        try:
            payload = self._execute(call_code(op, args), timeout)
        except KernelDied as exc:
            self._mark_down(f"{_DIED} ({exc})")
            raise SiteError(self.name, f"its kernel died during {op} ({exc}); nothing was "
                                       "released; it is restarted at the next query") from None
        except KernelTimeout as exc:
            if not exc.recovered:
                self._mark_down(f"it hung past {timeout:g} s and did not answer an interrupt")
            action = ("interrupted" if exc.recovered
                      else "it did not answer an interrupt and is restarted at the next query")
            raise SiteError(self.name, f"did not answer {op} within {timeout:g} s ({action})"
                            ) from None
        except TransportError as exc:
            self._mark_down(str(exc))
            raise SiteError(self.name, str(exc)) from None
        except KernelFailed as exc:
            raise SiteError(self.name, f"the site kernel failed: {exc}") from None
        return self._decode(op, payload)

    def _decode(self, op: str, payload: object) -> dict[str, Any]:
        if not isinstance(payload, dict) or not isinstance(payload.get("ok"), bool):
            raise SiteIntegrityError(self.name, f"its reply to {op} is not a site reply")
        if payload["ok"]:
            result = payload.get("result")
            if not isinstance(result, dict):
                raise SiteIntegrityError(self.name, f"its reply to {op} has no result")
            return result
        error, message = str(payload.get("error")), str(payload.get("message", ""))[:2000]
        rule = str(payload.get("rule", ""))[:100]
        if error == "DataValidationError":
            problems = [DataProblem(str(p["column"]), str(p["problem"]),
                                    count=int(p.get("count", 0)))
                        for p in payload.get("problems", ())]
            raise DataValidationError(message, problems, self.name)
        if error in ("AttestationError", "SiteAttestationError"):
            raise SiteAttestationError(self.name, message, rule=rule)
        if error == "SiteRefusal":
            raise SiteError(self.name, f"refused: {message}", rule=rule)
        if error in ("IntegrityError", "SiteIntegrityError", "PackingError"):
            raise SiteIntegrityError(self.name, message)
        if error == "QueryValidationError":
            raise SiteError(self.name, f"the site rejected the request: {message}")
        raise SiteError(self.name, f"{error}: {message}")

    # -- restarts ----------------------------------------------------------------------------
    def _mark_down(self, cause: str) -> None:
        if self.state != "closed":
            self.state, self.cause = "down", cause

    def _ensure_up(self) -> None:
        """Before a query: a kernel found dead (even one that died while idle) is restarted."""
        if self.state == "up":
            try:
                alive = self._alive()
            except Exception:
                alive = False
            if alive:
                return
            self._mark_down("its kernel had stopped")
        if self.state != "down":
            raise SiteError(self.name, f"is {self.state}: start it first")
        cause = self.cause
        self._stop_quietly()
        try:
            self._launch_named()
            info = self._call("start", self._start_args, self.start_timeout)
        except PetsError as exc:
            self._mark_down(f"{cause}; restart failed")
            why = exc.cause if isinstance(exc, SiteError) else str(exc)
            raise SiteError(self.name, f"is down ({cause}) and could not be restarted: "
                                       f"{why}") from None
        if info.get("verify_key") != self.verify_key.to_bytes().hex():
            self._mark_down(f"{cause}; after a restart it signs with another key")
            raise SiteError(self.name, "was restarted but signs with another key than the one "
                                       "the enclave registered")
        self.state, self.cause = "up", ""
        self.restarts += 1
        self.kernel_info.update(pid=info.get("pid"))

    def _launch_named(self) -> None:
        """Launch the kernel; any failure becomes a SiteError naming the site and why."""
        try:
            self._launch(self.start_timeout)
        except PetsError:
            raise
        except (TransportError, KernelDied, KernelFailed) as exc:
            raise SiteError(self.name, f"its kernel could not be started: {exc}") from None
        except KernelTimeout:
            raise SiteError(self.name, f"its kernel did not start within "
                                       f"{self.start_timeout:g} s") from None
        except Exception as exc:
            raise SiteError(self.name, f"its kernel could not be started "
                                       f"({type(exc).__name__}: {exc})") from None

    def _stop_quietly(self) -> None:
        with contextlib.suppress(Exception):
            self._shutdown()

    # -- transport (subclasses) -----------------------------------------------------------------
    def _launch(self, timeout: float) -> None:
        raise NotImplementedError

    def _execute(self, code: str, timeout: float) -> object:
        """Run ``code``; return its last ``application/json`` output. Raises KernelDied,
        KernelTimeout (after interrupting), TransportError or KernelFailed."""
        raise NotImplementedError

    def _alive(self) -> bool:
        raise NotImplementedError

    def _shutdown(self) -> None:
        raise NotImplementedError


def start_sites(sites: Sequence[RemoteSite]) -> None:
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
