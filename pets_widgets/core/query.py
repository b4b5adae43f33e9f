"""Query specs: immutable, validated against the schema, canonical JSON and SHA-256 hash.

A spec says *what* to compute, never how; sites turn it into an integer aggregate vector
whose :class:`Layout` depends on the spec and the schema only, so an empty cell is a zero
that is always there, and the shape of an answer reveals nothing about the data.

Canonical form: variable names and categorical values are matched case-insensitively
and stored in schema spelling; filter values and group-by variables are put in schema
order; filters that select every allowed value are dropped. Two specs that ask the same
question therefore have the same JSON and the same :attr:`QuerySpec.hash`, so a repeated
question cannot buy fresh noise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import numbers
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, ClassVar

import numpy as np

from pets_widgets.core import schema as S
from pets_widgets.core import standards
from pets_widgets.core.errors import QueryValidationError

#: Schema used to validate specs when they are built; sites are checked at run time against
#: the federation's own schema (site names are not known before).
_BASE = S.default_schema()

FilterValue = tuple[Any, ...]
#: Published limits on what a spec may hold, checked before anything else reads it: values
#: in one filter list, characters of spec JSON, and nesting of that JSON.
MAX_FILTER_VALUES = 1_000
MAX_SPEC_CHARS = 100_000
MAX_SPEC_DEPTH = 20


class Where(Mapping[str, FilterValue]):
    """A read-only, canonical mapping of filters: variable -> allowed values or (low, high)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, FilterValue] | None = None):
        self._data = dict(data or {})

    def __getitem__(self, key: str) -> FilterValue:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __repr__(self) -> str:
        return repr(self._data)


def _norm_name(text: object) -> str:
    return str(text).strip().lower().replace(" ", "_").replace("-", "_")


def _resolve_variable(name: object, field_name: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if not isinstance(name, str):
        raise QueryValidationError(field_name, f"expected a variable name, got {name!r}", allowed)
    wanted = _norm_name(name)
    for candidate in allowed:
        if _norm_name(candidate) == wanted:
            return candidate
    raise QueryValidationError(field_name, f"{name!r} is not allowed here", allowed)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _as_int(value: object, field_name: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise QueryValidationError(
                field_name, f"{value!r} is not a whole number", f"integers {bounds[0]}-{bounds[1]}"
            )
        value = int(value)
    if not _is_int(value):
        raise QueryValidationError(
            field_name, f"{value!r} is not an integer", f"integers {bounds[0]}-{bounds[1]}"
        )
    return int(value)  # type: ignore[call-overload]  # an Integral, checked just above


def _normalise_filter(var: S.Variable, raw: object, field_name: str) -> FilterValue | None:
    """Canonical filter values for one variable, or None when the filter selects everything."""
    if var.kind is S.Kind.INTEGER:
        assert var.bounds is not None
        lo_b, hi_b = var.bounds
        allowed = f"a (low, high) range of integers within {lo_b}-{hi_b}"
        if _is_int(raw) or isinstance(raw, float):
            lo = hi = _as_int(raw, field_name, var.bounds)
        elif isinstance(raw, (list, tuple)) and len(raw) == 2:
            lo, hi = (_as_int(v, field_name, var.bounds) for v in raw)
        else:
            raise QueryValidationError(field_name, f"{raw!r} is not a range", allowed)
        if lo > hi:
            raise QueryValidationError(field_name, f"range ({lo}, {hi}) is reversed", allowed)
        if lo < lo_b or hi > hi_b:
            raise QueryValidationError(field_name, f"range ({lo}, {hi}) is out of bounds", allowed)
        return None if (lo, hi) == (lo_b, hi_b) else (lo, hi)

    if isinstance(raw, Mapping):
        raise QueryValidationError(field_name, "is a mapping; give a list of values",
                                   var.values)
    if isinstance(raw, (list, tuple, set, frozenset)) and len(raw) > MAX_FILTER_VALUES:
        raise QueryValidationError(field_name, f"lists {len(raw):,} values; at most "
                                   f"{MAX_FILTER_VALUES:,}", var.values)
    values = [raw] if isinstance(raw, (str, bool)) or not isinstance(raw, Iterable) else list(raw)
    if not values:
        raise QueryValidationError(field_name, "selects no value", var.values)
    if var.name == "site":
        # Site names belong to a federation: checked by QuerySpec.validate at run time.
        if not all(isinstance(v, str) and v.strip() for v in values):
            raise QueryValidationError(field_name, f"{values!r} are not site names", "site names")
        return tuple(sorted({str(v).strip() for v in values}))
    chosen: set[object] = set()
    for value in values:
        chosen.add(_match_value(var, value, field_name))
    ordered = tuple(v for v in var.values if v in chosen)
    return None if len(ordered) == len(var.values) else ordered


def _match_value(var: S.Variable, value: object, field_name: str) -> object:
    if var.kind is S.Kind.BOOLEAN:
        if isinstance(value, bool):
            return value
        if _is_int(value) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
            return value.strip().lower() in ("true", "yes")
        raise QueryValidationError(field_name, f"{value!r} is not a boolean", var.values)
    if isinstance(value, str):
        wanted = value.strip().casefold()
        for category in var.categories:
            if category.casefold() == wanted:
                return category
    raise QueryValidationError(field_name, f"{value!r} is not a category", var.values)


def _normalise_where(where: Mapping[str, object] | None, schema: S.Schema) -> Where:
    if where is None:
        return Where()
    if not isinstance(where, Mapping):
        raise QueryValidationError("where", f"expected a mapping, got {type(where).__name__}",
                                   schema.names)
    out: dict[str, FilterValue] = {}
    for raw_name, raw in where.items():
        name = _resolve_variable(raw_name, "where", schema.names)
        if name in out:
            raise QueryValidationError(f"where.{name}", "is given twice", schema.names)
        value = _normalise_filter(schema[name], raw, f"where.{name}")
        if value is not None:
            out[name] = value
    return Where({k: out[k] for k in schema.names if k in out})


def _name_list(by: object, field_name: str, allowed: Iterable[str]) -> list[object]:
    """A variable name, or a list or tuple of them; a mapping (whose keys a loop would
    quietly take) or anything else is refused naming the field."""
    if isinstance(by, str):
        return [by]
    if isinstance(by, (list, tuple)):
        return list(by)
    raise QueryValidationError(field_name, f"is a {type(by).__name__}; give a variable name "
                               "or a list of them", list(allowed))


def _as_given(by: object) -> tuple[str, ...]:
    """The variables of ``by`` in the order the user wrote them (the table's order; the
    canonical, hashed form keeps the dictionary's order). Validation comes after."""
    if isinstance(by, str):
        return (_norm_name(by),)
    if isinstance(by, (list, tuple)) and all(isinstance(b, str) for b in by):
        return tuple(_norm_name(b) for b in by)
    return ()


def _normalise_by(by: object, schema: S.Schema, field_name: str = "by") -> tuple[str, ...]:
    if by is None:
        return ()
    items = _name_list(by, field_name, schema.groupable)
    names = [_resolve_variable(b, field_name, schema.groupable) for b in items]
    if len(set(names)) != len(names):
        raise QueryValidationError(field_name, f"repeats a variable in {names}", schema.groupable)
    return tuple(n for n in schema.names if n in names)


@dataclass(frozen=True)
class Dim:
    """One axis of an aggregate block: a categorical variable, or a variable cut into bins."""

    name: str
    levels: tuple[Any, ...]
    #: ``"category"`` (index of the value in ``levels``) or ``"bins"`` (histogram edges).
    coding: str = "category"
    edges: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return len(self.levels)


@dataclass(frozen=True)
class Block:
    """A group of cells computed the same way: patient counts, or clipped sums of a variable.

    ``max_contribution`` is the most one patient adds to one cell; ``sensitivity`` is the
    most one patient changes the block's cells in total (L1, add/remove one patient), which
    sets the noise scale; ``budget_share`` is the block's fraction of the query's epsilon.
    For a sum the stored value is ``clip(x) - clip_low`` so every cell is non-negative.
    """

    name: str
    dims: tuple[Dim, ...]
    sensitivity: int = 1
    max_contribution: int = 1
    budget_share: Fraction = Fraction(1)
    summand: str | None = None
    offset: int = 0
    #: True when each patient falls in at most one cell of all such blocks together, so their
    #: cells add up to the number of patients the query selects (used for the subset rule).
    partition: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d.size for d in self.dims) or (1,)

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Ordered blocks of cells: the fixed meaning of every position of an aggregate vector."""

    blocks: tuple[Block, ...]

    @property
    def size(self) -> int:
        return sum(b.size for b in self.blocks)

    def slices(self) -> dict[str, slice]:
        """Where each block sits in the flat vector."""
        out, start = {}, 0
        for block in self.blocks:
            out[block.name] = slice(start, start + block.size)
            start += block.size
        return out

    @property
    def max_contribution(self) -> int:
        return max(b.max_contribution for b in self.blocks)

    def describe(self) -> str:
        return "; ".join(
            f"{b.name}[{' x '.join(d.name for d in b.dims) or 'all'}]={b.size}" for b in self.blocks
        )


def structural_zeros(layout: Layout, where: Mapping[str, FilterValue],
                     schema: S.Schema) -> dict[str, np.ndarray]:
    """For each block, the cells no valid record can fall in, given the schema's rules on
    linked variables (subtype within its tumour group, stage only where it applies, age
    band from age, period from year) and the query's filter. Derived from public rules
    only, so publishing these cells as exact zeros discloses nothing."""
    out = {}
    for block in layout.blocks:
        possible = np.ones(block.shape, dtype=bool)
        for names, combos in S.LINKED:
            dims = [(axis, d) for axis, d in enumerate(block.dims) if d.name in names]
            filtered = [n for n in names if n in where]
            if not dims and not filtered:
                continue
            allowed = [c for c in combos if all(_admits(schema[n], where[n], c[names.index(n)])
                                                for n in filtered)]
            sub = np.zeros(tuple(d.size for _, d in dims), dtype=bool)
            for combo in allowed:
                hits = [[i for i in range(d.size) if _in_level(d, i, combo[names.index(d.name)])]
                        for _, d in dims]
                for index in itertools.product(*hits):
                    sub[index] = True
            shape = [1] * len(block.shape)
            for axis, d in dims:
                shape[axis] = d.size
            possible &= sub.reshape(shape) if dims else bool(allowed)
        out[block.name] = ~possible.reshape(-1)
    return out


def _admits(var: S.Variable, allowed: FilterValue, value: object) -> bool:
    if var.kind is S.Kind.INTEGER:
        return allowed[0] <= value <= allowed[1]
    return value in allowed


def _in_level(dim: Dim, i: int, value: object) -> bool:
    if dim.coding == "bins":
        return dim.edges[i] <= value < dim.edges[i + 1]  # type: ignore[operator]
    return dim.levels[i] == value


_KINDS: dict[str, type[QuerySpec]] = {}


@dataclass(frozen=True)
class QuerySpec:
    """Base class of query specs: a frozen, validated value with canonical JSON and hash."""

    kind: ClassVar[str] = ""
    #: Filters: variable -> allowed values (a list) or, for integers, a (low, high) range; any
    #: mapping is accepted and normalised to a canonical :class:`Where` on validation.
    where: Mapping[str, Any] = field(default_factory=Where, kw_only=True)
    #: The grouping variables in the order they were given (an attribute, not a field: not
    #: in the JSON or the hash): the order of the released table's index, as pandas'
    #: groupby gives it.
    order: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _KINDS[cls.kind] = cls

    def __post_init__(self) -> None:
        self._set("where", _normalise_where(self.where, _BASE))
        self._normalise()

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)

    def _normalise(self) -> None:
        """Normalise and validate the kind's own fields (overridden)."""

    # -- validation against a federation's schema ------------------------------------------
    def validate(self, schema: S.Schema) -> QuerySpec:
        """Check the spec against ``schema`` (site names included); return it unchanged."""
        for name, values in self.where.items():
            if name == "site":
                allowed = schema["site"].categories
                for v in values:
                    if v not in allowed:
                        raise QueryValidationError("where.site", f"{v!r} is not a site", allowed)
        for name in self.stratifiers():
            if name not in schema:
                raise QueryValidationError("by", f"{name!r} is not a variable", schema.groupable)
        return self

    def stratifiers(self) -> tuple[str, ...]:
        """The categorical variables the cells are split by."""
        return ()

    def canonical(self, schema: S.Schema) -> QuerySpec:
        """The same question in canonical form for a federation: a site filter that keeps
        every site of ``schema`` is dropped, like any other filter that selects everything."""
        sites = self.where.get("site")
        if sites is not None and set(sites) >= set(schema["site"].categories):
            kept = {k: v for k, v in self.where.items() if k != "site"}
            return dataclasses.replace(self, where=kept)
        return self

    def layout(self, schema: S.Schema) -> Layout:
        """The fixed cell layout of this query's aggregate vector."""
        raise NotImplementedError

    # -- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form: ``{"kind": ..., <fields>..., "where": {...}}``."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "where":
                value = {k: list(v) for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; equal specs give equal text."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def _hash_form(self) -> dict[str, Any]:
        """The form that is hashed; kinds whose field order is cosmetic override it."""
        return self.to_dict()

    @property
    def hash(self) -> str:
        """Canonical SHA-256 (hex) of the question asked, independent of spelling and order."""
        form = {"schema_version": S.SCHEMA_VERSION, **self._hash_form()}
        text = json.dumps(form, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def __hash__(self) -> int:
        return hash(self.hash)

    def describe(self) -> str:
        """A one-line description for people."""
        parts = [self.kind]
        for f in fields(self):
            if f.name != "where" and getattr(self, f.name) not in ((), None):
                parts.append(f"{f.name}={getattr(self, f.name)}")
        if self.where:
            parts.append("where " + ", ".join(f"{k} in {list(v)}" for k, v in self.where.items()))
        return " ".join(str(p) for p in parts)


def _count_dims(names: Iterable[str], schema: S.Schema) -> tuple[Dim, ...]:
    return tuple(Dim(n, schema[n].values) for n in names)


@dataclass(frozen=True)
class Count(QuerySpec):
    """Number of patients, overall or in each combination of the ``by`` categories."""

    kind: ClassVar[str] = "count"
    by: tuple[str, ...] = ()

    def _normalise(self) -> None:
        self._set("order", _as_given(self.by))
        self._set("by", _normalise_by(self.by, _BASE))

    def stratifiers(self) -> tuple[str, ...]:
        return self.by

    def layout(self, schema: S.Schema) -> Layout:
        return Layout((Block("count", _count_dims(self.by, schema)),))


@dataclass(frozen=True)
class Mean(QuerySpec):
    """Mean of a bounded variable (or a proportion, for a boolean), overall or by group.

    Released as a noisy clipped sum over a noisy count, the epsilon split equally between
    the two. Clipping bounds come from the schema, so one patient moves the sum by at most
    the width of the clipping range.
    """

    kind: ClassVar[str] = "mean"
    variable: str = ""
    by: tuple[str, ...] = ()

    def _normalise(self) -> None:
        self._set("variable", _resolve_variable(self.variable, "variable", _BASE.summable))
        self._set("order", _as_given(self.by))
        self._set("by", _normalise_by(self.by, _BASE))

    def stratifiers(self) -> tuple[str, ...]:
        return self.by

    def clip(self, schema: S.Schema) -> tuple[int, int]:
        var = schema[self.variable]
        return var.clip if var.clip is not None else (0, 1)

    def layout(self, schema: S.Schema) -> Layout:
        lo, hi = self.clip(schema)
        dims = _count_dims(self.by, schema)
        half = Fraction(1, 2)
        return Layout((
            Block("count", dims, budget_share=half),
            Block("sum", dims, sensitivity=hi - lo, max_contribution=hi - lo, budget_share=half,
                  summand=self.variable, offset=lo, partition=False),
        ))


@dataclass(frozen=True)
class Crosstab(QuerySpec):
    """Counts of patients in every combination of two categorical variables, with margins."""

    kind: ClassVar[str] = "crosstab"
    rows: str = ""
    cols: str = ""

    def _normalise(self) -> None:
        self._set("rows", _resolve_variable(self.rows, "rows", _BASE.groupable))
        self._set("cols", _resolve_variable(self.cols, "cols", _BASE.groupable))
        if self.rows == self.cols:
            others = tuple(n for n in _BASE.groupable if n != self.rows)
            raise QueryValidationError("cols", f"must differ from rows ({self.rows!r})", others)

    def stratifiers(self) -> tuple[str, ...]:
        return (self.rows, self.cols)

    def _hash_form(self) -> dict[str, Any]:
        # Swapping rows and columns asks the same question: hash the unordered pair.
        form = self.to_dict()
        form["rows"], form["cols"] = sorted((self.rows, self.cols))
        return form

    def layout(self, schema: S.Schema) -> Layout:
        # Cells in canonical (schema) order, whatever the orientation: the transposed
        # question must reuse the same stored noisy cells. Builders transpose for display.
        dims = tuple(n for n in schema.names if n in (self.rows, self.cols))
        return Layout((Block("count", _count_dims(dims, schema)),))


@dataclass(frozen=True)
class Histogram(QuerySpec):
    """Counts of patients in the schema's fixed bins of a bounded variable."""

    kind: ClassVar[str] = "histogram"
    variable: str = ""

    def _normalise(self) -> None:
        self._set("variable", _resolve_variable(self.variable, "variable", _BASE.numeric))

    def layout(self, schema: S.Schema) -> Layout:
        var = schema[self.variable]
        dim = Dim(var.name, var.bin_labels(), coding="bins", edges=var.bins)
        return Layout((Block("count", (dim,)),))


def _normalise_strata(by: object, field_name: str, allowed: tuple[str, ...],
                      most: int = 2) -> tuple[str, ...]:
    """``by`` as 0 to ``most`` distinct variables among ``allowed``, in schema order."""
    if by is None:
        return ()
    items = _name_list(by, field_name, allowed)
    names = [_resolve_variable(b, field_name, allowed) for b in items]
    if len(set(names)) != len(names):
        raise QueryValidationError(field_name, f"repeats a variable in {names}", allowed)
    if len(names) > most:
        raise QueryValidationError(field_name, f"has {len(names)} variables; at most {most}",
                                   allowed)
    return tuple(n for n in _BASE.names if n in names)


def _positive_int(value: object, field_name: str, allowed: str) -> int:
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        value = int(value)
    if not _is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        raise QueryValidationError(field_name, f"{value!r} is not a positive whole number",
                                   allowed)
    return int(value)  # type: ignore[call-overload]


#: Variables a survival curve or a rate may not be stratified by: vital status is the outcome.
_OUTCOMES = ("died",)


@dataclass(frozen=True)
class Survival(QuerySpec):
    """Kaplan-Meier survival by stratum, from deaths and censorings on a fixed time grid.

    The grid is set by the spec, never by the data: ``horizon_months / interval_months``
    intervals ``[0, w), [w, 2w), ...`` of completed months of follow-up, plus one cell for
    patients still followed at the horizon. Each patient falls in exactly one cell (stratum x
    interval x died), so the whole vector is one block of sensitivity 1: noise of scale
    ``1/epsilon`` on every cell makes the vector epsilon-DP by parallel composition.

    A death (or censoring) after ``T`` completed months is placed at the end of its interval,
    grid time ``(T // w + 1) * w``: with monthly intervals, a child who died in the first month
    (``T = 0``) died by 1 month. Curves are therefore Kaplan-Meier on durations mapped to the
    grid, censorings at a grid time counted at risk for that time's deaths (as lifelines does).

    Example
    -------
    >>> spec = Survival(by="tumour_group", where={"age_band": ["<1"]}, horizon_months=60)
    """

    kind: ClassVar[str] = "survival"
    by: tuple[str, ...] = ()
    horizon_months: int = 60
    interval_months: int = 1

    def _normalise(self) -> None:
        allowed = tuple(n for n in _BASE.groupable if n not in _OUTCOMES)
        self._set("by", _normalise_strata(self.by, "by", allowed))
        most = S.MAX_FOLLOW_UP_MONTHS
        horizon = _positive_int(self.horizon_months, "horizon_months",
                                f"whole numbers of months 1-{most}")
        if horizon > most:
            raise QueryValidationError("horizon_months", f"{horizon} is beyond the longest "
                                       "follow-up of the registries", f"1-{most}")
        interval = _positive_int(self.interval_months, "interval_months",
                                 f"whole numbers of months that divide horizon_months={horizon}")
        if horizon % interval:
            divisors = [d for d in range(1, horizon + 1) if horizon % d == 0]
            raise QueryValidationError("interval_months", f"{interval} does not divide "
                                       f"horizon_months={horizon}", divisors)
        self._set("horizon_months", horizon)
        self._set("interval_months", interval)

    def stratifiers(self) -> tuple[str, ...]:
        return self.by

    @property
    def grid(self) -> tuple[int, ...]:
        """Grid times in months, 0 to the horizon: where curves are estimated."""
        return tuple(range(0, self.horizon_months + 1, self.interval_months))

    @property
    def n_intervals(self) -> int:
        return self.horizon_months // self.interval_months

    def layout(self, schema: S.Schema) -> Layout:
        w, horizon = self.interval_months, self.horizon_months
        edges = (*self.grid, S.MAX_FOLLOW_UP_MONTHS + 1)
        labels = (*(f"{t}-{t + w - 1}" if w > 1 else str(t) for t in self.grid[:-1]),
                  f">={horizon}")
        interval = Dim("follow_up_months", labels, coding="bins", edges=edges)
        dims = (*_count_dims(self.by, schema), interval, Dim("died", (False, True)))
        return Layout((Block("survival", dims),))


#: Variables whose filters restrict the population denominators as well as the cases.
POPULATION_VARIABLES = ("site", "sex", "age_band", "diagnosis_year", "diagnosis_period",
                        "age_at_diagnosis")


def _age_band_edges() -> tuple[int, ...]:
    """First age of every age band, and one past the last age: (0, 1, 5, 10, 15)."""
    starts = [a for a in range(S.MAX_AGE + 1)
              if a == 0 or S.age_band_of(a) != S.age_band_of(a - 1)]
    return (*starts, S.MAX_AGE + 1)


@dataclass(frozen=True)
class IncidenceRate(QuerySpec):
    """New cases per million person-years, crude and age-standardised, by stratum.

    Cases are counted per stratum and age band (one block, sensitivity 1); the enclave divides
    by the sites' public person-years. Filters on ``site``, ``sex``, ``age_band``,
    ``diagnosis_year``, ``diagnosis_period`` and (on age-band boundaries) ``age_at_diagnosis``
    restrict cases and denominators alike; filters on other variables (tumour group, subtype,
    stage...) restrict the cases only, as for a rate of one tumour type. ``standard`` names the
    standard population of the age-standardised rate (see :mod:`pets_widgets.core.standards`).

    Example
    -------
    >>> spec = IncidenceRate(by="tumour_group", where={"diagnosis_period": ["2015-2019"]})
    """

    kind: ClassVar[str] = "incidence"
    by: tuple[str, ...] = ()
    standard: str = standards.DEFAULT_STANDARD

    def _normalise(self) -> None:
        allowed = tuple(n for n in _BASE.groupable if n not in _OUTCOMES)
        self._set("by", _normalise_strata(self.by, "by", allowed))
        self._set("standard", _resolve_variable(self.standard, "standard",
                                                tuple(standards.STANDARDS)))
        ages = self.where.get("age_at_diagnosis")
        if ages is not None:
            edges = _age_band_edges()
            if ages[0] not in edges or ages[1] + 1 not in edges:
                raise QueryValidationError(
                    "where.age_at_diagnosis", f"range {tuple(ages)} does not follow the age "
                    "bands of the population denominators",
                    "ranges from and to age-band boundaries: " + ", ".join(
                        f"({lo}, {hi - 1})" for lo, hi in itertools.pairwise(edges)))

    def stratifiers(self) -> tuple[str, ...]:
        return self.by

    def layout(self, schema: S.Schema) -> Layout:
        names = self.by if "age_band" in self.by else (*self.by, "age_band")
        return Layout((Block("cases", _count_dims(names, schema)),))


def spec_from_dict(data: Mapping[str, Any]) -> QuerySpec:
    """Rebuild (and re-validate) a spec from its :meth:`QuerySpec.to_dict` form.

    Whatever ``data`` holds, the result is a spec or a :class:`QueryValidationError` naming
    the field: a value of the wrong type anywhere is refused, never let through as another
    exception.
    """
    if not isinstance(data, Mapping) or "kind" not in data:
        raise QueryValidationError("kind", "missing", sorted(_KINDS))
    kind = data["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise QueryValidationError("kind", f"{kind!r} is not a query kind", sorted(_KINDS))
    cls = _KINDS[kind]
    known = {f.name for f in fields(cls)}
    extra = set(data) - known - {"kind"}
    if extra:
        raise QueryValidationError(sorted(extra)[0], "is not a field of " + cls.__name__,
                                   sorted(known))
    kwargs = {k: v for k, v in data.items() if k != "kind"}
    try:
        return cls(**kwargs)
    except QueryValidationError:
        raise
    except (TypeError, ValueError, AttributeError, RecursionError, OverflowError) as exc:
        raise QueryValidationError(kind, f"has a field of the wrong type "
                                   f"({type(exc).__name__})", sorted(known)) from None


def spec_from_json(text: str | bytes) -> QuerySpec:
    """Rebuild a spec from :meth:`QuerySpec.to_json` text; validation runs again.

    Any text gives a spec or a :class:`QueryValidationError`: text longer than
    :data:`MAX_SPEC_CHARS` or nested deeper than :data:`MAX_SPEC_DEPTH` is refused before it
    is parsed.
    """
    if not isinstance(text, (str, bytes)):
        raise QueryValidationError("json", f"expected text, got {type(text).__name__}")
    if len(text) > MAX_SPEC_CHARS:
        raise QueryValidationError("json", f"is {len(text):,} characters; at most "
                                   f"{MAX_SPEC_CHARS:,}")
    if _nesting(text) > MAX_SPEC_DEPTH:
        raise QueryValidationError("json", f"is nested more than {MAX_SPEC_DEPTH} deep")
    try:
        data = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise QueryValidationError("json", f"not valid JSON ({type(exc).__name__})") from None
    return spec_from_dict(data)


def _nesting(text: str | bytes) -> int:
    """The deepest bracket nesting of JSON text (brackets inside strings count too: an
    over-estimate, which only ever refuses)."""
    chars = text.decode("utf-8", "replace") if isinstance(text, bytes) else text
    depth = deepest = 0
    for char in chars:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def query_kinds() -> tuple[str, ...]:
    """Names of all query kinds, for menus."""
    return tuple(_KINDS)
