"""What a site trusts, and the check it makes before it encrypts anything: the attestation
platform's key and the approved enclave measurement (its enrollment), and the verification
of an enclave's quote against them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pets_widgets.core.errors import (
    AttestationError,
)
from pets_widgets.core.paillier import PublicKey, key_fingerprint
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import Quote


def verify_quote(quote: Quote, *, platform_key: VerifyKey, approved_measurement: str,
                 nonce: str, public_key: PublicKey) -> None:
    """Raise :class:`AttestationError` unless the quote is genuine, fresh and approved."""
    if not platform_key.verify(quote.signature, quote.body()):
        raise AttestationError("the attestation quote's signature does not verify")
    if quote.nonce != nonce:
        raise AttestationError("the attestation quote does not answer this site's challenge")
    if quote.measurement != approved_measurement:
        raise AttestationError(
            "the enclave's measurement is not the approved one (its code or policy changed)"
        )
    if quote.key_fingerprint != key_fingerprint(public_key):
        raise AttestationError("the encryption key is not the attested enclave's key")


@dataclass(frozen=True)
class Enrollment:
    """What a site trusts: the attestation platform's key and the approved enclave measurement."""

    platform_key: VerifyKey
    approved_measurement: str
