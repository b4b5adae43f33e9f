"""What a site trusts, held in its own configuration, and the checks it makes on an enclave's
attestation token before it touches any data.

A site pins the platform verifier's JWKS and issuer, lists the enclave image digests its
governance approved, and sets floors: the least k, the most epsilon per release, the least
subset size any enclave policy may have. Nothing here comes from the coordinator. Every
refusal names the check that failed (``trust.signature``, ``trust.image``, ``floor.k``...) and
nothing else: no value, no claim contents.
"""

from __future__ import annotations

import math
import time
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
    TOKEN_SECONDS,
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


@dataclass(frozen=True)
class SiteTrust:
    """The verifier a site trusts (pinned JWKS and issuer) and the images it approved."""

    verifier_jwks: Mapping[str, Any]
    approved_images: tuple[str, ...]
    issuer: str = ISSUER
    allow_debug: bool = False


@dataclass(frozen=True)
class VerifiedToken:
    """What a site learned from a token that passed every check."""

    admission: AdmissionClaims
    nonce: str
    image_digest: str
    dictionary: str
    policy: Mapping[str, Any] = field(default_factory=dict)
    debug: bool = False


#: Seconds a site tolerates between its clock and the verifier's.
CLOCK_SKEW = 60.0


@dataclass(frozen=True)
class Check:
    """One check a site makes on a token: ``passed`` is None when it was not made (an earlier
    check failed, or the live challenge or key was not given)."""

    rule: str
    passed: bool | None
    message: str


#: Every check, in the order a site makes them; each names what it verifies.
CHECKS: dict[str, str] = {
    "trust.format": "the token is a JWT",
    "trust.signature": "signed (ES256) by a key in the pinned verifier JWKS",
    "trust.issuer": "issued by the pinned verifier",
    "trust.audience": "addressed to this site",
    "trust.not_yet_valid": "valid now (nbf)",
    "trust.expired": "not expired (exp)",
    "trust.claims": "has every required claim, in the expected shape",
    "trust.nonce": "answers this site's current challenge",
    "trust.key_binding": "bound to the key the site encrypts to and to one admitted query",
    "trust.debug": "from a production enclave (dbgstat), unless debug is allowed",
    "trust.image": "the enclave image digest is one this site approved",
    "trust.dictionary": "the enclave enforces this site's data dictionary",
    "floor.k": "k of the policy and of the query meet this site's floor",
    "floor.max_epsilon": "epsilon of the policy and of the query meet this site's floor",
    "floor.min_subset": "the policy's smallest subset meets this site's floor",
}

_FAILURES: dict[str, str] = {
    "trust.format": "it is not a JWT",
    "trust.signature": "its signature does not verify against the pinned verifier keys",
    "trust.issuer": "it comes from another verifier",
    "trust.audience": "it is addressed to another site",
    "trust.not_yet_valid": "it is not valid yet",
    "trust.expired": "it has expired",
    "trust.claims": "a required claim is missing or has an unexpected shape",
    "trust.nonce": "it does not answer this site's current challenge",
    "trust.key_binding": "it is not bound to the key and query the site was asked to answer",
    "trust.debug": "it comes from a debug enclave, which this site refuses",
    "trust.image": "the enclave image digest is not one this site approved "
                   "(its code, policy or dictionary changed)",
    "trust.dictionary": "the enclave enforces another data dictionary",
}


class _Checklist:
    """Collects checks in order; after the first failure the rest are recorded as not made
    (a site stops there; a reviewer sees what was and was not checked)."""

    def __init__(self) -> None:
        self.results: list[Check] = []
        self.failed = False

    def check(self, rule: str, passed: bool | None, message: str | None = None) -> bool:
        if self.failed:
            return False
        if passed is None:
            self.results.append(Check(rule, None, message or "not checked"))
            return True
        text = CHECKS[rule] if passed else (message or _FAILURES[rule])
        self.results.append(Check(rule, passed, text))
        self.failed = not passed
        return passed

    def finish(self) -> list[Check]:
        made = {c.rule for c in self.results}
        reason = "not checked: an earlier check failed"
        return self.results + [Check(r, None, reason) for r in CHECKS if r not in made]


def token_checks(token: str, *, site: str, nonce: str | None, public_key_n: int | None,
                 trust: SiteTrust, floors: Floors, dictionary: str,
                 now: float | None = None) -> tuple[list[Check], VerifiedToken | None]:
    """Every check site ``site`` makes on an attestation token, in order, and what the token
    says when all of them passed.

    ``nonce`` is the challenge the site issued for this request and ``public_key_n`` the key
    it would encrypt to; either may be None for a check by hand (those checks are then
    reported as not made, and no :class:`VerifiedToken` is returned). ``dictionary`` is the
    digest of the site's own data dictionary. The signature is verified with PyJWT against
    the pinned JWKS before any claim is believed; the claims are then compared one by one so
    that each check has its own result.
    """
    checks = _Checklist()
    when = time.time() if now is None else now
    try:
        kid = jwt.get_unverified_header(token).get("kid")
        ok = True
    except jwt.InvalidTokenError:
        ok = False
    if not checks.check("trust.format", ok):
        return checks.finish(), None
    keys = {k.get("kid"): k for k in trust.verifier_jwks.get("keys", ())
            if isinstance(k, dict) and isinstance(k.get("kid"), str)}
    if not isinstance(kid, str):
        kid = None
    claims: dict[str, Any] = {}
    if kid in keys:
        try:
            key = jwt.PyJWK.from_dict(dict(keys[kid]), algorithm="ES256").key
            claims = jwt.decode(token, key, algorithms=["ES256"],
                                options={"verify_exp": False, "verify_nbf": False,
                                         "verify_iat": False, "verify_aud": False,
                                         "verify_iss": False, "require": []})
            signed = True
        except (jwt.PyJWTError, ValueError, TypeError):
            signed = False
    else:
        signed = False
    if not checks.check("trust.signature", signed, None if kid in keys else
                        "it is signed by a key the site did not pin"):
        return checks.finish(), None
    audience = claims.get("aud")
    for rule, passed in (
            ("trust.issuer", claims.get("iss") == trust.issuer),
            ("trust.audience", audience == site or (isinstance(audience, list)
                                                    and audience == [site]))):
        if not checks.check(rule, passed):
            return checks.finish(), None
    times = [claims.get(c) for c in ("nbf", "iat", "exp")]
    if not all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
               for t in times):
        checks.check("trust.claims", False, "its nbf, iat and exp are not all finite numbers")
        return checks.finish(), None
    nbf, iat, exp = (float(t) for t in times)  # type: ignore[arg-type]
    if not checks.check("trust.not_yet_valid", nbf <= when and iat <= when + CLOCK_SKEW):
        return checks.finish(), None
    # A token lives TOKEN_SECONDS: a longer-lived one is not the verifier's.
    if not checks.check("trust.expired", when < exp and exp - iat <= TOKEN_SECONDS
                        + CLOCK_SKEW):
        return checks.finish(), None
    try:
        missing = [c for c in REQUIRED_CLAIMS if c not in claims]
        token_nonce, binding = claims["eat_nonce"]
        mine = claims["submods"]["pets_widgets"]
        admission = AdmissionClaims.from_dict(mine["admission"])
        image = str(claims["submods"]["container"]["image_digest"])
        policy = dict(mine["policy"])
        token_dictionary = str(mine["dictionary"])
        debug = claims["dbgstat"] != DEBUG_DISABLED
        shaped = not missing
    except (KeyError, TypeError, ValueError):
        shaped = False
    if not checks.check("trust.claims", shaped):
        return checks.finish(), None
    live = nonce is not None and public_key_n is not None
    checks.check("trust.nonce", None if nonce is None else token_nonce == nonce,
                 "not checked: give the challenge the site issued (--nonce)")
    checks.check("trust.key_binding", None if public_key_n is None
                 else binding == key_binding(public_key_n, admission),
                 "not checked: give the key the site would encrypt to (--public-key-n)")
    checks.check("trust.debug", not debug or trust.allow_debug)
    checks.check("trust.image", image in trust.approved_images)
    checks.check("trust.dictionary", token_dictionary == dictionary)
    for rule, passed in _floor_results(policy, admission, floors):
        if passed is None:
            checks.check("trust.claims", False,
                         "its policy claims do not have the expected shape")
            break
        checks.check(rule, passed, _floor_failure(rule, floors))
    results = checks.finish()
    if checks.failed or not live:
        return results, None
    return results, VerifiedToken(admission, token_nonce, image, token_dictionary, policy, debug)


def verify_token(token: str, *, site: str, nonce: str, public_key_n: int, trust: SiteTrust,
                 floors: Floors, dictionary: str) -> VerifiedToken:
    """Check an attestation token exactly as site ``site`` does; raise
    :class:`AttestationError` (``rule`` = the first failed check) or return what it says.

    See :func:`token_checks` for the checks and their order.
    """
    results, verified = token_checks(token, site=site, nonce=nonce, public_key_n=public_key_n,
                                     trust=trust, floors=floors, dictionary=dictionary)
    for check in results:
        if check.passed is False:
            raise AttestationError(f"the enclave's attestation token fails check "
                                   f"{check.rule}: {check.message}", rule=check.rule)
    assert verified is not None  # every check was made and passed
    return verified


def _floor_results(policy: Mapping[str, Any], admission: AdmissionClaims,
                   floors: Floors) -> list[tuple[str, bool | None]]:
    """Whether the policy and the admitted query meet each floor (None: unreadable policy)."""
    try:
        k, max_eps = int(policy["k"]), Fraction(str(policy["max_epsilon"]))
        min_subset, eps = int(policy["min_subset"]), Fraction(admission.epsilon)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return [("floor.k", None)]
    limit = Fraction(str(floors.max_epsilon))
    return [("floor.k", k >= floors.k and admission.k >= floors.k),
            ("floor.max_epsilon", max_eps <= limit and eps <= limit),
            ("floor.min_subset", min_subset >= floors.min_subset)]


def _floor_failure(rule: str, floors: Floors) -> str:
    if rule == "floor.k":
        return f"the enclave's k is below this site's floor of {floors.k}"
    if rule == "floor.max_epsilon":
        return ("the enclave's epsilon per release is above this site's floor of "
                f"{floors.max_epsilon:g}")
    return f"the enclave's smallest subset is below this site's floor of {floors.min_subset}"
