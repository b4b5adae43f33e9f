"""The enclave stand-in: decrypts only totals, enforces the policy, adds noise; its tokens come
from the platform verifier that launched it.

A front over parts with one job each: :class:`~.attestation.AttestationClient` (tokens from
the platform verifier that launched it),
:class:`~.admission.Gatekeeper` (validation, policy, budget, refusals),
:class:`~.admission.OpenAdmissions` (open queries and their nonces),
:class:`~.decryption.Decryptor` (the only Paillier private key; signature checks and totals)
and :class:`~.releaser.Releaser` (the release flow over the pure functions of
:mod:`~.pipeline.release`). It enforces the :class:`~pets_widgets.core.policy.Policy` itself
(a user interface can be bypassed), reserves budget before noise is drawn, and releases nothing
that is not noised and suppressed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from fractions import Fraction

import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.budget import Budget
from pets_widgets.core.errors import IntegrityError
from pets_widgets.core.evidence import TOKEN_SECONDS, TokenIssuer
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY, Packing
from pets_widgets.core.paillier import DEFAULT_KEY_BITS
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.admission import (
    Admission,
    Gatekeeper,
    InFlight,
    OpenAdmissions,
    check_epsilon,
    check_k,
    release_key,
)
from pets_widgets.enclave.attestation import AttestationClient
from pets_widgets.enclave.decryption import Decryptor
from pets_widgets.enclave.ledger import QueryRecord
from pets_widgets.enclave.pipeline import incidence
from pets_widgets.enclave.pipeline.noise import NoisePool, OpenDPDiscreteLaplace
from pets_widgets.enclave.pipeline.release import EXACT_MECHANISM, build_release, exact_blocks
from pets_widgets.enclave.releaser import Releaser

__all__ = ["Admission", "Enclave", "check_epsilon", "check_k"]

#: Seconds after which an unreleased admission is closed: its tokens have expired by then.
ABANDONED_SECONDS = TOKEN_SECONDS + 120
#: The epsilons the enclave service draws noise for ahead of time (the dashboard's choices).
WARM_EPSILONS = (0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0)


class Enclave:
    """Holds the Paillier private key, the attestation key, the policy and the ledger."""

    def __init__(self, schema: S.Schema, ledger: audit.Ledger,
                 policy: Policy | None = None, key_bits: int = DEFAULT_KEY_BITS,
                 site_capacity: int = DEFAULT_SITE_CAPACITY, *,
                 issuer: TokenIssuer | None = None):
        self.schema = schema
        self.key_bits = key_bits
        self.site_capacity = site_capacity
        self._ledger = ledger
        self._decryptor = Decryptor(key_bits)
        self.public_key = self._decryptor.public_key
        self.key_fingerprint = self._decryptor.key_fingerprint
        #: The launching verifier's token service (the enclave never holds its key).
        self._attestation = AttestationClient(issuer)
        #: Public inputs of builders (population denominators), by name; never patient data.
        self._public: dict[str, pd.DataFrame] = {}
        self._gate = Gatekeeper(schema, ledger, policy or Policy(), self._public)
        self._open = OpenAdmissions()
        self._inflight = InFlight()
        self._exact: set[str] = set()  # admissions opened through the exact door
        self._releaser = Releaser(schema, self._gate, self._decryptor)
        bound = ledger.meta("policy_digest")
        if bound is not None and bound != self.policy.hash:
            raise IntegrityError("this ledger was created under another policy: an enclave "
                                 "opens it only with the policy it was created with (start "
                                 "a new ledger for a new policy)")
        ledger.set_meta("policy_digest", self.policy.hash)
        ledger.set_meta("policy", json.dumps(self.policy.to_dict(), sort_keys=True))
        ledger.set_meta("image_digest", self.image_digest)

    @property
    def ledger(self) -> audit.Ledger:
        """The audit log and budget this enclave was started with (fixed for its life: a
        second ledger would split the budget and the stored releases between two files)."""
        return self._ledger

    @property
    def policy(self) -> Policy:
        """The policy this enclave enforces (read-only: it is part of the image digest)."""
        return self._gate.policy

    @property
    def image_digest(self) -> str:
        """The image digest the platform verifier measured when it launched this enclave
        (code, policy and dictionary), as its tokens report it; "" when not launched."""
        return self._attestation.image_digest

    @property
    def debug(self) -> bool:
        """Whether this is a debug build (its tokens say so; the test doors need one)."""
        return self._attestation.debug

    def use_noise_pool(self, epsilons: Sequence[float] = WARM_EPSILONS,
                       cells: int = 1500) -> NoisePool:
        """Draw noise ahead of time (see :class:`~.pipeline.noise.NoisePool`): warmed for
        count-like blocks (sensitivity 1) at ``epsilons`` up to the policy's maximum, about
        ``cells`` draws each, and refilled after every release. The enclave service does
        this at boot; an in-process simulation draws on demand."""
        pool = NoisePool()
        self._releaser.mechanism = OpenDPDiscreteLaplace(pool)
        pool.warm([1 / Fraction(str(e)) for e in epsilons if e <= self.policy.max_epsilon],
                  2 * cells)
        return pool

    def register_population(self, population: pd.DataFrame) -> None:
        """Hold the sites' public person-years denominators (for incidence rates).

        They are population estimates, not patient data, and are used unnoised. They cannot
        weaken privacy: a rate is noisy counts divided by public numbers (post-processing),
        so wrong denominators could only give wrong rates, never disclose anyone.
        """
        self._public["population"] = incidence.check_population(population, self.schema.sites)

    @property
    def population(self) -> pd.DataFrame | None:
        """The registered public denominators (a copy), or None."""
        frame = self._public.get("population")
        return None if frame is None else frame.copy()

    # -- sites ------------------------------------------------------------------------------
    def register_site(self, name: str, verify_key: VerifyKey) -> None:
        """Record a site's signing key (done once, when the site joins the federation)."""
        if name not in self.schema.sites:
            raise ValueError(f"{name!r} is not a site of this federation")
        self._decryptor.register_site(name, verify_key)

    # -- phase 1: admission -----------------------------------------------------------------
    def admit(self, spec: QuerySpec, epsilon: object, k: object, analyst: str,
              sites: Sequence[str], *, wait: bool = True) -> Admission | Release | None:
        """Check a query against the policy before any site does any work.

        Returns the stored :class:`Release` when this exact question was answered before
        (nothing is spent), or an :class:`Admission` to collect site aggregates for.
        Refusals raise :class:`QueryRefused` after writing their audit row. While an
        identical question is being answered, this one waits for that answer (at most
        :attr:`InFlight.WAIT` seconds); with ``wait=False`` (a service answering one request
        at a time cannot wait) it returns None at once: ask again shortly.
        """
        sites = tuple(sites)
        self._reap()
        spec, eps, k_int = self._gate.validated(spec, epsilon, k, analyst, sites)
        query = QueryRecord(analyst, spec.hash, spec.to_json(), sites, eps)
        self._gate.enforce(query, spec, k_int)
        self._gate.refused_before(spec, query)
        admission = self._admission(spec, eps, k_int, analyst, sites)
        while True:
            stored = self.ledger.stored(admission.release_key)
            if stored is not None:
                return self._releaser.repeat(admission, stored)
            waiting = self._inflight.claim(admission.release_key, admission.id)
            if waiting is None:
                break  # this admission answers it
            if not wait:
                return None
            waiting.wait(InFlight.WAIT)
        try:
            self._gate.check_budget(query)
            self._gate.check_unreleased(query, self._open.count(analyst))
            self._open.open(admission)
        except BaseException:
            self._inflight.done(admission.id)
            raise
        return admission

    def _reap(self) -> None:
        """Close, with an audit row each, admissions whose tokens expired unanswered (nothing
        was reserved for them: the budget is reserved at release)."""
        for admission in self._open.abandoned(ABANDONED_SECONDS):
            self.abort(admission, audit.FAILED, "abandoned", "the query was admitted and "
                       "never released (its tokens expired); nothing was spent")

    def _admission(self, spec: QuerySpec, eps: Fraction, k: int, analyst: str,
                   sites: tuple[str, ...]) -> Admission:
        """An admission for a checked request (opened only when it is handed out)."""
        layout = spec.layout(self.schema)
        packing = Packing.for_layout(layout.size, layout.max_contribution, len(sites),
                                     self.key_bits, self.site_capacity)
        return Admission(spec, eps, k, analyst, sites, layout, packing,
                         release_key(spec, eps, k, sites))

    def budget(self, analyst: str) -> Budget:
        """What ``analyst`` and the federation have spent and have left."""
        return self._gate.budget(analyst)

    def open_admission(self, admission_id: object) -> Admission:
        """The enclave's own copy of an open admission, by the id its receipt carries."""
        return self._open.get(admission_id)

    def issue_nonce(self, admission: Admission, site: str, nonce: str) -> str:
        """The attestation token for one site's challenge on an open admission, remembered
        so the site's reply must answer it. No token exists for anything else."""
        self._open.answer(admission, site, nonce)
        return self._attestation.token(admission, site, nonce, self.public_key.n, self.policy)

    def record_failure(self, spec: QuerySpec, epsilon: object, analyst: str,
                       sites: Sequence[str], rule: str, reason: str) -> None:
        """Write the audit row of a query that failed at a site before it was admitted (an
        enclave service is asked with the sites' nonces: a site that cannot give one fails
        the query first). Nothing was admitted or spent."""
        spec, eps, _ = self._gate.validated(spec, epsilon, self.policy.k, analyst, tuple(sites))
        self.ledger.record(QueryRecord(analyst, spec.hash, spec.to_json(), tuple(sites), eps),
                           audit.FAILED, rule=rule, reason=reason)

    def issue_tokens(self, admission: Admission, nonces: dict[str, str]) -> dict[str, str]:
        """:meth:`issue_nonce` for every site of ``admission`` at once (one call to the
        verifier when it takes batches)."""
        for site, nonce in nonces.items():
            self._open.answer(admission, site, nonce)
        return self._attestation.tokens(admission, nonces, self.public_key.n, self.policy)

    def abort(self, admission: Admission, outcome: str, rule: str, reason: str) -> None:
        """Record a query that failed before any budget was reserved (nothing spent). The
        exact door's admissions are written as test use, whatever the outcome."""
        self._open.close(admission)
        if admission.id in self._exact:
            outcome = audit.TEST
        self._exact.discard(admission.id)
        self._inflight.done(admission.id)
        self.ledger.record(admission.record, outcome, rule=rule, reason=reason)

    # -- the exact door (debug builds only) ---------------------------------------------------
    def admit_exact(self, spec: QuerySpec, analyst: str, sites: Sequence[str]) -> Admission:
        """An open admission for exact totals: validated, but no policy, budget or stored
        release. Only a debug build has this door: its tokens say so and its image digest
        differs, so sites refuse it unless their configuration allows debug enclaves.
        For oracle tests (:func:`pets_widgets.testing.noiseless`)."""
        if not self.debug:
            raise IntegrityError("exact totals need a debug enclave (enclave serve --debug, or "
                                 "demo_federation(..., debug=True)); this one is not")
        spec = spec.validate(self.schema).canonical(self.schema)
        admission = self._admission(spec, Fraction(1), self.policy.k, analyst, tuple(sites))
        self._open.open(admission)
        self._exact.add(admission.id)
        return admission

    def is_exact(self, admission: Admission) -> bool:
        """Whether ``admission`` was opened through the exact door."""
        return admission.id in self._exact

    def release_exact(self, admission: Admission, aggregates: Sequence[EncryptedAggregate],
                      summed: Sequence[int]) -> Release:
        """Exact totals of verified aggregates: no noise, no suppression, no budget (an audit
        row records the test use). Debug builds only."""
        if not self.debug or admission.id not in self._exact:
            raise IntegrityError("this admission was not opened through the exact door")
        self._exact.discard(admission.id)
        admission, nonces = self._open.take(admission)
        refusal = self._gate.inputs_refusal(admission.spec.kind)
        if refusal is not None:
            raise refusal
        self._decryptor.verify(admission, nonces, aggregates, summed)
        totals = self._decryptor.totals(admission, summed)
        self.ledger.record(admission.record, audit.TEST, rule="test",
                           reason="exact totals through pets_widgets.testing")
        return build_release(admission.spec, self.schema, admission.layout,
                             exact_blocks(totals), admission.epsilon, admission.k, self.policy,
                             self._gate.public_inputs(admission.spec.kind),
                             mechanism=EXACT_MECHANISM, sites=admission.sites,
                             analyst=admission.analyst, suppress=False)

    # -- phase 2: verification, decryption, release -------------------------------------------
    def release(self, admission: Admission, aggregates: Sequence[EncryptedAggregate],
                summed: Sequence[int]) -> Release:
        """Verify, reserve budget, decrypt the totals, add noise, suppress, store, release.

        Only the enclave's own copy of the admission counts (and each is released once),
        and the policy is checked again: whatever the coordinator did to its receipt, the
        floors hold.
        """
        try:
            trusted, nonces = self._open.take(admission)
            return self._releaser.release(trusted, nonces, aggregates, summed)
        finally:
            self._inflight.done(admission.id)  # whoever waits on this question wakes

