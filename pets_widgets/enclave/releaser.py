"""Phase 2 of a query: from verified aggregates to a stored, charged release.

The order is the privacy argument: the aggregates are verified and the policy checked again
before anything is decrypted; the budget is reserved before any noise is drawn; the release,
its charge and its audit row are committed in one ledger transaction; and every failure after
the reservation either returns it with an audit row (nothing was released) or, when the
failure itself could tell something about the totals, keeps it charged.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from fractions import Fraction

import numpy as np

from pets_widgets.core import schema as S
from pets_widgets.core.clock import now
from pets_widgets.core.errors import BudgetExceeded, IntegrityError, InternalError, QueryRefused
from pets_widgets.core.query import Crosstab, QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.core.release_wire import release_from_dict, release_to_dict
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.admission import Admission, Gatekeeper, subset_key
from pets_widgets.enclave.decryption import Decryptor
from pets_widgets.enclave.ledger import QueryRecord
from pets_widgets.enclave.pipeline.noise import NoiseMechanism, OpenDPDiscreteLaplace
from pets_widgets.enclave.pipeline.release import (
    add_noise,
    build_release,
    draw_noise,
    noise_params,
    subset_refusal,
)
from pets_widgets.enclave.pipeline.tables import NoisyBlocks


def oriented(release: Release, spec: QuerySpec) -> Release:
    """A stored release as ``spec`` asks for it: the same question with a crosstab's rows
    and columns the other way round is the stored table transposed (the numbers and the
    hidden cells are the stored ones; nothing is drawn again)."""
    stored = release.spec
    if (isinstance(spec, Crosstab) and isinstance(stored, Crosstab)
            and (stored.rows, stored.cols) == (spec.cols, spec.rows) and spec.rows != spec.cols):
        return replace(release, spec=spec, table=release.table.T,
                       suppressed=release.suppressed.T, lower=release.lower.T,
                       upper=release.upper.T,
                       status=None if release.status is None else release.status.T)
    return replace(release, spec=spec)


@functools.cache
def _noise_worker() -> ThreadPoolExecutor:
    """A thread for drawing noise (OpenDP's sampler runs without the GIL) while the totals
    are decrypted."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="enclave-noise")


# A forked child has none of its parent's threads: it starts its own worker when it needs one.
os.register_at_fork(after_in_child=_noise_worker.cache_clear)


class Releaser:
    """Verifies, reserves, decrypts, noises, suppresses, stores and releases one query."""

    def __init__(self, schema: S.Schema, gate: Gatekeeper, decryptor: Decryptor):
        self.schema = schema
        self._gate = gate
        self._decryptor = decryptor
        self._ledger = gate.ledger
        #: The noise mechanism (OpenDP); only ``pets_widgets.testing`` swaps it, for tests.
        self.mechanism: NoiseMechanism = OpenDPDiscreteLaplace()

    def release(self, admission: Admission, nonces: Mapping[str, str],
                aggregates: Sequence[EncryptedAggregate], summed: Sequence[int]) -> Release:
        """Release the enclave's own copy of ``admission`` from the sites' aggregates."""
        query, spec, ledger = admission.record, admission.spec, self._ledger
        try:
            self._decryptor.verify(admission, nonces, aggregates, summed)
        except IntegrityError as exc:
            ledger.record(query, audit.FAILED, rule="integrity", reason=str(exc))
            raise
        self._gate.enforce(query, spec, admission.k)
        stored = ledger.stored(admission.release_key)
        if stored is not None:  # an identical query finished while the sites worked
            return self.repeat(admission, stored)
        try:
            reservation = self._gate.reserve(query)
        except BudgetExceeded as exc:
            stored = ledger.stored(admission.release_key)
            if stored is not None:
                return self.repeat(admission, stored)
            ledger.record(query, audit.REFUSED, rule=exc.rule, reason=str(exc))
            raise
        try:
            # The noise does not depend on the totals: it is drawn while they are decrypted.
            noise = _noise_worker().submit(draw_noise, self.mechanism, admission.layout,
                                           admission.epsilon)
            totals = self._decryptor.totals(admission, summed)
        except IntegrityError as exc:
            # A decrypted total outside its slots means a site encrypted something no honest
            # site can: the failure itself would answer a threshold question about the other
            # sites' exact totals. So it is charged, not returned, and the federation locks.
            ledger.incident(reservation, query, reason=str(exc),
                            at_least=Fraction(str(self._gate.policy.max_epsilon)))
            raise
        except BaseException as exc:  # an interrupt, a worker that cannot start: nothing out
            self._return(reservation, query, exc)
            raise
        refusal: QueryRefused | None = None
        try:
            noisy = self._noisy(admission, totals, noise.result())
            refusal = subset_refusal(spec, admission.layout, noisy, self._gate.policy)
            if refusal is None:
                release = self.build(admission, noisy)
                # Only what is released is stored: a hidden cell's noisy value is nowhere in
                # the ledger (reading the file must not undo suppression).
                payload = json.dumps({"release": release_to_dict(release), "time": now()},
                                     allow_nan=False)
                committed = ledger.commit_release(reservation, query,
                                                  release_key=admission.release_key,
                                                  payload=payload)
        except BaseException as exc:
            self._return(reservation, query, exc)
            raise
        if refusal is not None:
            # The refusal was decided on freshly drawn noise: it is a differentially private
            # answer, so its epsilon is charged to the analyst who asked, and the decision is
            # kept for this filter, whatever the kind or epsilon.
            ledger.refuse_charged(
                reservation, query, keys=(admission.release_key, subset_key(spec, query.sites)),
                payload=json.dumps({"refused": [refusal.rule, str(refusal)]}),
                rule=refusal.rule, reason=str(refusal))
            raise refusal
        if not committed:  # an identical concurrent query stored its release first
            stored = ledger.stored(admission.release_key)
            if stored is None:
                raise InternalError("a concurrent release vanished from the ledger")
            return self.repeat(admission, stored)
        return self.with_budget(release, admission.analyst)

    def _noisy(self, admission: Admission, totals: Mapping[str, np.ndarray],
               noise: Mapping[str, np.ndarray]) -> NoisyBlocks:
        params = noise_params(admission.layout, admission.epsilon, {}, admission.spec.where,
                              self.schema)
        return add_noise(params, totals, noise)

    def _return(self, reservation: int, query: QueryRecord, exc: BaseException) -> None:
        """Hand a reservation back after a refusal or a fault that released nothing."""
        if isinstance(exc, QueryRefused):
            self._ledger.return_reservation(reservation, query, outcome=audit.REFUSED,
                                            rule=exc.rule, reason=str(exc))
        else:
            self._ledger.return_reservation(
                reservation, query, outcome=audit.FAILED, rule="fault",
                reason=f"{type(exc).__name__} after the budget was reserved; nothing released")

    def repeat(self, admission: Admission, stored: str) -> Release:
        """The stored answer to a question asked before: the same noise, nothing spent."""
        query, spec = admission.record, admission.spec
        data = json.loads(stored)
        if "refused" in data:
            rule, message = data["refused"]
            self._gate.refuse(query, QueryRefused(rule, message))
        if "release" in data:
            stored_release = oriented(release_from_dict(data["release"]), spec)
            card = replace(stored_release.card, repeated=True, analyst=admission.analyst)
            release = replace(stored_release, card=card)
        else:  # a ledger written before releases were stored as released (noisy blocks)
            values = {b: np.asarray(v, dtype=np.int64) for b, v in data["noisy"].items()}
            noisy = noise_params(admission.layout, admission.epsilon, values, spec.where,
                                 self.schema)
            release = self.build(admission, noisy, repeated=True)
        self._ledger.record(query, audit.REPEATED,
                            reason="same question at the same epsilon: stored release returned")
        return self.with_budget(release, admission.analyst)

    def build(self, admission: Admission, noisy: NoisyBlocks, *,
              repeated: bool = False) -> Release:
        """The release of noisy blocks: tables, suppression and card."""
        spec, gate = admission.spec, self._gate
        return build_release(spec, self.schema, admission.layout, noisy, admission.epsilon,
                             admission.k, gate.policy, gate.public_inputs(spec.kind),
                             mechanism=self.mechanism.name, sites=admission.sites,
                             analyst=admission.analyst, repeated=repeated)

    def with_budget(self, release: Release, analyst: str) -> Release:
        """``release`` with the analyst's budget, as it stands now, on its card."""
        budget = self._gate.budget(analyst)
        card = replace(release.card, budget_spent=float(budget.analyst_spent),
                       budget_left=float(budget.analyst_left),
                       federation_budget_left=float(budget.federation_left))
        return replace(release, card=card)
