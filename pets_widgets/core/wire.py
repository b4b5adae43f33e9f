"""The wire format shared by all domains: aggregate requests (with the enclave's attestation
token) and signed encrypted aggregates, with their JSON forms.

Nothing here carries plaintext: specs, public keys, packing parameters, nonces,
ciphertexts and signatures only, so every object can travel through untrusted code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import secrets
from dataclasses import dataclass
from typing import Any

from pets_widgets.core.errors import (
    IntegrityError,
    QueryValidationError,
)
from pets_widgets.core.packing import Packing
from pets_widgets.core.paillier import PublicKey
from pets_widgets.core.query import QuerySpec, spec_from_dict
from pets_widgets.core.signing import SigningKey, _canonical


def new_nonce() -> str:
    """A fresh 128-bit challenge (hex) from the OS's secure source."""
    return secrets.token_hex(16)


# --------------------------------------------------------------------------- aggregates
@dataclass(frozen=True)
class EncryptedAggregate:
    """One site's packed, encrypted aggregate for one query, signed by the site.

    Carries no plaintext: only ciphertexts, the spec hash, the query's nonce and the
    packing parameters (public), so it can travel through untrusted code and kernels.
    """

    site: str
    spec_hash: str
    nonce: str
    key_fingerprint: str
    packing: Packing
    ciphertexts: tuple[int, ...]
    signature: bytes = b""
    #: The admission the site answered (from the token it verified): an aggregate answers
    #: one admission, at its epsilon, and can never be replayed into another.
    admission: str = ""

    def body(self) -> bytes:
        digest = hashlib.sha256()
        for c in self.ciphertexts:
            digest.update(c.to_bytes((c.bit_length() + 7) // 8 or 1, "big"))
            digest.update(b"|")
        return _canonical({"site": self.site, "spec_hash": self.spec_hash, "nonce": self.nonce,
                           "key_fingerprint": self.key_fingerprint,
                           "packing": self.packing.to_dict(),
                           "ciphertexts_sha256": digest.hexdigest(),
                           "admission": self.admission})

    def signed(self, key: SigningKey) -> EncryptedAggregate:
        return dataclasses.replace(self, signature=key.sign(self.body()))

    def to_dict(self) -> dict[str, Any]:
        """Wire form (JSON-ready): ciphertexts and signature as hex strings."""
        return {
            "site": self.site, "spec_hash": self.spec_hash, "nonce": self.nonce,
            "key_fingerprint": self.key_fingerprint, "packing": self.packing.to_dict(),
            "ciphertexts": [format(c, "x") for c in self.ciphertexts],
            "signature": self.signature.hex(), "admission": self.admission,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> EncryptedAggregate:
        """Parse the wire form; any malformed field is an :class:`IntegrityError`."""
        try:
            return cls(str(d["site"]), str(d["spec_hash"]), str(d["nonce"]),
                       str(d["key_fingerprint"]), Packing(**d["packing"]),
                       tuple(int(c, 16) for c in d["ciphertexts"]), bytes.fromhex(d["signature"]),
                       str(d["admission"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"malformed encrypted aggregate ({type(exc).__name__})") from None

    @classmethod
    def from_json(cls, text: str) -> EncryptedAggregate:
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise IntegrityError(f"malformed encrypted aggregate ({type(exc).__name__})") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class AggregateRequest:
    """Everything a site needs for one query; plain data, so it can travel as JSON."""

    spec: QuerySpec
    #: The platform verifier's attestation token for this site and this admission (a JWT).
    token: str
    public_key: PublicKey
    #: The encoding the enclave expects; the site computes its own and refuses any other.
    packing: Packing

    def to_body(self) -> dict[str, Any]:
        """The body of a site service's ``POST /aggregate``: the admission and the token."""
        return {"admission": {"spec": self.spec.to_dict(),
                              "public_key_n": format(self.public_key.n, "x"),
                              "packing": self.packing.to_dict()},
                "token": self.token}

    def to_json(self) -> str:
        return json.dumps({**self.to_body()["admission"], "token": self.token}, sort_keys=True)

    @classmethod
    def from_body(cls, body: object) -> AggregateRequest:
        """Parse a ``POST /aggregate`` body: exactly ``admission`` and ``token``, nothing
        else; the spec is validated again by the caller against its own dictionary."""
        if not isinstance(body, dict) or set(body) != {"admission", "token"}:
            raise QueryValidationError("body", "must be a JSON object with exactly admission "
                                       "and token", ["admission", "token"])
        admission = body["admission"]
        if not isinstance(admission, dict) or set(admission) != {"spec", "public_key_n",
                                                                  "packing"}:
            raise QueryValidationError("admission", "must hold exactly spec, public_key_n and "
                                       "packing", ["spec", "public_key_n", "packing"])
        if not isinstance(body["token"], str):
            raise QueryValidationError("token", "must be the attestation token (a JWT)")
        return cls._from_dict({**admission, "token": body["token"]})

    @classmethod
    def from_json(cls, text: str) -> AggregateRequest:
        """Parse and re-validate a request; the spec is checked again against the schema."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise QueryValidationError("request", f"malformed ({type(exc).__name__})") from None
        return cls._from_dict(data)

    @classmethod
    def _from_dict(cls, d: Any) -> AggregateRequest:
        try:
            token = str(d["token"])
            public_key = PublicKey(int(d["public_key_n"], 16))
            packing = Packing(**d["packing"])
            raw_spec = d["spec"]
        except (KeyError, TypeError, ValueError) as exc:
            raise QueryValidationError("request", f"malformed ({type(exc).__name__})") from None
        return cls(spec_from_dict(raw_spec), token, public_key, packing)
