"""Releases: the shape of each table, hidden cells, intervals, the card, and export."""

from __future__ import annotations

import json

import pandas as pd

import pets_widgets as pw
from pets_widgets.core.query import spec_from_dict


def test_crosstab_release_shape_display_and_card(fresh_fed):
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]})
    release = fresh_fed.run(spec)
    assert list(release.table.index)[-1] == "Total" and list(release.table.columns)[-1] == "Total"
    assert release.table.shape == release.suppressed.shape == (13, 5)
    assert release.suppressed.to_numpy().any()  # small cells exist in this small registry
    shown = release.display_table()
    assert (shown.to_numpy()[release.suppressed.to_numpy()] == "<5").all()
    assert release.table.isna().to_numpy()[release.suppressed.to_numpy()].all()
    released = release.table.to_numpy(dtype=float, na_value=float("nan"))
    visible = ~release.suppressed.to_numpy()
    assert (released[visible] >= 5).all()  # nothing below k is ever shown
    lower = release.lower.to_numpy(dtype=float)[visible]
    upper = release.upper.to_numpy(dtype=float)[visible]
    assert ((lower <= released[visible]) & (released[visible] <= upper)).all()
    card = release.card
    assert (card.epsilon, card.k, card.sensitivity, card.noise_scale) == (1.0, 5, 1, 1.0)
    assert card.noise_interval_95 == 3 and card.spec_hash == spec.hash
    assert card.sites == ("NDRS", "NCI") and "OpenDP" in card.mechanism
    assert card.budget_left == 9.0 and card.policy["k"] == 5
    text = card.describe()
    for phrase in ("epsilon 1", "95%", "k=5", "Policy"):
        assert phrase in text
    assert "&lt;5" in release._repr_html_()


def test_export_csv_and_json(fresh_fed):
    release = fresh_fed.run(pw.Histogram(variable="age_at_diagnosis",
                                         where={"tumour_group": ["Retinoblastoma"]}))
    csv = release.to_csv()
    assert csv.splitlines()[0].startswith("age_at_diagnosis")
    if release.suppressed.to_numpy().any():
        assert "<5" in csv
    data = json.loads(release.to_json())
    assert spec_from_dict(data["spec"]) == release.spec
    assert data["card"]["spec_hash"] == release.spec.hash


def test_mean_release_splits_epsilon_and_hides_small_groups(fresh_fed):
    release = fresh_fed.run(pw.Mean(variable="age_at_diagnosis", by=["subtype"]))
    card = release.card
    assert [c.block for c in card.components] == ["count", "sum"]
    assert [c.epsilon for c in card.components] == [0.5, 0.5]
    assert card.components[1].sensitivity == 14 and card.components[1].noise_scale == 28
    n = release.table["n"]
    hidden = release.suppressed["mean"]
    assert (hidden == release.suppressed["n"]).all()
    assert (n[~hidden] >= 5).all()
    means = release.table["mean"][~hidden]
    assert ((means >= 0) & (means <= 14)).all()
    assert (release.lower["mean"][~hidden] <= means).all()
    assert (means <= release.upper["mean"][~hidden]).all()


def test_count_by_one_variable_has_no_margins(fresh_fed):
    release = fresh_fed.run(pw.Count(by=["tumour_group"]))
    assert "Total" not in release.table.index
    assert release.card.margins == "none released"
    assert "secondary" not in release.card.suppression_rule
    assert isinstance(release.table, pd.DataFrame)
