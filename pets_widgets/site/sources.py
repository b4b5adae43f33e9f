"""Where a site's rows come from: a seeded synthetic registry, a CSV or Parquet file, or SQL.

A source is a small, public description (a seed and a size, a path, a database URL); loading
it happens where the rows live, inside the site's own process or kernel. Real files are
checked against the schema before a single query runs, and every bad column and every bad
value is reported with its row number but never with the value itself: the error travels
back to the coordinator, which must not see patient data.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.errors import ConfigError, DataProblem, DataValidationError
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY
from pets_widgets.site import synthetic
from pets_widgets.site.validation import validate_rows

#: An SQLAlchemy URL of an SQLite file (any driver): its prefix and the path after it.
SQLITE_FILE = re.compile(r"^(sqlite(?:\+\w+)?:///)(.*)$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?$")


class Source(Protocol):
    """What every data source offers: its kind, a JSON form, and loading where the rows live."""

    kind: ClassVar[str]

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def load(self, schema: S.Schema, site: str,
             capacity: int = DEFAULT_SITE_CAPACITY) -> pd.DataFrame: ...

    def population(self, site: str) -> pd.DataFrame | None: ...


@dataclass(frozen=True)
class SyntheticSource:
    """A seeded synthetic registry (:mod:`pets_widgets.site.synthetic`) named after its site.

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
             capacity: int = DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
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
             capacity: int = DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
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
             capacity: int = DEFAULT_SITE_CAPACITY) -> pd.DataFrame:
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
        return cls(**fields)
    except TypeError:
        allowed = sorted(f.name for f in dataclasses.fields(cls))
        raise ConfigError(f"{kind} source: unexpected keys {sorted(fields)}; allowed: "
                          f"{allowed}") from None


def anchored(source: Source, base: Path,
             place: Callable[[str, str], Path] | None = None) -> Source:
    """``source`` with its relative file path made absolute against ``base`` (a
    configuration's folder); ``place(path, key)`` does it instead when given (a site checks
    that the path stays inside its folder)."""
    put = place or (lambda path, key: base / path)
    if isinstance(source, CsvSource):  # also Parquet
        return replace(source, path=str(put(source.path, "source.path")))
    if isinstance(source, SqlSource):
        local = SQLITE_FILE.match(source.url)
        if local is not None:
            prefix, rest = local.groups()
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                return replace(source, url=f"{prefix}{put(rest, 'source.url')}")
    return source
