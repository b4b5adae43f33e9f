"""Helpers for attestation tests: a real request for one site, and tokens signed with the
federation's own verifier key but with chosen claims (what an attacker holding a verifier
would need; the checks a site makes must still catch each one)."""

from __future__ import annotations

import time
from typing import Any

from pets_widgets import testing
from pets_widgets.core.wire import AggregateRequest

#: Claims of a real token that tests rewrite, by dotted path.
Claims = dict[str, Any]


def verifier_of(fed):
    """The platform verifier that launched ``fed``'s enclave (in-process simulation)."""
    return fed.enclave._attestation._issuer._verifier


def real_request(fed, site, spec):
    """An open exact admission and a genuine request for ``site`` (a Site object)."""
    admission = testing.admit_exact(fed.enclave, spec, "t", fed.site_names)
    token = fed.enclave.issue_nonce(admission, site.name, site.challenge())
    return admission, AggregateRequest(admission.spec, token, fed.enclave.public_key,
                                       admission.packing)


def claims_of(token: str) -> Claims:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})


def resigned(fed, token: str, change) -> str:
    """``token`` with its claims passed through ``change`` and signed again by the real
    verifier key (so only the claim checks can catch it)."""
    claims = claims_of(token)
    change(claims)
    return verifier_of(fed)._sign(claims)


def expired(claims: Claims) -> None:
    claims["iat"] = claims["nbf"] = int(time.time()) - 3600
    claims["exp"] = int(time.time()) - 60
