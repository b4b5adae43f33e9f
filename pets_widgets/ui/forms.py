"""What the query builder's menus offer, and how the chosen values become a spec.

Headless (no ipywidgets, no IPython), so the rules behind the dashboard are unit-tested in
plain Python. Every option is taken from the schema and then *probed* against the spec
classes' own validation, so a menu can only offer what the spec accepts: the UI cannot
build an invalid spec, and a rule added to a spec class (e.g. "survival may not be
stratified by vital status") reaches the menus without touching this module.

Example
-------
>>> import pets_widgets as pw
>>> from pets_widgets import forms
>>> schema = pw.default_schema()
>>> form = forms.default_form(schema, "crosstab")
>>> forms.build_spec(form, schema).describe()
'crosstab rows=tumour_group cols=age_band'
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import lru_cache
from types import MappingProxyType
from typing import Any

from pets_widgets.core import query
from pets_widgets.core import schema as S
from pets_widgets.core.errors import QueryValidationError
from pets_widgets.ui import presets

#: Query kinds the builder knows how to ask, in menu order, with their menu labels.
KIND_LABELS: Mapping[str, str] = MappingProxyType({
    "crosstab": "Crosstab: two variables, with totals",
    "count": "Count of patients",
    "mean": "Mean of a variable",
    "histogram": "Histogram",
    "survival": "Survival (Kaplan-Meier)",
    "incidence": "Incidence rate per million",
})

#: The form fields each kind uses (besides filters), in display order.
KIND_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "count": ("by", "by2"),
    "mean": ("variable", "by", "by2"),
    "crosstab": ("rows", "cols"),
    "histogram": ("variable",),
    "survival": ("preset", "tumour_group", "subtype"),
    "incidence": ("by", "by2"),
})

#: Human labels of the form fields.
FIELD_LABELS: Mapping[str, str] = MappingProxyType({
    "variable": "Variable", "by": "Group by", "by2": "Then by", "rows": "Rows",
    "cols": "Columns", "preset": "Analysis", "tumour_group": "Tumour group",
    "subtype": "Rare subtype",
})

#: Filters left out per kind: a survival analysis is not restricted by its own outcome.
EXCLUDED_FILTERS: Mapping[str, tuple[str, ...]] = MappingProxyType({"survival": ("died",)})

#: The year-range filter: a range slider rather than a multi-select.
YEAR = "diagnosis_year"
NONE_LABEL = "(none)"
ANY_LABEL = "(any)"

Options = list[tuple[str, Any]]


@dataclass(frozen=True)
class QueryForm:
    """The values of the builder's controls: plain data, independent of any widget.

    ``filters`` maps a categorical variable to the values kept (an empty tuple keeps all);
    ``years`` is an inclusive range of diagnosis years, or None for all years.
    """

    kind: str = "crosstab"
    variable: str | None = None
    by: str | None = None
    by2: str | None = None
    rows: str | None = None
    cols: str | None = None
    preset: str | None = None
    tumour_group: str | None = None
    subtype: str | None = None
    filters: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    years: tuple[int, int] | None = None


# --------------------------------------------------------------------------- kinds


def kinds() -> tuple[str, ...]:
    """Kinds offered in the menu: every query kind, in the menu's order."""
    known = set(query.query_kinds())
    return tuple(kind for kind in KIND_LABELS if kind in known)


def kind_options() -> Options:
    """``(label, kind)`` pairs for the kind menu."""
    return [(KIND_LABELS[k], k) for k in kinds()]


# --------------------------------------------------------------------------- probing


def variable_label(schema: S.Schema, name: str) -> str:
    """The label shown in menus for a variable."""
    return schema[name].label


def _variables(schema: S.Schema, names: tuple[str, ...], accept: Any) -> Options:
    return [(variable_label(schema, n), n) for n in names if accept(n)]


def choices(schema: S.Schema, form: QueryForm, name: str) -> Options:
    """``(label, value)`` options of form field ``name`` given the rest of ``form``.

    A value is offered only when the spec built with it (and the fields before it in
    :data:`KIND_FIELDS`) passes the spec's own validation; optional fields start with a
    "(none)" or "(any)" entry whose value is None.
    """
    kind = form.kind
    bare = replace(form, filters={}, years=None)
    if name == "variable":
        pool = schema.summable if kind == "mean" else schema.numeric
        return _variables(schema, pool, lambda n: _bare_builds(
            replace(bare, variable=n, by=None, by2=None), schema))
    if name == "by":
        opts = _variables(schema, schema.groupable, lambda n: _bare_builds(
            replace(bare, by=n, by2=None), schema))
        return [(NONE_LABEL, None), *opts]
    if name == "by2":
        if form.by is None:
            return [(NONE_LABEL, None)]
        opts = _variables(schema, schema.groupable, lambda n: n != form.by and _bare_builds(
            replace(bare, by2=n), schema))
        return [(NONE_LABEL, None), *opts]
    if name == "rows":
        return _variables(schema, schema.groupable, lambda n: any(
            _bare_builds(replace(bare, rows=n, cols=c), schema)
            for c in schema.groupable if c != n))
    if name == "cols":
        return _variables(schema, schema.groupable, lambda n: n != form.rows and _bare_builds(
            replace(bare, cols=n), schema))
    if name == "preset":
        labels = dict(presets.table()["label"])
        return [(labels.get(n, n.replace("_", " ")), n) for n in presets.names()]
    if name in ("tumour_group", "subtype"):
        var = schema[name]
        return [(ANY_LABEL, None), *((var.label_of(v), v) for v in var.values)]
    raise KeyError(f"{name!r} is not a form field; fields: {sorted(FIELD_LABELS)}")


def filter_variables(schema: S.Schema, kind: str) -> tuple[str, ...]:
    """Categorical variables the kind may be filtered on (multi-selects), in schema order.

    Fields the kind already chooses through its own menus (e.g. a survival analysis's
    tumour group) are left out, so a value can never be given twice.
    """
    base = default_form(schema, kind)
    own = set(KIND_FIELDS.get(kind, ())) | set(EXCLUDED_FILTERS.get(kind, ()))
    out = []
    for name in schema.groupable:
        if name in own:
            continue
        var = schema[name]
        trial = replace(base, filters={name: (var.values[0],)})
        if _builds(trial, schema):
            out.append(name)
    return tuple(out)


def filter_options(schema: S.Schema, name: str) -> Options:
    """``(label, value)`` options of one filter's multi-select."""
    var = schema[name]
    return [(var.label_of(v), v) for v in var.values]


def year_filter_allowed(schema: S.Schema, kind: str) -> bool:
    """Whether the kind accepts a diagnosis-year range filter."""
    lo, _ = year_bounds(schema)
    return _builds(replace(default_form(schema, kind), years=(lo, lo)), schema)


def year_bounds(schema: S.Schema) -> tuple[int, int]:
    bounds = schema[YEAR].bounds
    assert bounds is not None
    return bounds


def _bare_builds(form: QueryForm, schema: S.Schema) -> bool:
    """:func:`_builds` for a form without filters, cached (menus ask the same many times)."""
    key = tuple(getattr(form, f) for f in _MENU_FIELDS)
    return _bare_builds_cached(key, schema)


_MENU_FIELDS = ("kind", "variable", "by", "by2", "rows", "cols", "preset", "tumour_group",
                "subtype")


@lru_cache(maxsize=4096)
def _bare_builds_cached(key: tuple[Any, ...], schema: S.Schema) -> bool:
    return _builds(QueryForm(**dict(zip(_MENU_FIELDS, key, strict=True))), schema)


def _builds(form: QueryForm, schema: S.Schema) -> bool:
    try:
        build_spec(form, schema)
    except QueryValidationError:
        return False
    return True


# --------------------------------------------------------------------------- defaults


_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "crosstab": {"rows": "tumour_group", "cols": "age_band"},
    "count": {"by": "tumour_group"},
    "mean": {"variable": "age_at_diagnosis", "by": "sex"},
    "histogram": {"variable": "age_at_diagnosis"},
    "survival": {"preset": "by_tumour_group"},
    "incidence": {"by": "tumour_group"},
})


def default_form(schema: S.Schema, kind: str) -> QueryForm:
    """A sensible starting form for ``kind``: each field at its default when that is offered,
    otherwise at the first option."""
    if kind not in KIND_LABELS:
        raise QueryValidationError("kind", f"{kind!r} is not a kind the builder offers", kinds())
    form = QueryForm(kind=kind)
    wanted = _DEFAULTS.get(kind, {})
    for name in KIND_FIELDS[kind]:
        form = replace(form, **{name: pick(choices(schema, form, name), wanted.get(name))})
    return form


def pick(options: Options, wanted: Any) -> Any:
    """``wanted`` when it is among the options' values, else the first option's value."""
    values = [v for _, v in options]
    if wanted in values:
        return wanted
    return values[0] if values else None


def refit(schema: S.Schema, form: QueryForm) -> QueryForm:
    """The same form with every field moved to an offered value (e.g. columns changed when
    they would equal the rows), so dependent menus never hold an impossible choice."""
    for name in KIND_FIELDS.get(form.kind, ()):
        form = replace(form, **{name: pick(choices(schema, form, name), getattr(form, name))})
    allowed = set(filter_variables(schema, form.kind))
    filters = {k: tuple(v) for k, v in form.filters.items() if k in allowed and v}
    years = form.years if year_filter_allowed(schema, form.kind) else None
    return replace(form, filters=filters, years=years)


# --------------------------------------------------------------------------- spec


def where_of(schema: S.Schema, form: QueryForm) -> dict[str, Any]:
    """The spec's ``where`` from the filters: empty selections and the full year range are
    no filter at all."""
    where: dict[str, Any] = {k: list(v) for k, v in form.filters.items() if v}
    if form.years is not None and tuple(form.years) != year_bounds(schema):
        where[YEAR] = (int(form.years[0]), int(form.years[1]))
    return where


def build_spec(form: QueryForm, schema: S.Schema) -> query.QuerySpec:
    """The spec the form asks for. Raises :class:`QueryValidationError` (naming the field and
    the allowed values) for a form no menu can produce."""
    where = where_of(schema, form)
    kind = form.kind
    if kind == "survival":
        if form.preset is None:
            raise QueryValidationError("preset", "choose an analysis", presets.names())
        return presets.survival(form.preset, tumour_group=form.tumour_group,
                                subtype=form.subtype, where=where)
    data: dict[str, Any] = {"kind": kind, "where": where}
    fields_ = KIND_FIELDS.get(kind)
    if fields_ is None:
        raise QueryValidationError("kind", f"{kind!r} is not a kind the builder offers", kinds())
    if "by" in fields_:
        data["by"] = [b for b in (form.by, form.by2) if b is not None]
    for name in ("variable", "rows", "cols"):
        if name in fields_:
            data[name] = getattr(form, name) or ""
    return query.spec_from_dict(data)
