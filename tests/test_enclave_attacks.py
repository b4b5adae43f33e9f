"""Attacks on the enclave's admission and release, each tried and shown to fail: altered
receipts, replays, a swapped policy, overflow probes, redrawn refusals, renamed analysts."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest

import pets_widgets as pw

from .test_integrity import overflowing, with_site0


def _collect(fed, admission):
    """The sites' aggregates for an admission made directly on the in-process enclave."""
    receipt = fed._port._receipt(admission, fed._challenges(lambda *a: None))
    return fed._gather(receipt, lambda *a: None)


def test_altered_admission_cannot_lower_k_or_raise_epsilon(fresh_fed):
    enclave = fresh_fed.enclave
    spec = pw.Count(by=["subtype"], where={"diagnosis_year": (2001, 2001)})
    admission = enclave.admit(spec, 1.0, 5, "eve", fresh_fed.site_names)
    forged = dataclasses.replace(admission, k=1, epsilon=Fraction(5))
    aggregates, summed = _collect(fresh_fed, admission)
    with pytest.raises(pw.IntegrityError, match="altered"):
        enclave.release(forged, aggregates, summed)
    with pytest.raises(pw.IntegrityError, match="not open"):  # and the real one is spent
        enclave.release(admission, aggregates, summed)
    assert fresh_fed.budget("eve").analyst_spent == 0


def test_old_aggregates_cannot_be_replayed_into_a_new_release(fresh_fed):
    enclave = fresh_fed.enclave
    spec = pw.Count(by=["sex"])
    first = enclave.admit(spec, 1.0, 5, "eve", fresh_fed.site_names)
    aggregates, summed = _collect(fresh_fed, first)
    enclave.release(first, aggregates, summed)
    second = enclave.admit(spec, 0.5, 5, "eve", fresh_fed.site_names)
    for agg in aggregates:
        with pytest.raises(pw.IntegrityError, match="once"):
            enclave.issue_nonce(second, agg.site, agg.nonce)


def test_another_k_is_another_release_and_hidden_cells_stay_hidden(fresh_fed):
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"diagnosis_year": (2005, 2005)})
    at5 = fresh_fed.run(spec, analyst="eve")
    again = fresh_fed.run(spec, analyst="eve")
    assert again.card.repeated and again.suppressed.equals(at5.suppressed)
    swapped = fresh_fed.run(pw.Crosstab(rows="age_band", cols="tumour_group",
                                        where={"diagnosis_year": (2005, 2005)}), analyst="eve")
    assert swapped.card.repeated
    np.testing.assert_array_equal(swapped.suppressed.to_numpy(), at5.suppressed.to_numpy().T)
    at8 = fresh_fed.run(spec, k=8, analyst="eve")
    assert not at8.card.repeated  # new suppression needs new noise, and is charged
    assert fresh_fed.budget("eve").analyst_spent == 2


def test_policy_cannot_be_swapped_after_attestation(fresh_fed):
    with pytest.raises(AttributeError):
        fresh_fed.enclave.policy = pw.Policy(k=1)  # type: ignore[misc]
    # Swapping the enforced policy underneath: tests/test_site_trust.py shows every site
    # then refuses the enclave (its image digest changes).


def test_overflow_probe_is_charged_and_locks_the_federation(fresh_fed):
    """A colluding site encrypting out-of-range values learns one bit at most: the failure
    is charged, and the federation locks."""
    evil = with_site0(fresh_fed, overflowing(fresh_fed))
    with pytest.raises(pw.IntegrityError):
        evil.run(pw.Count(by=["sex"]), epsilon=0.5, analyst="eve")
    # A cheating site's probe costs the policy's epsilon per release at least, however small
    # the epsilon asked (0.5 here, max_epsilon 1): tiny probes are not cheap.
    assert fresh_fed.budget("eve").analyst_spent == 1
    assert fresh_fed.audit_log().iloc[-1].rule == "integrity_incident"
    with pytest.raises(pw.QueryRefused) as info:
        fresh_fed.run(pw.Count(by=["age_band"]), analyst="ann")
    assert info.value.rule == "locked"
    fresh_fed.ledger.unlock()
    fresh_fed.run(pw.Count(by=["age_band"]), analyst="ann")


def test_subset_refusals_cannot_be_redrawn_by_changing_epsilon(fresh_fed):
    where = {"subtype": ["PPB"], "sex": ["F"], "diagnosis_year": (2003, 2004)}
    with pytest.raises(pw.QueryRefused) as info:
        fresh_fed.run(pw.Count(where=where), epsilon=1.0, analyst="eve")
    assert info.value.rule == "min_subset"
    budget = fresh_fed.budget("eve")
    assert budget.analyst_spent == 1 and budget.federation_spent == 1  # eve paid the check
    assert fresh_fed.budget("ann").analyst_spent == 0  # and nobody else did
    for eps in (0.9, 0.8, 0.5):  # any epsilon, any kind: the stored decision, no new noise
        with pytest.raises(pw.QueryRefused):
            fresh_fed.run(pw.Count(where=where), epsilon=eps, analyst="eve")
    with pytest.raises(pw.QueryRefused):
        fresh_fed.run(pw.Histogram(variable="age_at_diagnosis", where=where), analyst="eve")
    assert fresh_fed.budget("eve").federation_spent == 1


def test_one_analysts_refused_probes_leave_everyone_elses_budget_untouched(fresh_fed):
    probes = [{"subtype": ["PPB"], "sex": [s], "diagnosis_year": (y, y)}
              for s in ("F", "M") for y in range(2001, 2007)]
    refused = 0
    for where in probes:
        try:
            fresh_fed.run(pw.Count(where=where), epsilon=0.5, analyst="mallory")
        except pw.QueryRefused as exc:
            refused += exc.rule == "min_subset"
        except pw.BudgetExceeded:
            break
    assert refused >= 2
    assert fresh_fed.budget("ann").analyst_spent == 0
    spent = fresh_fed.budget("mallory")
    assert spent.federation_spent == spent.analyst_spent  # all of it charged to mallory
    fresh_fed.run(pw.Count(by=["sex"]), epsilon=1.0, analyst="ann")  # ann is not refused


def test_a_ledger_refuses_an_enclave_with_another_policy(fresh_fed):
    from pets_widgets.enclave.enclave import Enclave

    with pytest.raises(pw.IntegrityError, match="another policy"):
        Enclave(fresh_fed.schema, fresh_fed.ledger, pw.Policy(k=3), key_bits=1024)
    looser = dataclasses.replace(fresh_fed.policy, analyst_budget=1e6, federation_budget=1e6)
    with pytest.raises(pw.IntegrityError, match="another policy"):
        Enclave(fresh_fed.schema, fresh_fed.ledger, looser, key_bits=1024)


def test_a_filter_on_every_site_is_no_filter(fresh_fed):
    spec = pw.Count(by=["sex"], where={"site": list(fresh_fed.site_names)})
    assert spec.canonical(fresh_fed.schema).hash == pw.Count(by=["sex"]).hash
    first = fresh_fed.run(pw.Count(by=["sex"]), analyst="eve")
    again = fresh_fed.run(spec, analyst="eve")
    assert again.card.repeated and again.table.equals(first.table)


def test_jupyterhub_user_is_enforced_inside_the_enclave(fresh_fed, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "hub-user")
    with pytest.raises(pw.QueryValidationError) as info:
        fresh_fed.enclave.admit(pw.Count(), 1.0, 5, "someone-else", fresh_fed.site_names)
    assert info.value.field == "analyst"


def test_margin_intervals_allow_for_clamping_bias():
    from pets_widgets.enclave.pipeline.tables import _clamp_bias, _margin_bounds

    table = np.zeros((3, 4), dtype=np.int64)  # all-zero 2x3 table with margins
    lo, hi = _margin_bounds(table, 1.0, 3)
    assert _clamp_bias(1.0) == pytest.approx(0.4255, abs=1e-3)
    assert hi[-1, -1] > hi[0, 0] and lo[-1, -1] == 0


def test_the_enclave_ledger_cannot_be_swapped_for_a_fresh_one(fresh_fed, tmp_path):
    """A second ledger would split the budget and the stored releases between two files
    (the gatekeeper would charge one while repeats were looked up in the other)."""
    from pets_widgets.enclave import ledger as audit

    with pytest.raises(AttributeError):
        fresh_fed.enclave.ledger = audit.Ledger(tmp_path / "fresh.sqlite")
    assert fresh_fed.ledger is fresh_fed.enclave._gate.ledger


def test_eight_simultaneous_identical_queries_cost_one_epsilon_and_share_one_answer(
        tmp_path):
    import threading

    from .conftest import SMALL_ROWS, TEST_KEY_BITS

    fed = pw.demo_federation(seed=9, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite",
                             policy=pw.Policy(analyst_budget=3, federation_budget=3))
    spec, results, errors = pw.Count(by=["tumour_group"]), [], []
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        try:
            results.append(fed.run(spec, epsilon=1.0, analyst="ann"))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(results) == 8
    assert fed.budget("ann").analyst_spent == 1
    assert sum(not r.card.repeated for r in results) == 1
    first = results[0].table
    assert all(r.table.equals(first) for r in results)


def test_an_admission_never_released_is_closed_once_its_tokens_expire(fresh_fed, monkeypatch):
    from pets_widgets.enclave import enclave as enclave_module

    enclave = fresh_fed.enclave
    left = enclave.admit(pw.Count(by=["stage"]), 0.5, 5, "vanished", fresh_fed.site_names)
    monkeypatch.setattr(enclave_module, "ABANDONED_SECONDS", -1.0)
    fresh_fed.run(pw.Count(by=["sex"]), epsilon=0.5, analyst="next")
    with pytest.raises(pw.IntegrityError, match="not open"):
        enclave.open_admission(left.id)
    row = fresh_fed.audit_log("vanished").iloc[-1]
    assert row.outcome == "failed" and row.rule == "abandoned"
    assert fresh_fed.budget("vanished").analyst_spent == 0


def test_a_nonce_put_in_an_unanswered_admission_does_not_lock_others_out(fresh_fed):
    """Mallory reads each site's current nonce and admits with it, never asking the sites;
    Ann's query with the same nonces (a site service hands status callers one nonce) works."""
    enclave, names = fresh_fed.enclave, fresh_fed.site_names
    nonces = {s.name: s.challenge() for s in fresh_fed._sites}
    burnt = enclave.admit(pw.Count(by=["sex"]), 0.5, 5, "mallory", names)
    enclave.issue_tokens(burnt, nonces)
    enclave.abort(burnt, "failed", "site", "never sent to the sites")
    ann = enclave.admit(pw.Count(by=["age_band"]), 0.5, 5, "ann", names)
    receipt = fresh_fed._port._receipt(ann, lambda: nonces)
    aggregates, summed = fresh_fed._gather(receipt, lambda *a: None)
    assert enclave.release(ann, aggregates, summed).table is not None


def test_an_aggregate_answers_one_admission_and_cannot_be_replayed_into_another(fresh_fed):
    """A cheap admission's aggregates (epsilon 0.01, charged so at each site) reused for an
    expensive one with the same nonces: refused, naming the site."""
    enclave, names = fresh_fed.enclave, fresh_fed.site_names
    spec = pw.Count(by=["tumour_group"])
    cheap = enclave.admit(spec, 0.01, 5, "eve", names)
    aggregates, summed = _collect(fresh_fed, cheap)
    enclave.abort(cheap, "failed", "site", "pretend a site failed")
    dear = enclave.admit(spec, 1.0, 5, "eve", names)
    enclave.issue_tokens(dear, {a.site: a.nonce for a in aggregates})
    with pytest.raises(pw.SiteError, match="another admission"):
        enclave.release(dear, aggregates, summed)
    assert fresh_fed.budget("eve").analyst_spent == 0


def test_one_analyst_cannot_hold_many_admissions_or_waste_sites_budgets_unreleased(fresh_fed):
    """Sites charge their own lifetime epsilon when they answer; an admission never released
    costs its analyst nothing, so the enclave bounds both how many are open at once and how
    much epsilon they asked for in a day."""
    from pets_widgets.enclave.admission import MAX_OPEN_ADMISSIONS

    enclave, names = fresh_fed.enclave, fresh_fed.site_names
    held = [enclave.admit(pw.Count(by=["sex"], where={"diagnosis_year": (2000 + i, 2000 + i)}),
                          0.5, 5, "hoarder", names) for i in range(MAX_OPEN_ADMISSIONS)]
    with pytest.raises(pw.QueryRefused) as info:
        enclave.admit(pw.Count(by=["stage"]), 0.5, 5, "hoarder", names)
    assert info.value.rule == "open_admissions"
    fresh_fed.run(pw.Count(by=["stage"]), epsilon=0.5, analyst="ann")  # others are not held up
    for admission in held:  # each "failed at a site" after the sites answered
        enclave.abort(admission, "failed", "site", "a site failed")
    for year in range(2010, 2022):  # keep asking and aborting, epsilon 1 each
        try:
            admission = enclave.admit(pw.Count(where={"diagnosis_year": (year, year)}), 1.0, 5,
                                      "hoarder", names)
        except pw.QueryRefused as exc:
            assert exc.rule == "unreleased_admissions"
            break
        enclave.abort(admission, "failed", "site.timeout", "a site failed")
    else:
        pytest.fail("unreleased admissions were never bounded")
    assert fresh_fed.budget("hoarder").analyst_spent == 0  # site failures are never charged
