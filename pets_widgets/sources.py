"""Where a site's rows come from: a seeded synthetic registry, a CSV or Parquet file, or SQL.

A source is a small, public description (a seed and a size, a path, a database URL); loading
it happens where the rows live, inside the site's own process or kernel. Real files are
checked against the schema before a single query runs, and every bad column and every bad
value is reported with its row number but never with the value itself: the error travels
back to the coordinator, which must not see patient data.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import pandas as pd

from pets_widgets import crypto, synthetic
from pets_widgets import schema as S
from pets_widgets.errors import ConfigError, DataProblem, DataValidationError

#: Spellings accepted for the boolean ``died`` column (case-insensitive).
TRUE_WORDS = frozenset({"true", "t", "yes", "y", "1", "1.0"})
FALSE_WORDS = frozenset({"false", "f", "no", "n", "0", "0.0"})
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class Source(Protocol):
    """What every data source offers: its kind, a JSON form, and loading where the rows live."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def load(self, schema: S.Schema, site: str,
             capacity: int = crypto.DEFAULT_SITE_CAPACITY) -> pd.DataFrame: ...

    def population(self, site: str) -> pd.DataFrame | None: ...


@dataclass(frozen=True)
class SyntheticSource:
    """A seeded synthetic registry (:mod:`pets_widgets.synthetic`) named after its site.

    ``size`` rows (default: 23 years of ``cases_per_year``); ``cases_per_year`` also sets the
    public population denominators; ``loss_to_follow_up`` is the yearly censoring rate.
    """

    kind: ClassVar[str] = "synthetic"
    seed: int
    size: int | None = None
    cases_per_year: int | None = None
    loss_to_follow_up: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"synthetic source: seed must be an integer, got {self.seed!r}")
        if self.size is None and self.cases_per_year is None:
            raise ConfigError("synthetic source: give size (rows) or cases_per_year")
        for name in ("size", "cases_per_year"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 1):
                raise ConfigError(f"synthetic source: {name} must be a positive integer, "
                                  f"got {value!r}")
        if not 0.0 <= float(self.loss_to_follow_up) < 1.0:
            raise ConfigError("synthetic source: loss_to_follow_up must be in [0, 1)")

    def profile(self, site: str) -> synthetic.SiteProfile:
        per_year = self.cases_per_year
        if per_year is None:
            assert self.size is not None
            per_year = max(1, round(self.size / synthetic.N_YEARS))
        return synthetic.SiteProfile(site, per_year, float(self.loss_to_follow_up))

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if v is not None}}

    def describe(self) -> str:
        return f"synthetic registry (seed {self.seed}, {self.size or 'default'} rows)"

    def load(self, schema: S.Schema, site: str,
             capacity: int = crypto.DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
        # Generated from the schema itself: valid by construction, so not re-validated.
        rows = synthetic.registry(self.profile(site), self.seed, self.size)
        if len(rows) > capacity:
            raise DataValidationError(self.describe(), [DataProblem(
                "*", f"more rows than the site capacity of {capacity}")], site)
        return rows

    def population(self, site: str) -> pd.DataFrame | None:
        return synthetic.population(self.profile(site))


@dataclass(frozen=True)
class CsvSource:
    """A CSV file with a header row naming the schema's columns (``site`` optional)."""

    kind: ClassVar[str] = "csv"
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path}

    def describe(self) -> str:
        return f"CSV file {self.path}"

    def read(self) -> pd.DataFrame:
        # Every cell as text: our parser, not pandas' type guessing, decides what is valid.
        return pd.read_csv(self.path, dtype=str, keep_default_na=False, na_values=[""],
                           skipinitialspace=True)

    def load(self, schema: S.Schema, site: str,
             capacity: int = crypto.DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
        try:
            raw = self.read()
        except FileNotFoundError:
            raise DataValidationError(self.describe(), [DataProblem(
                "*", "the file does not exist")], site) from None
        except (ValueError, OSError) as exc:  # parser, encoding and format errors
            raise DataValidationError(self.describe(), [DataProblem(
                "*", f"the file cannot be read as {self.kind} ({type(exc).__name__})")],
                site) from None
        return validate_rows(raw, schema, site, self.describe(), capacity)

    def population(self, site: str) -> pd.DataFrame | None:
        return None


@dataclass(frozen=True)
class ParquetSource(CsvSource):
    """A Parquet file with the schema's columns (needs the optional ``pyarrow`` package)."""

    kind: ClassVar[str] = "parquet"

    def describe(self) -> str:
        return f"Parquet file {self.path}"

    def read(self) -> pd.DataFrame:
        try:
            return pd.read_parquet(self.path)
        except ImportError:
            raise ConfigError("Parquet sources need pyarrow: pip install "
                              "'pets-widgets[parquet]'") from None


@dataclass(frozen=True)
class SqlSource:
    """A table (or a fixed query) in a database reached through an SQLAlchemy URL.

    ``table`` is a plain (optionally schema-qualified) identifier; ``query`` is SQL written by
    the site in its own configuration, never text from a researcher.
    """

    kind: ClassVar[str] = "sql"
    url: str
    table: str | None = None
    query: str | None = None

    def __post_init__(self) -> None:
        if (self.table is None) == (self.query is None):
            raise ConfigError("sql source: give exactly one of table or query")
        if self.table is not None and not _IDENTIFIER.match(self.table):
            raise ConfigError(f"sql source: table {self.table!r} is not a plain identifier")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **{k: v for k, v in asdict(self).items() if v is not None}}

    def describe(self) -> str:
        # A URL may carry a password: show only its scheme and database.
        safe = re.sub(r"//[^/@]*@", "//***@", self.url)
        return f"SQL {'table ' + self.table if self.table else 'query'} at {safe}"

    def load(self, schema: S.Schema, site: str,
             capacity: int = crypto.DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
        import sqlalchemy

        try:
            engine = sqlalchemy.create_engine(self.url)
        except (sqlalchemy.exc.ArgumentError, ImportError) as exc:
            raise ConfigError(f"{self.describe()}: not a usable SQLAlchemy URL "
                              f"({type(exc).__name__})") from None
        try:
            with engine.connect() as conn:
                if self.table is not None:
                    schema_name, _, table = self.table.rpartition(".")
                    raw = pd.read_sql_table(table, conn, schema=schema_name or None)
                else:
                    raw = pd.read_sql_query(sqlalchemy.text(self.query or ""), conn)
        except (sqlalchemy.exc.SQLAlchemyError, ValueError) as exc:
            raise DataValidationError(self.describe(), [DataProblem(
                "*", f"the database cannot be read ({type(exc).__name__})")], site) from None
        finally:
            engine.dispose()
        return validate_rows(raw, schema, site, self.describe(), capacity)

    def population(self, site: str) -> pd.DataFrame | None:
        return None


SOURCES: dict[str, type] = {s.kind: s for s in (SyntheticSource, CsvSource, ParquetSource,
                                                 SqlSource)}


def source_from_dict(data: Mapping[str, Any]) -> Source:
    """Rebuild a source from its :meth:`to_dict` form (also the TOML ``source`` table)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"a source must be a table, got {type(data).__name__}")
    kind = data.get("kind")
    if kind not in SOURCES:
        raise ConfigError(f"source kind {kind!r} is not one of {sorted(SOURCES)}")
    cls = SOURCES[kind]
    fields = {k: v for k, v in data.items() if k != "kind"}
    try:
        return cls(**fields)  # type: ignore[no-any-return]
    except TypeError:
        allowed = sorted(cls.__dataclass_fields__)
        raise ConfigError(f"{kind} source: unexpected keys {sorted(fields)}; allowed: "
                          f"{allowed}") from None


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
                  capacity: int = crypto.DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
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
        for name, rule, problem in (
            ("subtype", S.subtype_allowed, "is not possible in this tumour_group"),
            ("stage", lambda st, g: (st != "Not applicable") == S.stage_applies(g),
             "does not fit this tumour_group (staged groups need a stage, others "
             "'Not applicable')"),
        ):
            if name not in valid:
                continue
            both = valid[name] & valid["tumour_group"]
            values = np.asarray(out[name], dtype=object)
            wrong = both.copy()
            wrong[both] = [not rule(v, g) for v, g in zip(values[both], groups[both],
                                                          strict=True)]
            if wrong.any():
                problems.append(DataProblem(name, problem, _rows_where(wrong)))
    return problems
