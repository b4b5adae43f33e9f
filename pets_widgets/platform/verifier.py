"""The simulated platform verifier: launches and measures the enclave, then signs attestation
tokens for it, and for nothing else.

A token is an EAT-shaped JWT (RFC 9711) with Google Confidential Space claim names, signed
ES256 with a key only the verifier holds (PyJWT with the ``cryptography`` backend). A site pins
the verifier's JWKS and issuer in its own configuration and checks every token itself
(:func:`pets_widgets.site.trust.verify_token`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from pets_widgets.core.evidence import (
    DEBUG_DISABLED,
    DEBUG_ENABLED,
    HWMODEL,
    ISSUER,
    SWNAME,
    TOKEN_SECONDS,
    AdmissionClaims,
    key_binding,
)
from pets_widgets.core.keyfile import load_or_create
from pets_widgets.core.policy import Policy
from pets_widgets.platform.measurement import code_digest, image_digest

#: The package version the tokens report as ``swversion``.
SWVERSION = "0.2.0"


#: File names in a verifier's folder: its signing key (mode 0600) and the JWKS it publishes.
KEY_FILE = "verifier-key.pem"
JWKS_FILE = "verifier-jwks.json"


class PlatformVerifier:
    """Holds the attestation signing key and the JWKS sites pin.

    ``key`` is the ES256 signing key (a fresh one when None); :meth:`open` keeps one in a
    folder so registries can pin its JWKS once.
    """

    def __init__(self, issuer: str = ISSUER, key: ec.EllipticCurvePrivateKey | None = None):
        self.issuer = issuer
        self._key = key or ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self._key.public_key()))
        self.kid = "pets-verifier-" + hashlib.sha256(
            f"{jwk['x']}{jwk['y']}".encode()).hexdigest()[:12]
        self._jwk = {**jwk, "kid": self.kid, "alg": "ES256", "use": "sig"}

    @classmethod
    def open(cls, folder: str | os.PathLike[str], issuer: str = ISSUER) -> PlatformVerifier:
        """The verifier whose key is kept in ``folder`` (created there, mode 0600, the first
        time), with its JWKS written beside it as ``verifier-jwks.json`` for site operators."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        key = load_or_create(folder / KEY_FILE, ec.EllipticCurvePrivateKey,
                             lambda: ec.generate_private_key(ec.SECP256R1()), "verifier")
        verifier = cls(issuer, key)
        (folder / JWKS_FILE).write_text(json.dumps(verifier.jwks(), indent=2) + "\n",
                                        encoding="utf-8")
        return verifier

    def jwks(self) -> dict[str, Any]:
        """The verifier's public keys as a JWKS (what each site pins)."""
        return {"keys": [dict(self._jwk)]}

    def launch(self, policy: Policy, dictionary: str, *, debug: bool = False) -> LaunchedEnclave:
        """Measure the enclave code now and launch it with ``policy`` and ``dictionary``.

        ``debug=True`` launches a debug build: its tokens say ``dbgstat: enabled``, and sites
        refuse it unless their configuration allows debug enclaves (the test doors need one).
        """
        return LaunchedEnclave(self, code_digest(), policy, dictionary, debug)

    def _sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": self.kid})


class LaunchedEnclave:
    """The verifier's handle for one enclave it launched: the enclave asks it for tokens and
    never sees the signing key. Implements :class:`pets_widgets.core.evidence.TokenIssuer`."""

    def __init__(self, verifier: PlatformVerifier, code: str, policy: Policy, dictionary: str,
                 debug: bool):
        self._verifier = verifier
        self._code = code
        self.dictionary = dictionary
        self.debug = debug
        self.image_digest = image_digest(code, policy, dictionary, debug)

    def token(self, *, audience: str, nonce: str, public_key_n: int,
              admission: AdmissionClaims, policy: Policy) -> str:
        """A token for ``audience`` (a site) answering its ``nonce`` for one admission.

        The digest is computed from the launch-time code and the policy the enclave reports
        enforcing now: an enclave whose policy was changed after launch presents another
        image, which no site approved.
        """
        now = int(time.time())
        digest = image_digest(self._code, policy, self.dictionary, self.debug)
        claims = {
            "iss": self._verifier.issuer, "aud": audience, "sub": digest,
            "iat": now, "nbf": now, "exp": now + TOKEN_SECONDS,
            "eat_nonce": [nonce, key_binding(public_key_n, admission)],
            "hwmodel": HWMODEL, "swname": SWNAME, "swversion": [SWVERSION],
            "dbgstat": DEBUG_ENABLED if self.debug else DEBUG_DISABLED,
            "submods": {
                "container": {"image_digest": digest},
                "pets_widgets": {"policy": policy.to_dict(), "dictionary": self.dictionary,
                                 "admission": admission.to_dict()},
            },
        }
        return self._verifier._sign(claims)
