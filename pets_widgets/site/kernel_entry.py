"""The one entry point inside a site kernel, and the one fixed call that reaches it.

The coordinator never sends code built from a researcher's input. Every call into a site
kernel is the fixed template :data:`CALL_TEMPLATE` with a base64 literal filled in; the
base64 decodes to JSON ``{"op": ..., "args": {...}}`` naming one of four operations:

``start``
    read the site's own configuration file (:mod:`pets_widgets.site.config`), load its rows,
    signing key, budget, floors and trust from it (inside this kernel); replies with the
    site's name, the study's sites, the verify key and the size rounded to 100.
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

from pets_widgets.core.errors import (
    ConfigError,
    DataValidationError,
    PetsError,
    QueryValidationError,
)
from pets_widgets.site.site import Site

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
    except DataValidationError as exc:  # the rules broken and counts: no row, no path
        problems = [{"column": p.column, "problem": p.problem, "count": p.n_rows}
                    for p in exc.problems]
        return {"ok": False, "error": "DataValidationError", "message": exc.counted().source,
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


def _start(args: dict[str, Any]) -> dict[str, Any]:
    from pets_widgets.site.config import load_site_config, open_site

    if "site" in _STATE:
        raise QueryValidationError("call.op", "this kernel already runs a site", ["challenge"])
    path = args.get("config")
    if not isinstance(path, str) or set(args) != {"config"}:
        raise QueryValidationError("call.args", "start needs only config, the path of the "
                                   "site's own configuration file", ["config"])
    try:
        config = load_site_config(path)
    except Exception:
        # The path came in a call: say nothing of what is (or is not) at it.
        raise ConfigError("the site's configuration cannot be used here; its operator sees "
                          "why with: python -m pets_widgets site check") from None
    site = open_site(config)
    _STATE["site"] = site
    return {"name": site.name, "sites": list(config.sites),
            "verify_key": site.verify_key.to_bytes().hex(), "rows": site.rows_rounded,
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
