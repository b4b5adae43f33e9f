"""The enclave stand-in: attests itself, decrypts only totals, enforces the policy, adds noise.

It is the only holder of the Paillier private key. It checks every site's signature, the
spec hash, the nonce it issued and the packing before decrypting the homomorphic sum; it
enforces the :class:`~pets_widgets.core.policy.Policy` itself (a user interface can be bypassed),
reserves budget in the ledger before noise is drawn, and releases nothing that is not
noised and suppressed. Its attested measurement hashes its code and its policy, so sites
refuse to encrypt to an enclave whose rules were quietly loosened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import numbers
import os
import secrets
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.budget import Budget
from pets_widgets.core.card import NoiseComponent, ParameterCard
from pets_widgets.core.clock import now
from pets_widgets.core.errors import (
    BudgetExceeded,
    IntegrityError,
    InternalError,
    QueryRefused,
    QueryValidationError,
    SiteIntegrityError,
)
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY, Packing
from pets_widgets.core.paillier import (
    DEFAULT_KEY_BITS,
    add_encrypted,
    check_ciphertexts,
    key_fingerprint,
)
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import Layout, QuerySpec, structural_zeros
from pets_widgets.core.release import Release
from pets_widgets.core.signing import SigningKey, VerifyKey
from pets_widgets.core.wire import EncryptedAggregate, Quote
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.decryption import decrypt, generate_paillier_keypair
from pets_widgets.enclave.pipeline import incidence
from pets_widgets.enclave.pipeline.builders import BUILDERS, PUBLIC_INPUTS
from pets_widgets.enclave.pipeline.noise import (
    NoiseMechanism,
    OpenDPDiscreteLaplace,
    noise_interval,
)
from pets_widgets.enclave.pipeline.tables import NoisyBlocks

#: Folders of the package whose source files make up the enclave's measured code: the
#: enclave's own folder and everything it imports (``core``, which imports nothing else).
MEASURED_FOLDERS = ("enclave", "core")


def measured_files() -> list[Path]:
    """Every source file of the measured folders, in a fixed order."""
    package = Path(__file__).resolve().parent.parent
    return sorted(path for folder in MEASURED_FOLDERS
                  for path in (package / folder).rglob("*.py"))


@functools.cache
def code_measurement() -> str:
    """SHA-256 over the enclave's folder and ``core/`` (a stand-in for an MRENCLAVE): each
    file's path inside the package and its bytes, so adding, removing or changing any file
    the enclave runs changes the measurement."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in measured_files():
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def expected_measurement(policy: Policy) -> str:
    """The measurement an enclave running this code with this policy reports: what a site's
    governance approves."""
    return hashlib.sha256(f"{code_measurement()}:{policy.hash}".encode()).hexdigest()


@functools.cache
def _noise_worker() -> ThreadPoolExecutor:
    """A thread for drawing noise (OpenDP's sampler runs without the GIL) while the totals
    are decrypted."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclave-noise")


# A forked child has none of its parent's threads: it starts its own worker when it needs one.
os.register_at_fork(after_in_child=_noise_worker.cache_clear)


def check_epsilon(epsilon: object) -> Fraction:
    """Validate a requested epsilon and return it as an exact fraction."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (numbers.Real, Fraction)):
        raise QueryValidationError("epsilon", f"{epsilon!r} is not a number",
                                   "a finite number above 0")
    if isinstance(epsilon, float) and not math.isfinite(epsilon):
        raise QueryValidationError("epsilon", f"{epsilon!r} is not finite",
                                   "a finite number above 0")
    value = Fraction(str(epsilon)) if isinstance(epsilon, float) else Fraction(epsilon)
    if value <= 0:
        raise QueryValidationError("epsilon", f"{epsilon!r} is not above 0",
                                   "a finite number above 0")
    return value


def check_k(k: object) -> int:
    """Validate a requested suppression threshold."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:  # type: ignore[call-overload]
        raise QueryValidationError("k", f"{k!r} is not a whole number of at least 1",
                                   "integers from the policy's k upwards")
    return int(k)  # type: ignore[call-overload]


@dataclass(frozen=True)
class Admission:
    """A query the enclave has admitted: validated and within policy.

    The coordinator holds this object only as a receipt: the enclave keeps its own copy,
    looked up by ``id``, with the nonces it issued, and trusts nothing else the caller
    passes back.
    """

    spec: QuerySpec
    epsilon: Fraction
    k: int
    analyst: str
    sites: tuple[str, ...]
    layout: Layout
    packing: Packing
    release_key: str
    id: str = field(default_factory=lambda: secrets.token_hex(16))


class Enclave:
    """Holds the Paillier private key, the attestation key, the policy and the ledger."""

    def __init__(self, schema: S.Schema, ledger: audit.Ledger,
                 policy: Policy | None = None, key_bits: int = DEFAULT_KEY_BITS,
                 site_capacity: int = DEFAULT_SITE_CAPACITY):
        self.schema = schema
        self._policy = policy or Policy()
        self.key_bits = key_bits
        self.site_capacity = site_capacity
        self.public_key, self._private_key = generate_paillier_keypair(key_bits)
        self.key_fingerprint = key_fingerprint(self.public_key)
        self._platform_key = SigningKey()  # stands in for the CPU's attestation key
        self.platform_key = self._platform_key.public
        self._mechanism: NoiseMechanism = OpenDPDiscreteLaplace()
        self._site_keys: dict[str, VerifyKey] = {}
        #: Public inputs of builders (population denominators), by name; never patient data.
        self._public: dict[str, pd.DataFrame] = {}
        self._lock = threading.Lock()
        self._open: dict[str, Admission] = {}
        self._nonces: dict[str, dict[str, str]] = {}
        self._used_nonces: set[str] = set()
        self.ledger = ledger
        ledger.set_meta("policy", json.dumps(self.policy.to_dict(), sort_keys=True))
        ledger.set_meta("measurement", self.measurement)

    @property
    def policy(self) -> Policy:
        """The policy this enclave enforces (read-only: it is part of the measurement)."""
        return self._policy

    @property
    def measurement(self) -> str:
        """What this enclave attests to: a hash of its code and of the policy it enforces,
        computed afresh, so a policy changed after start-up is seen by every site."""
        return expected_measurement(self._policy)

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

    # -- attestation ------------------------------------------------------------------------
    def register_site(self, name: str, verify_key: VerifyKey) -> None:
        """Record a site's signing key (done once, when the site joins the federation)."""
        if name not in self.schema.sites:
            raise ValueError(f"{name!r} is not a site of this federation")
        self._site_keys[name] = verify_key

    def quote(self, nonce: str) -> Quote:
        """A signed quote of this enclave's measurement and key, answering ``nonce``."""
        quote = Quote(self.measurement, nonce, self.key_fingerprint, self.policy.hash)
        return replace(quote, signature=self._platform_key.sign(quote.body()))

    # -- phase 1: admission -----------------------------------------------------------------
    def admit(self, spec: QuerySpec, epsilon: object, k: object, analyst: str,
              sites: Sequence[str]) -> Admission | Release:
        """Check a query against the policy before any site does any work.

        Returns the stored :class:`Release` when this exact question was answered before
        (nothing is spent), or an :class:`Admission` to collect site aggregates for.
        Refusals raise :class:`QueryRefused` after writing their audit row.
        """
        sites = tuple(sites)
        eps = self._validated(spec, epsilon, k, analyst, sites)
        spec = spec.canonical(self.schema)
        k_int = check_k(k)
        self._enforce(spec, eps, k_int, analyst, sites)
        if spec.where:
            decided = self.ledger.stored(self._subset_key(spec, sites))
            if decided is not None:  # this filter was refused before: same answer, no noise
                rule, message = json.loads(decided)["refused"]
                self._refuse(spec, eps, analyst, sites, QueryRefused(rule, message))
        admission = self._admission(spec, eps, k_int, analyst, sites)
        stored = self.ledger.stored(admission.release_key)
        if stored is not None:
            self._close(admission)
            return self._repeat(admission, stored)
        budget = self._budget(analyst)
        if eps > budget.analyst_left or eps > budget.federation_left:
            self._close(admission)
            self._refuse_budget(spec, eps, analyst, sites, budget)
        return admission

    def _admission(self, spec: QuerySpec, eps: Fraction, k: int, analyst: str,
                   sites: tuple[str, ...]) -> Admission:
        layout = spec.layout(self.schema)
        packing = Packing.for_layout(layout.size, layout.max_contribution, len(sites),
                                            self.key_bits, self.site_capacity)
        admission = Admission(spec, eps, k, analyst, sites, layout, packing,
                              self._release_key(spec, eps, k, sites))
        with self._lock:
            self._open[admission.id] = admission
            self._nonces[admission.id] = {}
        return admission

    def _close(self, admission: Admission) -> None:
        with self._lock:
            self._open.pop(admission.id, None)
            self._nonces.pop(admission.id, None)

    def _take(self, admission: Admission) -> tuple[Admission, dict[str, str]]:
        """The enclave's own copy of an open admission and its nonces, closed for good: each
        admission is released (or fails) once, and its nonces can never answer again."""
        with self._lock:
            trusted = self._open.pop(admission.id, None)
            nonces = self._nonces.pop(admission.id, None)
        if trusted is None or nonces is None:
            raise IntegrityError("this query is not open in the enclave (already released, "
                                 "aborted, or never admitted)")
        if trusted != admission:
            raise IntegrityError("the admission was altered after the enclave issued it")
        return trusted, nonces

    def _validated(self, spec: QuerySpec, epsilon: object, k: object, analyst: str,
                   sites: tuple[str, ...]) -> Fraction:
        try:
            if not isinstance(spec, QuerySpec):
                raise QueryValidationError("spec", f"{type(spec).__name__} is not a query spec",
                                           "Count, Mean, Crosstab, Histogram, ...")
            spec.validate(self.schema)
            eps = check_epsilon(epsilon)
            check_k(k)
            if not analyst or not isinstance(analyst, str):
                raise QueryValidationError("analyst", f"{analyst!r} is not a name",
                                           "a non-empty name")
            hub_user = os.environ.get("JUPYTERHUB_USER")
            if hub_user and analyst != hub_user:
                raise QueryValidationError(
                    "analyst", f"is fixed to the signed-in JupyterHub user {hub_user!r}",
                    [hub_user])
        except QueryValidationError as exc:
            self.ledger.record(
                analyst=str(analyst or "?"), spec_hash=getattr(spec, "hash", ""),
                spec_json=spec.to_json() if isinstance(spec, QuerySpec) else "{}",
                sites=sites, epsilon_asked=None, outcome=audit.INVALID, rule=exc.field,
                reason=str(exc))
            raise
        return eps

    def _enforce(self, spec: QuerySpec, eps: Fraction, k: int, analyst: str,
                 sites: tuple[str, ...]) -> None:
        policy = self.policy
        locked = self.ledger.meta("locked")
        if locked:
            self._refuse(spec, eps, analyst, sites, QueryRefused(
                "locked", f"the federation is locked after an integrity incident ({locked}); "
                "an operator must investigate and unlock the ledger"))
        if eps > Fraction(str(policy.max_epsilon)):
            self._refuse(spec, eps, analyst, sites, QueryRefused(
                "max_epsilon", f"epsilon {float(eps):g} is above the policy maximum of "
                f"{policy.max_epsilon:g} per release"))
        if k < policy.k:
            self._refuse(spec, eps, analyst, sites, QueryRefused(
                "k", f"k={k} is below the policy minimum of {policy.k}: cells below "
                f"{policy.k} are always hidden"))
        if set(sites) != set(self.schema.sites):
            self._refuse(spec, eps, analyst, sites, QueryRefused(
                "sites", "every site of the federation must take part in every query"))
        missing = [n for n in PUBLIC_INPUTS.get(spec.kind, ()) if n not in self._public]
        if missing:
            self._refuse(spec, eps, analyst, sites, QueryRefused(
                "public_inputs", f"a {spec.kind} query needs public {', '.join(missing)} "
                "tables, and none are registered with the enclave"))

    def _refuse(self, spec: QuerySpec, eps: Fraction | None, analyst: str,
                sites: tuple[str, ...], exc: QueryRefused) -> None:
        self.ledger.record(analyst=analyst, spec_hash=spec.hash, spec_json=spec.to_json(),
                           sites=sites, epsilon_asked=eps, outcome=audit.REFUSED,
                           rule=exc.rule, reason=str(exc))
        raise exc

    def _refuse_budget(self, spec: QuerySpec, eps: Fraction, analyst: str,
                       sites: tuple[str, ...], budget: Budget) -> None:
        if eps > budget.analyst_left:
            exc = BudgetExceeded("analyst_budget", (
                f"epsilon {float(eps):g} would take analyst {analyst!r} past the policy's "
                f"budget of {self.policy.analyst_budget:g} per analyst "
                f"({float(budget.analyst_left):g} left)"))
        else:
            exc = BudgetExceeded("federation_budget", (
                f"epsilon {float(eps):g} would take the federation past its total budget of "
                f"{self.policy.federation_budget:g} ({float(budget.federation_left):g} left)"))
        self._refuse(spec, eps, analyst, sites, exc)

    def _budget(self, analyst: str) -> Budget:
        return self.ledger.budget(analyst, Fraction(str(self.policy.analyst_budget)),
                                  Fraction(str(self.policy.federation_budget)))

    def budget(self, analyst: str) -> Budget:
        """What ``analyst`` and the federation have spent and have left."""
        return self._budget(analyst)

    @staticmethod
    def _release_key(spec: QuerySpec, eps: Fraction, k: int, sites: Sequence[str]) -> str:
        # k is part of the question: suppression is decided once, when the noise is drawn,
        # so a repeat can never show a different pattern of hidden cells.
        text = (f"{spec.hash}|{eps.numerator}/{eps.denominator}|k={k}|"
                f"{','.join(sorted(sites))}")
        return hashlib.sha256(text.encode()).hexdigest()

    @staticmethod
    def _subset_key(spec: QuerySpec, sites: Sequence[str]) -> str:
        where = json.dumps({k: list(v) for k, v in spec.where.items()}, sort_keys=True)
        text = f"subset|{where}|{','.join(sorted(sites))}"
        return hashlib.sha256(text.encode()).hexdigest()

    def issue_nonce(self, admission: Admission, site: str, nonce: str) -> Quote:
        """Quote for one site's challenge, remembered so the site's reply must answer it.

        A nonce is accepted once, for one site of one open admission: an old aggregate can
        never be replayed into another release."""
        with self._lock:
            trusted = self._open.get(admission.id)
            nonces = self._nonces.get(admission.id)
            if trusted is None or nonces is None or trusted != admission:
                raise IntegrityError("this query is not open in the enclave")
            if site not in trusted.sites:
                raise IntegrityError(f"{site!r} is not a site of this query")
            if site in nonces or nonce in self._used_nonces:
                raise IntegrityError("a challenge can be answered once only")
            nonces[site] = nonce
            self._used_nonces.add(nonce)
        return self.quote(nonce)

    def abort(self, admission: Admission, outcome: str, rule: str, reason: str) -> None:
        """Record a query that failed before any budget was reserved (nothing spent)."""
        self._close(admission)
        self.ledger.record(analyst=admission.analyst, spec_hash=admission.spec.hash,
                           spec_json=admission.spec.to_json(), sites=admission.sites,
                           epsilon_asked=admission.epsilon, outcome=outcome, rule=rule,
                           reason=reason)

    # -- phase 2: verification, decryption, release -------------------------------------------
    def _verify(self, admission: Admission, nonces: Mapping[str, str],
                aggregates: Sequence[EncryptedAggregate], summed: Sequence[int]) -> None:
        """Raise :class:`IntegrityError` unless every aggregate is signed by its site, for this
        spec, this query's nonce, this key and packing, and ``summed`` is their product."""
        seen = sorted(a.site for a in aggregates)
        if seen != sorted(admission.sites):
            raise IntegrityError("the aggregates do not come from exactly the query's sites")
        for agg in aggregates:
            problem = self._problem(admission, nonces, agg)
            if problem:
                raise SiteIntegrityError(agg.site, problem)
        expected = add_encrypted(self.public_key, [a.ciphertexts for a in aggregates])
        if list(summed) != expected:
            raise IntegrityError("the aggregator's sum does not match the signed site "
                                 "aggregates")

    def _problem(self, admission: Admission, nonces: Mapping[str, str],
                 agg: EncryptedAggregate) -> str:
        """Why one site's aggregate cannot be accepted ("" when it can)."""
        key = self._site_keys.get(agg.site)
        if key is None:
            return "the site is not registered with the enclave"
        if not key.verify(agg.signature, agg.body()):
            return "its aggregate has a bad signature (tampered or not signed by the site)"
        if agg.spec_hash != admission.spec.hash:
            return "its aggregate is for another query"
        if agg.nonce != nonces.get(agg.site):
            return "its aggregate answers another challenge (a replay)"
        if agg.key_fingerprint != self.key_fingerprint:
            return "its aggregate is encrypted to another enclave key"
        if agg.packing != admission.packing:
            return "its aggregate uses another packing"
        if len(agg.ciphertexts) != admission.packing.n_ciphertexts:
            return "its aggregate has the wrong number of ciphertexts"
        try:
            check_ciphertexts(self.public_key, agg.ciphertexts)
        except IntegrityError as exc:
            return str(exc)
        return ""

    def _totals(self, admission: Admission, summed: Sequence[int]) -> dict[str, np.ndarray]:
        plaintexts = decrypt(self._private_key, summed)
        cells = np.array(admission.packing.unpack(plaintexts), dtype=np.int64)
        out, slices = {}, admission.layout.slices()
        for block in admission.layout.blocks:
            out[block.name] = cells[slices[block.name]]
        return out

    def release(self, admission: Admission, aggregates: Sequence[EncryptedAggregate],
                summed: Sequence[int]) -> Release:
        """Verify, reserve budget, decrypt the totals, add noise, suppress, store, release.

        Only the enclave's own copy of the admission counts, and the policy is checked again
        here: whatever the coordinator did to its receipt, the floors hold.
        """
        admission, nonces = self._take(admission)
        spec, eps = admission.spec, admission.epsilon
        try:
            self._verify(admission, nonces, aggregates, summed)
        except IntegrityError as exc:
            self.abort(admission, audit.FAILED, "integrity", str(exc))
            raise
        self._enforce(spec, eps, admission.k, admission.analyst, admission.sites)
        stored = self.ledger.stored(admission.release_key)
        if stored is not None:  # an identical query finished while the sites worked
            return self._repeat(admission, stored)
        try:
            reservation = self.ledger.reserve(
                analyst=admission.analyst, spec_hash=spec.hash, epsilon=eps,
                analyst_budget=Fraction(str(self.policy.analyst_budget)),
                federation_budget=Fraction(str(self.policy.federation_budget)))
        except BudgetExceeded as exc:
            stored = self.ledger.stored(admission.release_key)
            if stored is not None:
                return self._repeat(admission, stored)
            self.abort(admission, audit.REFUSED, exc.rule, str(exc))
            raise
        try:
            # The noise does not depend on the totals: it is drawn while they are decrypted.
            noise = _noise_worker().submit(self._noise, admission.layout, eps)
            totals = self._totals(admission, summed)
        except IntegrityError as exc:
            # A decrypted total outside its slots means a site encrypted something no honest
            # site can: the failure itself would answer a threshold question about the other
            # sites' exact totals. So it is charged, not returned, and the federation locks.
            self.ledger.incident(
                reservation, analyst=admission.analyst, spec_hash=spec.hash,
                spec_json=spec.to_json(), sites=admission.sites, epsilon=eps, reason=str(exc))
            raise
        except BaseException as exc:  # an interrupt, a worker that cannot start: nothing out
            self._return_reservation(reservation, admission, exc)
            raise
        refusal: QueryRefused | None = None
        try:
            noisy = self._noisy(admission.layout, eps, totals, spec.where, noise.result())
            refusal = self._subset_refusal(admission, noisy)
            if refusal is None:
                release = self._build(admission, noisy, suppress=True)
                payload = json.dumps({"noisy": {b: v.tolist() for b, v in noisy.values.items()},
                                      "time": now()})
                committed = self.ledger.commit_release(
                    reservation, release_key=admission.release_key, spec_hash=spec.hash,
                    spec_json=spec.to_json(), sites=admission.sites, epsilon=eps,
                    analyst=admission.analyst, payload=payload)
        except BaseException as exc:
            self._return_reservation(reservation, admission, exc)
            raise
        if refusal is not None:
            # The refusal was decided on freshly drawn noise: it is a differentially private
            # answer, so its epsilon is charged to the federation (not to the analyst, who gets
            # nothing), and the decision is kept for this filter, whatever the kind or epsilon.
            decision = json.dumps({"refused": [refusal.rule, str(refusal)]})
            self.ledger.refuse_charged(
                reservation, keys=(admission.release_key, self._subset_key(spec,
                                                                          admission.sites)),
                payload=decision, analyst=admission.analyst, spec_hash=spec.hash,
                spec_json=spec.to_json(), sites=admission.sites, epsilon=eps,
                rule=refusal.rule, reason=str(refusal))
            raise refusal
        if not committed:  # an identical concurrent query stored its release first
            stored = self.ledger.stored(admission.release_key)
            if stored is None:
                raise InternalError("a concurrent release vanished from the ledger")
            return self._repeat(admission, stored)
        return self._with_budget(release, admission.analyst)

    def _return_reservation(self, reservation: int, admission: Admission,
                            exc: BaseException) -> None:
        """Hand a reservation back after a refusal or a fault that released nothing."""
        refused = isinstance(exc, QueryRefused)
        self.ledger.return_reservation(
            reservation, analyst=admission.analyst, spec_hash=admission.spec.hash,
            spec_json=admission.spec.to_json(), sites=admission.sites,
            epsilon=admission.epsilon, outcome=audit.REFUSED if refused else audit.FAILED,
            rule=exc.rule if isinstance(exc, QueryRefused) else "fault",
            reason=str(exc) if refused
            else f"{type(exc).__name__} after the budget was reserved; nothing released")

    @staticmethod
    def _scale(sensitivity: int, eps: Fraction, share: Fraction) -> Fraction:
        return Fraction(sensitivity) / (eps * share)

    def _noise_params(self, layout: Layout, eps: Fraction, values: Mapping[str, np.ndarray],
                      where: Mapping[str, tuple[object, ...]]) -> NoisyBlocks:
        scales = {b.name: self._scale(b.sensitivity, eps, b.budget_share) for b in layout.blocks}
        return NoisyBlocks(dict(values), {b: float(s) for b, s in scales.items()},
                           {b: noise_interval(s) for b, s in scales.items()},
                           structural_zeros(layout, where, self.schema))

    def _noise(self, layout: Layout, eps: Fraction) -> dict[str, np.ndarray]:
        """One draw of the mechanism's noise for every cell of every block, at the block's
        own scale: the mechanism applied to zeros (it adds its noise to what it is given)."""
        return {block.name: np.asarray(self._mechanism.sample(
                    [0] * block.size, self._scale(block.sensitivity, eps, block.budget_share)),
                    dtype=np.int64)
                for block in layout.blocks}

    def _noisy(self, layout: Layout, eps: Fraction, totals: Mapping[str, np.ndarray],
               where: Mapping[str, tuple[object, ...]] | None = None,
               noise: Mapping[str, np.ndarray] | None = None) -> NoisyBlocks:
        """Discrete Laplace noise on every cell of every block, at the block's own scale.

        ``noise`` is a draw of :meth:`_noise` for this layout and epsilon, made for this
        release only (drawn here when None). Both mechanisms add independent noise to each
        value, so totals plus noise drawn on zeros is exactly the mechanism on the totals.

        Cells the schema's rules make impossible (structural zeros, e.g. a stage for a
        leukaemia, or DIPG outside the CNS group) are then set to exactly zero: that is
        post-processing with public knowledge, and it keeps pure noise out of tables."""
        where = where or {}
        noise = self._noise(layout, eps) if noise is None else noise
        impossible = structural_zeros(layout, where, self.schema)
        values = {}
        for block in layout.blocks:
            noisy = np.asarray(totals[block.name], dtype=np.int64) + noise[block.name]
            noisy[impossible[block.name]] = 0
            values[block.name] = noisy
        return self._noise_params(layout, eps, values, where)

    def _subset_refusal(self, admission: Admission, noisy: NoisyBlocks) -> QueryRefused | None:
        """The differencing defence: a filter must select at least ``min_subset`` patients,
        judged on the noisy cells (their sum is post-processing of the release's own noise)."""
        if not admission.spec.where or self.policy.min_subset <= 0:
            return None
        subset = sum(int(noisy.values[b.name].sum()) for b in admission.layout.blocks
                     if b.partition)
        if subset < self.policy.min_subset:
            return QueryRefused(
                "min_subset", f"the filter {dict(admission.spec.where)} selects fewer than the "
                f"policy minimum of {self.policy.min_subset} patients (judged on noisy counts)")
        return None

    def _repeat(self, admission: Admission, stored: str) -> Release:
        spec, eps, analyst, sites = (admission.spec, admission.epsilon, admission.analyst,
                                     admission.sites)
        data = json.loads(stored)
        if "refused" in data:
            rule, message = data["refused"]
            self._refuse(spec, eps, analyst, sites, QueryRefused(rule, message))
        values = {b: np.asarray(v, dtype=np.int64) for b, v in data["noisy"].items()}
        release = self._build(admission, self._noise_params(admission.layout, eps, values,
                                                            spec.where),
                              suppress=True, repeated=True)
        self.ledger.record(analyst=analyst, spec_hash=spec.hash, spec_json=spec.to_json(),
                           sites=sites, epsilon_asked=eps, outcome=audit.REPEATED,
                           reason="same question at the same epsilon: stored release returned")
        return self._with_budget(release, analyst)

    def _build(self, admission: Admission, noisy: NoisyBlocks, *, suppress: bool,
               repeated: bool = False, exact: bool = False) -> Release:
        spec, layout, eps, k = admission.spec, admission.layout, admission.epsilon, admission.k
        builder = BUILDERS.get(spec.kind)
        if builder is None:
            raise InternalError(f"no table builder for query kind {spec.kind!r}")
        missing = [n for n in PUBLIC_INPUTS.get(spec.kind, ()) if n not in self._public]
        if missing:
            raise QueryRefused("public_inputs", f"a {spec.kind} query needs public "
                               f"{', '.join(missing)} tables, and none are registered")
        public = {n: self._public[n] for n in PUBLIC_INPUTS.get(spec.kind, ())}
        tables = builder(spec, self.schema, layout, noisy, k, self.policy.protection, suppress,
                         **public)
        components = tuple(
            NoiseComponent(b.name, float(eps * b.budget_share), b.sensitivity,
                                   0.0 if exact else noisy.scales[b.name],
                                   0 if exact else noisy.intervals[b.name])
            for b in layout.blocks)
        first = components[0]
        rule = f"primary: cells with a noisy value below k={k} hidden"
        if tables.margins and not tables.margins.startswith("none"):
            rule += (f"; secondary: further cells hidden so no hidden cell can be worked out "
                     f"from the totals to within {self.policy.protection}")
        if tables.suppression:  # a kind with its own rule (survival strata, rates)
            rule = tables.suppression
        if not suppress:
            rule = "none (test-only exact release)"
        card = ParameterCard(
            mechanism="none (test-only exact totals)" if exact else self._mechanism.name,
            epsilon=float(eps), epsilon_per_cell=first.epsilon, sensitivity=first.sensitivity,
            noise_scale=first.noise_scale, noise_interval_95=first.noise_interval_95, k=k,
            suppression_rule=rule, spec_hash=spec.hash, sites=admission.sites, time=now(),
            components=components, margins=tables.margins,
            postprocessing=tables.postprocessing, analyst=admission.analyst,
            repeated=repeated, policy=self.policy.to_dict(), notes=tables.notes)
        return Release(spec, tables.table, tables.suppressed, card, tables.lower, tables.upper,
                       tables.extras)

    def _with_budget(self, release: Release, analyst: str) -> Release:
        budget = self._budget(analyst)
        card = replace(release.card, budget_spent=float(budget.analyst_spent),
                       budget_left=float(budget.analyst_left),
                       federation_budget_left=float(budget.federation_left))
        return replace(release, card=card)

    # -- the test door (reached only from pets_widgets.testing) --------------------------------
    def _admit_exact(self, spec: QuerySpec, analyst: str, sites: Sequence[str]) -> Admission:
        """Admission for the test door: validated, but no policy, budget or stored release."""
        spec = spec.validate(self.schema).canonical(self.schema)
        return self._admission(spec, Fraction(1), self.policy.k, analyst, tuple(sites))

    def _release_exact(self, admission: Admission,
                       aggregates: Sequence[EncryptedAggregate],
                       summed: Sequence[int]) -> Release:
        """Exact totals, no noise, no suppression, no budget: for oracle tests only."""
        admission, nonces = self._take(admission)
        self._verify(admission, nonces, aggregates, summed)
        totals = self._totals(admission, summed)
        noisy = NoisyBlocks(totals, {b: 0.0 for b in totals}, {b: 0 for b in totals})
        self.abort(admission, audit.TEST, "test", "exact totals through pets_widgets.testing")
        return self._build(admission, noisy, suppress=False, exact=True)
