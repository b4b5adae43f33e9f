"""Which function turns a query kind's noisy blocks into its tables: one table for every kind,
so the enclave and the explorer's simulation always build a release the same way."""

from __future__ import annotations

from pets_widgets.core.query import IncidenceRate, Survival
from pets_widgets.enclave.pipeline.incidence import build_incidence
from pets_widgets.enclave.pipeline.survival import build_survival
from pets_widgets.enclave.pipeline.tables import TABLE_BUILDERS, Builder

#: Table builders by query kind.
BUILDERS: dict[str, Builder] = {
    **TABLE_BUILDERS,
    Survival.kind: build_survival,
    IncidenceRate.kind: build_incidence,
}

#: Public, non-patient inputs a kind's builder takes as keywords (e.g. population
#: denominators); the enclave passes what was registered with it and refuses the query before
#: any site works when an input is missing.
PUBLIC_INPUTS: dict[str, tuple[str, ...]] = {IncidenceRate.kind: ("population",)}
