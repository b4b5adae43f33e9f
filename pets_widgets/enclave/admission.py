"""Admission: which queries the enclave lets sites work on, and the refusals it writes down.

Everything here runs before any site sees the query, and again when the aggregates come back
(:meth:`Gatekeeper.enforce`): whatever a coordinator does to its receipt, the floors hold.
Every refusal writes its audit row before it is raised.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import re
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from fractions import Fraction
from typing import NoReturn

import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.analyst import check_analyst
from pets_widgets.core.budget import Budget, overspend
from pets_widgets.core.errors import IntegrityError, QueryRefused, QueryValidationError
from pets_widgets.core.packing import Packing
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import Layout, QuerySpec
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.ledger import QueryRecord
from pets_widgets.enclave.pipeline.builders import PUBLIC_INPUTS


def check_epsilon(epsilon: object) -> Fraction:
    """Validate a requested epsilon and return it as an exact fraction."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (numbers.Real, Fraction)):
        raise QueryValidationError("epsilon", f"{epsilon!r} is not a number",
                                   "a finite number above 0")
    if isinstance(epsilon, float) and not math.isfinite(epsilon):
        raise QueryValidationError("epsilon", f"{epsilon!r} is not finite",
                                   "a finite number above 0")
    value = (Fraction(str(epsilon)) if isinstance(epsilon, float)
             else Fraction(epsilon))  # type: ignore[call-overload]  # Rational or Integral
    if value <= 0:
        raise QueryValidationError("epsilon", f"{epsilon!r} is not above 0",
                                   "a finite number above 0")
    return value


def check_k(k: object) -> int:
    """Validate a requested suppression threshold."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or int(k) < 1:
        raise QueryValidationError("k", f"{k!r} is not a whole number of at least 1",
                                   "integers from the policy's k upwards")
    return int(k)


def release_key(spec: QuerySpec, eps: Fraction, k: int, sites: Sequence[str]) -> str:
    """The key a release is stored under: the same question at the same epsilon and k.

    k is part of the question: suppression is decided once, when the noise is drawn, so a
    repeat can never show a different pattern of hidden cells."""
    text = f"{spec.hash}|{eps.numerator}/{eps.denominator}|k={k}|{','.join(sorted(sites))}"
    return hashlib.sha256(text.encode()).hexdigest()


def subset_key(spec: QuerySpec, sites: Sequence[str]) -> str:
    """The key a filter's refusal is stored under, whatever the kind or epsilon asked."""
    where = json.dumps({k: list(v) for k, v in spec.where.items()}, sort_keys=True)
    return hashlib.sha256(f"subset|{where}|{','.join(sorted(sites))}".encode()).hexdigest()


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

    @property
    def record(self) -> QueryRecord:
        """What the ledger writes about this query."""
        return QueryRecord(self.analyst, self.spec.hash, self.spec.to_json(), self.sites,
                           self.epsilon)


#: What a site's nonce looks like (:func:`pets_widgets.core.wire.new_nonce`).
NONCE = re.compile(r"[0-9a-f]{32}")


class OpenAdmissions:
    """The admissions issued and not yet released, with the nonce each site answers.

    An admission is taken (released or failed) once, and a nonce answers once, for one site
    of one open admission: an old aggregate can never be replayed into another release."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, Admission] = {}
        self._nonces: dict[str, dict[str, str]] = {}
        self._opened: dict[str, float] = {}
        self._used: set[str] = set()

    def open(self, admission: Admission) -> None:
        with self._lock:
            self._open[admission.id] = admission
            self._nonces[admission.id] = {}
            self._opened[admission.id] = time.monotonic()

    def close(self, admission: Admission) -> None:
        with self._lock:
            self._open.pop(admission.id, None)
            self._nonces.pop(admission.id, None)
            self._opened.pop(admission.id, None)

    def count(self, analyst: str) -> int:
        """How many admissions ``analyst`` has open."""
        with self._lock:
            return sum(a.analyst == analyst for a in self._open.values())

    def abandoned(self, seconds: float) -> list[Admission]:
        """Admissions open for longer than ``seconds``: their tokens have expired, so no
        site can answer them any more (a coordinator that admitted and vanished)."""
        now = time.monotonic()
        with self._lock:
            return [self._open[i] for i, t in self._opened.items()
                    if now - t > seconds and i in self._open]

    def answer(self, admission: Admission, site: str, nonce: str) -> None:
        """Remember ``nonce`` as the challenge ``site`` must answer for ``admission``."""
        with self._lock:
            trusted = self._open.get(admission.id)
            nonces = self._nonces.get(admission.id)
            if trusted is None or nonces is None or trusted != admission:
                raise IntegrityError("this query is not open in the enclave")
            if site not in trusted.sites:
                raise IntegrityError(f"{site!r} is not a site of this query")
            if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
                raise IntegrityError("a site's nonce is 32 hexadecimal digits")
            if site in nonces or nonce in self._used:
                raise IntegrityError("a challenge can be answered once only")
            # Marked used only when a release takes it: a nonce someone read from a site's
            # status and put in an admission nobody answered must not lock everyone else out
            # of that site. Replays need no global mark: each aggregate is signed for one
            # admission (EncryptedAggregate.admission), and a site answers a nonce once.
            nonces[site] = nonce

    def get(self, admission_id: object) -> Admission:
        """The enclave's own copy of the open admission ``admission_id`` (a service's client
        sends the id only)."""
        with self._lock:
            trusted = self._open.get(admission_id) if isinstance(admission_id, str) else None
        if trusted is None:
            raise IntegrityError("this query is not open in the enclave (already released, "
                                 "aborted, or never admitted)")
        return trusted

    def take(self, admission: Admission) -> tuple[Admission, dict[str, str]]:
        """The enclave's own copy of an open admission and its nonces, closed for good."""
        with self._lock:
            trusted = self._open.pop(admission.id, None)
            nonces = self._nonces.pop(admission.id, None)
            self._opened.pop(admission.id, None)
        if trusted is None or nonces is None:
            raise IntegrityError("this query is not open in the enclave (already released, "
                                 "aborted, or never admitted)")
        if trusted != admission:
            raise IntegrityError("the admission was altered after the enclave issued it")
        with self._lock:
            self._used.update(nonces.values())  # answered (or refused) once, for good
        return trusted, nonces


#: The most queries one analyst may have admitted and not yet released at once.
MAX_OPEN_ADMISSIONS = 8


class Gatekeeper:
    """Validation, the policy's floors, the budget and refusals, each with its audit row.

    ``public`` is the enclave's table of registered public inputs (denominators), read when
    a kind needs one.
    """

    def __init__(self, schema: S.Schema, ledger: audit.Ledger, policy: Policy,
                 public: Mapping[str, pd.DataFrame]):
        self.schema = schema
        self.ledger = ledger
        self._policy = policy
        self._public = public

    @property
    def policy(self) -> Policy:
        return self._policy

    def validated(self, spec: object, epsilon: object, k: object, analyst: object,
                  sites: tuple[str, ...]) -> tuple[QuerySpec, Fraction, int]:
        """The canonical spec, epsilon and k of a well-formed request; an invalid one is
        written to the audit log (outcome "invalid", rule = the field) and raised."""
        try:
            if not isinstance(spec, QuerySpec):
                raise QueryValidationError("spec", f"{type(spec).__name__} is not a query spec",
                                           "Count, Mean, Crosstab, Histogram, ...")
            spec.validate(self.schema)
            eps = check_epsilon(epsilon)
            k_int = check_k(k)
            check_analyst(analyst)
        except QueryValidationError as exc:
            self.ledger.record(QueryRecord(
                str(analyst or "?"), getattr(spec, "hash", ""),
                spec.to_json() if isinstance(spec, QuerySpec) else "{}", sites, None),
                audit.INVALID, rule=exc.field, reason=str(exc))
            raise
        return spec.canonical(self.schema), eps, k_int

    def enforce(self, query: QueryRecord, spec: QuerySpec, k: int) -> None:
        """Refuse a query that breaks a floor or a limit of the policy (or meets a locked
        ledger), before any site is asked."""
        policy, eps, kind = self.policy, query.charge, spec.kind
        locked = self.ledger.meta("locked")
        if locked:
            self.refuse(query, QueryRefused(
                "locked", f"the federation is locked after an integrity incident ({locked}); "
                "an operator must investigate and unlock the ledger"))
        if eps > Fraction(str(policy.max_epsilon)):
            self.refuse(query, QueryRefused(
                "max_epsilon", f"epsilon {float(eps):g} is above the policy maximum of "
                f"{policy.max_epsilon:g} per release"))
        if eps < Fraction(str(policy.min_epsilon)):
            self.refuse(query, QueryRefused(
                "min_epsilon", f"epsilon {float(eps):g} is below the policy minimum of "
                f"{policy.min_epsilon:g} per release"))
        if k < policy.k:
            self.refuse(query, QueryRefused(
                "k", f"k={k} is below the policy minimum of {policy.k}: cells below "
                f"{policy.k} are always hidden"))
        cells = spec.layout(self.schema).size
        if cells > policy.max_cells:
            self.refuse(query, QueryRefused(
                "max_cells", f"the query has {cells:,} cells; the policy allows at most "
                f"{policy.max_cells:,} per query (group by fewer variables, or filter)"))
        if kind == "survival":
            strata = math.prod(len(self.schema[n].values) for n in spec.stratifiers())
            if strata > policy.max_strata:
                self.refuse(query, QueryRefused(
                    "max_strata", f"the survival query has {strata:,} strata; the policy "
                    f"allows at most {policy.max_strata}"))
        if set(query.sites) != set(self.schema.sites):
            self.refuse(query, QueryRefused(
                "sites", "every site of the federation must take part in every query"))
        refusal = self.inputs_refusal(kind)
        if refusal is not None:
            self.refuse(query, refusal)

    def inputs_refusal(self, kind: str) -> QueryRefused | None:
        """The refusal for a kind whose public inputs nobody registered, or None."""
        missing = [n for n in PUBLIC_INPUTS.get(kind, ()) if n not in self._public]
        if not missing:
            return None
        return QueryRefused("public_inputs", f"a {kind} query needs public "
                            f"{', '.join(missing)} tables, and none are registered with the "
                            "enclave")

    def public_inputs(self, kind: str) -> dict[str, pd.DataFrame]:
        """The registered public inputs a kind's builder takes."""
        return {n: self._public[n] for n in PUBLIC_INPUTS.get(kind, ()) if n in self._public}

    def refused_before(self, spec: QuerySpec, query: QueryRecord) -> None:
        """A filter refused before gets the same answer again, with no new noise."""
        if not spec.where:
            return
        decided = self.ledger.stored(subset_key(spec, query.sites))
        if decided is not None:
            rule, message = json.loads(decided)["refused"]
            self.refuse(query, QueryRefused(rule, message))

    def refuse(self, query: QueryRecord, exc: QueryRefused) -> NoReturn:
        """Write the refusal's audit row, then raise it."""
        self.ledger.record(query, audit.REFUSED, rule=exc.rule, reason=str(exc))
        raise exc

    def budget(self, analyst: str) -> Budget:
        """What ``analyst`` and the federation have spent and have left."""
        return self.ledger.budget(analyst, *self._limits())

    def check_unreleased(self, query: QueryRecord, open_now: int) -> None:
        """Refuse an analyst who holds too many open admissions, or whose admissions that
        were never released (a site failed, or they were abandoned) asked for more than
        their budget in the last day.

        Why: a site charges its own lifetime epsilon when it answers, and an admission that
        is never released costs the analyst nothing (a site's failure must not be charged
        to the analyst), so without a bound one analyst could exhaust every site's lifetime
        budget for free. This caps that at the analyst's own budget per day, with every
        such query on the record in their name.
        """
        if open_now >= MAX_OPEN_ADMISSIONS:
            self.refuse(query, QueryRefused(
                "open_admissions", f"this analyst already has {open_now} queries admitted and "
                f"not yet released; at most {MAX_OPEN_ADMISSIONS} may be open at once"))
        since = (datetime.now(UTC) - timedelta(days=1)).isoformat(timespec="milliseconds")
        wasted = self.ledger.unreleased(query.analyst, since)
        limit = Fraction(str(self.policy.analyst_budget))
        if wasted + query.charge > limit:
            self.refuse(query, QueryRefused(
                "unreleased_admissions", f"queries this analyst had admitted and never "
                f"released asked for epsilon {float(wasted):g} in the last 24 hours; at most "
                f"the analyst's budget ({float(limit):g}) a day may go unreleased (sites "
                "charge their own budget when they answer)"))

    def check_budget(self, query: QueryRecord) -> None:
        """Refuse, before any site works, a query the budget cannot pay for."""
        refusal = overspend(self.budget(query.analyst), query.charge, *self._limits())
        if refusal is not None:
            self.refuse(query, refusal)

    def reserve(self, query: QueryRecord) -> int:
        """Reserve the query's epsilon (raises :class:`BudgetExceeded`, reserving nothing)."""
        return self.ledger.reserve(query, *self._limits())

    def _limits(self) -> tuple[Fraction, Fraction]:
        return (Fraction(str(self.policy.analyst_budget)),
                Fraction(str(self.policy.federation_budget)))


class InFlight:
    """Release keys being answered now. An identical question asked meanwhile waits for the
    first answer and gets it as a stored release, instead of reserving budget of its own:
    eight simultaneous identical queries cost one epsilon and return one answer."""

    #: Seconds a question waits for an identical one before it is answered on its own (a
    #: coordinator that admitted a query and vanished must not hold the question for long;
    #: answered on its own, the question is still charged once: the release is stored once).
    WAIT = 15.0

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: dict[str, tuple[threading.Event, float]] = {}
        self._owners: dict[str, str] = {}  # admission id -> the key it answers

    def claim(self, key: str, admission_id: str) -> threading.Event | None:
        """None when this admission answers ``key`` (release it with :meth:`done`), else
        the event that is set once the admission answering it is done. A claim older than
        :attr:`WAIT` passes to the asker (its admission was abandoned, or is slow: answered
        twice, the question is still stored, and charged, once)."""
        with self._lock:
            held = self._events.get(key)
            if held is not None and time.monotonic() - held[1] < self.WAIT:
                return held[0]
            if held is not None:  # stale: whoever waits on it is woken, the asker answers
                held[0].set()
                for owner in [o for o, k in self._owners.items() if k == key]:
                    del self._owners[owner]
            self._events[key] = (threading.Event(), time.monotonic())
            self._owners[admission_id] = key
            return None

    def done(self, admission_id: str) -> None:
        """The admission ended (released, refused, failed): wake whoever waits on its key."""
        with self._lock:
            key = self._owners.pop(admission_id, None)
            held = self._events.pop(key, None) if key is not None else None
        if held is not None:
            held[0].set()

