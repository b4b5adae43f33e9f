"""Query specs: validation names the field and the allowed values; JSON and hash are canonical."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings

import pets_widgets as pw

from .test_oracle import specs


@pytest.mark.parametrize(("build", "field", "allowed_has"), [
    (lambda: pw.Count(by=["shoe_size"]), "by", "tumour_group"),
    (lambda: pw.Count(by=["age_at_diagnosis"]), "by", "age_band"),  # continuous group-by
    (lambda: pw.Count(where={"sex": ["X"]}), "where.sex", "F"),
    (lambda: pw.Count(where={"tumour_group": ["Wilms"]}), "where.tumour_group", "Renal"),
    (lambda: pw.Count(where={"colour": ["red"]}), "where", "sex"),
    (lambda: pw.Count(where={"diagnosis_year": (2019, 2010)}), "where.diagnosis_year", "2000"),
    (lambda: pw.Count(where={"diagnosis_year": (1990, 2010)}), "where.diagnosis_year", "2022"),
    (lambda: pw.Count(where={"age_at_diagnosis": (0, float("nan"))}), "where.age_at_diagnosis",
     "0-14"),
    (lambda: pw.Count(where={"age_at_diagnosis": (0, math.inf)}), "where.age_at_diagnosis",
     "0-14"),
    (lambda: pw.Count(where={"sex": []}), "where.sex", "F"),
    (lambda: pw.Mean(variable="tumour_group"), "variable", "age_at_diagnosis"),
    (lambda: pw.Histogram(variable="sex"), "variable", "follow_up_months"),
    (lambda: pw.Crosstab(rows="sex", cols="sex"), "cols", "age_band"),
    (lambda: pw.Crosstab(rows="sex", cols="age_at_diagnosis"), "cols", "age_band"),
])
def test_invalid_specs_name_field_and_allowed_values(build, field, allowed_has):
    with pytest.raises(pw.QueryValidationError) as info:
        build()
    assert info.value.field == field
    assert field in str(info.value)
    assert allowed_has in str(info.value.allowed) or allowed_has in str(info.value)


@pytest.mark.parametrize("epsilon", [0, -1, float("nan"), float("inf"), "1", None, True])
def test_bad_epsilon_is_refused_and_audited(fresh_fed, epsilon):
    with pytest.raises(pw.QueryValidationError) as info:
        fresh_fed.run(pw.Count(by=["sex"]), epsilon=epsilon)
    assert info.value.field == "epsilon"
    last = fresh_fed.audit_log().iloc[-1]
    assert last.outcome == "invalid" and last.rule == "epsilon"
    assert fresh_fed.budget().analyst_spent == 0


def test_unknown_site_in_filter_is_rejected_at_run(fresh_fed):
    spec = pw.Count(where={"site": ["Narnia"]})
    with pytest.raises(pw.QueryValidationError) as info:
        fresh_fed.run(spec)
    assert info.value.field == "where.site" and "NDRS" in str(info.value)


def test_spelling_and_order_do_not_change_the_question():
    a = pw.Count(by=["tumour_group", "sex"], where={"sex": ["F"], "diagnosis_year": (2010, 2019)})
    b = pw.Count(by=["Sex", "Tumour Group"], where={"DIAGNOSIS_YEAR": [2010, 2019], "sex": "f"})
    assert a == b and a.hash == b.hash and a.to_json() == b.to_json()
    assert pw.Crosstab(rows="sex", cols="age_band").hash == \
        pw.Crosstab(rows="age_band", cols="sex").hash
    # a filter that keeps every value asks the same question as no filter
    assert pw.Count(where={"sex": ["M", "F"]}).hash == pw.Count().hash
    assert pw.Count(where={"diagnosis_year": (2000, 2022)}).hash == pw.Count().hash
    assert pw.Count(by=["sex"]).hash != pw.Count(by=["age_band"]).hash
    assert pw.Count().hash != pw.Histogram(variable="age_at_diagnosis").hash


@settings(max_examples=200, deadline=None)
@given(spec=specs(("NDRS", "NCI")))
def test_json_round_trip_and_hash(spec):
    text = spec.to_json()
    back = pw.spec_from_json(text)
    assert back == spec and back.hash == spec.hash and back.to_json() == text
    assert len(spec.hash) == 64 and int(spec.hash, 16) >= 0


def test_from_json_rejects_garbage():
    with pytest.raises(pw.QueryValidationError) as info:
        pw.spec_from_json("{not json")
    assert info.value.field == "json"
    with pytest.raises(pw.QueryValidationError) as info:
        pw.spec_from_json('{"kind": "regression"}')
    assert info.value.field == "kind" and "count" in str(info.value)
    with pytest.raises(pw.QueryValidationError) as info:
        pw.spec_from_json('{"kind": "count", "by": ["sex"], "code": "import os"}')
    assert info.value.field == "code"


def test_specs_are_immutable():
    spec = pw.Count(by=["sex"])
    with pytest.raises(AttributeError):
        spec.by = ("age_band",)  # type: ignore[misc]
