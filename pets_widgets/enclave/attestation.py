"""The enclave's side of attestation: asking the platform verifier that launched it for one
token per site of an open admission, and for nothing else.

The enclave holds no attestation key: the verifier measured it before launch and signs the
tokens (:mod:`pets_widgets.platform.verifier`). A token is bound to the site's nonce, to the
enclave's Paillier key and to the admitted query, so it answers one request only.
"""

from __future__ import annotations

from typing import Any

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

    def tokens(self, admission: Admission, nonces: dict[str, str], public_key_n: int,
               policy: Policy) -> dict[str, str]:
        """A token per site of ``nonces``: in one call when the issuer batches them."""
        batch = getattr(self._issuer, "tokens", None)
        if batch is None:
            return {site: self.token(admission, site, nonce, public_key_n, policy)
                    for site, nonce in nonces.items()}
        return dict(batch(nonces=nonces, public_key_n=public_key_n,
                          admission=admission_claims(admission), policy=policy))

    def token(self, admission: Admission, site: str, nonce: str, public_key_n: int,
              policy: Policy) -> str:
        if self._issuer is None:
            raise AttestationError("this enclave was not launched by a platform verifier, so "
                                   "it has no attestation evidence", rule="trust.unlaunched")
        return self._issuer.token(audience=site, nonce=nonce, public_key_n=public_key_n,
                                  admission=admission_claims(admission), policy=policy)


class VerifierClient:
    """The token service of the platform verifier that launched this enclave process (see
    :mod:`pets_widgets.platform.launch`), as a :class:`TokenIssuer`: the signing key stays
    in the verifier's process; this holds its loopback URL and the launch secret only."""

    def __init__(self, url: str, secret: str):
        import requests

        self._url = url.rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"secret {secret}"
        launched = self._call("GET", "/launch", None)
        self.image_digest = str(launched["image_digest"])
        self.debug = bool(launched["debug"])

    def _call(self, method: str, route: str, body: dict[str, Any] | None) -> dict[str, Any]:
        import requests

        try:
            reply = self._session.request(method, self._url + route, json=body, timeout=10)
        except requests.RequestException as exc:
            raise AttestationError(f"the platform verifier cannot be reached "
                                   f"({type(exc).__name__})", rule="trust.verifier") from None
        if reply.status_code != 200:
            raise AttestationError(f"the platform verifier refused (HTTP {reply.status_code})",
                                   rule="trust.verifier")
        data = reply.json()
        assert isinstance(data, dict)
        return data

    def token(self, *, audience: str, nonce: str, public_key_n: int,
              admission: AdmissionClaims, policy: Policy) -> str:
        return self.tokens(nonces={audience: nonce}, public_key_n=public_key_n,
                           admission=admission, policy=policy)[audience]

    def tokens(self, *, nonces: dict[str, str], public_key_n: int, admission: AdmissionClaims,
               policy: Policy) -> dict[str, str]:
        """One token per site (audience) for its nonce, in one call to the verifier."""
        reply = self._call("POST", "/tokens", {
            "nonces": nonces, "public_key_n": format(public_key_n, "x"),
            "admission": admission.to_dict(), "policy": policy.to_dict()})
        tokens = reply.get("tokens")
        if not isinstance(tokens, dict) or set(tokens) != set(nonces):
            raise AttestationError("the platform verifier's reply is malformed",
                                   rule="trust.verifier")
        return {str(site): str(token) for site, token in tokens.items()}
