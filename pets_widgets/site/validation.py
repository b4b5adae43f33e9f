"""Checks of a site's loaded rows against the schema.

Every bad column and every bad value is reported by rule with its row number, never with
the value itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.errors import DataProblem, DataValidationError
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY
from pets_widgets.site import synthetic

#: Spellings accepted for the boolean ``died`` column (case-insensitive).
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "1.0"})


FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "0.0"})


# --------------------------------------------------------------------------- validation
def _rows_where(mask: np.ndarray) -> tuple[int, ...]:
    """1-based data row numbers where ``mask`` is True."""
    return tuple(int(i) + 1 for i in np.flatnonzero(mask))


def _as_text(col: pd.Series) -> pd.Series:
    """Cells as stripped text (pandas' string dtype); missing cells stay missing."""
    return col.astype("string").str.strip()


def _empty(text: pd.Series) -> np.ndarray:
    return (text.isna() | (text == "")).to_numpy(dtype=bool)


def _parse_integer(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, empty mask, not-a-whole-number mask) of an integer column."""
    text = _as_text(col)
    empty = _empty(text)
    numbers = pd.to_numeric(text.mask(empty), errors="coerce").to_numpy(dtype=float,
                                                                        na_value=np.nan)
    bad = ~empty & (~np.isfinite(numbers) | (numbers != np.floor(numbers)))
    values = np.where(empty | bad, 0, numbers).astype(np.int64)
    return values, empty, bad


def _parse_boolean(col: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    text = _as_text(col).str.lower()
    empty = _empty(text)
    truth = text.isin(TRUE_WORDS).to_numpy(dtype=bool, na_value=False)
    bad = ~empty & ~truth & ~text.isin(FALSE_WORDS).to_numpy(dtype=bool, na_value=False)
    return truth, empty, bad


def validate_rows(raw: pd.DataFrame, schema: S.Schema, site: str, source: str,
                  capacity: int = DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
    """Check loaded rows against ``schema``; return them in schema order and dtypes.

    Raises :class:`DataValidationError` listing every missing or unknown column and, for each
    column, every row whose value is empty, of the wrong type, outside the schema's bounds or
    categories, or inconsistent with a derived column (``age_band``, ``diagnosis_period``,
    ``subtype``). Messages name the rule, never the value found.
    """
    problems: list[DataProblem] = []
    raw = raw.rename(columns=lambda c: str(c).strip())
    expected = [n for n in schema.names if n != "site"]
    for name in expected:
        if name not in raw.columns:
            problems.append(DataProblem(name, "is missing"))
    for name in raw.columns:
        if name not in schema.names:
            problems.append(DataProblem(name, "is not a schema column; remove or rename it "
                                              f"(schema columns: {', '.join(schema.names)})"))
    if len(raw.columns) != len(set(raw.columns)):
        problems.append(DataProblem("*", "a column name appears more than once"))
    if len(raw) == 0:
        problems.append(DataProblem("*", "there are no data rows"))
    if len(raw) > capacity:
        problems.append(DataProblem("*", f"more rows than the site capacity of {capacity}"))
    if problems and (len(raw) == 0 or len(raw.columns) != len(set(raw.columns))):
        raise DataValidationError(source, problems, site)

    out: dict[str, Any] = {"site": np.full(len(raw), site, dtype=object)}
    valid: dict[str, np.ndarray] = {}
    if "site" in raw.columns:
        wrong = (_as_text(raw["site"]) != site).to_numpy(dtype=bool, na_value=True)
        if wrong.any():
            problems.append(DataProblem("site", f"does not name this site ({site!r})",
                                        _rows_where(wrong)))
    for name in expected:
        if name not in raw.columns:
            continue
        var = schema[name]
        if var.kind is S.Kind.INTEGER:
            values, empty, bad = _parse_integer(raw[name])
            assert var.bounds is not None
            lo, hi = var.bounds
            outside = ~empty & ~bad & ((values < lo) | (values > hi))
            checks = [(empty, "is empty"), (bad, "is not a whole number"),
                      (outside, f"is outside the allowed range {lo}-{hi}")]
            out[name] = values
        elif var.kind is S.Kind.BOOLEAN:
            values, empty, bad = _parse_boolean(raw[name])
            outside = np.zeros(len(raw), dtype=bool)
            checks = [(empty, "is empty"),
                      (bad, "is not a boolean (true/false, yes/no or 1/0)")]
            out[name] = values
        else:
            text = _as_text(raw[name])
            empty = _empty(text)
            bad = ~empty & ~text.isin(var.categories).to_numpy(dtype=bool, na_value=False)
            outside = np.zeros(len(raw), dtype=bool)
            allowed = ", ".join(repr(c) for c in var.categories)
            checks = [(empty, "is empty"), (bad, f"is not one of the categories {allowed}")]
            out[name] = text.to_numpy(dtype=object, na_value=None)
        for mask, problem in checks:
            if mask.any():
                problems.append(DataProblem(name, problem, _rows_where(mask)))
        valid[name] = ~(empty | bad | outside)

    problems += _consistency(out, valid)
    if problems:
        raise DataValidationError(source, problems, site)
    rows = pd.DataFrame({n: out[n] for n in schema.names})
    return synthetic.as_schema_dtypes(rows)


def _consistency(out: Mapping[str, Any], valid: Mapping[str, np.ndarray]) -> list[DataProblem]:
    """Derived columns must agree with the columns they are derived from."""
    problems = []
    bands = np.array([S.age_band_of(a) for a in range(S.MAX_AGE + 1)], dtype=object)
    years = range(S.FIRST_YEAR, S.LAST_YEAR + 1)
    periods = np.array([S.period_of(y) for y in years], dtype=object)
    derived = (
        ("age_band", "age_at_diagnosis", lambda v: bands[np.clip(v, 0, S.MAX_AGE)],
         "does not match age_at_diagnosis"),
        ("diagnosis_period", "diagnosis_year",
         lambda v: periods[np.clip(v - S.FIRST_YEAR, 0, len(periods) - 1)],
         "does not match diagnosis_year"),
    )
    for name, source, rule, problem in derived:
        if name in valid and source in valid:
            both = valid[name] & valid[source]
            wrong = both & (np.asarray(out[name], dtype=object) != rule(out[source]))
            if wrong.any():
                problems.append(DataProblem(name, problem, _rows_where(wrong)))
    if "tumour_group" in valid:
        groups = np.asarray(out["tumour_group"], dtype=object)
        # The schema's rules on linked variables (the same ones that define structural
        # zeros): a listed subtype only in its own group, a stage only where it applies.
        linked: tuple[tuple[str, Callable[[Any, Any], bool], str], ...] = (
            ("subtype", S.subtype_allowed, "is not possible in this tumour_group"),
            ("stage", lambda st, g: (st != "Not applicable") == S.stage_applies(g),
             "does not fit this tumour_group (staged groups need a stage, others "
             "'Not applicable')"),
        )
        for name, fits, problem in linked:
            if name not in valid:
                continue
            both = valid[name] & valid["tumour_group"]
            values = np.asarray(out[name], dtype=object)
            wrong = both.copy()
            wrong[both] = [not fits(v, g) for v, g in zip(values[both], groups[both],
                                                          strict=True)]
            if wrong.any():
                problems.append(DataProblem(name, problem, _rows_where(wrong)))
    return problems
