"""pets_widgets: privacy-preserving federated statistics on rare childhood cancers, in Jupyter.

One import is all a user needs::

    import pets_widgets as pw
    fed = pw.demo_federation(seed=7)
    release = fed.run(pw.Crosstab(rows="tumour_group", cols="age_band"))
    release.table, release.suppressed, release.card
    km = fed.run(pw.presets.survival("by_tumour_group"))   # Kaplan-Meier, noise-aware bands
    km.table, km.curves, km.logrank, pw.plots.plot(km)
    fed.run(pw.IncidenceRate(by="tumour_group"))          # cases per million person-years

    fed = pw.Federation.from_config("sites.toml")   # sites as kernels, or behind gateways
    fed.status()

Approved query specs run inside each site; only Paillier-encrypted aggregates leave; an
attested enclave decrypts the sum, adds exact discrete Laplace noise and hides small cells.
"""

from __future__ import annotations

import importlib
from typing import Any

from pets_widgets.audit import Ledger
from pets_widgets.enclave import Enclave
from pets_widgets.errors import (
    AttestationError,
    BudgetExceeded,
    ConfigError,
    DataValidationError,
    IntegrityError,
    PetsError,
    QueryRefused,
    QueryValidationError,
    SiteError,
)
from pets_widgets.federation import Federation, demo_federation
from pets_widgets.privacy import ParameterCard, Policy
from pets_widgets.query import (
    Count,
    Crosstab,
    Histogram,
    IncidenceRate,
    Mean,
    QuerySpec,
    Survival,
    spec_from_json,
)
from pets_widgets.release import Release
from pets_widgets.schema import Schema, default_schema

__version__ = "0.1.0"

__all__ = [
    "AttestationError", "BudgetExceeded", "ConfigError", "Count", "Crosstab",
    "DataValidationError", "Enclave", "Federation", "Histogram", "IncidenceRate",
    "IntegrityError", "Ledger", "Mean", "ParameterCard", "PetsError", "Policy", "QueryRefused",
    "QuerySpec", "QueryValidationError", "Release", "Schema", "SiteError", "Survival",
    "default_schema", "demo_federation", "spec_from_json",
]

# Submodules reached as attributes (pw.testing, pw.schema...) without being imported by the
# package itself: the test door stays closed unless a test opens it, and ipywidgets is only
# imported when a user reaches for pw.widgets.
_LAZY = ("testing", "schema", "synthetic", "crypto", "privacy", "audit", "query", "site",
         "enclave", "federation", "release", "survival", "incidence", "standards", "presets",
         "plots", "sources", "config", "remote", "kernels", "gateway", "site_kernel", "widgets",
         "forms", "progress", "render", "explore", "serve")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"pets_widgets.{name}")
    raise AttributeError(f"module 'pets_widgets' has no attribute {name!r}")
