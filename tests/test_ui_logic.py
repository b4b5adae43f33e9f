"""The dashboard's headless logic: menus and specs (forms), progress, HTML (render), and the
epsilon explorer's simulation (explore). No ipywidgets here."""

from __future__ import annotations

import base64
import json
import math
import re
import subprocess
import sys
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest

import pets_widgets as pw
from pets_widgets.coordinator.federation import STAGES
from pets_widgets.coordinator.progress import ProgressModel
from pets_widgets.enclave.pipeline import release as pipeline
from pets_widgets.enclave.pipeline.noise import noise_interval, noise_sd
from pets_widgets.ui import explore, forms, render

SCHEMA = pw.default_schema()


@pytest.fixture(scope="module")
def reference(fed):
    return explore.PublicReference.for_federation(fed)


# --------------------------------------------------------------------------- forms


def test_the_package_never_imports_the_ui_or_the_test_door():
    code = ("import sys, pets_widgets as pw; pw.demo_federation; "
            "bad = [m for m in ('ipywidgets', 'IPython', 'pets_widgets.widgets', "
            "'pets_widgets.testing') if m in sys.modules]; print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_menus_offer_the_base_kinds_and_survival_only_when_it_exists():
    kinds = forms.kinds()
    assert {"crosstab", "count", "mean", "histogram"} <= set(kinds)
    assert ("survival" in kinds) == hasattr(pw, "Survival")
    assert [v for _, v in forms.kind_options()] == list(kinds)


def _all_forms():
    """Every form the menus can produce, field by field (filters sampled per variable)."""
    for kind in forms.kinds():
        base = forms.default_form(SCHEMA, kind)
        yield base
        for name in forms.KIND_FIELDS[kind]:
            for _, value in forms.choices(SCHEMA, base, name):
                form = forms.refit(SCHEMA, replace(base, **{name: value}))
                yield form
                for later in forms.KIND_FIELDS[kind]:
                    for _, v2 in forms.choices(SCHEMA, form, later):
                        yield forms.refit(SCHEMA, replace(form, **{later: v2}))
        for var in forms.filter_variables(SCHEMA, kind):
            values = SCHEMA[var].values
            yield replace(base, filters={var: tuple(values[:2])})
        if forms.year_filter_allowed(SCHEMA, kind):
            yield replace(base, years=(2010, 2014))


def test_every_form_the_menus_can_produce_is_a_valid_spec():
    seen = set()
    for form in _all_forms():
        spec = forms.build_spec(form, SCHEMA)
        spec.validate(SCHEMA)
        seen.add(spec.kind)
        # the spec's JSON round-trips: the UI fills the same spec a notebook user writes
        assert pw.spec_from_json(spec.to_json()) == spec
    assert seen == set(forms.kinds())


def test_columns_never_offer_the_rows_and_refit_moves_them_away():
    form = forms.default_form(SCHEMA, "crosstab")
    cols = [v for _, v in forms.choices(SCHEMA, form, "cols")]
    assert form.rows not in cols and form.cols in cols
    clash = forms.refit(SCHEMA, replace(form, cols=form.rows))
    assert clash.cols != clash.rows
    forms.build_spec(clash, SCHEMA)


def test_second_grouping_excludes_the_first_and_is_empty_without_it():
    form = forms.default_form(SCHEMA, "count")
    assert form.by == "tumour_group"
    by2 = [v for _, v in forms.choices(SCHEMA, form, "by2")]
    assert by2[0] is None and "tumour_group" not in by2 and "sex" in by2
    assert forms.choices(SCHEMA, replace(form, by=None), "by2") == [(forms.NONE_LABEL, None)]
    spec = forms.build_spec(replace(form, by2="sex"), SCHEMA)
    assert spec == pw.Count(by=["tumour_group", "sex"])


def test_filters_and_year_range_become_where_and_empty_means_everyone():
    form = forms.default_form(SCHEMA, "histogram")
    assert forms.build_spec(form, SCHEMA) == pw.Histogram(variable="age_at_diagnosis")
    full = forms.year_bounds(SCHEMA)
    same = replace(form, filters={"sex": ()}, years=full)
    assert forms.build_spec(same, SCHEMA) == pw.Histogram(variable="age_at_diagnosis")
    narrowed = replace(form, filters={"sex": ("F",), "subtype": ("DIPG", "ATRT")},
                       years=(2010, 2019))
    spec = forms.build_spec(narrowed, SCHEMA)
    assert spec == pw.Histogram(variable="age_at_diagnosis", where={
        "sex": ["F"], "subtype": ["ATRT", "DIPG"], "diagnosis_year": (2010, 2019)})


def test_menu_labels_come_from_the_schema():
    form = forms.default_form(SCHEMA, "crosstab")
    assert ("Tumour group (ICCC-3)", "tumour_group") in forms.choices(SCHEMA, form, "rows")
    assert forms.filter_options(SCHEMA, "sex") == [("Female", "F"), ("Male", "M")]
    assert forms.filter_options(SCHEMA, "died") == [("no", False), ("yes", True)]


def test_bad_kind_names_the_field_and_the_allowed_kinds():
    with pytest.raises(pw.QueryValidationError) as err:
        forms.default_form(SCHEMA, "regression")
    assert err.value.field == "kind" and "crosstab" in err.value.allowed


# --------------------------------------------------------------------------- progress


def test_progress_follows_a_real_run_per_site_and_stage(fed):
    model = ProgressModel.for_sites(fed.site_names)
    seen = []

    def report(stage, site, fraction):
        model.update(stage, site, fraction)
        seen.append((stage, site, model.fraction, dict(model.steps)))

    model.start()
    fed.run(pw.Count(by=["sex"]), analyst="progress", progress=report)
    model.finish(True)
    stages = [s for s, *_ in seen]
    assert stages[0] == "attest" and stages[-1] == "release" and "aggregate" in stages
    assert [s for s in STAGES if s in stages] == list(STAGES)
    fractions = [f for _, _, f, _ in seen]
    assert fractions == sorted(fractions) and model.fraction == 1.0
    for stage, site, _, steps in seen:
        if stage == "attest":
            assert steps[site] >= 1
        if stage == "compute":
            assert steps[site] == 2
        if stage == "encrypt":
            assert steps[site] == 3  # this site's encrypted aggregate has arrived
    assert set(model.steps.values()) == {3} and model.state == "done"
    model.finish(False)
    assert model.state == "failed" and model.text == "nothing released"


# --------------------------------------------------------------------------- render


@pytest.fixture(scope="module")
def crosstab_release(fed):
    # rare subtypes by age band: real small cells (stage would give structural zeros only)
    return fed.run(pw.Crosstab(rows="subtype", cols="age_band"), analyst="render")


def test_table_html_marks_every_hidden_cell_and_shows_released_values(crosstab_release):
    rel = crosstab_release
    text = render.table_html(rel, schema=SCHEMA)
    status = rel.cell_status.to_numpy()
    primary = re.findall(r'<td class="[^"]*pw-hidden[^"]*">&lt;5</td>', text)
    complementary = re.findall(r'<td class="[^"]*pw-hidden pw-complementary[^"]*">c</td>',
                               text)
    assert len(primary) == int((status == "primary").sum()) > 0
    assert len(complementary) == int((status == "complementary").sum())
    assert len(primary) + len(complementary) == int(rel.suppressed.to_numpy().sum())
    shown = rel.table.to_numpy(dtype=float, na_value=np.nan)[~rel.suppressed.to_numpy()]
    for value in shown:
        assert f">{int(value)}<" in text
    assert "Rare subtype \\ Age band" in text and 'class="pw-total"' in text
    legend = render.legend_html(rel)
    assert "&lt;5</b>" in legend and "Total" in legend


def test_intervals_follow_each_value_when_asked(crosstab_release):
    text = render.table_html(crosstab_release, intervals=True)
    assert 'class="pw-ci"' in text and "(" in text
    assert 'class="pw-ci"' not in render.table_html(crosstab_release)


def test_card_html_says_epsilon_k_noise_and_budget_in_words(crosstab_release):
    text = render.card_html(crosstab_release.card)
    for phrase in ("ε = 1", "k = 5", "within ±3", "Budget", "spec hash", "secondary"):
        assert phrase in text, phrase


def test_download_links_carry_the_released_csv_and_the_json_card(crosstab_release):
    text = render.download_html(crosstab_release)
    csv_b64 = re.search(r'download="[^"]+\.csv" href="data:text/csv;charset=utf-8;base64,'
                        r'([^"]+)"', text).group(1)
    assert base64.b64decode(csv_b64).decode() == crosstab_release.to_csv()
    assert "&lt;5" not in base64.b64decode(csv_b64).decode()
    assert f'download="{crosstab_release.file_stem()}.csv"' in text and ".json" in text
    assert 'download="crosstab_subtype_by_age-band_20' in text


@pytest.mark.parametrize("exc, words", [
    (pw.BudgetExceeded("analyst_budget", "epsilon 1 would take analyst 'a' past ..."),
     ["privacy budget", "asking the same question again is free"]),
    (pw.QueryRefused("min_subset", "the filter selects fewer than 10"),
     ["rule: min_subset", "Widen the filters"]),
    (pw.SiteError("NDRS", "ConnectionError: gone"), ["site NDRS failed", "no budget"]),
    (pw.QueryValidationError("cols", "must differ", ["sex"]), ["Not a valid query (cols)"]),
    (RuntimeError("boom <b>"), ["Something went wrong", "RuntimeError: boom &lt;b&gt;"]),
])
def test_errors_are_clear_messages_never_tracebacks(exc, words):
    text = render.error_html(exc)
    for word in words:
        assert word in text
    assert "Traceback" not in text and "<b>boom" not in text


def test_audit_and_status_html(fed, crosstab_release):
    text = render.audit_html(fed.audit_log("render"))
    assert "Number of patients by rare subtype and age band" in text and "released" in text
    assert render.audit_html(fed.audit_log("nobody")).startswith('<div class="pw-note">')
    status = render.status_html(fed.status())
    assert "NDRS" in status and "online" in status and "about 3,000 patients" in status
    down = pd.DataFrame({"backend": ["kernel", "kernel"], "alive": [True, False],
                         "rows": [3000, None], "state": ["up", "down"],
                         "detail": ["", "kernel died (exit -9)"]}, index=["A", "B"])
    text = render.status_html(down)
    assert text.count("● online") == 1 and "● offline: kernel died (exit -9)" in text


def test_numbers_print_plainly():
    assert [render.number(v) for v in (5, 5.0, 0.123456, 12345.6, float("nan"), True)] == [
        "5", "5", "0.1235", "12346", "", "yes"]


# --------------------------------------------------------------------------- explore


def test_discrete_laplace_pmf_and_cdf_agree():
    for scale in (0.5, 1.0, 7.3):
        x = np.arange(-400, 401)
        p = explore.pmf(x, scale)
        assert math.isclose(p.sum(), 1.0, rel_tol=1e-9)
        np.testing.assert_allclose(explore.cdf(x, scale), np.cumsum(p), atol=1e-9)
        a = noise_interval(scale)
        assert p[np.abs(x) <= a].sum() >= 0.95 > p[np.abs(x) <= a - 1].sum()


def test_simulated_noise_has_the_published_spread():
    rng = np.random.default_rng(1)  # a simulation on public data: seeding is fine here
    for scale in (1.0, 4.0):
        draws = explore.sample_noise(200_000, scale, rng)
        sd = noise_sd(scale)
        assert abs(draws.std() - sd) < 0.02 * sd and abs(draws.mean()) < 0.05 * sd


def test_probability_hidden_is_exact():
    # a cell of true value 5 is hidden when the noise is -1 or less: P = q/(1+q)
    q = math.exp(-1.0)
    assert math.isclose(explore.probability_hidden(np.array([5]), 5, 1.0)[0], q / (1 + q))
    assert explore.probability_hidden(np.array([0]), 5, 1e-9)[0] == pytest.approx(1.0)


def test_simulation_intervals_shrink_as_epsilon_grows(reference, fed):
    spec = pw.Crosstab(rows="subtype", cols="stage")
    sims = [explore.simulate(reference, spec, eps, 5, fed.policy) for eps in (0.1, 1.0, 5.0)]
    intervals = [s.blocks[0].interval95 for s in sims]
    assert intervals[0] > intervals[1] > intervals[2]
    assert intervals[1] == noise_interval(1.0)
    assert all(s.count_cells == 24 and 0 < s.expected_hidden < 24 for s in sims)
    assert sims[2].notes and "above the policy maximum" in sims[2].notes[0]
    assert "SIMULATED" in sims[0].release.card.mechanism
    assert "no privacy budget is spent" in sims[0].source


def test_expected_hidden_cells_match_monte_carlo(reference):
    spec = pw.Count(by=["subtype", "sex"], where={"age_band": ["<1"]})
    exact = reference.cells(spec)["count"]
    rng = np.random.default_rng(2)
    scale, k = 2.0, 5
    predicted = explore.probability_hidden(exact, k, scale).sum()
    draws = np.stack([exact + explore.sample_noise(exact.size, scale, rng)
                      for _ in range(20_000)])
    assert abs((draws < k).sum(axis=1).mean() - predicted) < 0.05


def test_means_get_monte_carlo_errors_and_k_matters(reference, fed):
    spec = pw.Mean(variable="age_at_diagnosis", by=["subtype"])
    sim = explore.simulate(reference, spec, 0.2, 5, fed.policy, draws=50, time_budget=5,
                           rng=np.random.default_rng(3))
    assert sim.draws == 50 and sim.error95 is not None
    assert [b.name for b in sim.blocks] == ["count", "sum"]
    assert sim.blocks[1].scale == pytest.approx(14 / 0.1)
    low_k = explore.simulate(reference, pw.Crosstab(rows="subtype", cols="stage"), 1.0, 1)
    high_k = explore.simulate(reference, pw.Crosstab(rows="subtype", cols="stage"), 1.0, 20)
    assert low_k.expected_hidden < high_k.expected_hidden
    assert "below the policy minimum" in low_k.notes[0]


def test_the_explorer_spends_no_budget_and_writes_no_audit_row(fed, reference):
    before = (fed.budget("explorer"), len(fed.audit_log()))
    explore.simulate(reference, pw.Histogram(variable="age_at_diagnosis"), 0.5, 5)
    assert (fed.budget("explorer"), len(fed.audit_log())) == before


def test_block_scale_is_the_enclaves():
    assert pipeline.block_scale(14, Fraction(1), Fraction(1, 2)) == 28


@pytest.mark.parametrize("spec", [pw.Crosstab(rows="sex", cols="age_band"),
                                  pw.Count(by=["tumour_group"], where={"sex": ["F"]})])
def test_a_card_rule_changed_in_one_place_shows_in_a_release_and_a_simulation(
        fed, reference, monkeypatch, spec):
    """The explorer runs the enclave's own pipeline: it cannot describe a release differently
    (it once dropped the secondary rule's "to within" clause and the tables' own rule)."""
    monkeypatch.setattr(pipeline, "PRIMARY_RULE", "primary: CHANGED IN ONE PLACE, k={k}")
    monkeypatch.setattr(pipeline, "SECONDARY_RULE", "secondary: within {protection}")
    released = fed.run(spec, analyst="one-pipeline")
    simulated = explore.simulate(reference, spec, 1.0, 5).release
    assert released.card.suppression_rule == simulated.card.suppression_rule
    assert released.card.suppression_rule.startswith("primary: CHANGED IN ONE PLACE, k=5")
    if isinstance(spec, pw.Crosstab):
        assert f"secondary: within {fed.policy.protection}" in released.card.suppression_rule
    assert released.card.postprocessing == simulated.card.postprocessing
    assert released.card.components == simulated.card.components


def test_the_download_notebook_rebuilds_the_same_question(crosstab_release):
    text = render.download_html(crosstab_release)
    nb_b64 = re.search(r'download="[^"]+\.ipynb" href="data:application/x-ipynb\+json;'
                       r'charset=utf-8;base64,([^"]+)"', text).group(1)
    notebook = json.loads(base64.b64decode(nb_b64).decode())
    code = "".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert crosstab_release.spec.to_json() in code and "fed.run(spec" in code


def test_a_survival_result_shows_percentages_medians_and_the_logrank_test(fed):
    # Two large strata: both shown, so the log-rank test is there whatever the noise.
    release = fed.run(pw.Survival(by="sex", where={"tumour_group": ["CNS"]}), epsilon=1.0,
                      analyst="render")
    shown = release.display_table(intervals=True)
    one_year = shown["1 year"][release.cell_status["1 year"] == "shown"]
    assert one_year.str.fullmatch(r"\d{1,3}\.\d% \(\d{1,3}\.\d-\d{1,3}\.\d\)").all()
    text = render.release_html(release)
    assert "median survival (months)" in text and "Log-rank test across" in text
    assert "from the noisy counts" in text and "p = " in text
    medians = pw.survival.median_survival(release)
    for label, row in medians[medians.shown].iterrows():
        assert f"<th>{label}</th><td>{render._months(row['median'])}</td>" in text


def test_the_explorers_noise_axis_stays_fixed_while_epsilon_moves_and_sims_are_marked(reference):
    from pets_widgets.enclave.pipeline.noise import noise_interval
    from pets_widgets.ui import plots

    limits = []
    for epsilon in (0.1, 1.0, 5.0):
        block = explore.NoiseBlock("count", epsilon, 1, 1 / epsilon, 0.0,
                                   noise_interval(1 / epsilon), 48, None)
        limits.append(explore.noise_figure([block], epsilon).axes[0].get_xlim())
    assert limits[0] == limits[1] == limits[2]  # one axis at every epsilon: the noise moves
    sim = explore.simulate(reference, pw.Survival(by="sex"), epsilon=0.5, k=5)
    fig = plots.plot(sim.release)
    assert any(t.get_gid() == plots.SIMULATED_GID and t.get_text() == "SIMULATED"
               for t in fig.texts)
