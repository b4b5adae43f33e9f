"""With noise off (the test door), every query kind equals pandas on the pooled rows, exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pets_widgets as pw
from pets_widgets.core import schema as S

from .oracle import expected

BASE = pw.default_schema()
GROUPABLE = [n for n in BASE.groupable if n != "site"]


@st.composite
def wheres(draw: st.DrawFn) -> dict[str, object]:
    where: dict[str, object] = {}
    for name in draw(st.lists(st.sampled_from(BASE.names[1:]), max_size=2, unique=True)):
        var = BASE[name]
        if var.kind is S.Kind.INTEGER:
            lo, hi = var.bounds
            a = draw(st.integers(lo, hi))
            where[name] = (a, draw(st.integers(a, hi)))
        else:
            where[name] = draw(st.lists(st.sampled_from(var.values), min_size=1, unique=True))
    return where


@st.composite
def specs(draw: st.DrawFn, sites: tuple[str, ...]) -> pw.QuerySpec:
    groupable = [*GROUPABLE, "site"]
    kind = draw(st.sampled_from(["count", "mean", "crosstab", "histogram"]))
    where = draw(wheres())
    if draw(st.booleans()):
        where["site"] = draw(st.lists(st.sampled_from(sites), min_size=1, unique=True))
    if kind == "count":
        return pw.Count(by=draw(st.lists(st.sampled_from(groupable), max_size=3, unique=True)),
                        where=where)
    if kind == "mean":
        return pw.Mean(variable=draw(st.sampled_from(BASE.summable)),
                       by=draw(st.lists(st.sampled_from(groupable), max_size=2, unique=True)),
                       where=where)
    if kind == "crosstab":
        rows, cols = draw(st.lists(st.sampled_from(groupable), min_size=2, max_size=2,
                                   unique=True))
        return pw.Crosstab(rows=rows, cols=cols, where=where)
    return pw.Histogram(variable=draw(st.sampled_from(BASE.numeric)), where=where)


def assert_release_equals_pooled(fed: pw.Federation, pooled: pd.DataFrame,
                                 spec: pw.QuerySpec) -> None:
    release = pw.testing.noiseless(fed, spec)
    want = expected(spec, pooled, fed.schema)
    got = release.table
    assert not release.suppressed.to_numpy().any()
    assert got.shape == want.shape, (spec, got.shape, want.shape)
    assert list(got.index) == list(want.index)
    for col in got.columns:
        g = got[col].astype(float).to_numpy()
        w = want[col].astype(float).to_numpy()
        np.testing.assert_array_equal(g, w, err_msg=f"{spec.describe()} column {col}")


SETTINGS = settings(max_examples=40, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@SETTINGS
@given(data=st.data())
def test_two_sites_equal_pooled_pandas(fed2, pooled2, data):
    spec = data.draw(specs(fed2.site_names))
    assert_release_equals_pooled(fed2, pooled2, spec)


@SETTINGS
@given(data=st.data())
def test_five_sites_equal_pooled_pandas(fed5, pooled5, data):
    spec = data.draw(specs(fed5.site_names))
    assert_release_equals_pooled(fed5, pooled5, spec)


@pytest.mark.parametrize("spec", [
    pw.Count(),
    pw.Count(by=["tumour_group"]),
    pw.Count(by=["sex", "died"]),
    pw.Count(by=["tumour_group", "age_band", "sex"]),
    pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]}),
    pw.Crosstab(rows="site", cols="diagnosis_period"),
    pw.Mean(variable="age_at_diagnosis", by=["sex"]),
    pw.Mean(variable="died", by=["tumour_group"]),
    pw.Mean(variable="follow_up_months"),
    pw.Histogram(variable="age_at_diagnosis", where={"tumour_group": ["Retinoblastoma"]}),
    pw.Histogram(variable="follow_up_months", where={"diagnosis_year": (2010, 2019)}),
], ids=lambda s: s.describe())
def test_named_queries_equal_pooled_pandas(fed2, pooled2, spec):
    assert_release_equals_pooled(fed2, pooled2, spec)


def test_mean_matches_pandas_groupby_mean(fed2, pooled2):
    release = pw.testing.noiseless(fed2, pw.Mean(variable="age_at_diagnosis", by=["sex"]))
    want = pooled2.groupby("sex", observed=False)["age_at_diagnosis"].mean()
    np.testing.assert_allclose(release.table["mean"].to_numpy(float), want.to_numpy(),
                               rtol=1e-12)
