"""One JSON request to a service (a site's, the enclave's), read with a deadline and a cap.

The coordinator's clients share this: a reply is read as it arrives (``read1``), held to the
whole request's deadline (a service dripping bytes cannot hold a query) and to a size cap;
every failure is an :class:`HttpFailure` with a rule (``timeout``, ``tls``, ``unreachable``,
``broken``, ``too_large``, ``not_json``) that each client turns into its own error naming
the service.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

#: Seconds to open a connection to a service (a reply may take up to the request's timeout).
CONNECT_SECONDS = 10.0


class HttpFailure(Exception):
    """A request that got no usable JSON reply; ``rule`` says why."""

    def __init__(self, rule: str, message: str):
        super().__init__(message)
        self.rule = rule


def session(authorization: str, client_cert: str | None = None,
            client_key: str | None = None) -> requests.Session:
    """A kept-alive session sending ``authorization``, retrying only connections that never
    reached the service (a slow reply is the service's answer, never asked twice)."""
    s = requests.Session()
    retry = Retry(total=2, connect=2, read=False, status=0, other=0, redirect=0,
                  backoff_factor=0.05, raise_on_status=False)
    s.mount("http://", HTTPAdapter(max_retries=retry))
    s.mount("https://", HTTPAdapter(max_retries=retry))
    s.headers["Authorization"] = authorization
    if client_cert is not None:
        s.cert = (client_cert, client_key) if client_key else client_cert
    return s


def request_json(s: requests.Session, method: str, url: str, body: Mapping[str, Any] | None,
                 *, timeout: float, verify: str | bool, max_reply: int,
                 op: str) -> tuple[int, dict[str, Any]]:
    """``(status, payload)`` of one request whose reply is a JSON object."""
    late = HttpFailure("timeout", f"did not answer {op} within {timeout:g} s")
    deadline = time.monotonic() + timeout
    try:
        response = s.request(method, url, json=body, timeout=(CONNECT_SECONDS, timeout),
                             verify=verify, stream=True)
        chunks, size = [], 0
        with response:
            # read1 returns what has arrived (urllib3 2): a dripping service cannot make one
            # read wait for a full chunk.
            while chunk := response.raw.read1(2**16, decode_content=True):
                size += len(chunk)
                if size > max_reply:
                    raise HttpFailure("too_large", f"its reply to {op} is larger than "
                                      f"{max_reply:,} bytes")
                if time.monotonic() > deadline:
                    raise late
                chunks.append(chunk)
    except (requests.Timeout, urllib3.exceptions.ReadTimeoutError):
        # (read1 reads the raw stream: its timeouts and breaks are urllib3's own)
        raise late from None
    except requests.exceptions.SSLError:
        raise HttpFailure("tls", "refused the TLS connection (certificate)") from None
    except requests.ConnectionError:
        raise HttpFailure("unreachable", f"cannot be reached at {url.rsplit('/', 1)[0]}") \
            from None
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise HttpFailure("broken", f"its reply to {op} is broken "
                          f"({type(exc).__name__})") from None
    try:
        payload = json.loads(b"".join(chunks))
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        if response.status_code == 401:
            return 401, {}
        raise HttpFailure("not_json", f"its reply to {op} is not JSON "
                          f"(HTTP {response.status_code})")
    return response.status_code, payload
