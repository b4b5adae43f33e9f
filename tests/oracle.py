"""Pooled-data oracles: the same statistics computed directly with pandas on pooled rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

import pets_widgets as pw
from pets_widgets.core.release import ALL, TOTAL


def filtered(rows: pd.DataFrame, spec: pw.QuerySpec, schema: pw.Schema) -> pd.DataFrame:
    mask = np.ones(len(rows), dtype=bool)
    for name, values in spec.where.items():
        if schema[name].kind.value == "integer":
            mask &= rows[name].between(values[0], values[1]).to_numpy()
        else:
            mask &= rows[name].isin(list(values)).to_numpy()
    return rows[mask]


def _levels(schema: pw.Schema, name: str) -> list[object]:
    return list(schema[name].values)


def counts(rows: pd.DataFrame, by: tuple[str, ...], schema: pw.Schema) -> pd.Series:
    if not by:
        return pd.Series([len(rows)], index=pd.Index([ALL], name=""))
    grouped = rows.groupby(list(by), observed=False).size()
    full = (pd.Index(_levels(schema, by[0]), name=by[0]) if len(by) == 1 else
            pd.MultiIndex.from_product([_levels(schema, b) for b in by], names=list(by)))
    return grouped.reindex(full, fill_value=0)


def crosstab(rows: pd.DataFrame, a: str, b: str, schema: pw.Schema) -> pd.DataFrame:
    table = pd.crosstab(rows[a].astype(object), rows[b].astype(object))
    table = table.reindex(index=_levels(schema, a), columns=_levels(schema, b), fill_value=0)
    table[TOTAL] = table.sum(axis=1)
    table.loc[TOTAL] = table.sum(axis=0)
    table.index.name, table.columns.name = a, b
    return table


def expected(spec: pw.QuerySpec, pooled: pd.DataFrame, schema: pw.Schema) -> pd.DataFrame:
    """The table a noiseless release of ``spec`` must equal."""
    rows = filtered(pooled, spec, schema)
    if isinstance(spec, pw.Crosstab):
        return crosstab(rows, spec.rows, spec.cols, schema)
    if isinstance(spec, pw.Count):
        if len(spec.by) == 2:
            wide = crosstab(rows, spec.by[0], spec.by[1], schema)
            return wide.stack().rename("count").to_frame()
        return counts(rows, spec.by, schema).rename("count").to_frame()
    if isinstance(spec, pw.Histogram):
        var = schema[spec.variable]
        cut = pd.cut(rows[spec.variable], bins=list(var.bins), right=False,
                     labels=list(var.bin_labels()))
        return cut.value_counts(sort=False).rename("count").to_frame()
    if isinstance(spec, pw.Mean):
        lo, hi = spec.clip(schema)
        x = rows[spec.variable].astype(np.int64).clip(lo, hi) - lo
        frame = rows.assign(_x=x)
        n = counts(frame, spec.by, schema)
        if spec.by:
            s = frame.groupby(list(spec.by), observed=False)["_x"].sum().reindex(n.index,
                                                                                 fill_value=0)
        else:
            s = pd.Series([int(x.sum())], index=n.index)
        mean = lo + s.astype(float) / n.where(n > 0)
        return pd.DataFrame({"mean": mean, "n": n})
    raise AssertionError(f"no oracle for {spec.kind}")
