"""The enclave's side of attestation: asking the platform verifier that launched it for one
token per site of an open admission, and for nothing else.

The enclave holds no attestation key: the verifier measured it before launch and signs the
tokens (:mod:`pets_widgets.platform.verifier`). A token is bound to the site's nonce, to the
enclave's Paillier key and to the admitted query, so it answers one request only.
"""

from __future__ import annotations

from pets_widgets.core.errors import AttestationError
from pets_widgets.core.evidence import AdmissionClaims, TokenIssuer
from pets_widgets.core.policy import Policy
from pets_widgets.enclave.admission import Admission


def admission_claims(admission: Admission) -> AdmissionClaims:
    """What a token says about ``admission``."""
    eps = admission.epsilon
    return AdmissionClaims(admission.id, admission.spec.hash,
                           f"{eps.numerator}/{eps.denominator}", admission.k, admission.sites,
                           admission.layout.size)


class AttestationClient:
    """Asks the launching verifier for tokens; the enclave calls it for open admissions only
    (:meth:`pets_widgets.enclave.enclave.Enclave.issue_nonce`)."""

    def __init__(self, issuer: TokenIssuer | None):
        self._issuer = issuer

    @property
    def image_digest(self) -> str:
        """The digest the verifier measured at launch ("" when not launched by one)."""
        return self._issuer.image_digest if self._issuer is not None else ""

    @property
    def debug(self) -> bool:
        return bool(self._issuer is not None and self._issuer.debug)

    def token(self, admission: Admission, site: str, nonce: str, public_key_n: int,
              policy: Policy) -> str:
        if self._issuer is None:
            raise AttestationError("this enclave was not launched by a platform verifier, so "
                                   "it has no attestation evidence", rule="trust.unlaunched")
        return self._issuer.token(audience=site, nonce=nonce, public_key_n=public_key_n,
                                  admission=admission_claims(admission), policy=policy)
