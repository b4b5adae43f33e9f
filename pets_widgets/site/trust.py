"""What a site trusts, held in its own configuration, and the checks it makes on an enclave's
attestation token before it touches any data.

A site pins the platform verifier's JWKS and issuer, lists the enclave image digests its
governance approved, and sets floors: the least k, the most epsilon per release, the least
subset size any enclave policy may have. Nothing here comes from the coordinator. Every
refusal names the check that failed (``trust.signature``, ``trust.image``, ``floor.k``...) and
nothing else: no value, no claim contents.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from typing import Any

import jwt

from pets_widgets.core.errors import AttestationError
from pets_widgets.core.evidence import (
    DEBUG_DISABLED,
    ISSUER,
    REQUIRED_CLAIMS,
    AdmissionClaims,
    key_binding,
)


@dataclass(frozen=True)
class Floors:
    """The least a site accepts from any enclave policy, and its own limits.

    ``k``: the smallest suppression threshold; ``max_epsilon``: the most epsilon one release
    may spend; ``min_subset``: the smallest filtered subset the enclave must insist on;
    ``lifetime_epsilon``: the total epsilon this site lets be released over its data;
    ``allow_site_breakdown``: whether its numbers may be shown on their own (``by`` or
    ``where`` on ``site``).
    """

    k: int = 5
    max_epsilon: float = 1.0
    min_subset: int = 10
    lifetime_epsilon: float = 100.0
    allow_site_breakdown: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Floors:
        return cls(int(data["k"]), float(data["max_epsilon"]), int(data["min_subset"]),
                   float(data["lifetime_epsilon"]), bool(data["allow_site_breakdown"]))


@dataclass(frozen=True)
class SiteTrust:
    """The verifier a site trusts (pinned JWKS and issuer) and the images it approved."""

    verifier_jwks: Mapping[str, Any]
    approved_images: tuple[str, ...]
    issuer: str = ISSUER
    allow_debug: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"verifier_jwks": dict(self.verifier_jwks),
                "approved_images": list(self.approved_images), "issuer": self.issuer,
                "allow_debug": self.allow_debug}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SiteTrust:
        return cls(dict(data["verifier_jwks"]), tuple(str(i) for i in data["approved_images"]),
                   str(data["issuer"]), bool(data["allow_debug"]))


@dataclass(frozen=True)
class VerifiedToken:
    """What a site learned from a token that passed every check."""

    admission: AdmissionClaims
    nonce: str
    image_digest: str
    dictionary: str
    policy: Mapping[str, Any] = field(default_factory=dict)
    debug: bool = False


def _refuse(rule: str, message: str) -> AttestationError:
    return AttestationError(f"the enclave's attestation token fails check {rule}: {message}",
                            rule=rule)


_DECODE_RULES: tuple[tuple[type[Exception], str, str], ...] = (
    (jwt.ExpiredSignatureError, "trust.expired", "it has expired"),
    (jwt.ImmatureSignatureError, "trust.not_yet_valid", "it is not valid yet"),
    (jwt.InvalidAudienceError, "trust.audience", "it is addressed to another site"),
    (jwt.InvalidIssuerError, "trust.issuer", "it comes from another verifier"),
    (jwt.MissingRequiredClaimError, "trust.claims", "a required claim is missing"),
    (jwt.InvalidSignatureError, "trust.signature",
     "its signature does not verify against the pinned verifier keys"),
)


def verify_token(token: str, *, site: str, nonce: str, public_key_n: int, trust: SiteTrust,
                 floors: Floors, dictionary: str) -> VerifiedToken:
    """Check an attestation token exactly as site ``site`` does; raise
    :class:`AttestationError` (``rule`` = the failed check) or return what it says.

    ``nonce`` is the challenge the site issued for this request; ``public_key_n`` the key it
    would encrypt to; ``dictionary`` the digest of the site's own data dictionary.
    """
    try:
        kid = jwt.get_unverified_header(token).get("kid")
    except jwt.InvalidTokenError:
        raise _refuse("trust.format", "it is not a JWT") from None
    keys = {k.get("kid"): k for k in trust.verifier_jwks.get("keys", ())}
    if kid not in keys:
        raise _refuse("trust.signature", "it is signed by a key the site did not pin")
    try:
        key = jwt.PyJWK.from_dict(dict(keys[kid])).key
        claims = jwt.decode(token, key, algorithms=["ES256"], audience=site,
                            issuer=trust.issuer, options={"require": list(REQUIRED_CLAIMS)})
    except jwt.InvalidTokenError as exc:
        for kind, rule, message in _DECODE_RULES:
            if isinstance(exc, kind):
                raise _refuse(rule, message) from None
        raise _refuse("trust.format", "it cannot be decoded") from None
    try:
        token_nonce, binding = claims["eat_nonce"]
        mine = claims["submods"]["pets_widgets"]
        admission = AdmissionClaims.from_dict(mine["admission"])
        image = str(claims["submods"]["container"]["image_digest"])
        policy = dict(mine["policy"])
        token_dictionary = str(mine["dictionary"])
    except (KeyError, TypeError, ValueError):
        raise _refuse("trust.claims", "its claims do not have the expected shape") from None
    if token_nonce != nonce:
        raise _refuse("trust.nonce", "it does not answer this site's current challenge")
    if binding != key_binding(public_key_n, admission):
        raise _refuse("trust.key_binding",
                      "it is not bound to the key and query the site was asked to answer")
    debug = claims["dbgstat"] != DEBUG_DISABLED
    if debug and not trust.allow_debug:
        raise _refuse("trust.debug", "it comes from a debug enclave, which this site refuses")
    if image not in trust.approved_images:
        raise _refuse("trust.image", "the enclave image digest is not one this site approved "
                      "(its code, policy or dictionary changed)")
    if token_dictionary != dictionary:
        raise _refuse("trust.dictionary", "the enclave enforces another data dictionary")
    check_floors(policy, admission, floors)
    return VerifiedToken(admission, nonce, image, token_dictionary, policy, debug)


def check_floors(policy: Mapping[str, Any], admission: AdmissionClaims, floors: Floors) -> None:
    """Refuse a policy or an admitted query below any of the site's floors."""
    try:
        k, max_eps = int(policy["k"]), Fraction(str(policy["max_epsilon"]))
        min_subset, eps = int(policy["min_subset"]), Fraction(admission.epsilon)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        raise _refuse("trust.claims", "its policy claims do not have the expected shape") \
            from None
    if k < floors.k or admission.k < floors.k:
        raise _refuse("floor.k", f"the enclave's k is below this site's floor of {floors.k}")
    limit = Fraction(str(floors.max_epsilon))
    if max_eps > limit or eps > limit:
        raise _refuse("floor.max_epsilon", "the enclave's epsilon per release is above this "
                      f"site's floor of {floors.max_epsilon:g}")
    if min_subset < floors.min_subset:
        raise _refuse("floor.min_subset", "the enclave's smallest subset is below this "
                      f"site's floor of {floors.min_subset}")
