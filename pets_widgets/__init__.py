"""pets_widgets: privacy-preserving federated statistics on rare childhood cancers, in Jupyter.

One import is all a user needs::

    import pets_widgets as pw
    fed = pw.demo_federation(seed=7)
    release = fed.run(pw.Crosstab(rows="tumour_group", cols="age_band"))
    release.table, release.suppressed, release.card
    km = fed.run(pw.presets.survival("by_tumour_group"))   # Kaplan-Meier, noise-aware bands
    km.table, km.curves, km.logrank, pw.plots.plot(km)
    fed.run(pw.IncidenceRate(by="tumour_group"))          # cases per million person-years

    fed = pw.Federation.from_config("sites.toml")   # site services, by URL or started here
    fed.status()

    fed = pw.demo_federation(backend="service")   # sites and the enclave as services

Approved query specs run inside each site; only Paillier-encrypted aggregates leave; an
attested enclave decrypts the sum, adds exact discrete Laplace noise and hides small cells.
"""

from __future__ import annotations

import importlib
from typing import Any

from pets_widgets.coordinator.federation import Federation, demo_federation
from pets_widgets.core.card import ParameterCard
from pets_widgets.core.errors import (
    AttestationError,
    BudgetExceeded,
    ConfigError,
    DataValidationError,
    EnclaveError,
    IntegrityError,
    PetsError,
    QueryRefused,
    QueryValidationError,
    SiteError,
)
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import (
    Count,
    Crosstab,
    Histogram,
    IncidenceRate,
    Mean,
    QuerySpec,
    Survival,
    spec_from_json,
)
from pets_widgets.core.release import Release
from pets_widgets.core.schema import Schema, default_schema
from pets_widgets.enclave.enclave import Enclave
from pets_widgets.enclave.ledger import Ledger
from pets_widgets.site.trust import Floors

#: The package version (pyproject.toml reads it from here).
__version__ = "0.1.0"

__all__ = [  # noqa: RUF022 (grouped by what a user does, not sorted)
    # running queries
    "Federation", "demo_federation",
    # what to ask
    "QuerySpec", "Count", "Mean", "Crosstab", "Histogram", "Survival", "IncidenceRate",
    "spec_from_json", "Schema", "default_schema",
    # what comes back, and under which rules
    "Release", "ParameterCard", "Policy", "Floors", "Enclave", "Ledger",
    # what can go wrong
    "PetsError", "QueryValidationError", "QueryRefused", "BudgetExceeded", "SiteError",
    "AttestationError", "IntegrityError", "DataValidationError", "ConfigError",
    "EnclaveError",
]

#: Modules reached as attributes (``pw.schema``, ``pw.presets``...), imported on first use: the
#: test door stays closed unless a test opens it, and ipywidgets is only imported when a user
#: reaches for ``pw.widgets``. Everything else is reached by its import path.
_SUBMODULES = ("schema", "presets", "plots", "survival", "widgets", "testing")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"pets_widgets.{name}")
    raise AttributeError(f"module 'pets_widgets' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*__all__, *_SUBMODULES, "__version__"])
