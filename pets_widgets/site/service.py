"""The site service's two routes, run inside the kernel that Kernel Gateway's notebook-http
personality starts for ``pets_widgets/site/service.ipynb``.

The notebook only calls these functions: :func:`boot` when its kernel starts,
:func:`status` for ``GET /status``, :func:`aggregate` for ``POST /aggregate``, and
:func:`response_info` for the status code and headers of the reply just computed. The
configuration path comes from the environment of ``site serve`` (:data:`CONFIG_ENV`), never
from a request, and no request can name a path, a URL, a query or code: the body of
``POST /aggregate`` is exactly an admission (spec, key, packing) and a token.

Every reply is JSON. An error is ``{"error": <class>, "rule": <rule>, "message": ...}`` with
an HTTP status; messages are pets_widgets' own, naming rules (and, for a bad request, the
field and its allowed values), never a value, a row number, a data column or a traceback.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

from pets_widgets.core.deadline import DeadlineExceeded, deadline
from pets_widgets.core.errors import (
    AttestationError,
    ConfigError,
    DataValidationError,
    IntegrityError,
    PetsError,
    QueryValidationError,
    SiteRefusal,
)
from pets_widgets.core.kernel import forget_requests
from pets_widgets.core.wire import AggregateRequest
from pets_widgets.site.config import SiteConfiguration, load_site_config, open_site
from pets_widgets.site.site import Site

#: The environment variable ``site serve`` sets to the configuration file's path.
CONFIG_ENV = "PETS_SITE_CONFIG"

_STATE: dict[str, Any] = {"site": None, "config": None, "broken": None,
                          "reply": {"status": 200}}


def boot() -> None:
    """Open the site from the configuration named by :data:`CONFIG_ENV`.

    A configuration or data problem does not stop the kernel: every route then answers 503
    with the rule (and, for data, the rules broken and how many rows break each), so the
    coordinator learns that the site is down and why in words its operator can act on.
    """
    forget_requests()
    try:
        config = load_site_config(os.environ[CONFIG_ENV])
        _STATE["config"] = config
        _STATE["site"] = open_site(config)
        _STATE["broken"] = None
    except KeyError:
        _STATE["broken"] = ("config", f"{CONFIG_ENV} is not set: start the service with "
                            "python -m pets_widgets site serve")
    except ConfigError:
        _STATE["broken"] = ("config", "the site's configuration cannot be used; its operator "
                            "sees why with: python -m pets_widgets site check")
    except DataValidationError as exc:
        _STATE["broken"] = ("data", str(exc.counted()))
    except Exception as exc:  # never echo: a foreign message could quote a value
        _STATE["broken"] = ("internal", f"{type(exc).__name__} while opening the site")


def status(request: str) -> str:
    """``GET /status``: public facts, the site's floors and budget, and its next nonce."""
    return _answer(request, _status, max_body=None)


def aggregate(request: str) -> str:
    """``POST /aggregate``: ``{admission, token}`` in; the signed encrypted aggregate and
    the site's next nonce out."""
    config: SiteConfiguration | None = _STATE["config"]
    return _answer(request, _aggregate,
                   max_body=config.service.max_body if config is not None else None)


def response_info() -> str:
    """The status code and headers of the reply just computed (the ResponseInfo cells)."""
    return json.dumps(_STATE["reply"])


# --------------------------------------------------------------------------- the routes
def _status(site: Site, config: SiteConfiguration, body: object) -> dict[str, Any]:
    # One nonce for every status call until it is used or nearly expired: asking for the
    # status again and again cannot push other callers' nonces out of the site's table.
    cached = _STATE.get("status_nonce")
    if cached is not None and site.nonce_open(cached[0]) and cached[1] > time.time() + 60:
        nonce, expires = cached
    else:
        nonce, expires = _STATE["status_nonce"] = site.next_nonce()
    return {"name": site.name, "sites": list(config.sites), "rows": site.rows_rounded,
            "capacity": config.capacity, "verify_key": site.verify_key.to_bytes().hex(),
            "dictionary": site.schema.digest, "floors": config.floors.to_dict(),
            "epsilon_used": float(site.budget.used()),
            "epsilon_left": float(site.budget.left()),
            "nonce": nonce, "nonce_expires": expires}


def _aggregate(site: Site, config: SiteConfiguration, body: object) -> dict[str, Any]:
    request = AggregateRequest.from_body(body)
    with deadline(config.service.deadline):
        reply = site.respond(request)
    nonce, expires = site.next_nonce()
    return {"aggregate": reply.to_dict(), "nonce": nonce,
            "nonce_expires": expires}


# --------------------------------------------------------------------------- the frame
_STATUS: tuple[tuple[type[BaseException], int, str], ...] = (
    (AttestationError, 403, ""),
    (SiteRefusal, 403, ""),
    (QueryValidationError, 400, "validation"),
    (IntegrityError, 400, "integrity"),
    (DeadlineExceeded, 504, "deadline"),
    (PetsError, 400, "request"),
)


def _answer(request: str, route: Callable[[Site, SiteConfiguration, object], dict[str, Any]],
            max_body: int | None) -> str:
    """Run one route on the request the gateway passed, and set the reply's status."""
    try:
        if max_body is not None and len(request) > 2 * max_body:
            # The gateway's own limit stops bigger bodies first; this is its second line.
            return _error(413, "body_size", "the request body is larger than this site "
                          "accepts", "PayloadTooLarge")
        if _STATE["broken"] is not None:
            rule, message = _STATE["broken"]
            return _error(503, rule, message, "SiteUnavailable")
        site, config = _STATE["site"], _STATE["config"]
        try:
            body = json.loads(request).get("body")
        except (ValueError, AttributeError):
            raise QueryValidationError("request", "is not the gateway's JSON") from None
        if isinstance(body, str) and body:
            raise QueryValidationError("body", "must be JSON (Content-Type: "
                                       "application/json)")
        result = route(site, config, body)
        _STATE["reply"] = {"status": 200, "headers": {"Content-Type": "application/json"}}
        return json.dumps(result)
    except Exception as exc:
        for kind, code, rule in _STATUS:
            if isinstance(exc, kind):
                return _error(code, str(getattr(exc, "rule", "") or rule), str(exc),
                              type(exc).__name__)
        return _error(500, "internal", f"{type(exc).__name__} in the site service",
                      "InternalError")


def _error(code: int, rule: str, message: str, error: str) -> str:
    _STATE["reply"] = {"status": code, "headers": {"Content-Type": "application/json"}}
    return json.dumps({"error": error, "rule": rule, "message": message[:2000]})
