"""Attacks by a determined analyst, each tried and shown to fail.

Repetition (averaging), differencing with overlapping filters, margin subtraction on
crosstabs, policy bypass; every refusal is in the audit log with its rule and spends nothing.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pets_widgets as pw
from pets_widgets.coordinator.federation import Federation, LocalSite
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.enclave import Enclave
from pets_widgets.enclave.pipeline.suppression import (
    feasible_ranges,
    primary_suppression,
    secondary_suppression,
)
from pets_widgets.platform.verifier import PlatformVerifier
from pets_widgets.site import synthetic
from pets_widgets.site.site import Site
from pets_widgets.site.trust import Floors, SiteTrust

from .conftest import TEST_KEY_BITS


def test_repetition_returns_the_same_noise_and_spends_once(fresh_fed):
    spec = pw.Crosstab(rows="tumour_group", cols="sex")
    first = fresh_fed.run(spec, analyst="mallory")
    tables = [fresh_fed.run(spec, analyst=who).table for who in ["mallory", "trudy"] * 5]
    # the same spelled differently or transposed is the same question
    respelled = fresh_fed.run(pw.Crosstab(rows="Sex", cols="Tumour Group"), analyst="mallory")
    for t in tables:
        pd.testing.assert_frame_equal(t, first.table)
    assert respelled.card.repeated
    np.testing.assert_array_equal(respelled.table.loc["F"].to_numpy(dtype=float, na_value=-1),
                                  first.table["F"].to_numpy(dtype=float, na_value=-1))
    # averaging eleven answers gives exactly the first answer back: no variance is gained
    assert fresh_fed.budget("mallory").analyst_spent == 1
    assert fresh_fed.budget("trudy").analyst_spent == 0
    log = fresh_fed.audit_log()
    assert (log.outcome == "repeated").sum() == 11 and (log.outcome == "released").sum() == 1
    # a new epsilon is a new release and is charged
    fresh_fed.run(spec, epsilon=0.5, analyst="mallory")
    assert fresh_fed.budget("mallory").analyst_spent == 1.5


@pytest.mark.parametrize(("kwargs", "rule", "field_in_message"), [
    ({"epsilon": 1.5}, "max_epsilon", "epsilon"),
    ({"epsilon": 10}, "max_epsilon", "epsilon"),
    ({"k": 1}, "k", "k="),
    ({"k": 4}, "k", "k="),
])
def test_policy_floors_hold_whatever_the_caller_passes(fresh_fed, kwargs, rule,
                                                        field_in_message):
    with pytest.raises(pw.QueryRefused) as info:
        fresh_fed.run(pw.Count(by=["tumour_group"]), **kwargs)
    assert info.value.rule == rule and field_in_message in str(info.value)
    last = fresh_fed.audit_log().iloc[-1]
    assert (last.outcome, last.rule, last.epsilon_spent) == ("refused", rule, "0/1")
    assert fresh_fed.budget().analyst_spent == 0


def test_the_enclave_enforces_policy_when_the_federation_is_bypassed(fresh_fed):
    """Calling the enclave directly (as a hacked UI or coordinator could) changes nothing."""
    with pytest.raises(pw.QueryRefused):
        fresh_fed.enclave.admit(pw.Count(), 3.0, 5, "h4x", fresh_fed.site_names)
    with pytest.raises(pw.QueryRefused):
        fresh_fed.enclave.admit(pw.Count(), 1.0, 2, "h4x", fresh_fed.site_names)
    with pytest.raises(pw.QueryRefused):  # leaving a site out
        fresh_fed.enclave.admit(pw.Count(), 1.0, 5, "h4x", fresh_fed.site_names[:1])


def test_a_filter_selecting_too_few_patients_is_refused(fresh_fed):
    tiny = pw.Count(where={"subtype": ["PPB"], "sex": ["F"], "diagnosis_year": (2003, 2004)})
    with pytest.raises(pw.QueryRefused) as info:
        fresh_fed.run(tiny, analyst="mallory")
    assert info.value.rule == "min_subset" and "10 patients" in str(info.value)
    # asking again gives the same decision, from the ledger, not a fresh draw of noise
    for _ in range(3):
        with pytest.raises(pw.QueryRefused):
            fresh_fed.run(tiny, analyst="mallory")
    assert fresh_fed.budget("mallory").analyst_spent == 1  # the check, once: asking is paying
    log = fresh_fed.audit_log()
    assert list(log.rule.iloc[-4:]) == ["min_subset"] * 4


# --------------------------------------------------------------------------- differencing


def _federation(frames: dict[str, pd.DataFrame], ledger_path) -> Federation:
    schema = pw.Schema(tuple(frames))
    policy = pw.Policy()
    verifier = PlatformVerifier()
    launched = verifier.launch(policy, schema.digest, debug=True)
    enclave = Enclave(schema, audit.Ledger(ledger_path), policy, key_bits=TEST_KEY_BITS,
                      issuer=launched)
    trust = SiteTrust(verifier.jwks(), (launched.image_digest,), allow_debug=True)
    sites = []
    for name, rows in frames.items():
        # The attack spends far more than a site's default lifetime budget on purpose.
        site = Site(name, rows, schema, floors=Floors(lifetime_epsilon=1e9))
        site.enroll(trust)
        sites.append(LocalSite(site))
    return Federation(sites, enclave)


@pytest.fixture(scope="module")
def neighbouring_worlds():
    """Two registries; in world IN one extra child (the target) is present, in OUT not.
    The only retinoblastoma patient aged exactly 3 diagnosed in 2005-2015 is the target, so
    the filters 'age 0-3' and 'age 0-2' differ by that one child."""
    profiles = synthetic.profiles(2, 4_000)
    frames = {p.name: synthetic.registry(p, seed=9, n_rows=4_000) for p in profiles}
    for name, rows in frames.items():
        window = rows.diagnosis_year.between(2005, 2015) & (rows.tumour_group == "Retinoblastoma")
        frames[name] = rows[~(window & (rows.age_at_diagnosis == 3))].reset_index(drop=True)
    target = frames["NDRS"].iloc[[0]].copy()
    target[["age_at_diagnosis", "diagnosis_year"]] = [3, 2010]
    target["age_band"], target["diagnosis_period"] = "1-4", "2010-2014"
    target["tumour_group"], target["subtype"] = "Retinoblastoma", "Retinoblastoma"
    with_target = pd.concat([frames["NDRS"], target], ignore_index=True)
    world_in = {"NDRS": synthetic.as_schema_dtypes(with_target), "NCI": frames["NCI"]}
    return world_in, frames


BROAD = {"tumour_group": ["Retinoblastoma"], "diagnosis_year": (2005, 2015)}
SPEC_A = pw.Count(where={**BROAD, "age_at_diagnosis": (0, 3)})
SPEC_B = pw.Count(where={**BROAD, "age_at_diagnosis": (0, 2)})


def _attack(fed: Federation, analyst: str, epsilon: float) -> bool:
    """The attacker's guess that the target is present: released A minus released B >= 1."""
    a = fed.run(pw.Count(where=SPEC_A.where), epsilon=epsilon, analyst=analyst)
    b = fed.run(pw.Count(where=SPEC_B.where), epsilon=epsilon, analyst=analyst)
    return int(a.table["count"].iloc[0]) - int(b.table["count"].iloc[0]) >= 1


def test_differencing_without_noise_would_identify_the_child(neighbouring_worlds, tmp_path):
    world_in, world_out = neighbouring_worlds
    for frames, present in ((world_in, True), (world_out, False)):
        fed = _federation(frames, tmp_path / f"exact-{present}.sqlite")
        a = pw.testing.noiseless(fed, SPEC_A).table["count"].iloc[0]
        b = pw.testing.noiseless(fed, SPEC_B).table["count"].iloc[0]
        assert bool(a - b == 1) is present
        assert b >= pw.Policy().min_subset  # both filters pass the subset rule


def test_differencing_success_is_bounded_by_epsilon(neighbouring_worlds, tmp_path):
    """Each trial is a fresh ledger (the attacker's one shot: asking again returns the same
    noise). Two releases at epsilon 1 bound any attacker: P(guess IN | IN) <= e^2 P(guess IN |
    OUT), so balanced accuracy <= e^2/(1+e^2) = 0.881."""
    world_in, world_out = neighbouring_worlds
    epsilon, trials_per_ledger, n_ledgers = 1.0, 10, 12
    guesses: dict[bool, list[bool]] = {True: [], False: []}
    for present, frames in ((True, world_in), (False, world_out)):
        for ledger_no in range(n_ledgers):
            fed = _federation(frames, tmp_path / f"w{present}-{ledger_no}.sqlite")
            for t in range(trials_per_ledger):
                # nudging epsilon makes a new, fully charged release (the only way to get
                # fresh noise); every analyst and the federation stay within their budgets
                eps = epsilon - t * 1e-6
                guesses[present].append(_attack(fed, f"attacker{t % 5}", eps))
    tpr = float(np.mean(guesses[True]))
    fpr = float(np.mean(guesses[False]))
    n = len(guesses[True])
    success = (tpr + 1 - fpr) / 2
    bound = math.exp(2 * epsilon) / (1 + math.exp(2 * epsilon))
    slack = 3 * math.sqrt(0.25 / n)
    assert success <= bound + slack, (success, bound)
    # and it matches the theory of this attacker: P(X - Y >= 0), X, Y discrete Laplace(1)
    q = math.exp(-1 / epsilon)
    p0 = ((1 - q) / (1 + q)) ** 2 * (1 + q * q) / (1 - q * q)
    expected = (1 + p0) / 2
    assert abs(success - expected) < 4 * math.sqrt(expected * (1 - expected) / (2 * n))


# --------------------------------------------------------------------------- margins


def test_margin_subtraction_recovers_primary_only_suppression():
    """Why secondary suppression exists: hide only the small cell and the totals give it away."""
    table = np.array([[40, 3, 50, 93], [30, 20, 25, 75], [70, 23, 75, 168]])
    hidden = primary_suppression(table, 5)
    lower, upper = feasible_ranges(table, hidden)
    assert lower[0, 1] == upper[0, 1] == 3  # recovered exactly
    protected = secondary_suppression(table, hidden, protection=5)
    lower, upper = feasible_ranges(table, protected)
    widths = (upper - lower)[protected]
    assert protected.sum() >= 4 and (widths >= 5).all()


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_secondary_suppression_protects_every_hidden_cell(data):
    n_rows = data.draw(st.integers(1, 6))
    n_cols = data.draw(st.integers(1, 5))
    cells = np.array(data.draw(st.lists(
        st.lists(st.one_of(st.integers(0, 6), st.integers(0, 300)), min_size=n_cols,
                 max_size=n_cols), min_size=n_rows, max_size=n_rows)))
    table = np.zeros((n_rows + 1, n_cols + 1), dtype=int)
    table[:-1, :-1] = cells
    table[:-1, -1] = cells.sum(1)
    table[-1, :-1] = cells.sum(0)
    table[-1, -1] = cells.sum()
    hidden = secondary_suppression(table, primary_suppression(table, 5), protection=5)
    assert hidden[primary_suppression(table, 5)].all()  # never un-hides a small cell
    lower, upper = feasible_ranges(table, hidden)
    assert ((upper - lower)[hidden] >= 5).all()


@pytest.mark.parametrize("where", [
    {"sex": ["F"]},
    {"diagnosis_year": (2015, 2022), "stage": ["Metastatic", "Regional"]},
    {"subtype": ["Other"], "died": [True]},
])
def test_released_crosstabs_resist_the_linear_programming_attacker(fresh_fed, where):
    release = fresh_fed.run(pw.Crosstab(rows="tumour_group", cols="age_band", where=where),
                            analyst="lp-attacker")
    hidden = release.suppressed.to_numpy()
    assert hidden.any()
    published = release.table.to_numpy(dtype=float, na_value=0.0)
    lower, upper = feasible_ranges(published, hidden)
    assert ((upper - lower)[hidden] >= fresh_fed.policy.protection).all()
    assert "secondary" in release.card.suppression_rule
    assert "post-processing" in release.card.margins


def test_released_two_way_counts_resist_the_linear_programming_attacker(fresh_fed):
    release = fresh_fed.run(pw.Count(by=["tumour_group", "age_band"], where={"sex": ["M"]}),
                            analyst="lp-attacker")
    shape = (len(release.table.index.levels[0]), len(release.table.index.levels[1]))
    hidden = release.suppressed.to_numpy().reshape(shape)
    assert hidden.any() and release.table.index[-1] == ("Total", "Total")
    published = release.table.to_numpy(dtype=float, na_value=0.0).reshape(shape)
    lower, upper = feasible_ranges(published, hidden)
    assert ((upper - lower)[hidden] >= fresh_fed.policy.protection).all()
    assert "secondary" in release.card.suppression_rule


def test_a_highs_warm_start_ending_unknown_is_solved_again():
    """HiGHS once ended a warm-started solve with status 'Unknown' on this table."""
    cells = np.array([[3, 0, 0, 3], [0, 0, 1, 2], [5, 3, 5, 5], [2, 2, 5, 0]])
    table = np.zeros((5, 5))
    table[:-1, :-1] = cells
    table[:-1, -1] = cells.sum(1)
    table[-1, :-1] = cells.sum(0)
    table[-1, -1] = cells.sum()
    hidden = secondary_suppression(table, primary_suppression(table, 5), protection=5)
    lower, upper = feasible_ranges(table, hidden)
    assert ((upper - lower)[hidden] >= 5).all()


def test_structural_zeros_are_published_as_exact_zeros_and_never_used_as_cover(fresh_fed):
    """Impossible cells (a stage for leukaemia, DIPG outside CNS) are public knowledge: they
    show as 0 with no noise, are never hidden, and an attacker who knows them still cannot
    narrow any hidden cell below the protection width."""
    release = fresh_fed.run(pw.Crosstab(rows="tumour_group", cols="stage",
                                        where={"diagnosis_year": (2021, 2022), "sex": ["F"]}))
    table = release.table
    assert table.loc["Leukaemia", "Localised"] == 0 and table.loc["CNS", "Metastatic"] == 0
    assert not release.suppressed.loc["Leukaemia"].any()
    assert release.upper.loc["Leukaemia", "Regional"] == 0
    from pets_widgets.core.query import structural_zeros
    spec = release.spec
    known = structural_zeros(spec.layout(fresh_fed.schema), spec.where, fresh_fed.schema)
    hidden = release.suppressed.to_numpy()
    published = release.table.to_numpy(dtype=float, na_value=0.0)
    lower, upper = feasible_ranges(published, hidden)
    assert ((upper - lower)[hidden] >= fresh_fed.policy.protection).all()
    assert known["count"].sum() == 5 * 3 + 7 * 1  # unstaged groups x 3 stages + staged x NA


def test_histogram_outside_the_filtered_ages_is_structurally_zero(fresh_fed):
    release = fresh_fed.run(pw.Histogram(variable="age_at_diagnosis",
                                         where={"age_band": ["<1", "1-4"]}))
    counts = release.table["count"]
    assert (counts.iloc[5:] == 0).all() and not release.suppressed["count"].iloc[5:].any()
