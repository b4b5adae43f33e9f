"""The enclave as the coordinator sees it: an in-process simulation or an enclave service.

Both answer the same four calls (:meth:`admit`, :meth:`release`, :meth:`abort`, and the
exact door's :meth:`admit_exact`), so :class:`~pets_widgets.coordinator.federation.Federation`
runs one protocol whatever the enclave is. The coordinator holds a :class:`Receipt` of each
admission: its id, the spec and packing the sites need, the enclave's public key and one
attestation token per site; never the enclave's own copy.

:class:`ServiceEnclave` is the enclave service (``enclave serve``) reached by URL with the
analyst's token: this process then holds no private key, no ledger and no identity it can
choose (the enclave charges the token's owner).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

from pets_widgets.coordinator.http import HttpFailure, request_json, session
from pets_widgets.coordinator.service import ServiceProcess, announced_url, first_answer
from pets_widgets.core import schema as S
from pets_widgets.core.budget import Budget
from pets_widgets.core.errors import (
    AttestationError,
    BudgetExceeded,
    EnclaveError,
    IntegrityError,
    QueryRefused,
    QueryValidationError,
    SiteAttestationError,
    SiteError,
    SiteIntegrityError,
)
from pets_widgets.core.packing import Packing
from pets_widgets.core.paillier import PublicKey
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import QuerySpec, spec_from_dict
from pets_widgets.core.release import Release
from pets_widgets.core.release_wire import release_from_dict
from pets_widgets.core.wire import EncryptedAggregate

#: ``nonces()``: each site's current challenge, asked only when the enclave needs them.
Nonces = Callable[[], Mapping[str, str]]
#: The largest reply read from the enclave (a release of a 20,000-cell query is far below).
MAX_REPLY = 64 * 2**20
#: Seconds the enclave may take to answer one request, and to come up, by default.
DEFAULT_TIMEOUT = 120.0
DEFAULT_START_TIMEOUT = 180.0
#: How long, and how often, to ask again while an identical question is in flight.
PENDING_SECONDS, PENDING_POLL = 30.0, 0.02


@dataclass(frozen=True)
class Receipt:
    """What the coordinator holds of an admission: enough to ask each site, nothing more.
    ``admission`` is the in-process enclave's object (None for a service)."""

    id: str
    spec: QuerySpec
    packing: Packing
    public_key: PublicKey
    tokens: Mapping[str, str]
    admission: Any = field(default=None, compare=False, repr=False)


class LocalEnclave:
    """The in-process simulation's enclave object behind the coordinator's calls (the same
    protocol as a service, in one process: a simulation, not a boundary)."""

    backend = "local"

    def __init__(self, enclave: Any):
        self.enclave = enclave

    def admit(self, spec: QuerySpec, epsilon: object, k: object, analyst: str,
              sites: Sequence[str], nonces: Nonces) -> Receipt | Release:
        admitted = self.enclave.admit(spec, epsilon, k, analyst, sites)
        if isinstance(admitted, Release):
            return admitted
        return self._receipt(admitted, nonces)

    def admit_exact(self, spec: QuerySpec, analyst: str, sites: Sequence[str],
                    nonces: Nonces) -> Receipt:
        return self._receipt(self.enclave.admit_exact(spec, analyst, sites), nonces)

    def _receipt(self, admission: Any, nonces: Nonces) -> Receipt:
        try:
            given = nonces()
            tokens = {site: self.enclave.issue_nonce(admission, site, given[site])
                      for site in admission.sites}
        except BaseException as exc:
            rule = f"site.{exc.rule}" if isinstance(exc, SiteError) and exc.rule else "site"
            self.enclave.abort(admission, "failed", rule, str(exc))
            raise
        return Receipt(admission.id, admission.spec, admission.packing,
                       self.enclave.public_key, tokens, admission)

    def release(self, receipt: Receipt, aggregates: Sequence[EncryptedAggregate],
                summed: Sequence[int]) -> Release:
        if self.enclave.is_exact(receipt.admission):
            return self.enclave.release_exact(receipt.admission, aggregates, summed)
        return self.enclave.release(receipt.admission, aggregates, summed)

    def abort(self, receipt: Receipt, rule: str, reason: str) -> None:
        self.enclave.abort(receipt.admission, "failed", rule, reason)

    def budget(self, analyst: str) -> Budget:
        return self.enclave.budget(analyst)

    def audit_rows(self, analyst: str | None) -> list[dict[str, Any]]:
        return self.enclave.ledger.audit_rows(analyst)


class ServiceEnclave:
    """The enclave service at ``url``, called with an analyst's token (``token``, or the
    environment variable ``token_env``); ``ca_file`` the CA of its TLS certificate and
    ``client_cert``/``client_key`` this coordinator's certificate for mutual TLS.

    :meth:`start` reads ``GET /status``: the policy, the dictionary, the public key and the
    analyst the token belongs to (:attr:`analyst`), which is who every query is charged to.
    """

    backend = "service"

    def __init__(self, url: str, *, token: str | None = None, token_env: str | None = None,
                 ca_file: str | None = None, client_cert: str | None = None,
                 client_key: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 start_timeout: float = DEFAULT_START_TIMEOUT,
                 process: EnclaveProcess | None = None):
        if token is None:
            token = os.environ.get(token_env or "", "")
            if not token:
                raise EnclaveError(f"no analyst token: set the environment variable "
                                   f"{token_env} (the enclave operator gives it: python -m "
                                   "pets_widgets enclave add-analyst NAME)", rule="token")
        self.url = url.rstrip("/")
        self.timeout, self.start_timeout = float(timeout), float(start_timeout)
        self._session = session(f"token {token}", client_cert, client_key)
        #: This process's analyst token (what it proves it is with; never another's).
        self.token = token
        self._verify: str | bool = ca_file if ca_file is not None else True
        self._process = process
        self.info: dict[str, Any] = {}
        self.state = "new"

    def __repr__(self) -> str:
        return f"ServiceEnclave({self.url}, {self.state})"

    # -- what the enclave publishes --------------------------------------------------------
    @property
    def analyst(self) -> str:
        """The analyst this process's token belongs to (who is charged)."""
        return str(self.info["analyst"])

    @property
    def policy(self) -> Policy:
        return Policy(**self.info["policy"])

    @property
    def schema(self) -> S.Schema:
        return S.Schema(tuple(self.info["sites"]))

    @property
    def public_key(self) -> PublicKey:
        return PublicKey(int(self.info["public_key_n"], 16))

    @property
    def key_bits(self) -> int:
        return int(self.info["key_bits"])

    @property
    def site_capacity(self) -> int:
        return int(self.info["site_capacity"])

    @property
    def image_digest(self) -> str:
        return str(self.info["image_digest"])

    @property
    def debug(self) -> bool:
        return bool(self.info["debug"])

    def start(self) -> ServiceEnclave:
        """Wait for the service to answer ``/status`` and read what it publishes."""
        deadline = time.monotonic() + self.start_timeout

        def stopped(how: str) -> EnclaveError:
            return EnclaveError(f"it stopped while starting ({how})", rule="start")

        if self._process is not None and not self.url:
            self.url = announced_url(self._process, self.start_timeout, stopped)
        self.info = first_answer(
            lambda timeout: self._call("GET", "/status", None, "status", timeout), deadline,
            self._process, stopped)
        self.state = "up"
        return self

    # -- the protocol ------------------------------------------------------------------------
    def admit(self, spec: QuerySpec, epsilon: object, k: object, analyst: str,
              sites: Sequence[str], nonces: Nonces) -> Receipt | Release:
        body = {"spec": spec.to_dict(), "epsilon": _epsilon(epsilon), "k": k}
        return self._admit(body, nonces)

    def admit_exact(self, spec: QuerySpec, analyst: str, sites: Sequence[str],
                    nonces: Nonces) -> Receipt:
        admitted = self._admit({"spec": spec.to_dict(), "exact": True}, nonces)
        assert isinstance(admitted, Receipt)
        return admitted

    def _admit(self, body: dict[str, Any], nonces: Nonces) -> Receipt | Release:
        try:
            body["nonces"] = dict(nonces())
        except SiteError as exc:  # the audit log still says which site ended the query
            rule = f"site.{exc.rule}" if exc.rule else "site"
            self._call("POST", "/admit", {**body, "failed": {"rule": rule, "reason": str(exc)}},
                       "admit")
            raise
        deadline = time.monotonic() + PENDING_SECONDS
        while True:
            reply = self._call("POST", "/admit", body, "admit")
            if not reply.get("pending") or time.monotonic() > deadline:
                break
            time.sleep(PENDING_POLL)  # an identical question is being answered: its answer
        if "release" in reply:
            return self._release(reply)
        try:
            a = reply["admission"]
            return Receipt(str(a["id"]), spec_from_dict(a["spec"]), Packing(**a["packing"]),
                           PublicKey(int(a["public_key_n"], 16)),
                           {str(s): str(t) for s, t in a["tokens"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise EnclaveError(f"its admission is malformed ({type(exc).__name__})",
                               rule="protocol") from None

    def release(self, receipt: Receipt, aggregates: Sequence[EncryptedAggregate],
                summed: Sequence[int]) -> Release:
        return self._release(self._call("POST", "/release", {
            "admission": receipt.id, "aggregates": [a.to_dict() for a in aggregates],
            "summed": [format(c, "x") for c in summed]}, "release"))

    def abort(self, receipt: Receipt, rule: str, reason: str) -> None:
        self._call("POST", "/release", {"admission": receipt.id,
                                        "failed": {"rule": rule, "reason": reason}}, "abort")

    def budget(self, analyst: str | None = None) -> Budget:
        data = self._call("GET", "/budget", None, "budget")
        try:
            return Budget(str(data["analyst"]), *(Fraction(data[name]) for name in (
                "analyst_spent", "analyst_left", "federation_spent", "federation_left")))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise EnclaveError(f"its budget is malformed ({type(exc).__name__})",
                               rule="protocol") from None

    def audit_rows(self, analyst: str | None = None) -> list[dict[str, Any]]:
        rows = self._call("GET", "/audit", None, "audit").get("rows")
        if not isinstance(rows, list):
            raise EnclaveError("its audit rows are malformed", rule="protocol")
        return rows

    def status(self) -> dict[str, Any]:
        """``GET /status`` again (the lock, the analyst)."""
        self.info = self._call("GET", "/status", None, "status")
        return dict(self.info)

    def close(self) -> None:
        self._session.close()
        if self._process is not None:
            self._process.stop()
        self.state = "closed"

    # -- HTTP --------------------------------------------------------------------------------
    def _release(self, reply: Mapping[str, Any]) -> Release:
        try:
            return release_from_dict(reply["release"])
        except (KeyError, IntegrityError) as exc:
            raise EnclaveError(f"its release is malformed ({type(exc).__name__})",
                               rule="protocol") from None

    def _call(self, method: str, route: str, body: Mapping[str, Any] | None, op: str,
              timeout: float | None = None) -> dict[str, Any]:
        try:
            status, payload = request_json(self._session, method, self.url + route, body,
                                           timeout=timeout or self.timeout,
                                           verify=self._verify, max_reply=MAX_REPLY, op=op)
        except HttpFailure as exc:
            raise EnclaveError(str(exc), rule=exc.rule) from None
        if status == 200:
            return payload
        raise enclave_error(status, payload)


def _epsilon(value: object) -> object:
    """Epsilon for the wire: exact fractions as ``"numerator/denominator"``."""
    if isinstance(value, Fraction):
        return f"{value.numerator}/{value.denominator}"
    return value


def enclave_error(status: int, payload: Mapping[str, Any]) -> Exception:
    """The enclave service's JSON error as the exception the analyst's code expects: the
    same classes the in-process enclave raises."""
    error = str(payload.get("error", ""))[:100]
    rule = str(payload.get("rule", ""))[:100]
    message = str(payload.get("message", ""))[:2000]
    if status == 401:
        return EnclaveError("refused this analyst's token (unknown or revoked; the enclave "
                            "operator issues tokens: enclave add-analyst NAME)", rule="token")
    if error == "QueryValidationError":
        allowed = payload.get("allowed")
        return QueryValidationError(str(payload.get("field", rule))[:100],
                                    str(payload.get("problem", message))[:2000],
                                    allowed if isinstance(allowed, (list, str)) else None)
    site = payload.get("site")
    if isinstance(site, str):  # a site's fault, found by the enclave
        cause = str(payload.get("cause", message))[:2000]
        if error == "SiteIntegrityError":
            return SiteIntegrityError(site, cause)
        if error == "SiteAttestationError":
            return SiteAttestationError(site, cause, rule=rule)
        return SiteError(site, cause, rule=rule)
    if error == "BudgetExceeded":
        return BudgetExceeded(rule, message)
    if error == "QueryRefused":
        return QueryRefused(rule, message)
    if error == "IntegrityError":
        return IntegrityError(message)
    if error == "AttestationError":
        return AttestationError(message, rule=rule)
    if status == 503:
        return EnclaveError(f"is unavailable: {message}", rule=rule)
    return EnclaveError(f"{error or 'HTTP ' + str(status)}: {message}", rule=rule)


class EnclaveProcess(ServiceProcess):
    """An ``enclave serve`` this coordinator started (the embedded default): the platform
    verifier, which launches the enclave service. :meth:`jwks` waits for the verifier's
    JWKS path (announced before the enclave starts), :meth:`image` for the image digest."""

    def __init__(self, config: Path, *, debug: bool = False, log: Path | None = None):
        self.config = config
        super().__init__(["enclave", "serve", "--config", str(config), "--port", "0",
                          *(["--debug"] if debug else [])], {}, log)

    def jwks(self, timeout: float) -> Path | None:
        found = self.line(r"verifier jwks at (\S+)", timeout)
        return None if found is None else Path(found.group(1))

    def image(self, timeout: float) -> str | None:
        found = self.line(r"image (sha256:[0-9a-f]{64})", timeout)
        return None if found is None else found.group(1)
