"""Releases: the value type of a released result, and how its numbers read as text.

A :class:`Release` holds only what left the enclave: noisy (post-processed) values with
hidden cells missing, the mask, 95% noise intervals and the parameter card.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core.card import ParameterCard
from pets_widgets.core.query import QuerySpec

TOTAL = "Total"


ALL = "All patients"


@dataclass(frozen=True)
class Release:
    """A released result: ``table`` (hidden cells missing), ``suppressed`` (same shape),
    ``card`` (the :class:`~pets_widgets.core.card.ParameterCard`), and 95% noise intervals
    ``lower`` / ``upper`` of each released value."""

    spec: QuerySpec
    table: pd.DataFrame
    suppressed: pd.DataFrame
    card: ParameterCard
    lower: pd.DataFrame
    upper: pd.DataFrame
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def curves(self) -> pd.DataFrame | None:
        """Survival releases: curves by grid time (rows, months) with columns ``(quantity,
        stratum)``, quantity one of survival, lower, upper, at_risk; hidden values and hidden
        strata are NaN. None for other query kinds."""
        return self.extras.get("curves")

    @property
    def logrank(self) -> Any:
        """Survival releases: the log-rank test across shown strata, computed from the noisy
        counts (a lifelines ``StatisticalResult``), or None."""
        return self.extras.get("logrank")

    def display_table(self, hidden: str | None = None, intervals: bool = False) -> pd.DataFrame:
        """The table as text, hidden cells shown as ``"<k"`` (``"<5"`` by default); with
        ``intervals=True`` each value is followed by its 95% noise interval."""
        mark = hidden if hidden is not None else f"<{self.card.k}"
        shown = self.table.astype(object).map(_fmt)
        if intervals:
            lo = self.lower.astype(object).map(_fmt)
            hi = self.upper.astype(object).map(_fmt)
            shown = shown + " (" + lo + "-" + hi + ")"
        return shown.mask(self.suppressed.to_numpy(), mark)

    def _repr_html_(self) -> str:
        legend = (f"<p><small>&lt;{self.card.k}: hidden (noisy value below {self.card.k}, or "
                  f"hidden so another hidden cell cannot be worked out). "
                  f"{_escape(self.card.describe().splitlines()[0])}</small></p>")
        return self.display_table().to_html() + legend

    def __repr__(self) -> str:
        return (f"Release({self.spec.describe()})\n{self.display_table().to_string()}\n"
                f"{self.card.describe()}")

    def to_csv(self) -> str:
        """The released table as CSV, hidden cells as ``<k``, ready to download."""
        return self.display_table().to_csv()

    def to_json(self) -> str:
        """Spec, card and released table (and curves, for survival): enough to reproduce and
        review the release."""
        out = {
            "spec": self.spec.to_dict(),
            "card": self.card.to_dict(),
            "table": json.loads(self.display_table().to_json(orient="split")),
        }
        if self.curves is not None:
            out["curves"] = json.loads(self.curves.to_json(orient="split"))
        return json.dumps(out, default=str, sort_keys=True)


def _fmt(value: object) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}" if not float(value).is_integer() or abs(value) < 1e15 else str(value)
    return str(value)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
