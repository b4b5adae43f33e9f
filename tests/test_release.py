"""Releases: the shape of each table, hidden cells, intervals, the card, and export."""

from __future__ import annotations

import json

import numpy as np
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
    status = release.cell_status.to_numpy()
    hidden = release.suppressed.to_numpy()
    assert ((status == "primary") | (status == "complementary"))[hidden].all()
    assert not ((status == "primary") | (status == "complementary"))[~hidden].any()
    # A primary cell reads "<5"; one hidden only to protect another reads "c" (it may be big).
    assert (shown.to_numpy()[status == "primary"] == "<5").all()
    assert (shown.to_numpy()[status == "complementary"] == "c").all()
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
    assert "<5" not in csv  # numbers only: hidden cells are empty, with their status
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


def test_cell_status_tells_primary_complementary_and_structural_cells_apart(fresh_fed):
    """Primary cells are exactly the hidden ones whose noisy value was below k (checked
    with a seeded sampler, whose noisy values the test can see); complementary cells were
    hidden only to protect them; structural zeros are shown as 0."""
    from pets_widgets.enclave.pipeline.tables import _with_margins

    class Recording:  # the seeded sampler, keeping the noise it drew
        def __init__(self):
            self.inner, self.drawn = pw.testing.seeded_sampler(11), []
            self.name = self.inner.name

        def sample(self, values, scale):
            out = self.inner.sample(values, scale)
            self.drawn.append(np.asarray(out) - np.asarray(values))
            return out

    spec = pw.Crosstab(rows="subtype", cols="tumour_group", where={"diagnosis_year": (2015,
                                                                                     2016)})
    recording = Recording()
    with pw.testing.use_mechanism(fresh_fed, recording):
        release = fresh_fed.run(spec, epsilon=0.5, analyst="status")
    exact = pw.testing.noiseless(fresh_fed, spec)  # the canonical orientation's totals
    block = spec.layout(fresh_fed.schema).blocks[0]
    cells = exact.table.to_numpy(dtype=float)[:-1, :-1]
    if block.dims[0].name != exact.spec.rows:
        cells = cells.T
    inner = np.maximum(cells.ravel() + recording.drawn[0], 0).reshape(block.shape)
    if block.dims[0].name != spec.rows:
        inner = inner.T
    status = release.cell_status
    inner[status.to_numpy()[:-1, :-1] == "structural"] = 0  # certain zeros carry no noise
    noisy = _with_margins(inner)
    assert status.shape == release.table.shape
    assert set(np.unique(status.to_numpy())) <= {"shown", "primary", "complementary",
                                                 "structural"}
    structural = status.to_numpy() == "structural"
    assert structural.any()  # a subtype outside its tumour group
    assert (release.table.to_numpy(dtype=float, na_value=-1)[structural] == 0).all()
    assert (release.display_table().to_numpy()[structural] == "0").all()
    hidden = release.suppressed.to_numpy()
    assert not (hidden & structural).any()
    primary = status.to_numpy() == "primary"
    assert primary.any() and (status.to_numpy() == "complementary").any()
    np.testing.assert_array_equal(primary, hidden & (noisy < 5))  # below k: primary
    # The repeat (stored release) and the transposed question keep the statuses.
    again = fresh_fed.run(spec, epsilon=0.5, analyst="status")
    assert again.card.repeated and again.cell_status.equals(status)
    swapped = fresh_fed.run(pw.Crosstab(rows="tumour_group", cols="subtype",
                                        where={"diagnosis_year": (2015, 2016)}), epsilon=0.5,
                            analyst="status")
    assert swapped.cell_status.equals(status.T)


def test_the_csv_reads_as_numbers_with_a_status_column_and_a_sidecar(fresh_fed, tmp_path):
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]})
    release = fresh_fed.run(spec, analyst="csv")
    path = tmp_path / f"{release.file_stem()}.csv"
    assert path.name.startswith("crosstab_tumour-group_by_age-band_20")
    release.to_csv(path)
    table = pd.read_csv(path)
    assert list(table.columns) == ["tumour_group", "age_band", "value", "lower", "upper",
                                   "status"]
    assert all(str(table[c].dtype) == "float64" for c in ("value", "lower", "upper"))
    status = release.cell_status.to_numpy().ravel()
    assert list(table.status) == list(status)
    hidden = table.status.isin(["primary", "complementary"])
    assert table.value[hidden].isna().all() and table.lower[hidden].isna().all()
    shown = release.table.to_numpy(dtype=float, na_value=np.nan).ravel()
    np.testing.assert_array_equal(table.value.to_numpy(), shown)
    sidecar = json.loads(path.with_name(path.name + ".json").read_text())
    assert sidecar["spec_hash"] == spec.hash and sidecar["k"] == 5
    assert spec_from_dict(sidecar["spec"]) == release.spec
    assert sidecar["filters"] == {"sex": ["F"]} and "complementary" in sidecar["statuses"]


def test_a_survival_csv_carries_the_curves(fresh_fed, tmp_path):
    release = fresh_fed.run(pw.Survival(by="sex"), epsilon=0.5, analyst="csv")
    path = tmp_path / f"{release.file_stem()}.csv"
    release.to_csv(path)
    curves = pd.read_csv(tmp_path / f"{release.file_stem()}.curves.csv", index_col=0)
    assert len(curves) == len(release.curves) and "survival:F" in curves.columns


def test_a_release_rebuilds_as_a_notebook_that_spends_nothing_when_run_again(tmp_path):
    """The download a researcher keeps: run against the same federation file, the notebook
    (here its .py twin, executed in a fresh interpreter) returns the stored release."""
    import subprocess
    import sys
    import textwrap

    config = tmp_path / "sites.toml"
    config.write_text(textwrap.dedent("""
        [federation]
        key_bits = 1024
        ledger = "ledger.sqlite"
        [[sites]]
        name = "NDRS"
        backend = "local"
        source = { kind = "synthetic", seed = 7, size = 2000 }
        [[sites]]
        name = "NCI"
        backend = "local"
        source = { kind = "synthetic", seed = 7, size = 2000 }
        """))
    fed = pw.Federation.from_config(config)
    spec = pw.Crosstab(rows="age_band", cols="sex", where={"tumour_group": ["Leukaemia"]})
    release = fed.run(spec, epsilon=0.5)
    notebook = release.to_notebook(tmp_path / "again.ipynb", federation=config)
    cells = json.loads(notebook.read_text())["cells"]
    assert [c["cell_type"] for c in cells] == ["markdown", "code", "code", "code"]
    assert all(c["outputs"] == [] for c in cells if c["cell_type"] == "code")
    spent = fed.budget().analyst_spent
    fed.close()
    done = subprocess.run([sys.executable, str(notebook.with_suffix(".py"))],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "stored release, nothing spent" in done.stdout
    again = pw.Federation.from_config(config)
    assert again.budget().analyst_spent == spent
