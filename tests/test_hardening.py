"""Input hardening: malformed or extreme requests are refused with a QueryValidationError
naming the field, never let through and never escaping as another exception."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pets_widgets as pw
from pets_widgets.core.query import MAX_FILTER_VALUES, MAX_SPEC_CHARS

KINDS = [pw.Count, pw.Mean, pw.Crosstab, pw.Histogram, pw.Survival, pw.IncidenceRate]


# --------------------------------------------------------------------------- 1. mappings
@pytest.mark.parametrize("make", [
    lambda: pw.Count(by=["tumour_group"], where={"sex": {"F": True}}),
    lambda: pw.Count(by={"sex": 1, "tumour_group": 2}),
    lambda: pw.Mean(variable="age_at_diagnosis", by={"sex": True}),
    lambda: pw.Survival(by={"tumour_group": 1}),
    lambda: pw.IncidenceRate(by={"sex": 1}),
    lambda: pw.Count(by=5),
])
def test_a_mapping_or_a_number_where_a_list_is_meant_is_refused_by_name(make):
    with pytest.raises(pw.QueryValidationError) as info:
        make()
    assert info.value.field in ("by", "where.sex")


# --------------------------------------------------------------------------- 2. any JSON text
@pytest.mark.parametrize("text", [
    "[" * 50_000 + "]" * 50_000,                       # deeper than the parser's stack
    '{"kind": ["count"]}',                             # an unhashable kind
    '{"kind": "count", "by": [["sex"]]}',
    '{"kind": "count", "where": {"sex": [["F"]]}}',
    '{"kind": "mean", "variable": {"x": 1}}',
    '{"kind": "crosstab", "rows": ["sex"], "cols": 3}',
    '{"kind": "survival", "horizon_months": "60"}',
    '{"kind": "histogram", "variable": null}',
    '{"kind": "count", "where": {"age_at_diagnosis": [1e400, 2]}}',
    "x" * (MAX_SPEC_CHARS + 1),
    '{"kind": "count"' + ', "where": {"sex": ["F"]}' * 3,
    "\x00",
])
def test_any_text_gives_a_spec_or_a_validation_error(text):
    with pytest.raises(pw.QueryValidationError):
        pw.spec_from_json(text)


def test_a_filter_list_past_the_published_limit_is_refused_before_it_is_read():
    with pytest.raises(pw.QueryValidationError, match=f"at most {MAX_FILTER_VALUES:,}"):
        pw.Count(where={"tumour_group": ["CNS"] * 2_000_000})


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=20)
FIELDS = st.sampled_from(["kind", "by", "where", "variable", "rows", "cols", "bins",
                          "horizon_months", "interval_months", "standard", "sex", "age_band",
                          "tumour_group", "age_at_diagnosis", "diagnosis_year"])
SPEC_LIKE = st.fixed_dictionaries(
    {"kind": st.sampled_from(["count", "mean", "crosstab", "histogram", "survival",
                              "incidence"]) | JSON},
    optional={"by": JSON, "where": st.dictionaries(FIELDS, JSON, max_size=3), "variable": JSON,
              "rows": JSON, "cols": JSON, "horizon_months": JSON, "interval_months": JSON,
              "standard": JSON})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, SPEC_LIKE))
def test_random_json_gives_only_specs_or_validation_errors(value):
    try:
        text = json.dumps(value)
    except ValueError:
        return
    try:
        spec = pw.spec_from_json(text)
    except pw.QueryValidationError:
        return
    assert isinstance(spec, pw.QuerySpec)
    assert pw.spec_from_json(spec.to_json()).hash == spec.hash  # what is accepted round-trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(KINDS), st.dictionaries(FIELDS, JSON | st.sets(st.integers(), max_size=3)
                                               | st.tuples(JSON, JSON), max_size=4))
def test_random_python_values_in_every_constructor_give_specs_or_validation_errors(kind, kwargs):
    kwargs.pop("kind", None)
    where = {k: kwargs.pop(k) for k in list(kwargs) if k in ("sex", "age_band", "tumour_group",
                                                             "age_at_diagnosis",
                                                             "diagnosis_year")}
    where = kwargs.pop("where", where)  # a random value as the whole filter, at times
    try:
        spec = kind(where=where, **kwargs)
    except pw.QueryValidationError:
        return
    except TypeError as exc:  # a keyword the kind does not have: Python's own message
        assert "unexpected keyword argument" in str(exc)
        return
    assert isinstance(spec, pw.QuerySpec)


# --------------------------------------------------------------------------- 3-4. policy limits
@pytest.mark.parametrize(("run", "rule"), [
    (lambda fed: fed.run(pw.Count(by=["sex"]), epsilon=1e-300), "min_epsilon"),
    (lambda fed: fed.run(pw.Count(by=["site", "sex", "age_band", "diagnosis_period",
                                      "tumour_group", "subtype", "stage", "died"])),
     "max_cells"),  # 46,080 cells
    (lambda fed: fed.run(pw.Survival(by=["tumour_group", "subtype"], horizon_months=12,
                                     interval_months=12)), "max_strata"),  # 72 strata
])
def test_a_query_past_a_published_limit_is_refused_by_name_before_any_site_works(
        fresh_fed, run, rule, monkeypatch):
    asked = []
    for site in fresh_fed._sites:
        monkeypatch.setattr(site, "respond", lambda request, s=site: asked.append(s.name))
    with pytest.raises(pw.QueryRefused) as info:
        run(fresh_fed)
    assert info.value.rule == rule and not asked
    assert fresh_fed.audit_log().iloc[-1].rule == rule
    assert fresh_fed.budget().analyst_spent == 0


def test_the_limits_are_on_the_card_and_in_the_policy_text(fresh_fed):
    release = fresh_fed.run(pw.Count(by=["sex"]), epsilon=0.5)
    assert release.card.policy["max_cells"] == 20_000
    assert release.card.policy["min_epsilon"] == 0.01
    assert "from epsilon 0.01" in pw.Policy().describe()


# --------------------------------------------------------------------------- 7. config paths
@pytest.mark.parametrize(("entry", "key"), [
    ('source = { kind = "csv", path = "../../../../etc/os-release" }', "source.path"),
    ('source = { kind = "synthetic", seed = 1, size = 10 }\npopulation = "../../p.csv"',
     "population"),
    ('config = "../elsewhere/site.toml"', "config"),
])
def test_a_relative_path_leaving_the_federation_files_folder_is_refused_naming_the_key(
        tmp_path, entry, key):
    folder = tmp_path / "fed"
    folder.mkdir()
    (folder / "sites.toml").write_text(f'[[sites]]\nname = "A"\nbackend = "local"\n{entry}\n')
    with pytest.raises(pw.ConfigError, match=f"{key} leaves the configuration's folder"):
        pw.Federation.from_config(folder / "sites.toml")


def test_an_absolute_path_may_point_anywhere(tmp_path):
    from pets_widgets.coordinator.config import load_config

    (tmp_path / "sites.toml").write_text(
        '[[sites]]\nname = "A"\nbackend = "local"\n'
        'source = { kind = "csv", path = "/srv/registry/a.csv" }\n')
    assert load_config(tmp_path / "sites.toml").sites[0].source.path == "/srv/registry/a.csv"


# --------------------------------------------------------------------------- 6. equal spellings
@pytest.mark.parametrize(("a", "b"), [
    (pw.Count(by=["sex", "tumour_group"]), pw.Count(by=["tumour_group", "sex"])),
    (pw.Count(where={"sex": "F", "died": True}), pw.Count(where={"died": [1], "SEX": ["f"]})),
    (pw.Count(where={"tumour_group": ["CNS", "Leukaemia", "CNS"]}),
     pw.Count(where={"tumour_group": ["leukaemia", "cns"]})),
    (pw.Count(where={"died": "yes"}), pw.Count(where={"died": [True]})),
    (pw.Count(where={"age_at_diagnosis": 3}), pw.Count(where={"age_at_diagnosis": (3, 3)})),
    (pw.Count(where={"sex": ["F", "M"]}), pw.Count()),
    (pw.Count(by=["Sex"]), pw.Count(by="sex")),
], ids=["by-order", "case-and-lists", "repeats", "booleans", "one-number", "keeps-all", "names"])
def test_the_spellings_the_readme_calls_equal_hash_the_same(a, b):
    assert a.hash == b.hash


@pytest.mark.parametrize(("a", "b"), [
    (pw.Count(where={"age_band": ["<1"]}), pw.Count(where={"age_at_diagnosis": (0, 0)})),
    (pw.Count(where={"diagnosis_period": ["2015-2019"]}),
     pw.Count(where={"diagnosis_year": (2015, 2019)})),
], ids=["age-band", "period"])
def test_the_spellings_the_readme_calls_different_are_charged_again(a, b):
    assert a.hash != b.hash


# --------------------------------------------------------------------------- 5. table order
def test_the_table_comes_back_in_the_order_the_user_wrote(fresh_fed):
    first = fresh_fed.run(pw.Count(by=["subtype", "diagnosis_period"]), epsilon=0.5)
    assert list(first.table.index.names) == ["subtype", "diagnosis_period"]
    assert list(first.table.index.get_level_values(0).unique()[:2]) == ["Retinoblastoma",
                                                                      "Hepatoblastoma"]
    again = fresh_fed.run(pw.Count(by=["diagnosis_period", "subtype"]), epsilon=0.5)
    assert again.card.repeated  # the same question: the stored release, in the new order
    assert list(again.table.index.names) == ["diagnosis_period", "subtype"]
    swapped = again.table.reorder_levels(["subtype", "diagnosis_period"])
    pd.testing.assert_frame_equal(swapped.loc[first.table.index], first.table)
    assert (again.suppressed.reorder_levels(["subtype", "diagnosis_period"])
            .loc[first.table.index] == first.suppressed).all().all()


# --------------------------------------------------------------------------- endurance
@pytest.mark.slow
def test_300_mixed_valid_and_malformed_queries_leave_the_federation_answering(tmp_path):
    import gc
    import os

    from .conftest import TEST_KEY_BITS
    from .kernel_helpers import rss_mb

    fed = pw.demo_federation(seed=5, rows_per_site=2_000, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite",
                             policy=pw.Policy(analyst_budget=1e4, federation_budget=1e4),
                             floors=pw.Floors(lifetime_epsilon=1e6))
    bad = [lambda: pw.spec_from_json("[" * 10_000), lambda: pw.spec_from_json('{"kind": 1}'),
           lambda: fed.run(pw.Count(by=["sex"]), epsilon=-1),
           lambda: fed.run(pw.Count(by=["sex"]), epsilon=1e-300),
           lambda: fed.run(pw.Count(by=["sex"]), k=1),
           lambda: pw.Count(by={"sex": 1}), lambda: pw.Count(where={"sex": ["X"] * 5_000})]
    specs = [pw.Count(by=["tumour_group"]), pw.Crosstab(rows="sex", cols="age_band"),
             pw.Mean(variable="age_at_diagnosis", by=["sex"]),
             pw.Histogram(variable="age_at_diagnosis")]

    def one(i: int) -> None:
        if i % 2:
            with pytest.raises((pw.QueryValidationError, pw.QueryRefused)):
                bad[i % len(bad)]()
        else:
            fed.run(specs[i % len(specs)], epsilon=0.01 + 0.001 * (i % 97))

    for i in range(30):
        one(i)
    gc.collect()
    before = rss_mb(os.getpid())
    for i in range(300):
        one(i)
    gc.collect()
    growth = rss_mb(os.getpid()) - before
    assert fed.run(pw.Count(by=["sex"]), epsilon=0.5).table is not None
    assert growth < 40, f"RSS grew {growth:.1f} MB over 300 queries"
