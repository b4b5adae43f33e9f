"""The enclave service's routes, run inside the kernel that Kernel Gateway's notebook-http
personality starts for ``pets_widgets/enclave/service.ipynb``.

``GET /status``, ``POST /admit``, ``POST /release``, ``GET /budget`` and ``GET /audit``;
nothing else. The configuration comes from the environment of ``enclave serve``, never from
a request; the analyst is the owner of the token in the request's Authorization header (the
ledger keeps the tokens' hashes), never a name the request gives. The Paillier private key,
the policy and the ledger live in this process only.

Every reply is JSON; an error is ``{"error": <class>, "rule": <rule>, "message": ...}`` with
an HTTP status, naming rules (and, for a bad request, the field and its allowed values),
never a value or a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import pandas as pd

from pets_widgets.core.budget import Budget
from pets_widgets.core.deadline import DeadlineExceeded, deadline
from pets_widgets.core.enclave_config import EnclaveConfiguration, load_enclave_config
from pets_widgets.core.errors import (
    AttestationError,
    ConfigError,
    IntegrityError,
    PetsError,
    QueryRefused,
    QueryValidationError,
    SiteError,
)
from pets_widgets.core.kernel import forget_requests
from pets_widgets.core.query import spec_from_dict
from pets_widgets.core.release import Release
from pets_widgets.core.release_wire import release_to_dict
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.admission import Admission
from pets_widgets.enclave.attestation import VerifierClient
from pets_widgets.enclave.enclave import Enclave

#: The environment variable ``enclave serve`` sets to the configuration file's path.
CONFIG_ENV = "PETS_ENCLAVE_CONFIG"
#: Set by the platform verifier that launched this service: its token service's URL, and
#: the path of a file holding the launch secret (deleted once read).
URL_ENV, SECRET_ENV = "PETS_VERIFIER_URL", "PETS_VERIFIER_SECRET_FILE"
#: Audit columns an analyst sees of their own rows.
AUDIT_COLUMNS = ("id", "time", "analyst", "spec_hash", "spec_json", "sites", "epsilon_asked",
                 "epsilon_spent", "outcome", "rule", "reason")
FAILURE_RULE = re.compile(r"site(\.[a-z_]{1,40}){0,3}|integrity")
ADMIT_KEYS = {"spec", "epsilon", "k", "nonces", "exact", "failed"}
RELEASE_KEYS = {"admission", "aggregates", "summed", "failed"}

_STATE: dict[str, Any] = {"enclave": None, "config": None, "broken": None,
                          "reply": {"status": 200}}


class Unauthorized(PetsError):
    """The request's token belongs to no analyst of this enclave."""


def boot() -> None:
    """Start the enclave of the configuration named by :data:`CONFIG_ENV`: a fresh Paillier
    key, the ledger (refusing one made under another policy), the sites' verify keys and the
    public denominators, tokens from the verifier that launched this process."""
    forget_requests()
    try:
        config = load_enclave_config(os.environ[CONFIG_ENV])
        _STATE["config"] = config
        _STATE["enclave"] = open_enclave(config, VerifierClient(os.environ[URL_ENV],
                                                                launch_secret()))
        _STATE["broken"] = None
    except KeyError:
        _STATE["broken"] = ("config", "start the enclave with python -m pets_widgets enclave "
                            "serve (its configuration and verifier are not set)")
    except ConfigError:
        _STATE["broken"] = ("config", "the enclave's configuration cannot be used; its "
                            "operator sees why with: python -m pets_widgets enclave check")
    except IntegrityError as exc:
        _STATE["broken"] = ("ledger", str(exc))
    except AttestationError as exc:
        _STATE["broken"] = ("trust.verifier", str(exc))
    except Exception as exc:  # never echo a foreign message
        _STATE["broken"] = ("internal", f"{type(exc).__name__} while starting the enclave")


def launch_secret() -> str:
    """The secret that proves to the verifier this is the enclave it launched: read once from
    the file its launcher names (0600, in the launch's private folder) and deleted, so no
    later reader of that folder, or of this process's environment, finds it."""
    path = os.environ.pop(SECRET_ENV)
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def open_enclave(config: EnclaveConfiguration, issuer: Any) -> Enclave:
    """The enclave of ``config``, its tokens from ``issuer``."""
    enclave = Enclave(config.schema, audit.Ledger(config.ledger), config.policy,
                      config.key_bits, config.site_capacity, issuer=issuer)
    for name, key in config.site_keys.items():
        enclave.register_site(name, VerifyKey.from_bytes(bytes.fromhex(key)))
    enclave.use_noise_pool()
    if config.population is not None:
        try:
            enclave.register_population(pd.read_csv(config.population))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"population: {config.population} cannot be used "
                              f"({type(exc).__name__})") from None
    return enclave


# --------------------------------------------------------------------------- the routes
def status(request: str) -> str:
    """``GET /status``: what the enclave publishes, and whose token this is."""
    return _answer(request, _status)


def admit(request: str) -> str:
    """``POST /admit``: ``{spec, epsilon, k, nonces}`` in; an admission with one token per
    site, or the stored release, or ``{"pending": true}`` (ask again shortly)."""
    return _answer(request, _admit)


def release(request: str) -> str:
    """``POST /release``: ``{admission, aggregates, summed}`` in, the release out; or
    ``{admission, failed: {rule, reason}}``: the query failed at a site (nothing spent)."""
    return _answer(request, _release)


def budget(request: str) -> str:
    """``GET /budget``: the caller's budget and the federation's."""
    return _answer(request, lambda enclave, analyst, body: budget_dict(enclave.budget(analyst)))


def audit_rows(request: str) -> str:
    """``GET /audit``: the caller's own audit rows."""
    return _answer(request, lambda enclave, analyst, body: {
        "rows": [{c: r[c] for c in AUDIT_COLUMNS} for r in enclave.ledger.audit_rows(analyst)]})


def response_info() -> str:
    """The status code and headers of the reply just computed (the ResponseInfo cells)."""
    return json.dumps(_STATE["reply"])


def budget_dict(budget: Budget) -> dict[str, Any]:
    return {"analyst": budget.analyst, **{
        name: audit.fraction_text(value) for name, value in (
            ("analyst_spent", budget.analyst_spent), ("analyst_left", budget.analyst_left),
            ("federation_spent", budget.federation_spent),
            ("federation_left", budget.federation_left))}}


def _status(enclave: Enclave, analyst: str, body: object) -> dict[str, Any]:
    config: EnclaveConfiguration = _STATE["config"]
    return {"sites": list(enclave.schema.sites), "dictionary": enclave.schema.digest,
            "policy": enclave.policy.to_dict(), "policy_digest": enclave.policy.hash,
            "image_digest": enclave.image_digest, "debug": enclave.debug,
            "key_bits": enclave.key_bits, "site_capacity": enclave.site_capacity,
            "public_key_n": format(enclave.public_key.n, "x"),
            "key_fingerprint": enclave.key_fingerprint, "site_keys": dict(config.site_keys),
            "population": enclave.population is not None,
            "locked": bool(enclave.ledger.meta("locked")), "analyst": analyst}


def _epsilon(value: object) -> object:
    """Epsilon as sent: a JSON number, or an exact ``"numerator/denominator"``."""
    if isinstance(value, str) and re.fullmatch(r"\d{1,9}/\d{1,9}", value):
        numerator, denominator = value.split("/")
        if int(denominator) > 0:
            return Fraction(int(numerator), int(denominator))
    return value


def _admit(enclave: Enclave, analyst: str, body: object) -> dict[str, Any]:
    data = _object(body, ADMIT_KEYS, required={"spec"})
    if not isinstance(data["spec"], dict):
        raise QueryValidationError("spec", "must be a query spec (a JSON object)")
    spec = spec_from_dict(data["spec"])
    failed = data.get("failed")
    if failed is not None:  # a site could not give its nonce: the query ends here
        rule, reason = _failure(failed)
        enclave.record_failure(spec, _epsilon(data.get("epsilon", 1.0)), analyst,
                               enclave.schema.sites, rule, reason)
        return {"recorded": True}
    nonces = data.get("nonces")
    if (not isinstance(nonces, dict) or set(nonces) != set(enclave.schema.sites)
            or not all(isinstance(n, str) for n in nonces.values())):
        raise QueryValidationError("nonces", "must give each site's current nonce",
                                   list(enclave.schema.sites))
    sites = tuple(enclave.schema.sites)
    if data.get("exact", False) is True:
        admitted: Admission | Release | None = enclave.admit_exact(spec, analyst, sites)
    else:
        admitted = enclave.admit(spec, _epsilon(data.get("epsilon", 1.0)),
                                 data.get("k", enclave.policy.k), analyst, sites, wait=False)
    if admitted is None:
        return {"pending": True}
    if isinstance(admitted, Release):
        return {"release": release_to_dict(admitted)}
    try:
        tokens = enclave.issue_tokens(admitted, {site: nonces[site] for site in sites})
    except BaseException as exc:
        enclave.abort(admitted, audit.FAILED, "trust.verifier",
                      f"no attestation token ({type(exc).__name__}); nothing spent")
        raise
    return {"admission": {"id": admitted.id, "spec": admitted.spec.to_dict(),
                          "epsilon": audit.fraction_text(admitted.epsilon), "k": admitted.k,
                          "packing": admitted.packing.to_dict(), "tokens": tokens,
                          "public_key_n": format(enclave.public_key.n, "x")}}


def _release(enclave: Enclave, analyst: str, body: object) -> dict[str, Any]:
    data = _object(body, RELEASE_KEYS, required={"admission"})
    admission = enclave.open_admission(data["admission"])
    if admission.analyst != analyst:
        raise IntegrityError("this query was admitted for another analyst")
    failed = data.get("failed")
    if failed is not None:
        rule, reason = _failure(failed)
        enclave.abort(admission, audit.FAILED, rule, reason)
        return {"aborted": True}
    raw, summed = data.get("aggregates"), data.get("summed")
    if not isinstance(raw, list) or not isinstance(summed, list):
        raise QueryValidationError("aggregates", "must be the sites' signed aggregates and "
                                   "their homomorphic sum", ["aggregates", "summed"])
    try:
        aggregates = [EncryptedAggregate.from_dict(a) for a in raw]
        sums = [int(c, 16) for c in summed]
    except (TypeError, ValueError) as exc:
        raise QueryValidationError("aggregates", f"malformed ({type(exc).__name__})") from None
    if enclave.is_exact(admission):
        result = enclave.release_exact(admission, aggregates, sums)
    else:
        result = enclave.release(admission, aggregates, sums)
    return {"release": release_to_dict(result)}


def _failure(failed: object) -> tuple[str, str]:
    """The rule and reason of a failure the coordinator reports, fit for the audit log: a
    site's rule (``site``, ``site.<rule>``) or ``integrity``, and a reason of printable text
    (an operator reads it in a terminal)."""
    if not isinstance(failed, dict):
        raise QueryValidationError("failed", "must be {rule, reason}", ["rule", "reason"])
    rule = str(failed.get("rule", "site"))
    if not FAILURE_RULE.fullmatch(rule):
        raise QueryValidationError("failed.rule", "is not a failure a coordinator reports",
                                   "site, site.<rule> or integrity")
    reason = "".join(c if c.isprintable() else " " for c in str(failed.get("reason", "")))
    return rule, reason[:1000]


def _object(body: object, allowed: set[str], required: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict) or not required <= set(body) or not set(body) <= allowed:
        raise QueryValidationError("body", f"must be a JSON object with {sorted(required)} "
                                   f"(and optionally {sorted(allowed - required)})",
                                   sorted(allowed))
    return body


# --------------------------------------------------------------------------- the frame
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (Unauthorized, 401, "token"),
    (DeadlineExceeded, 504, "deadline"),
    (QueryValidationError, 400, "validation"),
    (QueryRefused, 403, "policy"),
    (AttestationError, 502, "trust.verifier"),
    (IntegrityError, 409, "integrity"),
    (PetsError, 400, "request"),
)

Route = Callable[[Enclave, str, object], dict[str, Any]]


def _answer(request: str, route: Route) -> str:
    """Run one route for the analyst whose token the request carries."""
    try:
        config: EnclaveConfiguration | None = _STATE["config"]
        if config is not None and len(request) > 2 * config.service.max_body:
            return _error(413, "body_size", "the request body is larger than the enclave "
                          "accepts", "PayloadTooLarge")
        if _STATE["broken"] is not None:
            rule, message = _STATE["broken"]
            return _error(503, rule, message, "EnclaveUnavailable")
        enclave: Enclave = _STATE["enclave"]
        try:
            parsed = json.loads(request)
            body, headers = parsed.get("body"), parsed.get("headers") or {}
        except (ValueError, AttributeError):
            raise QueryValidationError("request", "is not the gateway's JSON") from None
        header = str(headers.get("Authorization", ""))
        analyst = (enclave.ledger.analyst_for(header.removeprefix("token "))
                   if header.startswith("token ") else None)
        if analyst is None:
            raise Unauthorized("this token belongs to no analyst of the enclave (ask its "
                               "operator: python -m pets_widgets enclave add-analyst NAME)")
        if isinstance(body, str) and body:
            raise QueryValidationError("body", "must be JSON (Content-Type: application/json)")
        with deadline(config.service.deadline if config is not None else 60.0):
            result = route(enclave, analyst, body)
        _STATE["reply"] = {"status": 200, "headers": {"Content-Type": "application/json"}}
        return json.dumps(result, allow_nan=False)
    except Exception as exc:
        for kind, code, rule in _STATUS:
            if isinstance(exc, kind):
                extra = ({"field": exc.field, "problem": exc.problem,
                          "allowed": None if exc.allowed is None else
                          exc.allowed if isinstance(exc.allowed, str)
                          else [str(a) for a in exc.allowed]}
                         if isinstance(exc, QueryValidationError) else
                         {"site": exc.site, "cause": exc.cause}
                         if isinstance(exc, SiteError) else {})
                return _error(code, str(getattr(exc, "rule", "") or rule), str(exc),
                              type(exc).__name__, extra)
        return _error(500, "internal", f"{type(exc).__name__} in the enclave service",
                      "InternalError")


def _error(code: int, rule: str, message: str, error: str,
           extra: dict[str, Any] | None = None) -> str:
    _STATE["reply"] = {"status": code, "headers": {"Content-Type": "application/json"}}
    return json.dumps({"error": error, "rule": rule, "message": message[:2000],
                       **(extra or {})})
