"""Incidence rates: with noise off they equal a hand computation on the pooled rows and the
public denominators; intervals hold Poisson error and noise; the card names the standard."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import pets_widgets as pw
from pets_widgets.core import schema as S
from pets_widgets.core import standards
from pets_widgets.enclave.pipeline import incidence
from pets_widgets.enclave.pipeline.tables import NoisyBlocks
from pets_widgets.platform.measurement import measured_files

from .conftest import make_fed
from .oracle import filtered

SPECS = [
    pw.IncidenceRate(),
    pw.IncidenceRate(by="tumour_group"),
    pw.IncidenceRate(by="sex"),
    pw.IncidenceRate(by="age_band"),
    pw.IncidenceRate(by="site"),
    pw.IncidenceRate(by="diagnosis_period", where={"tumour_group": ["Leukaemia"]}),
    pw.IncidenceRate(by=["tumour_group", "sex"]),
    pw.IncidenceRate(by="subtype", where={"sex": ["F"], "diagnosis_year": (2005, 2014)}),
    pw.IncidenceRate(by="sex", where={"age_at_diagnosis": (1, 9), "stage": ["Metastatic"]}),
    pw.IncidenceRate(by="age_band", where={"age_band": ["<1", "1-4"], "site": ["NCI"]},
                     standard="esp_2013"),
    pw.IncidenceRate(by="tumour_group", where={"diagnosis_period": ["2015-2019"]},
                     standard="us_2000"),
]


def hand_rates(pooled: pd.DataFrame, population: pd.DataFrame, spec: pw.IncidenceRate,
               schema: pw.Schema) -> pd.DataFrame:
    """Crude and directly age-standardised rates per million, computed plainly."""
    rows = filtered(pooled, spec, schema)
    pop = population.assign(diagnosis_period=[S.period_of(y) for y in population.diagnosis_year])
    for name, values in spec.where.items():
        if name in ("site", "sex", "age_band", "diagnosis_period"):
            pop = pop[pop[name].isin(values)]
        elif name == "diagnosis_year":
            pop = pop[pop[name].between(*values)]
        elif name == "age_at_diagnosis":
            pop = pop[pop.age_band.isin({S.age_band_of(a) for a in range(values[0],
                                                                          values[1] + 1)})]
    weights = standards.STANDARDS[spec.standard].weights
    levels = [list(schema[b].values) for b in spec.by]
    keys = pd.MultiIndex.from_product(levels, names=list(spec.by)) if spec.by else [()]
    out = []
    for key in keys:
        key = key if isinstance(key, tuple) else (key,)
        r, p = rows, pop
        for name, value in zip(spec.by, key, strict=True):
            r = r[r[name] == value]
            if name in ("site", "sex", "age_band", "diagnosis_period"):
                p = p[p[name] == value]
        cases = {a: int((r.age_band == a).sum()) for a in S.AGE_BANDS}
        years = {a: float(p[p.age_band == a].person_years.sum()) for a in S.AGE_BANDS}
        covered = [a for a in S.AGE_BANDS if years[a] > 0]
        total_py = sum(years.values())
        crude = sum(cases.values()) / total_py * 1e6 if total_py else np.nan
        asr = (sum(weights[a] * cases[a] / years[a] for a in covered)
               / sum(weights[a] for a in covered) * 1e6) if covered else np.nan
        out.append((sum(cases.values()), total_py, crude, asr))
    return pd.DataFrame(out, columns=["cases", "person_years", "crude_rate", "asr"])


@pytest.mark.parametrize("which", ["2", "5"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_noiseless_rates_equal_hand_computation(request, which, spec):
    fed = request.getfixturevalue(f"fed{which}")
    pooled = request.getfixturevalue(f"pooled{which}")
    release = pw.testing.noiseless(fed, spec)
    want = hand_rates(pooled, fed.population(), spec, fed.schema)
    got = release.table
    assert len(got) == len(want) and not release.suppressed.to_numpy().any()
    np.testing.assert_array_equal(got["cases"].to_numpy(float), want["cases"].to_numpy(float))
    np.testing.assert_array_equal(got["person_years"].to_numpy(float), want["person_years"])
    for column in ("crude_rate", "asr"):
        np.testing.assert_allclose(got[column].to_numpy(float), want[column].to_numpy(),
                                   rtol=1e-12, err_msg=column)


def test_exact_crude_interval_is_the_garwood_poisson_interval(fed2, pooled2):
    release = pw.testing.noiseless(fed2, pw.IncidenceRate(by="tumour_group"))
    t = release.table
    cases = t["cases"].to_numpy(float)
    py = t["person_years"].to_numpy(float)
    lo = stats.chi2.ppf(0.025, 2 * cases) / 2 / py * 1e6
    hi = stats.chi2.ppf(0.975, 2 * cases + 2) / 2 / py * 1e6
    np.testing.assert_allclose(release.lower["crude_rate"], lo, rtol=1e-9)
    np.testing.assert_allclose(release.upper["crude_rate"], hi, rtol=1e-9)
    assert (release.lower["asr"] < t["asr"]).all() and (t["asr"] < release.upper["asr"]).all()


def test_card_names_the_standard_and_unnoised_denominators(tmp_path_factory):
    fed = make_fed(tmp_path_factory, "incidence_noisy", seed=9)
    spec = pw.IncidenceRate(by="tumour_group", where={"sex": ["M"]})
    with pw.testing.use_mechanism(fed, pw.testing.seeded_sampler(3)):
        release = fed.run(spec, analyst="rates")
    text = release.card.describe()
    assert "Segi (1960) world standard population" in text
    assert "<1: 2,400; 1-4: 9,600; 5-9: 10,000; 10-14: 9,000" in text
    assert "not noised" in text and "per million person-years" in text
    assert "Poisson" in text and "noise" in text
    assert "incidence.py" in {p.name for p in measured_files()}
    t, lo, hi = release.table, release.lower, release.upper
    shown = ~release.suppressed["asr"]
    assert ((lo["asr"][shown] <= t["asr"][shown]) & (t["asr"][shown] <= hi["asr"][shown])).all()
    # The noise widens every interval beyond the Poisson (Garwood) one of the same count.
    cases, py = t["cases"][shown].to_numpy(float), t["person_years"][shown].to_numpy(float)
    garwood_width = (stats.chi2.ppf(0.975, 2 * cases + 2)
                     - stats.chi2.ppf(0.025, 2 * cases)) / 2 / py * 1e6
    assert (hi["crude_rate"][shown] - lo["crude_rate"][shown] > garwood_width).all()
    # Denominators are public: never hidden, equal to the registered tables.
    assert not release.suppressed["person_years"].any()
    males = fed.population().query("sex == 'M'").person_years.sum()
    assert (t["person_years"] == males).all()


def test_small_strata_hide_cases_and_rates_not_person_years(fed2):
    spec = pw.IncidenceRate(by="sex")
    layout = spec.layout(fed2.schema)
    cells = np.array([[1, 1, 0, 1], [40, 30, 20, 10]])  # F: 3 cases (hidden), M: 100
    noisy = NoisyBlocks({"cases": cells.ravel()}, {"cases": 1.0}, {"cases": 3})
    tables = incidence.build_incidence(spec, fed2.schema, layout, noisy, 5, 5, True,
                                       population=fed2.enclave.population)
    assert tables.suppressed.loc["F"].tolist() == [True, False, True, True]
    assert not tables.suppressed.loc["M"].any()
    assert tables.table.loc["M", "cases"] == 100 and pd.notna(tables.table.loc["F",
                                                                             "person_years"])
    assert "k=5" in tables.suppression


def test_rates_are_refused_before_any_site_works_without_denominators(tmp_path_factory):
    fed = make_fed(tmp_path_factory, "incidence_nopop", seed=4)
    fed.enclave._public.clear()
    with pytest.raises(pw.QueryRefused) as info:
        fed.run(pw.IncidenceRate(), analyst="rates")
    assert info.value.rule == "public_inputs"
    assert fed.budget("rates").analyst_spent == 0
    assert fed.audit_log().iloc[-1].outcome == "refused"


@pytest.mark.parametrize(("build", "field", "allowed_has"), [
    (lambda: pw.IncidenceRate(where={"age_at_diagnosis": (2, 9)}), "where.age_at_diagnosis",
     "(1, 4)"),
    (lambda: pw.IncidenceRate(standard="mars_2100"), "standard", "segi_1960"),
    (lambda: pw.IncidenceRate(by="died"), "by", "tumour_group"),
    (lambda: pw.IncidenceRate(by=["sex", "site", "stage"]), "by", "tumour_group"),
])
def test_invalid_rate_specs_name_the_field(build, field, allowed_has):
    with pytest.raises(pw.QueryValidationError) as info:
        build()
    assert info.value.field == field and allowed_has in str(info.value)


def test_population_tables_are_checked():
    good = pd.DataFrame({"site": ["A"], "diagnosis_year": [2001], "sex": ["F"],
                         "age_band": ["<1"], "person_years": [10.0]})
    assert len(incidence.check_population(good, ("A",))) == 1
    with pytest.raises(ValueError, match="person_years"):
        incidence.check_population(good.drop(columns="person_years"), ("A",))
    with pytest.raises(ValueError, match="site"):
        incidence.check_population(good, ("B",))
    with pytest.raises(ValueError, match="negative"):
        incidence.check_population(good.assign(person_years=[-1.0]), ("A",))
