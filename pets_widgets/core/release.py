"""Releases: the value type of a released result, and how its numbers read as text.

A :class:`Release` holds only what left the enclave: noisy (post-processed) values with
hidden cells missing, the mask, 95% noise intervals and the parameter card.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core.card import ParameterCard
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.sentences import question

TOTAL = "Total"


#: How a cell hidden to protect another hidden cell is marked (statistical offices' "c").
COMPLEMENTARY = "c"


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
    #: Each cell's status (see :attr:`cell_status`); None: every hidden cell is primary.
    status: pd.DataFrame | None = None

    @property
    def cell_status(self) -> pd.DataFrame:
        """Same shape as :attr:`table`: ``"shown"``, ``"primary"`` (hidden: its noisy value
        is below k), ``"complementary"`` (hidden so that another hidden cell cannot be
        worked out from the totals: it may be large) or ``"structural"`` (a zero the data
        dictionary makes certain, shown as 0)."""
        if self.status is not None:
            return self.status
        hidden = self.suppressed.to_numpy(dtype=bool)
        return pd.DataFrame(np.where(hidden, "primary", "shown").astype(object),
                            index=self.table.index, columns=self.table.columns)

    def ordered(self, order: Sequence[str]) -> Release:
        """This release with its table's index levels in ``order`` (the user's order of
        ``by``), rows sorted level by level in the dictionary's order as pandas' groupby
        gives them; the numbers are the same (a stored release asked in another order
        comes back in that order)."""
        index = self.table.index
        if (len(order) < 2 or not isinstance(index, pd.MultiIndex)
                or list(index.names) == list(order) or set(index.names) != set(order)):
            return self
        # Each level's values rank in the order they first appear (the table is built in
        # the dictionary's order, totals last), not in the index's sorted levels.
        ranks = [pd.factorize(index.get_level_values(n))[0] for n in order]
        rows = np.lexsort(ranks[::-1])

        def moved(frame: pd.DataFrame) -> pd.DataFrame:
            out = frame.iloc[rows]
            out.index = out.index.reorder_levels(list(order))
            return out

        return dataclasses.replace(self, table=moved(self.table),
                                   suppressed=moved(self.suppressed),
                                   lower=moved(self.lower), upper=moved(self.upper),
                                   status=None if self.status is None else moved(self.status))

    @property
    def percent_columns(self) -> list[object]:
        """The table's columns that hold probabilities (a survival release's survival at
        1, 3 and 5 years), shown as percentages."""
        if self.spec.kind != "survival":
            return []
        return [c for c in self.table.columns if c != "patients"]

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

    def display_table(self, hidden: str | None = None, intervals: bool = False,
                      complementary: str = COMPLEMENTARY) -> pd.DataFrame:
        """The table as text: a primary hidden cell as ``"<k"`` (``"<5"`` by default), a
        complementary one as ``"c"`` (it was hidden to protect another cell and may be
        large: never read it as "fewer than 5"), structural zeros as 0; with
        ``intervals=True`` each value is followed by its 95% noise interval."""
        mark = hidden if hidden is not None else f"<{self.card.k}"
        shown = self.table.astype(object).map(format_number)
        percent = self.percent_columns  # survival probabilities read as percentages
        for column in percent:
            shown[column] = self.table[column].astype(object).map(format_percent)
        if intervals:
            lo = self.lower.astype(object).map(format_number)
            hi = self.upper.astype(object).map(format_number)
            for column in percent:
                lo[column] = self.lower[column].astype(object).map(format_percent_bare)
                hi[column] = self.upper[column].astype(object).map(format_percent_bare)
            shown = shown + " (" + lo + "-" + hi + ")"
        status = self.cell_status.to_numpy()
        return shown.mask(status == "primary", mark).mask(status == "complementary",
                                                          complementary)

    def _repr_html_(self) -> str:
        complementary = (f" {COMPLEMENTARY}: {_escape(COMPLEMENTARY_WHY)}"
                         if (self.cell_status == "complementary").any().any() else "")
        legend = (f"<p><small>&lt;{self.card.k}: hidden: "
                  f"{_escape(hidden_reason(self.spec.kind, self.card.k))}{complementary} "
                  f"{_escape(self.card.describe().splitlines()[0])}</small></p>")
        return self.display_table().to_html() + legend

    def __repr__(self) -> str:
        return (f"Release({self.spec.describe()})\n{self.display_table().to_string()}\n"
                f"{self.card.describe()}")

    def tidy(self) -> pd.DataFrame:
        """The release as one row per cell, for R, Stata and Excel: the table's index
        levels, its column (named as the table's columns are, else ``measure``), ``value``
        (a number; empty when hidden), ``lower`` and ``upper`` (the 95% interval; empty when
        hidden) and ``status`` (``shown``, ``primary``, ``complementary`` or
        ``structural``)."""
        names = [n or "group" for n in self.table.index.names]
        measure = self.table.columns.name or "measure"
        long: dict[str, list[Any]] = {name: [] for name in [*names, measure, "value", "lower",
                                                            "upper", "status"]}
        status = self.cell_status
        for i, label in enumerate(self.table.index):
            labels = label if isinstance(label, tuple) else (label,)
            for j, column in enumerate(self.table.columns):
                for name, level in zip(names, labels, strict=True):
                    long[name].append(level)
                long[measure].append(column)
                for key, frame in (("value", self.table), ("lower", self.lower),
                                   ("upper", self.upper)):
                    v = frame.iat[i, j]
                    long[key].append(None if v is None or v is pd.NA or (
                        isinstance(v, float) and math.isnan(v)) else float(v))
                long["status"].append(status.iat[i, j])
        out = pd.DataFrame(long)
        for key in ("value", "lower", "upper"):
            out[key] = pd.to_numeric(out[key])
        return out

    def metadata(self) -> dict[str, Any]:
        """What a CSV of this release needs beside it to be read and reproduced: the
        question in words and as a spec (with its hash), epsilon, k, what each status
        means, and the parameter card."""
        return {
            "question": question(self.spec), "spec": self.spec.to_dict(),
            "spec_hash": self.card.spec_hash, "epsilon": self.card.epsilon, "k": self.card.k,
            "filters": {name: list(values) for name, values in self.spec.where.items()},
            "statuses": {"shown": "released (noisy) value",
                         "primary": f"hidden: its noisy value was below k={self.card.k}",
                         "complementary": COMPLEMENTARY_WHY,
                         "structural": "a zero the data dictionary makes certain"},
            "card": self.card.to_dict(),
        }

    def file_stem(self, day: str | None = None) -> str:
        """A file name that says what the release is, e.g.
        ``crosstab_tumour-group_by_age-band_2026-12-03``."""
        spec = self.spec
        parts: list[str] = []
        for name in ("rows", "cols", "variable", "by"):
            value = getattr(spec, name, None)
            if isinstance(value, str) and value:
                parts.append(value)
            elif isinstance(value, (tuple, list)):
                parts.extend(str(v) for v in value)
        words = "_by_".join(p.replace("_", "-") for p in parts)
        day = day or self.card.time[:10] or "undated"
        return "_".join(x for x in (spec.kind, words, day) if x)

    def to_csv(self, path: str | os.PathLike[str] | None = None) -> str:
        """The release as a tidy CSV (see :meth:`tidy`): numbers as numbers, hidden cells
        empty with their status beside them. With ``path``, the CSV is written there with
        a sidecar ``path + ".json"`` (:meth:`metadata`: the question, epsilon, k, the spec
        and its hash, the card), and a survival release's curves beside it
        (``<stem>.curves.csv``). Returns the CSV text."""
        text = self.tidy().to_csv(index=False)
        if path is not None:
            target = Path(path)
            target.write_text(text, encoding="utf-8")
            Path(f"{target}.json").write_text(
                json.dumps(self.metadata(), indent=1, default=str, allow_nan=False) + "\n",
                encoding="utf-8")
            if self.curves is not None:
                stem = target.with_suffix("") if target.suffix == ".csv" else target
                curves = self.curves.copy()
                curves.columns = [f"{q}:{s}" for q, s in curves.columns]
                curves.to_csv(f"{stem}.curves.csv")
        return text

    def _rerun_cells(self, federation: str | os.PathLike[str] | None) -> list[str]:
        """The code that reruns this release against ``federation`` (see
        :meth:`to_notebook`), one string per notebook cell."""
        config = os.fspath(federation) if federation is not None else os.environ.get(
            "PETS_SITES_CONFIG")
        where = (f"fed = pw.Federation.from_config({config!r})" if config else
                 "fed = pw.demo_federation(seed=7)  # the synthetic demo (no file was given)")
        return [
            "import pets_widgets as pw\n\n" + where,
            f"spec = pw.spec_from_json({self.spec.to_json()!r})\n"
            f"release = fed.run(spec, epsilon={self.card.epsilon!r}, k={self.card.k!r})\n"
            "release.display_table()",
            "print(release.card.describe())\n"
            "print('stored release, nothing spent:' if release.card.repeated else "
            "'a new release:', release.card.spec_hash)",
        ]

    def notebook_json(self, federation: str | os.PathLike[str] | None = None) -> str:
        """The notebook :meth:`to_notebook` writes, as its JSON text (nbformat 4; the core
        writes it itself, importing nothing from Jupyter)."""
        intro = (f"# {question(self.spec)}\n\nRebuilds the query of a pets_widgets release "
                 f"(spec hash `{self.card.spec_hash}`, epsilon {self.card.epsilon:g}, "
                 f"k = {self.card.k}). Against the same federation it returns the stored "
                 "release and spends no budget.")

        def cell(kind: str, text: str, n: int) -> dict[str, Any]:
            lines = text.split("\n")
            out: dict[str, Any] = {"cell_type": kind, "id": f"pets-{n}", "metadata": {},
                                   "source": [line + "\n" for line in lines[:-1]] + lines[-1:]}
            if kind == "code":
                out.update(execution_count=None, outputs=[])
            return out

        cells = self._rerun_cells(federation)
        notebook = {"cells": [cell("markdown", intro, 0),
                              *(cell("code", c, i + 1) for i, c in enumerate(cells))],
                    "metadata": {"kernelspec": {"display_name": "Python 3",
                                                "language": "python", "name": "python3"},
                                 "language_info": {"name": "python"}},
                    "nbformat": 4, "nbformat_minor": 5}
        return json.dumps(notebook, indent=1) + "\n"

    def to_notebook(self, path: str | os.PathLike[str],
                    federation: str | os.PathLike[str] | None = None) -> Path:
        """Write a small notebook at ``path`` (and the same code at ``path`` with ``.py``)
        that rebuilds this release's spec and runs it at the same epsilon and k against
        the federation file ``federation`` (default: ``$PETS_SITES_CONFIG`` when set, as in
        the dashboard's kernels; else the synthetic demo). Run against the same federation
        it returns the stored release and spends nothing. Returns the notebook's path."""
        target = Path(path)
        target.write_text(self.notebook_json(federation), encoding="utf-8")
        target.with_suffix(".py").write_text(
            f'"""{question(self.spec)}: rebuilt from a pets_widgets release."""\n\n'
            + "\n\n".join(self._rerun_cells(federation)).replace(
                "release.display_table()", "print(release.display_table())") + "\n",
            encoding="utf-8")
        return target

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


def format_number(value: object) -> str:
    """A released number as text: integers whole, other values to about 4 digits, missing
    values empty. Used by tables, CSV exports and the dashboard alike."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        if abs(v) < 5e-5:
            return "0"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(value)


def format_percent(value: object) -> str:
    """A probability as a percentage with one decimal (``"98.6%"``); missing values empty."""
    text = format_percent_bare(value)
    return f"{text}%" if text else ""


def format_percent_bare(value: object) -> str:
    """A probability as a percentage number with one decimal (``"98.6"``), for intervals."""
    if value is None or value is pd.NA:
        return ""
    v = float(value)  # type: ignore[arg-type]
    return "" if math.isnan(v) else f"{100 * v:.1f}"


#: Why a value is hidden, by query kind ("" for the cell kinds); ``{k}`` is filled in.
#: The legend's sentence for a complementary cell.
COMPLEMENTARY_WHY = ("hidden to protect another hidden cell (it may hold many patients; it "
                     "is not a small number).")
HIDDEN_WHY = {
    "": "its noisy value was below k={k}.",
    "mean": "fewer than k={k} patients (noisy count) in the group.",
    "survival": "the stratum has too few patients (noisy), or fewer than k={k} remain at "
                "risk at that time.",
}


def hidden_reason(kind: str, k: int) -> str:
    """The legend's sentence for a hidden value of a ``kind`` release."""
    return HIDDEN_WHY.get(kind, HIDDEN_WHY[""]).format(k=k)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
