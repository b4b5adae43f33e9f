"""The widgets driven in plain Python: set values, click, read the result areas."""

from __future__ import annotations

import asyncio
import re

import pytest

import pets_widgets as pw
from pets_widgets.ui import forms
from pets_widgets.ui.widgets import app as widget_app
from tests.conftest import make_fed

W = pytest.importorskip("ipywidgets")


@pytest.fixture
def fed(fresh_fed):
    """Each widget test gets a federation with a new ledger (the shared ``fresh_fed``)."""
    return fresh_fed


def visible(widget) -> bool:
    return widget.layout.display != "none"


def crosstab(qb, rows: str, cols: str) -> None:
    qb.kind.value = "crosstab"
    qb.fields["rows"].value = rows
    qb.fields["cols"].value = cols


# --------------------------------------------------------------------------- QueryBuilder


def test_lazy_attribute_and_public_names():
    for name in ("QueryBuilder", "EpsilonExplorer", "AuditView", "Dashboard", "dashboard"):
        assert hasattr(pw.widgets, name)


def test_crosstab_by_clicking_shows_values_hidden_cells_card_budget_and_download(fed):
    qb = pw.widgets.QueryBuilder(fed)
    assert "pw-run" in qb.run_button._dom_classes
    crosstab(qb, "subtype", "age_band")  # rare subtypes by age: real small cells
    assert qb.spec == pw.Crosstab(rows="subtype", cols="age_band")
    qb.run_button.click()
    rel = qb.release
    assert rel is not None and qb.error is None
    table = qb.table.value
    n_hidden = int(rel.suppressed.to_numpy().sum())
    status = rel.cell_status.to_numpy()
    assert n_hidden > 0 and table.count("&lt;5</td>") == int((status == "primary").sum())
    assert table.count(">c</td>") == int((status == "complementary").sum())
    assert re.search(r'<td class="">\d+</td>', table)  # a released value
    assert "ε = 1" in qb.card.value and "k = 5" in qb.card.value
    assert "9</b> of 10" in qb.budget.value
    assert "Download table (CSV)" in qb.downloads.value
    assert qb.message.value.count("Released") == 1
    assert qb.progress.overall.value == 1.0
    assert {b.value for b in qb.progress.site_bars.values()} == {3}
    assert not qb.run_button.disabled


def test_asking_again_returns_the_stored_release_and_says_so(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.run()
    qb.run()
    assert "Asked before" in qb.message.value and qb.release.card.repeated
    assert "9</b> of 10" in qb.budget.value


def test_each_kind_shows_only_its_own_menus(fed):
    qb = pw.widgets.QueryBuilder(fed)
    for kind in forms.kinds():
        qb.kind.value = kind
        shown = {name for name, w in qb.fields.items() if visible(w)}
        assert shown == set(forms.KIND_FIELDS[kind]), kind
        assert qb.spec.kind == kind
        assert not qb.run_button.disabled


def test_dependent_menus_cannot_build_an_invalid_spec(fed):
    qb = pw.widgets.QueryBuilder(fed)
    crosstab(qb, "tumour_group", "age_band")
    assert "tumour_group" not in [v for _, v in qb.fields["cols"].options]
    qb.fields["rows"].value = "age_band"  # the columns held age_band: they move away
    assert qb.fields["cols"].value != "age_band"
    assert qb.spec.rows == "age_band"
    qb.kind.value = "count"
    qb.fields["by"].value = "sex"
    assert "sex" not in [v for _, v in qb.fields["by2"].options]
    qb.fields["by2"].value = "age_band"
    qb.fields["by"].value = ""  # no first grouping: the second goes too
    assert qb.fields["by2"].value == "" and qb.spec == pw.Count()


def test_filters_and_years_reach_the_spec(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.kind.value = "histogram"
    qb.filters["sex"].value = ("F",)
    qb.years.value = (2010, 2019)
    assert qb.spec == pw.Histogram(variable="age_at_diagnosis",
                                   where={"sex": ["F"], "diagnosis_year": (2010, 2019)})
    assert "Year of diagnosis: 2010 to 2019" in qb.spec_text.value  # in words, not field names
    qb.run_button.click()
    assert qb.release is not None and "age_at_diagnosis (years)" in qb.table.value


def test_means_show_their_intervals(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.kind.value = "mean"
    qb.run_button.click()
    assert qb.release.spec.kind == "mean"
    assert 'class="pw-ci"' in qb.table.value and "95% interval" in qb.table.value


def test_interval_checkbox_redraws_counts_with_intervals(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.run_button.click()
    assert 'class="pw-ci"' not in qb.table.value
    qb.intervals.value = True
    assert 'class="pw-ci"' in qb.table.value


def test_a_refusal_is_a_message_in_the_result_area_not_a_traceback(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.kind.value = "histogram"
    qb.filters["subtype"].value = ("PPB",)
    qb.filters["age_band"].value = ("<1",)
    qb.years.value = (2021, 2022)
    qb.run_button.click()
    assert qb.release is None and isinstance(qb.error, pw.QueryRefused)
    assert "pw-error" in qb.message.value and "min_subset" in qb.message.value
    assert "Traceback" not in qb.message.value and qb.table.value == ""
    assert qb.progress.model.state == "failed" and not qb.run_button.disabled
    assert "9</b> of 10" in qb.budget.value  # the subset check drew noise: charged to you


def test_budget_refusal_and_epsilon_limited_by_policy(tmp_path_factory):
    fed = make_fed(tmp_path_factory, "budget", seed=5,
                   policy=pw.Policy(max_epsilon=0.5, analyst_budget=0.5,
                                    federation_budget=1.0))
    qb = pw.widgets.QueryBuilder(fed)
    assert max(v for _, v in qb.epsilon.options) == 0.5 and qb.epsilon.value == 0.5
    assert qb.k.min == 5
    qb.run_button.click()
    assert qb.release is not None
    qb.kind.value = "count"
    qb.run_button.click()
    assert isinstance(qb.error, pw.BudgetExceeded)
    assert "privacy budget" in qb.message.value and "0</b> of 0.5" in qb.budget.value


def test_a_failing_site_is_named_in_the_result_area(fed, monkeypatch):
    site = fed._sites[0]

    def broken(request):
        raise ConnectionError("registry offline")

    monkeypatch.setattr(site, "respond", broken)
    qb = pw.widgets.QueryBuilder(fed)
    qb.run_button.click()
    assert isinstance(qb.error, pw.SiteError)
    assert f"site {site.name} failed" in qb.message.value
    assert "registry offline" in qb.message.value and "Traceback" not in qb.message.value


def test_unexpected_errors_are_caught_and_logged(fed, monkeypatch, caplog):
    def boom(*args, **kwargs):
        raise RuntimeError("bug")

    monkeypatch.setattr(fed, "run", boom)
    qb = pw.widgets.QueryBuilder(fed)
    qb.run_button.click()
    assert "Something went wrong" in qb.message.value and "RuntimeError: bug" in qb.message.value
    assert "query failed" in caplog.text


def test_run_is_disabled_while_the_form_is_not_a_valid_spec(fed, monkeypatch):
    qb = pw.widgets.QueryBuilder(fed)

    def invalid(form, schema):
        raise pw.QueryValidationError("rows", "not allowed", ["sex"])

    monkeypatch.setattr(forms, "build_spec", invalid)
    qb.fields["rows"].value = "sex"
    assert qb.run_button.disabled and "Not a valid query (rows)" in qb.spec_text.value
    assert qb.run() is None


def test_analyst_name_changes_the_budget_line(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.analyst.value = "alice"
    qb.run_button.click()
    assert "alice" in qb.budget.value and "9</b> of 10" in qb.budget.value
    qb.analyst.value = "bob"
    assert "bob" in qb.budget.value and "10</b> of 10" in qb.budget.value


@pytest.mark.skipif(not hasattr(pw, "Survival"), reason="survival analysis (issue 5) not merged")
def test_survival_preset_by_clicking(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.kind.value = "survival"
    presets = [v for _, v in qb.fields["preset"].options]
    assert presets == list(pw.presets.names())
    qb.fields["preset"].value = "overall"
    qb.run_button.click()
    assert qb.release is not None and qb.release.spec.kind == "survival", qb.message.value
    assert "<img" in qb.plot.value


def test_a_plot_appears_with_every_release(fed):
    qb = pw.widgets.QueryBuilder(fed)
    for kind in ("crosstab", "histogram", "mean", "count"):
        qb.kind.value = kind
        qb.run_button.click()
        assert 'src="data:image/png;base64,' in qb.plot.value, kind


# --------------------------------------------------------------------------- EpsilonExplorer


def test_explorer_updates_with_epsilon_and_k_and_spends_nothing(fed):
    before = (fed.budget(), len(fed.audit_log()))
    ex = pw.widgets.EpsilonExplorer(fed, pw.Crosstab(rows="subtype", cols="age_band"))
    ex.refresh()
    assert "public synthetic registries" in ex.source.value
    assert "within ±3" in ex.summary.value and "no budget spent" in ex.summary.value
    assert 'src="data:image/png;base64,' in ex.figure.value
    assert "&lt;5</td>" in ex.table.value
    ex.epsilon.value = 0.1  # no running event loop here: updates at once
    assert ex.epsilon_value == 0.1 and "within ±30" in ex.summary.value
    hidden_k5 = ex.simulation.expected_hidden
    ex.k.value = 15
    assert ex.simulation.expected_hidden > hidden_k5 and "k=15" in ex.summary.value
    ex.epsilon.value = 10.0
    assert "above the policy maximum" in ex.summary.value
    assert (fed.budget(), len(fed.audit_log())) == before


def test_explorer_follows_a_new_spec(fed):
    ex = pw.widgets.EpsilonExplorer(fed)
    ex.set_spec(pw.Mean(variable="age_at_diagnosis", by=["sex"]))
    assert "Mean age at diagnosis by sex" in ex.spec_text.value
    assert "sum</b>: noise scale 28" in ex.summary.value
    assert "95% error of the released values" in ex.summary.value and "mean ±" in ex.summary.value


@pytest.mark.skipif(not hasattr(pw, "Survival"), reason="survival analysis (issue 5) not merged")
def test_explorer_shows_the_kaplan_meier_error(fed):
    ex = pw.widgets.EpsilonExplorer(fed, pw.presets.survival("overall"))
    ex.refresh()
    assert "Kaplan-Meier curve error" in ex.summary.value
    small = ex.simulation.curve_error95
    ex.epsilon.value = 0.1
    assert ex.simulation.curve_error95 > small


def test_debouncer_coalesces_a_burst_inside_an_event_loop():
    from pets_widgets.ui.widgets._common import Debouncer

    calls = []
    debounced = Debouncer(lambda x: calls.append(x), wait=0.05)

    async def burst():
        for i in range(10):
            debounced(i)
        assert calls == [] and debounced.pending
        await asyncio.sleep(0.2)

    asyncio.run(burst())
    assert calls == [9]
    debounced("now")  # no running loop: at once
    assert calls == [9, "now"]


# --------------------------------------------------------------------------- AuditView, Dashboard


def test_audit_view_lists_outcomes_reasons_and_budget(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.analyst.value = "carol"
    qb.run_button.click()
    qb.kind.value = "histogram"
    qb.filters["subtype"].value = ("PPB",)
    qb.filters["age_band"].value = ("<1",)
    qb.years.value = (2021, 2022)
    qb.run_button.click()
    view = pw.widgets.AuditView(fed, analyst="carol")
    assert "1 released" in view.counts.value and "1 refused" in view.counts.value
    assert "min_subset" in view.table.value
    assert "Number of patients by tumour group (ICCC-3) and age band" in view.table.value
    assert "carol" in view.budget.value and "8</b> of 10" in view.budget.value  # and the check
    view.analyst.value = "nobody"
    assert "No queries yet" in view.table.value
    view.everyone.value = True
    assert "carol" in view.table.value


def test_dashboard_wires_builder_explorer_audit_and_status(fed):
    app = pw.widgets.Dashboard(fed)
    assert [app.tabs.get_title(i) for i in range(3)] == list(widget_app.TAB_TITLES)
    assert "NDRS" in app.status.value and "online" in app.status.value
    app.builder.kind.value = "histogram"
    assert app.explorer.spec == pw.Histogram(variable="age_at_diagnosis")
    app.tabs.selected_index = 1
    assert "Distribution of" in app.explorer.spec_text.value and "±3" in app.explorer.summary.value
    app.builder.run_button.click()
    assert "Distribution of age at diagnosis" in app.audit.table.value


def test_dashboard_without_a_federation_builds_the_demo(monkeypatch, tmp_path):
    monkeypatch.delenv(widget_app.CONFIG_ENV, raising=False)
    app = pw.widgets.dashboard(key_bits=1024, rows_per_site=2_000,
                               ledger=tmp_path / "ledger.sqlite")
    try:
        assert app.fed.site_names == ("NDRS", "NCI")
        assert set(app.fed.status().backend) == {"service"}  # each site its own service
        assert isinstance(app.builder, pw.widgets.QueryBuilder)
    finally:
        app.fed.close()


def test_dashboard_runs_on_the_sites_of_a_configuration_file(monkeypatch, tmp_path):
    config = tmp_path / "sites.toml"
    config.write_text(
        "[federation]\nkey_bits = 1024\n"
        + "".join(f'[[sites]]\nname = "{n}"\nbackend = "local"\n'
                  f'source = {{ kind = "synthetic", seed = 3, size = 800 }}\n' for n in "AB"))
    monkeypatch.setenv(widget_app.CONFIG_ENV, str(config))  # as the dashboard command sets
    app = pw.widgets.dashboard(ledger=tmp_path / "ledger.sqlite")
    assert app.fed.site_names == ("A", "B")
    assert "sites.toml" in app.children[1].children[0].value
    app.builder.kind.value = "count"
    app.builder.run_button.click()
    assert app.builder.release is not None, app.builder.message.value


def test_a_dashboard_on_real_registry_files_needs_a_lasting_ledger(tmp_path):
    from pathlib import Path

    csv = Path(__file__).resolve().parents[1] / "examples" / "registry_example.csv"
    text = (f'[[sites]]\nname = "NORDIC"\nbackend = "local"\n'
            f'source = {{ kind = "csv", path = "{csv}" }}\n')
    (tmp_path / "real.toml").write_text("[federation]\nkey_bits = 1024\n" + text)
    with pytest.raises(pw.ConfigError, match="ledger"):
        pw.widgets.dashboard(config=tmp_path / "real.toml")
    (tmp_path / "kept.toml").write_text(
        '[federation]\nkey_bits = 1024\nledger = "kept.sqlite"\n' + text)
    for _ in range(2):  # two page loads: one budget, one audit log
        app = pw.widgets.dashboard(config=tmp_path / "kept.toml")
        app.builder.kind.value = "count"
        app.builder.run_button.click()
    assert app.fed.ledger.path == tmp_path / "kept.sqlite"
    assert list(app.fed.audit_log().outcome) == ["released", "repeated"]


def test_incidence_rates_by_clicking_show_the_rates_their_standard_and_bars(fed):
    qb = pw.widgets.QueryBuilder(fed)
    qb.kind.value = "incidence"
    qb.run_button.click()
    rel = qb.release
    assert rel is not None and rel.spec.kind == "incidence", qb.message.value
    assert "per million" in qb.table.value.lower() or "per million" in qb.card.value.lower()
    assert "Segi" in qb.card.value
    assert 'src="data:image/png;base64,' in qb.plot.value
