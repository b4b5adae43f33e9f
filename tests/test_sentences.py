"""Every spec, filter and refusal reads as a sentence built from the dictionary's labels."""

from __future__ import annotations

import pytest

import pets_widgets as pw
from pets_widgets.core.sentences import filters_in_words, question

from .test_site_service import SPECS


@pytest.mark.parametrize(("spec", "words"), [
    (pw.Count(), "Number of patients"),
    (pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]}),
     "Number of patients by tumour group (ICCC-3) and age band; only Sex: Female"),
    (pw.Mean(variable="age_at_diagnosis", by=["sex"]), "Mean age at diagnosis by sex"),
    (pw.Survival(by="tumour_group", horizon_months=60, interval_months=3),
     "Survival by tumour group (ICCC-3), to 5 years in 3-month steps"),
    (pw.Survival(where={"age_band": ["<1"]}), "Survival, to 5 years; only Age band: under 1 "
                                              "year"),
    (pw.Count(where={"diagnosis_year": (2015, 2022)}),
     "Number of patients; only Year of diagnosis: 2015 to 2022"),
])
def test_questions_read_as_sentences(spec, words):
    assert question(spec) == words


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.kind)
def test_no_sentence_holds_a_field_name_or_a_python_literal(spec):
    text = question(spec)
    for developer in ("by=", "rows=", "variable=", "horizon_months", "where", "(", "'", "["):
        if developer == "(" and "(ICCC-3)" in text:
            continue
        assert developer not in text.replace("(ICCC-3)", ""), (developer, text)


def test_a_refusal_names_the_filter_in_words(fresh_fed):
    where = {"subtype": ["PPB"], "sex": ["F"], "diagnosis_year": (2003, 2004)}
    with pytest.raises(pw.QueryRefused) as info:
        fresh_fed.run(pw.Count(where=where), epsilon=1.0, analyst="words")
    assert info.value.rule == "min_subset"
    assert filters_in_words(pw.Count(where=where).where) in str(info.value)  # dictionary order
    assert "{" not in str(info.value) and "('" not in str(info.value)
