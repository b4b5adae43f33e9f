"""Plots: figures are returned (never shown), draw released numbers only, and carry the
expected artists: curves, the number-at-risk table, the note of hidden strata, bars."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pandas as pd
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure

import pets_widgets as pw
from pets_widgets.core.release import TOTAL

from .conftest import make_fed


@pytest.fixture(scope="module")
def noisy_fed(tmp_path_factory: pytest.TempPathFactory) -> pw.Federation:
    fed = make_fed(tmp_path_factory, "plots", seed=13)
    with pw.testing.use_mechanism(fed, pw.testing.seeded_sampler(99)):
        yield fed


def run(fed: pw.Federation, spec: pw.QuerySpec) -> pw.Release:
    return fed.run(spec, analyst="plots")


def texts(fig: Figure, gid: str) -> list:
    return [t for t in fig.findobj(lambda a: a.get_gid() == gid)]


def test_km_plot_draws_released_curves_at_risk_numbers_and_hidden_note(noisy_fed):
    release = run(noisy_fed, pw.Survival(by="tumour_group",
                                         where={"subtype": ["DIPG", "ATRT"]}))
    hidden = release.extras["suppressed_strata"]
    assert hidden  # the non-CNS groups hold no DIPG or ATRT patients
    fig = pw.plots.plot(release)
    assert isinstance(fig, Figure) and fig._repr_png_().startswith(b"\x89PNG")
    ax = fig.axes[0]
    curves = release.curves
    drawn = [s for s in curves["survival"].columns if curves["survival"][s].notna().any()]
    lines = {line.get_label(): line for line in ax.get_lines()
             if not line.get_label().startswith("_")}
    assert sorted(lines) == sorted(drawn) and "CNS" in lines
    for stratum, line in lines.items():
        np.testing.assert_array_equal(line.get_ydata(), curves["survival"][stratum].to_numpy())
    assert not set(hidden) & set(lines)
    assert len(ax.collections) == len(drawn)  # one band per drawn curve

    # The at-risk table: every number is the released one (or <k where none was released).
    ticks = list(ax.get_xticks())
    assert ticks == [0, 12, 24, 36, 48, 60]
    cells = texts(fig, pw.plots.AT_RISK_GID)
    assert len(cells) == len(drawn) * len(ticks)
    k = release.card.k
    for cell in cells:
        t, row = cell.get_position()
        value = curves["at_risk"].loc[t, drawn[int(row)]]
        assert cell.get_text() == (f"<{k}" if pd.isna(value) else f"{value:.0f}")
    labels = [t.get_text() for t in texts(fig, pw.plots.AT_RISK_LABEL_GID)]
    assert labels == drawn

    (note,) = texts(fig, pw.plots.NOTE_GID)
    for stratum in hidden:
        assert stratum in note.get_text()


def test_km_plot_of_one_stratum_without_hidden_strata_has_no_note(fed2):
    release = pw.testing.noiseless(fed2, pw.presets.survival("overall"))
    fig = pw.plots.plot_survival(release, bands=False)
    assert [ln.get_label() for ln in fig.axes[0].get_lines()] == ["All patients"]
    assert not texts(fig, pw.plots.NOTE_GID)
    assert not fig.axes[0].collections
    at_risk = [t.get_text() for t in texts(fig, pw.plots.AT_RISK_GID)]
    assert at_risk == [f"{v:.0f}" for v in release.curves["at_risk"]["All patients"].loc[
        [0, 12, 24, 36, 48, 60]]]


def bars_of(fig: Figure) -> list:
    return [c for c in fig.axes[0].containers if isinstance(c, BarContainer)]


def test_incidence_bars_show_released_rates_with_intervals(noisy_fed):
    release = run(noisy_fed, pw.IncidenceRate(by="tumour_group", where={"sex": ["F"]}))
    fig = pw.plots.plot(release)
    shown = ~release.suppressed["asr"].to_numpy()
    (bars,) = bars_of(fig)
    heights = [p.get_height() for p in bars.patches]
    np.testing.assert_allclose(heights, release.table["asr"].to_numpy(float)[shown])
    assert fig.axes[0].collections  # the interval whiskers
    assert len(texts(fig, pw.plots.HIDDEN_GID)) == int((~shown).sum())
    assert "per million" in fig.axes[0].get_ylabel()


@pytest.mark.parametrize("spec", [
    pw.Count(by=["tumour_group"]),
    pw.Count(by=["sex", "age_band"]),
    pw.Crosstab(rows="tumour_group", cols="age_band"),
    pw.Mean(variable="age_at_diagnosis", by=["tumour_group"]),
    pw.Histogram(variable="age_at_diagnosis", where={"tumour_group": ["Retinoblastoma"]}),
], ids=lambda s: s.kind)
def test_bar_charts_show_released_values_and_mark_hidden_ones(noisy_fed, spec):
    release = run(noisy_fed, spec)
    fig = pw.plots.plot(release)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    heights = sorted(p.get_height() for c in bars_of(fig) for p in c.patches)
    table, hidden = release.table, release.suppressed
    if spec.kind == "crosstab":
        inner = (slice(None, -1), slice(None, -1))
        table, hidden = table.iloc[inner], hidden.iloc[inner]
    elif spec.kind == "count" and len(spec.by) == 2:
        keep = [i for i, key in enumerate(table.index) if TOTAL not in key]
        table, hidden = table.iloc[keep], hidden.iloc[keep]
    column = "mean" if spec.kind == "mean" else None
    values = (table[column] if column else table).to_numpy(float).ravel()
    mask = (hidden[column] if column else hidden).to_numpy(bool).ravel()
    np.testing.assert_allclose(heights, sorted(values[~mask]))
    assert len(texts(fig, pw.plots.HIDDEN_GID)) == int(mask.sum())


def test_plots_never_use_pyplot_or_force_a_backend():
    source = inspect.getsource(pw.plots)
    imported = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            imported.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.update(f"{node.module}.{a.name}" for a in node.names)
    assert not any("pyplot" in name for name in imported)
    assert "MPLBACKEND" not in source and "matplotlib.use(" not in source


def test_dispatcher_refuses_a_release_it_cannot_draw(fed2):
    release = pw.testing.noiseless(fed2, pw.Count())
    fake = pw.Release(pw.Survival(), release.table, release.suppressed, release.card,
                      release.lower, release.upper)
    with pytest.raises(pw.QueryValidationError) as info:
        pw.plots.plot(fake)
    assert info.value.field == "release"
