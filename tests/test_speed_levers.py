"""The levers that make the encrypted pipeline fast keep its results exact: parallel CRT
decryption, packing sized from the sites' declared capacity, parallel local sites, cached
cell indices, and background precomputation that waits for the query to finish."""

from __future__ import annotations

import secrets
import threading
import time

import numpy as np
import pytest

import pets_widgets as pw
from pets_widgets.coordinator import federation
from pets_widgets.core.packing import Packing, capacity_for
from pets_widgets.core.paillier import ObfuscatorPool, encrypt, foreground, gil_released
from pets_widgets.enclave.decryption import decrypt, generate_paillier_keypair
from pets_widgets.enclave.ledger import Ledger, QueryRecord
from pets_widgets.site.synthetic import N_YEARS, profiles

from .conftest import SMALL_ROWS, TEST_KEY_BITS, make_fed


def test_parallel_decryption_equals_phes_raw_decrypt():
    public, private = generate_paillier_keypair(TEST_KEY_BITS)
    plaintexts = [0, 1, public.n - 1, *(secrets.randbelow(public.n) for _ in range(9))]
    ciphertexts = encrypt(public, plaintexts)
    assert decrypt(private, ciphertexts) == plaintexts
    assert decrypt(private, ciphertexts) == [private.raw_decrypt(c) for c in ciphertexts]
    assert decrypt(private, ciphertexts[:1]) == plaintexts[:1]
    assert decrypt(private, []) == []


def test_decryption_and_encryption_release_the_gil_only_inside_their_block():
    import gmpy2

    assert not gmpy2.get_context().allow_release_gil
    with gil_released():
        assert gmpy2.get_context().allow_release_gil
    assert not gmpy2.get_context().allow_release_gil


@pytest.mark.parametrize(("rows", "capacity"), [
    (0, 100), (7, 100), (99, 100), (100, 100), (101, 200), (437, 500), (1_001, 1_100),
    (38_001, 39_000), (92_143, 93_000), (100_000, 100_000), (999_999, 1_000_000)])
def test_capacity_rounds_up_to_two_significant_figures_and_at_least_a_hundred(rows, capacity):
    assert capacity_for(rows) == capacity
    assert capacity_for(rows) >= rows


def test_demo_packing_is_sized_from_the_sites_not_a_fixed_width(tmp_path):
    fed = pw.demo_federation(seed=1, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite")
    assert fed.enclave.site_capacity == SMALL_ROWS
    layout = pw.Count(by=["tumour_group"]).layout(fed.schema)
    packing = Packing.for_layout(layout.size, layout.max_contribution, 2,
                                        TEST_KEY_BITS, fed.enclave.site_capacity)
    assert packing.slot_bits == (2 * SMALL_ROWS).bit_length()  # 13 bits, not 24
    default = pw.demo_federation(seed=1, key_bits=TEST_KEY_BITS, ledger=tmp_path / "d.sqlite")
    largest = max(p.cases_per_year for p in profiles(2)) * N_YEARS
    assert default.enclave.site_capacity == capacity_for(largest)
    # An explicit bound still wins, and a site larger than it cannot join.
    wide = pw.demo_federation(seed=1, rows_per_site=500, key_bits=TEST_KEY_BITS,
                              ledger=tmp_path / "w.sqlite", site_capacity=2**22)
    assert wide.enclave.site_capacity == 2**22
    with pytest.raises(ValueError, match="capacity"):
        pw.demo_federation(seed=1, rows_per_site=500, key_bits=TEST_KEY_BITS,
                           ledger=tmp_path / "n.sqlite", site_capacity=499)


def test_local_sites_run_in_parallel_threads(fed2, monkeypatch):
    assert federation.LocalSite.parallel
    both_inside = threading.Barrier(2, timeout=30)  # passes only if both sites work at once
    seen: set[str] = set()
    original = federation.LocalSite.respond

    def spy(self, request):
        seen.add(threading.current_thread().name)
        both_inside.wait()
        return original(self, request)

    monkeypatch.setattr(federation.LocalSite, "respond", spy)
    fed2.run(pw.Count(by=["sex"]), epsilon=0.2468, analyst="levers")
    assert len(seen) == 2 and threading.current_thread().name not in seen


def test_a_failing_site_among_parallel_ones_is_named_and_nothing_is_spent(
        tmp_path_factory, monkeypatch):
    fed = make_fed(tmp_path_factory, "parallel_fault", seed=4)
    original = federation.LocalSite.respond

    def flaky(self, request):
        if self.name == "NCI":
            time.sleep(0.05)  # the other site has long finished
            raise RuntimeError("disk unplugged")
        return original(self, request)

    monkeypatch.setattr(federation.LocalSite, "respond", flaky)
    with pytest.raises(pw.SiteError, match="NCI"):
        fed.run(pw.Count(by=["sex"]))
    assert fed.budget().analyst_spent == 0
    assert fed.audit_log().iloc[-1].outcome == "failed"
    monkeypatch.undo()
    assert fed.run(pw.Count(by=["sex"])).card.epsilon == 1.0


def test_cached_cell_indices_give_the_same_totals_and_stay_bounded(fed2):
    site = fed2._sites[0]._site
    specs = [pw.Count(by=[v]) for v in ("sex", "age_band", "tumour_group", "subtype",
                                        "stage", "diagnosis_period", "died")]
    specs += [pw.Count(by=["sex", "age_band"]), pw.Histogram(variable="age_at_diagnosis"),
              pw.Survival(by="sex", horizon_months=24)]
    first = [site._aggregate(s) for s in specs]
    again = [site._aggregate(s) for s in specs]
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert len(site._indices) <= 8
    rows = pw.testing.site_rows(fed2, fed2._sites[0])
    expected = pw.testing.pandas_counts(rows, ["sex", "age_band"])
    assert np.array_equal(site._aggregate(pw.Count(by=["sex", "age_band"])), expected)


def test_background_precomputation_waits_a_moment_after_a_query():
    public, _ = generate_paillier_keypair(TEST_KEY_BITS)
    pool = ObfuscatorPool(public, target=2)
    try:
        with foreground():
            pass
        time.sleep(foreground.GRACE / 5)
        assert foreground.busy() and len(pool) == 0  # the query's tail goes first
        deadline = time.monotonic() + 30
        while len(pool) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(pool) == 2
    finally:
        pool.close()


def _decrypt_in_child(private, ciphertexts, results) -> None:
    results.put(decrypt(private, ciphertexts))


def test_a_forked_child_decrypts_with_workers_of_its_own():
    import multiprocessing

    public, private = generate_paillier_keypair(TEST_KEY_BITS)
    ciphertexts = encrypt(public, [3, 4, 5])
    assert decrypt(private, ciphertexts) == [3, 4, 5]  # the parent's workers exist
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_decrypt_in_child, args=(private, ciphertexts, results))
    child.start()
    assert results.get(timeout=60) == [3, 4, 5]  # the parent's threads are not in the child
    child.join(30)
    assert child.exitcode == 0


def test_a_ledger_travels_to_another_process_as_its_path(tmp_path):
    import pickle

    ledger = Ledger(tmp_path / "l.sqlite")
    ledger.record(QueryRecord("a", "h", "{}", ("A",), None), "invalid")
    copy = pickle.loads(pickle.dumps(ledger))
    assert copy.path == ledger.path and len(copy.audit_rows()) == 1
