"""Survival: with noise off, federated Kaplan-Meier and log-rank equal lifelines on the pooled
rows; with noise on, curves are valid and their bands cover the noiseless curve."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lifelines import KaplanMeierFitter
from lifelines.statistics import multivariate_logrank_test

import pets_widgets as pw
from pets_widgets.enclave.pipeline import survival as sv
from pets_widgets.enclave.pipeline.noise import noise_interval, noise_sd
from pets_widgets.enclave.pipeline.tables import NoisyBlocks
from pets_widgets.platform.measurement import measured_files
from pets_widgets.site.site import Site

from .conftest import make_fed
from .oracle import filtered

LANDMARK_MONTHS = (12, 36, 60)

#: Every preset, unrestricted, plus restrictions to one tumour group or one subtype.
PRESET_CASES = [(name, {}) for name in pw.presets.names()] + [
    ("by_age_band", {"tumour_group": "CNS"}),
    ("by_sex", {"subtype": "DIPG"}),
    ("by_site", {"subtype": "Hepatoblastoma"}),
    ("by_diagnosis_period", {"tumour_group": "Leukaemia"}),
]


# --------------------------------------------------------------------------- oracles


def grid_durations(rows: pd.DataFrame, spec: pw.Survival) -> np.ndarray:
    """Durations on the spec's grid: the end of the interval of T completed months."""
    w = spec.interval_months
    return (rows["follow_up_months"].to_numpy(dtype=np.int64) // w + 1) * w


def strata_of(rows: pd.DataFrame, spec: pw.Survival, schema: pw.Schema):
    """(label, rows) of every stratum in layout order, on the spec's filtered rows."""
    rows = filtered(rows, spec, schema)
    labels = sv.stratum_labels(spec.by, schema)
    if not spec.by:
        return [(labels[0], rows)]
    groups = dict(list(rows.groupby(list(spec.by), observed=False)))  # keys: tuples
    keys = [k if isinstance(k, tuple) else (k,) for k in sv._index(spec.by, schema)]
    return [(label, groups.get(key, rows.iloc[:0]))
            for label, key in zip(labels, keys, strict=True)]


def exact_cells(pooled: pd.DataFrame, spec: pw.QuerySpec, schema: pw.Schema) -> np.ndarray:
    """Exact pooled totals of the spec's block: one site holding every pooled row."""
    return Site(schema.sites[0], pooled, schema)._aggregate(spec)


def lifelines_km(rows: pd.DataFrame, spec: pw.Survival) -> KaplanMeierFitter:
    return KaplanMeierFitter().fit(grid_durations(rows, spec),
                                   rows["died"].to_numpy(dtype=int))


# --------------------------------------------------------------------------- the spec


@pytest.mark.parametrize(("kwargs", "field", "allowed_has"), [
    ({"horizon_months": 0}, "horizon_months", "1-288"),
    ({"horizon_months": 300}, "horizon_months", "1-288"),
    ({"horizon_months": 2.5}, "horizon_months", "1-288"),
    ({"interval_months": 0}, "interval_months", "divide"),
    ({"interval_months": 7}, "interval_months", "12"),
    ({"interval_months": True}, "interval_months", "divide"),
    ({"by": ["sex", "site", "age_band"]}, "by", "tumour_group"),
    ({"by": "died"}, "by", "tumour_group"),
    ({"by": "age_at_diagnosis"}, "by", "age_band"),
    ({"where": {"subtype": ["Ependymoma"]}}, "where.subtype", "DIPG"),
])
def test_invalid_survival_specs_name_the_field(kwargs, field, allowed_has):
    with pytest.raises(pw.QueryValidationError) as info:
        pw.Survival(**kwargs)
    assert info.value.field == field
    assert allowed_has in str(info.value)


def test_spec_is_canonical_and_round_trips():
    a = pw.Survival(by="Tumour group", horizon_months=60.0)
    b = pw.Survival(by=["tumour_group"], interval_months=1)
    assert a == b and a.hash == b.hash
    assert pw.spec_from_json(a.to_json()) == a
    assert a.grid[0] == 0 and a.grid[-1] == 60 and len(a.grid) == 61


def test_layout_is_one_block_of_sensitivity_one_holding_each_patient_once(fed2, pooled2):
    spec = pw.Survival(by=["sex", "age_band"], horizon_months=36, interval_months=3)
    layout = spec.layout(fed2.schema)
    assert len(layout.blocks) == 1
    block = layout.blocks[0]
    assert (block.sensitivity, block.max_contribution, block.budget_share) == (1, 1, 1)
    assert block.size == 2 * 4 * (36 // 3 + 1) * 2
    cells = exact_cells(pooled2, spec, fed2.schema)
    assert cells.sum() == len(pooled2)  # a patient is in exactly one cell
    assert "survival.py" in {p.name for p in measured_files()}


def test_presets_are_data_and_build_specs():
    names = pw.presets.names()
    for wanted in ("by_tumour_group", "by_age_band", "by_sex", "by_diagnosis_period", "by_site"):
        assert wanted in names
    assert list(pw.presets.table().index) == list(names)
    spec = pw.presets.survival("by_age_band", tumour_group="CNS")
    assert spec.by == ("age_band",) and spec.where["tumour_group"] == ("CNS",)
    spec = pw.presets.survival("by_sex", subtype="dipg")
    assert spec.where["subtype"] == ("DIPG",)
    with pytest.raises(pw.QueryValidationError) as info:
        pw.presets.survival("by_shoe_size")
    assert info.value.field == "name" and "by_tumour_group" in str(info.value)
    with pytest.raises(pw.QueryValidationError) as info:
        pw.presets.survival("by_sex", tumour_group="Wilms")
    assert "Renal" in str(info.value)


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("which", ["2", "5"])
@pytest.mark.parametrize(("preset", "restrict"), PRESET_CASES,
                         ids=[f"{n}-{'-'.join(r.values()) or 'all'}" for n, r in PRESET_CASES])
def test_noiseless_km_and_logrank_of_every_preset_equal_lifelines(request, which, preset,
                                                                   restrict):
    fed = request.getfixturevalue(f"fed{which}")
    pooled = request.getfixturevalue(f"pooled{which}")
    spec = pw.presets.survival(preset, **restrict)
    release = pw.testing.noiseless(fed, spec)
    curves = release.curves
    assert curves is not None and not release.suppressed.to_numpy().any()
    grid = list(spec.grid)
    labels, durations, died = [], [], []
    for label, rows in strata_of(pooled, spec, fed.schema):
        if rows.empty:
            assert curves["survival"][label].isna().all()
            continue
        kmf = lifelines_km(rows, spec)
        want = kmf.survival_function_at_times(grid).to_numpy()
        got = curves["survival"][label].to_numpy()
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=label)
        at_risk = [(rows["follow_up_months"] >= t).sum() for t in grid]
        np.testing.assert_array_equal(curves["at_risk"][label].to_numpy(), at_risk)
        assert release.table.loc[_key(release, label), "patients"] == len(rows)
        for name, month in sv.LANDMARKS.items():
            assert release.table.loc[_key(release, label), name] == pytest.approx(
                want[month], abs=1e-12)
        labels += [label] * len(rows)
        durations.append(grid_durations(rows, spec))
        died.append(rows["died"].to_numpy(dtype=int))
    if len(set(labels)) < 2:
        assert release.logrank is None
        return
    want = multivariate_logrank_test(np.concatenate(durations), labels, np.concatenate(died),
                                     t_0=spec.horizon_months)
    got = pw.survival.logrank(release)
    assert got.test_statistic == pytest.approx(want.test_statistic, rel=1e-9, abs=1e-9)
    assert got.p_value == pytest.approx(want.p_value, rel=1e-6, abs=1e-12)
    assert got.degrees_of_freedom == want.degrees_of_freedom
    assert "noisy" not in got.test_name


def test_logrank_observed_and_expected_per_stratum_equal_a_pandas_computation(fed2, pooled2):
    spec = pw.presets.survival("by_age_band")
    got = pw.testing.noiseless(fed2, spec).logrank.table
    events = []
    for label, rows in strata_of(pooled2, spec, fed2.schema):
        t = grid_durations(rows, spec)
        died = rows["died"].to_numpy(dtype=bool) & (t <= spec.horizon_months)
        events.append(pd.DataFrame({"stratum": label, "t": np.minimum(t, spec.horizon_months),
                                    "died": died}))
    frame = pd.concat(events, ignore_index=True)
    grid = np.arange(1, spec.horizon_months + 1) * spec.interval_months
    at_risk = pd.DataFrame({g: [(part.t >= t).sum() for t in grid]
                            for g, part in frame.groupby("stratum", sort=False)}, index=grid)
    deaths = pd.DataFrame({g: [(part.died & (part.t == t)).sum() for t in grid]
                           for g, part in frame.groupby("stratum", sort=False)}, index=grid)
    share = deaths.sum(axis=1) / at_risk.sum(axis=1)
    expected = at_risk.mul(share, axis=0).sum()
    for label in got.index:
        assert got.loc[label, "observed"] == deaths[label].sum()
        assert got.loc[label, "expected"] == pytest.approx(expected[label], rel=1e-12)
    assert got.observed.sum() == pytest.approx(got.expected.sum(), rel=1e-12)


def _key(release: pw.Release, label: str) -> object:
    index = release.table.index
    if isinstance(index, pd.MultiIndex):
        return tuple(label.split(" / "))
    return label


def test_coarse_grid_equals_lifelines_on_grid_durations(fed5, pooled5):
    spec = pw.Survival(by=["sex", "stage"], horizon_months=120, interval_months=6,
                       where={"diagnosis_year": (2000, 2012)})
    curves = pw.testing.noiseless(fed5, spec).curves
    for label, rows in strata_of(pooled5, spec, fed5.schema):
        want = lifelines_km(rows, spec).survival_function_at_times(list(spec.grid))
        np.testing.assert_allclose(curves["survival"][label], want, atol=1e-12)


def test_greenwood_part_equals_lifelines_variance(fed2, pooled2):
    spec = pw.presets.survival("by_tumour_group")
    n_int = spec.n_intervals
    cells = exact_cells(pooled2, spec, fed2.schema).reshape(-1, n_int + 1, 2)
    for (label, rows), c in zip(strata_of(pooled2, spec, fed2.schema), cells, strict=True):
        est = sv.kaplan_meier_from_counts(c[:n_int, 1], c[:n_int, 0], c[n_int],
                                          np.array(spec.grid), 0.0)
        kmf = lifelines_km(rows, spec)
        want = kmf._cumulative_sq_.reindex(list(spec.grid), method="pad").fillna(0.0)
        np.testing.assert_allclose(est.var_greenwood, want.to_numpy(), rtol=1e-9, atol=1e-15,
                                   err_msg=label)
        assert not est.adjusted and not est.var_noise.any()


# --------------------------------------------------------------------------- with noise


def test_noisy_release_is_valid_hidden_and_repeatable(tmp_path_factory):
    fed = make_fed(tmp_path_factory, "survival_noisy", seed=5)
    spec = pw.Survival(by="tumour_group", where={"subtype": ["DIPG", "ATRT"]})
    with pw.testing.use_mechanism(fed, pw.testing.seeded_sampler(17)):
        release = fed.run(spec, analyst="km")
    curves, k = release.curves, release.card.k
    surv, lower, upper = curves["survival"], curves["lower"], curves["upper"]
    assert (surv.diff().iloc[1:].fillna(0) <= 0).all().all()  # non-increasing
    values = surv.stack().dropna()
    assert ((values >= 0) & (values <= 1)).all()
    assert (lower.stack() <= surv.stack() + 1e-15).all()
    assert (upper.stack() >= surv.stack() - 1e-15).all()
    assert ((lower.stack() >= 0) & (upper.stack() <= 1)).all()
    assert (curves["at_risk"].stack().dropna() >= k).all()
    hidden = release.extras["suppressed_strata"]
    assert "CNS" not in hidden and len(hidden) >= 9  # DIPG and ATRT are CNS tumours
    for label in hidden:
        assert curves.xs(label, axis=1, level="stratum").isna().all().all()
        assert release.suppressed.loc[label].all() and release.table.loc[label].isna().all()
    assert release.logrank is None or "from noisy counts" in release.logrank.test_name
    card = release.card
    assert "isotonic" in card.postprocessing and "Greenwood" in card.postprocessing
    assert "not drawn" in card.suppression_rule
    assert card.components[0].sensitivity == 1 and card.epsilon_per_cell == 1.0
    spent = fed.budget("km").analyst_spent
    again = fed.run(spec, analyst="km")
    assert again.card.repeated and fed.budget("km").analyst_spent == spent
    pd.testing.assert_frame_equal(again.curves, curves)
    pd.testing.assert_frame_equal(again.table, release.table)


def test_small_strata_are_hidden_and_curves_stop_below_k(fed2):
    spec = pw.Survival(by="sex", horizon_months=12, interval_months=6)
    layout = spec.layout(fed2.schema)
    # F: 3 patients (hidden); M: 40 patients, 36 of them censored in the first interval.
    cells = np.zeros((2, 3, 2), dtype=np.int64)
    cells[0, 0, 1] = 3
    cells[1, 0, 0], cells[1, 0, 1], cells[1, 2, 0] = 36, 2, 2
    noisy = NoisyBlocks({"survival": cells.ravel()}, {"survival": 1.0}, {"survival": 3})
    tables = sv.build_survival(spec, fed2.schema, layout, noisy, 5, 5, suppress=True)
    assert tables.extras["suppressed_strata"] == ("F",)
    assert tables.extras["smallest_stratum"] == sv.stratum_threshold(5, noise_sd(1) ** 2,
                                                                     2)
    curves = tables.extras["curves"]
    assert curves["survival"]["F"].isna().all()
    assert curves["survival"]["M"].tolist()[:2] == [1.0, pytest.approx(38 / 40)]
    assert math.isnan(curves["survival"]["M"][12])  # 2 at risk after 6 months: below k
    assert math.isnan(curves["at_risk"]["M"][6]) and curves["at_risk"]["M"][0] == 40
    assert tables.suppressed.loc["M", "1 year"] and not tables.suppressed.loc["M", "patients"]


def test_monotone_post_processing_removes_noise_rises():
    deaths = np.array([3, -2, 1, 0, -1, 4])
    censored = np.array([0, 1, -1, 2, 0, 0])
    est = sv.kaplan_meier_from_counts(deaths, censored, np.array([20, 30]), np.arange(7), 1.84)
    assert est.adjusted
    assert np.all(np.diff(est.survival) <= 0) and est.survival[0] == 1.0
    assert np.all(np.diff(est.at_risk) <= 0) and np.all(est.at_risk >= 0)
    assert np.all(est.deaths >= 0) and np.all(est.var_noise[1:] > 0)


def coverage_simulation(fed: pw.Federation, pooled: pd.DataFrame, spec: pw.Survival,
                        replicates: int, seed: int, epsilon: Fraction = Fraction(1),
                        min_patients: int = 200) -> tuple[float, int]:
    """Share of (replicate, stratum, landmark) where the released band covers the noiseless
    pooled curve: exact pooled totals + seeded exact discrete Laplace noise, then the
    enclave's own builder, as a release would run."""
    schema = fed.schema
    layout = spec.layout(schema)
    exact = exact_cells(pooled, spec, schema)
    truth = pw.testing.noiseless(fed, spec)
    big = [label for label, n in zip(truth.curves["at_risk"].columns,
                                      truth.curves["at_risk"].iloc[0], strict=True)
           if n >= min_patients]
    scale = Fraction(1) / epsilon
    sampler = pw.testing.seeded_sampler(seed)
    hits = total = 0
    for _ in range(replicates):
        values = np.array(sampler.sample(exact.tolist(), scale), dtype=np.int64)
        noisy = NoisyBlocks({"survival": values}, {"survival": float(scale)},
                            {"survival": noise_interval(scale)})
        curves = sv.build_survival(spec, schema, layout, noisy, 5, 5, True).extras["curves"]
        surv = curves["survival"]
        assert (surv.diff().iloc[1:].fillna(0) <= 0).all().all()
        assert ((surv.fillna(0.5) >= 0) & (surv.fillna(0.5) <= 1)).all().all()
        for label in big:
            for month in LANDMARK_MONTHS:
                true = truth.curves["survival"].loc[month, label]
                lo, hi = curves["lower"].loc[month, label], curves["upper"].loc[month, label]
                hits += bool(lo <= true <= hi)  # a hidden value counts as a miss
                total += 1
    return hits / total, total


def test_bands_cover_the_noiseless_curve_at_1_3_5_years(fed2, pooled2, record_property):
    coverage, n = coverage_simulation(fed2, pooled2, pw.presets.survival("by_tumour_group"),
                                      replicates=30, seed=20251125)
    record_property("km_band_coverage", coverage)
    print(f"\nKM 95% band coverage of the noiseless pooled curve at 1, 3, 5 years, epsilon 1, "
          f"strata of 200+ patients: {coverage:.3f} ({n} comparisons)")
    assert coverage >= 0.90


def test_noise_part_of_the_band_matches_the_spread_of_noisy_curves(fed2, pooled2):
    """The delta-method noise variance against the spread of 200 seeded noisy curves of one
    stratum (CNS): the band must not be too narrow for the noise (it is slightly
    conservative where the monotone fit smooths the noise)."""
    spec = pw.Survival(by="tumour_group", where={"tumour_group": ["CNS"]})
    n_int = spec.n_intervals
    cells = exact_cells(pooled2, spec, fed2.schema).reshape(-1, n_int + 1, 2)
    cns = cells[fed2.schema["tumour_group"].categories.index("CNS")]
    grid = np.array(spec.grid)
    true = sv.kaplan_meier_from_counts(cns[:n_int, 1], cns[:n_int, 0], cns[n_int], grid)
    sampler = pw.testing.seeded_sampler(7)
    sigma2 = noise_sd(1) ** 2
    z = []
    for _ in range(200):
        noisy = np.array(sampler.sample(cns.ravel().tolist(), Fraction(1))).reshape(cns.shape)
        est = sv.kaplan_meier_from_counts(noisy[:n_int, 1], noisy[:n_int, 0], noisy[n_int],
                                          grid, sigma2)
        months = list(LANDMARK_MONTHS)
        z.append((np.log(est.survival[months]) - np.log(true.survival[months]))
                 / np.sqrt(est.var_noise[months]))
    z = np.array(z)
    assert np.all(np.abs(z.mean(axis=0)) < 0.3)  # little bias, in noise SDs
    assert np.all(z.std(axis=0) < 1.15) and np.all(z.std(axis=0) > 0.6)


@st.composite
def survival_specs(draw: st.DrawFn) -> pw.Survival:
    allowed = ["site", "sex", "age_band", "diagnosis_period", "tumour_group", "stage"]
    by = draw(st.lists(st.sampled_from(allowed), max_size=2, unique=True))
    horizons = [12, 24, 60, 120, 288] if len(by) < 2 else [12, 24]  # small vectors
    horizon = draw(st.sampled_from(horizons))
    interval = draw(st.sampled_from([d for d in (1, 2, 3, 6, 12) if horizon % d == 0]))
    where: dict[str, object] = {}
    if draw(st.booleans()):
        where["tumour_group"] = draw(st.lists(st.sampled_from(
            list(pw.schema.TUMOUR_GROUPS)), min_size=1, max_size=3, unique=True))
    if draw(st.booleans()):
        lo = draw(st.integers(2000, 2022))
        where["diagnosis_year"] = (lo, draw(st.integers(lo, 2022)))
    return pw.Survival(by=by, where=where, horizon_months=horizon, interval_months=interval)


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=survival_specs())
def test_any_noiseless_survival_spec_equals_lifelines(fed2, pooled2, spec):
    curves = pw.testing.noiseless(fed2, spec).curves
    for label, rows in strata_of(pooled2, spec, fed2.schema):
        if rows.empty:
            assert curves["survival"][label].isna().all()
            continue
        want = lifelines_km(rows, spec).survival_function_at_times(list(spec.grid))
        np.testing.assert_allclose(curves["survival"][label], want, atol=1e-12, err_msg=label)


@pytest.mark.parametrize("spec", [
    pw.Survival(where={"subtype": ["DIPG"]}),        # a median of about 10 months
    pw.Survival(by="sex", where={"subtype": ["DIPG"]}),
    pw.presets.survival("by_tumour_group"),          # most children survive: not reached
], ids=["dipg", "dipg-by-sex", "by-tumour-group"])
def test_noiseless_medians_equal_lifelines_median_survival_time(fed2, pooled2, spec):
    release = pw.testing.noiseless(fed2, spec)
    medians = pw.survival.median_survival(release)
    for label, rows in strata_of(pooled2, spec, fed2.schema):
        if rows.empty:
            continue
        want = lifelines_km(rows, spec).median_survival_time_
        got = medians.loc[label, "median"]
        if np.isinf(want) or want > spec.horizon_months:
            assert np.isinf(got), label
        else:
            assert got == want and np.isfinite(got), label
        # the interval brackets the median (noiseless: the band is Greenwood's alone)
        assert medians.loc[label, "lower"] <= got <= medians.loc[label, "upper"], label


def test_medians_of_a_noisy_release_come_from_its_own_curves(fed2):
    release = fed2.run(pw.presets.survival("by_tumour_group"), epsilon=0.7, analyst="median")
    medians = pw.survival.median_survival(release)
    assert list(medians.index) == list(release.curves["survival"].columns)
    shown = medians[medians.shown]
    assert ((shown["lower"] <= shown["median"]) & (shown["median"] <= shown["upper"])).all()
