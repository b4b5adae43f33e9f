"""The one entry point inside a site kernel, and the one fixed call that reaches it.

The coordinator never sends code built from a researcher's input. Every call into a site
kernel is the fixed template :data:`CALL_TEMPLATE` with a base64 literal filled in; the
base64 decodes to JSON ``{"op": ..., "args": {...}}`` naming one of four operations:

``start``
    load the site's rows from its source (inside this kernel), build the
    :class:`~pets_widgets.site.site.Site`, load or create its Ed25519 signing key, enroll it with
    the approved enclave; replies with the verify key and the size rounded to 100.
``challenge``
    a fresh nonce for the enclave's attestation quote.
``respond``
    an :class:`~pets_widgets.core.wire.AggregateRequest` as JSON in, the signed
    :class:`~pets_widgets.core.wire.EncryptedAggregate` as JSON out. The request is parsed and
    the spec re-validated here against this kernel's own schema copy before it runs.
``status``
    size rounded to 100.

The reply is one ``display_data`` message whose bundle is ``{"application/json": reply}``
with ``reply = {"ok": true, "result": {...}}`` or ``{"ok": false, "error": <class name>,
"message": ..., "problems": [...]}``. Rows and plaintext aggregates never leave: error
messages are pets_widgets' own, which name rules and never values, and any other exception
is reported by its class name only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pets_widgets.core import schema as S
from pets_widgets.core.errors import DataValidationError, PetsError, QueryValidationError
from pets_widgets.core.signing import SigningKey
from pets_widgets.site.site import Site
from pets_widgets.site.trust import Floors, SiteTrust

#: The only code a coordinator runs in a site kernel; ``{payload}`` is base64 text.
CALL_TEMPLATE = "import pets_widgets.site.kernel_entry as _pw_site\n_pw_site.handle('{payload}')\n"
_BASE64 = re.compile(r"^[A-Za-z0-9+/]*={0,2}$")
#: Largest request accepted (a 1,000-cell spec with a 3072-bit key is far below it).
MAX_PAYLOAD = 8 * 2**20
OPS = ("start", "challenge", "respond", "status")


def call_code(op: str, args: Mapping[str, Any] | None = None) -> str:
    """The fixed call for ``op`` with ``args`` as data (JSON, base64: no code from input)."""
    if op not in OPS:
        raise ValueError(f"{op!r} is not a site operation; allowed: {OPS}")
    message = json.dumps({"op": op, "args": dict(args or {})}, sort_keys=True)
    payload = base64.b64encode(message.encode()).decode("ascii")
    assert _BASE64.match(payload)  # nothing but base64 characters between the quotes
    return CALL_TEMPLATE.format(payload=payload)


# --------------------------------------------------------------------------- kernel side
#: This kernel's site (one per kernel): set by ``start``.
_STATE: dict[str, Any] = {}


def handle(payload: str) -> None:
    """Run one call and publish its reply as ``application/json`` display data."""
    from IPython.display import display

    display({"application/json": dispatch(payload)}, raw=True)


def dispatch(payload: str) -> dict[str, Any]:
    """Decode, validate and run one call; every outcome is a JSON-able reply dict."""
    try:
        op, args = _decode(payload)
        return {"ok": True, "result": _HANDLERS[op](args)}
    except DataValidationError as exc:
        problems = [{"column": p.column, "problem": p.problem, "rows": list(p.rows)}
                    for p in exc.problems]
        return {"ok": False, "error": "DataValidationError", "message": exc.source,
                "problems": problems}
    except PetsError as exc:
        return {"ok": False, "error": type(exc).__name__, "message": str(exc),
                "rule": str(getattr(exc, "rule", ""))}
    except Exception as exc:  # never echo: a foreign message could quote a value
        return {"ok": False, "error": "InternalError",
                "message": f"{type(exc).__name__} in the site kernel"}


def _decode(payload: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(payload, str) or len(payload) > MAX_PAYLOAD or not _BASE64.match(payload):
        raise QueryValidationError("call", "is not a base64 payload of an allowed size")
    try:
        message = json.loads(base64.b64decode(payload, validate=True))
    except (binascii.Error, ValueError):
        raise QueryValidationError("call", "does not decode to JSON") from None
    if not isinstance(message, dict) or set(message) != {"op", "args"}:
        raise QueryValidationError("call", "must be an object with op and args", ["op", "args"])
    op, args = message["op"], message["args"]
    if op not in _HANDLERS or not isinstance(args, dict):
        raise QueryValidationError("call.op", f"{op!r} is not allowed", OPS)
    return op, args


def _site() -> Site:
    site = _STATE.get("site")
    if site is None:
        raise QueryValidationError("call.op", "this kernel has no site yet: call start first",
                                   ["start"])
    return site


def _signing_key(key_file: str | None) -> SigningKey:
    """The site's long-term signing key: read from ``key_file``, or created there (0600)."""
    if key_file is None:
        return SigningKey()
    path = Path(key_file)
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise PetsError(f"key_file {key_file} does not hold an Ed25519 private key")
        return SigningKey(key)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    return SigningKey(key)


def _start(args: dict[str, Any]) -> dict[str, Any]:
    from pets_widgets.site.sources import source_from_dict

    if "site" in _STATE:
        raise QueryValidationError("call.op", "this kernel already runs a site", ["challenge"])
    try:
        name = str(args["site"])
        schema = S.Schema(tuple(str(s) for s in args["sites"]))
        source = source_from_dict(args["source"])
        trust = SiteTrust.from_dict(args["trust"])
        floors = Floors.from_dict(args["floors"])
        capacity = int(args["capacity"])
        key_file = args.get("key_file")
    except (KeyError, TypeError, ValueError):
        raise QueryValidationError("call.args", "start needs site, sites, source, "
                                   "trust, floors and capacity") from None
    rows = source.load(schema, name, capacity)
    site = Site(name, rows, schema, None, capacity, signing_key=_signing_key(key_file),
                floors=floors)
    site.enroll(trust)
    _STATE["site"] = site
    return {"verify_key": site.verify_key.to_bytes().hex(), "rows": site.rows_rounded,
            "module": str(Path(__file__).resolve().parents[1]), "pid": os.getpid()}


def _challenge(args: dict[str, Any]) -> dict[str, Any]:
    return {"nonce": _site().challenge()}


def _respond(args: dict[str, Any]) -> dict[str, Any]:
    request = args.get("request")
    if not isinstance(request, str):
        raise QueryValidationError("call.args", "respond needs a request", ["request"])
    return {"aggregate": _site().respond_json(request)}


def _status(args: dict[str, Any]) -> dict[str, Any]:
    site = _site()
    return {"rows": site.rows_rounded, "epsilon_used": float(site.budget.used()),
            "epsilon_left": float(site.budget.left())}


_HANDLERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "start": _start, "challenge": _challenge, "respond": _respond, "status": _status,
}
