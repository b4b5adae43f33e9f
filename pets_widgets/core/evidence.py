"""Attestation evidence shared by the platform verifier, the enclave and the sites.

A token is an EAT-shaped JWT (RFC 9711) with the claim names of Google Confidential Space
tokens, signed ES256 by the platform verifier; the enclave never holds that key. This module
holds what all three must agree on: the claim values, what a token says about the admitted
query, and the hash that binds a token to the enclave's Paillier key and to that admission.
It signs and verifies nothing itself (see :mod:`pets_widgets.platform.verifier` and
:mod:`pets_widgets.site.trust`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Protocol

from pets_widgets.core.policy import Policy

#: The simulated verifier's issuer name (what a site pins beside its JWKS).
ISSUER = "https://verifier.pets.invalid"
HWMODEL = "SIMULATED_TEE"
SWNAME = "PETS_ENCLAVE"
#: ``dbgstat`` of a production enclave, and of a debug build (test doors open).
DEBUG_DISABLED = "disabled-since-boot"
DEBUG_ENABLED = "enabled"
#: Claims a site requires in every token.
REQUIRED_CLAIMS = ("iss", "aud", "iat", "nbf", "exp", "eat_nonce", "dbgstat", "submods")
#: How long a token is valid, in seconds (a query takes well under a second).
TOKEN_SECONDS = 10 * 60


@dataclass(frozen=True)
class AdmissionClaims:
    """What a token says about the one admitted query it may answer."""

    id: str
    spec_hash: str
    epsilon: str           # exact, as "numerator/denominator"
    k: int
    sites: tuple[str, ...]
    layout_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "spec_hash": self.spec_hash, "epsilon": self.epsilon,
                "k": self.k, "sites": list(self.sites), "layout_size": self.layout_size}

    @classmethod
    def from_dict(cls, data: Any) -> AdmissionClaims:
        return cls(str(data["id"]), str(data["spec_hash"]), str(data["epsilon"]),
                   int(data["k"]), tuple(str(s) for s in data["sites"]),
                   int(data["layout_size"]))


def key_binding(public_key_n: int, admission: AdmissionClaims) -> str:
    """The hash in ``eat_nonce`` that binds a token to the enclave's Paillier key and to one
    admission: a token for another key, or another query, does not match."""
    text = (f"pets-key-binding|{public_key_n:x}|{admission.id}|{admission.spec_hash}|"
            f"{admission.epsilon}|{admission.k}|{','.join(admission.sites)}|"
            f"{admission.layout_size}")
    return hashlib.sha256(text.encode()).hexdigest()


class TokenIssuer(Protocol):
    """What the platform verifier hands the enclave it launched: a way to ask for tokens,
    never the signing key. ``image_digest`` is what it measured at launch."""

    image_digest: str
    debug: bool

    def token(self, *, audience: str, nonce: str, public_key_n: int,
              admission: AdmissionClaims, policy: Policy) -> str: ...
