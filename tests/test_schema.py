from __future__ import annotations

import pets_widgets as pw
from pets_widgets.core import schema as S
from pets_widgets.site import synthetic


def test_schema_columns_and_kinds():
    schema = pw.default_schema()
    assert schema.names == ("site", "sex", "age_at_diagnosis", "age_band", "diagnosis_year",
                            "diagnosis_period", "tumour_group", "subtype", "stage",
                            "follow_up_months", "died")
    assert schema["sex"].categories == ("F", "M")
    assert schema["age_band"].categories == ("<1", "1-4", "5-9", "10-14")
    assert schema["age_at_diagnosis"].bounds == (0, 14)
    assert schema["diagnosis_year"].bounds == (2000, 2022)
    assert len(schema["tumour_group"].categories) == 12
    assert schema["tumour_group"].label_of("Retinoblastoma") == "V Retinoblastoma"
    assert schema["died"].kind is S.Kind.BOOLEAN
    assert "age_at_diagnosis" not in schema.groupable
    assert set(schema.numeric) == {"age_at_diagnosis", "diagnosis_year", "follow_up_months"}
    for name in schema.numeric:
        var = schema[name]
        assert var.clip is not None and var.bins[0] == var.bounds[0]
        assert var.bins[-1] == var.bounds[1] + 1  # every value falls in exactly one bin


def test_bins_labels_cover_bounds():
    assert S.YEAR.bin_labels() == ("2000-2004", "2005-2009", "2010-2014", "2015-2019",
                                   "2020-2022")
    assert S.AGE.bin_labels()[0] == "0" and S.AGE.bin_labels()[-1] == "14"
    assert S.FOLLOW_UP.bin_labels()[-1] == "264-288"


def test_synthetic_registry_follows_schema_and_is_seeded():
    profile = synthetic.profiles(2, 2_000)[0]
    a = synthetic.registry(profile, seed=1, n_rows=2_000)
    b = synthetic.registry(profile, seed=1, n_rows=2_000)
    c = synthetic.registry(profile, seed=2, n_rows=2_000)
    assert a.equals(b) and not a.equals(c)
    schema = pw.default_schema()
    for name in schema.names:
        var = schema[name]
        if var.kind is S.Kind.CATEGORICAL and name != "site":
            assert set(a[name].astype(str)) <= set(var.categories), name
        elif var.kind is S.Kind.INTEGER:
            assert a[name].between(*var.bounds).all(), name
    assert (a.age_band.astype(str) == a.age_at_diagnosis.map(S.age_band_of)).all()
    assert (a.diagnosis_period.astype(str) == a.diagnosis_year.map(S.period_of)).all()
    # follow-up never runs past the end of 2023
    assert (a.follow_up_months <= (2024 - a.diagnosis_year) * 12).all()
    # subtypes sit in their ICCC-3 group
    for subtype, (_, group) in S.SUBTYPES.items():
        if group:
            assert (a.loc[a.subtype == subtype, "tumour_group"] == group).all()


def test_synthetic_survival_is_realistic():
    from lifelines import KaplanMeierFitter

    profile = synthetic.DEMO_PROFILES[0]
    rows = synthetic.registry(profile, seed=7)
    assert 1_500 * 23 <= len(rows) <= 1_800 * 23

    def surv(mask, months):
        km = KaplanMeierFitter().fit(rows.follow_up_months[mask], rows.died[mask])
        return float(km.predict(months))

    assert 0.83 <= surv(rows.tumour_group == "Leukaemia", 60) <= 0.93
    assert 0.85 <= surv(rows.tumour_group == "Retinoblastoma", 60) <= 0.99
    assert surv(rows.subtype == "DIPG", 24) < 0.10


def test_demo_sites_and_denominators():
    assert synthetic.site_names(2) == ("NDRS", "NCI")
    assert synthetic.site_names(4) == ("NDRS", "NCI", "SITE3", "SITE4")
    nci, ndrs = synthetic.DEMO_PROFILES[1], synthetic.DEMO_PROFILES[0]
    assert nci.cases_per_year > ndrs.cases_per_year
    pop = synthetic.population(ndrs)
    assert set(pop.columns) == {"site", "diagnosis_year", "sex", "age_band", "person_years"}
    assert len(pop) == 23 * 2 * 4
    # about 160 cases per million children per year
    rate = ndrs.cases_per_year / pop[pop.diagnosis_year == 2000].person_years.sum() * 1e6
    assert 140 < rate < 180


def test_linked_variable_rules():
    assert S.subtype_allowed("DIPG", "CNS") and not S.subtype_allowed("DIPG", "Bone")
    assert S.subtype_allowed("Other", "Bone")
    assert not S.subtype_allowed("Other", "Retinoblastoma")  # ICCC-3 V is retinoblastoma
    assert S.stage_applies("Renal") and not S.stage_applies("Leukaemia")
    rows = synthetic.registry(synthetic.profiles(1, 3_000)[0], seed=3, n_rows=3_000)
    for g, st, sg in zip(rows.tumour_group, rows.subtype, rows.stage, strict=True):
        assert (g, st, sg) in S.LINKED[0][1]
