"""Specs, filters and rules as sentences for people, from the data dictionary's labels.

One wording for every place a question is shown: tables, plots, refusals, the audit log and
exports. ``question(spec)`` says what was asked (``"Survival by tumour group (ICCC-3), to 5
years"``); ``filters_in_words(where)`` says which patients (``"Sex: Female; year of
diagnosis: 2015 to 2022"``). Both use labels only: never a data value beyond the
dictionary's own categories.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pets_widgets.core import schema as S
from pets_widgets.core.query import FilterValue, QuerySpec


def _name(schema: S.Schema, variable: str, lower: bool = True) -> str:
    label = schema[variable].label if variable in schema.names else variable
    return label[:1].lower() + label[1:] if lower and not label[:2].isupper() else label


def _joined(parts: Sequence[str], word: str = "and") -> str:
    parts = list(parts)
    if len(parts) <= 1:
        return "".join(parts)
    return ", ".join(parts[:-1]) + f" {word} " + parts[-1]


def _by(schema: S.Schema, by: Sequence[str]) -> str:
    return f" by {_joined([_name(schema, b) for b in by])}" if by else ""


def _duration(months: int) -> str:
    if months % 12 == 0:
        years = months // 12
        return f"{years} year{'s' if years != 1 else ''}"
    return f"{months} months"


def question(spec: QuerySpec, schema: S.Schema | None = None) -> str:
    """What ``spec`` asks, in words, with its filter when it has one, e.g. ``"Number of
    patients by tumour group (ICCC-3) and age band; only Sex: Female"``."""
    schema = schema or S.default_schema()
    kind, field = spec.kind, getattr
    by = _by(schema, field(spec, "by", ()))
    if kind == "count":
        text = "Number of patients" + by
    elif kind == "crosstab":
        text = "Number of patients" + _by(schema, (field(spec, "rows"), field(spec, "cols")))
    elif kind == "mean":
        text = f"Mean {_name(schema, field(spec, 'variable'))}" + by
    elif kind == "histogram":
        text = f"Distribution of {_name(schema, field(spec, 'variable'))}"
    elif kind == "survival":
        every = field(spec, "interval_months")
        text = (f"Survival{by}, to {_duration(field(spec, 'horizon_months'))}"
                + (f" in {every}-month steps" if every != 1 else ""))
    elif kind == "incidence":
        text = "Incidence rate per million person-years" + by
    else:
        text = spec.describe()
    where = filters_in_words(spec.where, schema)
    return f"{text}; only {where}" if where else text


def filters_in_words(where: Mapping[str, FilterValue], schema: S.Schema | None = None) -> str:
    """A filter in words, each variable's label and the labels of the values it keeps:
    ``"Sex: Female; Year of diagnosis: 2015 to 2022"``."""
    schema = schema or S.default_schema()
    parts = []
    for variable, values in where.items():
        var = schema[variable] if variable in schema.names else None
        if var is not None and not var.is_categorical:
            lo, hi = tuple(values)  # an integer range
            unit = f" {var.unit}" if var.unit and var.unit != "year" else ""
            kept = f"{lo}{unit}" if lo == hi else f"{lo} to {hi}{unit}"
        else:
            kept = _joined([var.label_of(v) if var is not None else str(v) for v in values],
                           "or")
        parts.append(f"{_name(schema, variable, lower=False)}: {kept}")
    return "; ".join(parts)
