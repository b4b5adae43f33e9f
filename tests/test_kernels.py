"""Sites as real Jupyter kernels: same totals as in-process sites, faults end cleanly.

One two-site and one five-site kernel federation (1024-bit keys, small sites) serve the whole
module; fault tests restore the sites they break. Loopback only; every kernel is stopped.
"""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from pathlib import Path

import jwt
import pandas as pd
import pytest

import pets_widgets as pw
from pets_widgets import testing
from pets_widgets.core.errors import SiteAttestationError, SiteIntegrityError
from pets_widgets.core.wire import AggregateRequest, new_nonce
from pets_widgets.platform.verifier import PlatformVerifier
from pets_widgets.site.kernel_entry import CALL_TEMPLATE, call_code

from .conftest import SMALL_ROWS, TEST_KEY_BITS, TESTING
from .kernel_helpers import faulty_respond, rss_mb, run_in_kernel

#: Slow; every kernel and gateway this module starts is gone when it ends.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_kernels")]

SPECS = [
    pw.Count(),
    pw.Count(by=["tumour_group"]),
    pw.Count(by=["sex", "died"], where={"diagnosis_year": (2005, 2015)}),
    pw.Count(by=["tumour_group", "age_band", "sex"]),
    pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]}),
    pw.Crosstab(rows="site", cols="diagnosis_period"),
    pw.Mean(variable="age_at_diagnosis", by=["sex"]),
    pw.Mean(variable="died", by=["tumour_group"], where={"stage": ["Metastatic"]}),
    pw.Histogram(variable="follow_up_months", where={"tumour_group": ["Leukaemia"]}),
    pw.Histogram(variable="age_at_diagnosis"),
]
SPECS += [
    pw.Survival(by="tumour_group", horizon_months=60, interval_months=3),
    pw.Survival(where={"age_band": ["<1"]}),
    pw.IncidenceRate(by="tumour_group", where={"diagnosis_period": ["2015-2019"]}),
]

_EPSILONS = itertools.count(1)


def fresh_epsilon() -> float:
    """A new epsilon per successful run, so no run is answered from the stored releases."""
    return round(0.01 + 0.001 * next(_EPSILONS), 4)



@pytest.fixture(scope="module")
def kfed2(tmp_path_factory):
    t0 = time.monotonic()
    fed = pw.demo_federation(seed=7, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             backend="kernel", **TESTING,
                             ledger=tmp_path_factory.mktemp("kfed2") / "ledger.sqlite")
    fed.start_seconds = time.monotonic() - t0  # type: ignore[attr-defined]
    with fed:
        yield fed


@pytest.fixture(scope="module")
def kfed5(tmp_path_factory):
    with pw.demo_federation(seed=11, n_sites=5, rows_per_site=1_500, key_bits=TEST_KEY_BITS,
                            backend="kernel", **TESTING,
                            ledger=tmp_path_factory.mktemp("kfed5") / "ledger.sqlite") as fed:
        yield fed


def assert_same_totals(a: pw.Federation, b: pw.Federation, spec: pw.QuerySpec) -> None:
    got, want = pw.testing.noiseless(a, spec), pw.testing.noiseless(b, spec)
    pd.testing.assert_frame_equal(got.table, want.table, obj=spec.describe())


# --------------------------------------------------------------------------- equivalence
def test_kernel_sites_run_in_their_own_kernels_over_curve(kfed2):
    sites = kfed2._sites
    assert [s.backend for s in sites] == ["kernel", "kernel"]
    pids = {s.pid for s in sites}
    assert len(pids) == 2 and os.getpid() not in pids
    for site in sites:
        # the kernel imports the same pets_widgets as this process (the tree under test)
        assert site.kernel_info["module"] == str(Path(pw.__file__).resolve().parent)
        info = site._km.get_connection_info()
        assert site._km.transport_encryption == "required" and info.get("curve_publickey")
    status = kfed2.status()
    assert list(status.index) == ["NDRS", "NCI"]
    assert status["alive"].all() and (status["backend"] == "kernel").all()
    assert (status["rows"] == SMALL_ROWS).all()
    assert (status["epsilon_left"] > 0).all()  # asked of each site's own budget
    assert status.loc["NDRS", "key_fingerprint"] == sites[0].verify_key.fingerprint
    assert kfed2.start_seconds < 60


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_two_kernel_sites_equal_local_sites(kfed2, fed2, spec):
    assert_same_totals(kfed2, fed2, spec)


#: Every query kind at five kernel sites (half the specs, and the incidence rate).
FIVE_SITE_SPECS = [*SPECS[1::2], SPECS[-1]]
assert {s.kind for s in FIVE_SITE_SPECS} == {s.kind for s in SPECS}


@pytest.mark.parametrize("spec", FIVE_SITE_SPECS, ids=lambda s: s.describe())
def test_five_kernel_sites_equal_local_sites(kfed5, fed5, spec):
    assert_same_totals(kfed5, fed5, spec)


def test_pooled_rows_are_rebuilt_from_sources_not_read_from_kernels(kfed2, pooled2):
    pd.testing.assert_frame_equal(pw.testing.pooled_rows(kfed2), pooled2)


def test_a_noisy_release_through_kernels(kfed2):
    release = kfed2.run(pw.Crosstab(rows="tumour_group", cols="sex"), epsilon=fresh_epsilon())
    assert release.card.sites == ("NDRS", "NCI")
    assert release.table.shape == (13, 3)


def test_the_coordinator_sends_only_a_fixed_call():
    code = call_code("respond", {"request": "'); import os; os.system('x') #"})
    prefix, _, rest = CALL_TEMPLATE.partition("{payload}")
    assert code.startswith(prefix) and code.endswith(rest)
    payload = code[len(prefix):-len(rest)]
    assert set(payload) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    with pytest.raises(ValueError, match="not a site operation"):
        call_code("exec", {})


def test_the_site_kernel_rejects_calls_it_does_not_know(kfed2):
    site = kfed2._sites[0]
    for bad in ("not base64!", "eyJvcCI6ICJleGVjIiwgImFyZ3MiOiB7fX0="):  # {"op": "exec", ...}
        code = f"import pets_widgets.site.kernel_entry as k\nk.handle({bad!r})"
        reply = run_in_kernel(site, code)
        assert reply["ok"] is False and reply["error"] == "QueryValidationError"
    with pytest.raises(pw.SiteError, match="rejected the request") as info:
        site._call("respond", {"request": "{}"}, 10)
    assert info.value.site == "NDRS"


# --------------------------------------------------------------------------- faults
def assert_failed_cleanly(fed: pw.Federation, before_rows: int, before_spent: float,
                          site: str, cause: str) -> None:
    log = fed.audit_log()
    assert len(log) == before_rows + 1
    last = log.iloc[-1]
    assert last.outcome == "failed" and site in last.reason and cause in last.reason
    assert fed.budget().analyst_spent == before_spent


def run_fault(fed: pw.Federation, error: type[pw.SiteError], site: str, cause: str,
              spec: pw.QuerySpec = SPECS[1]) -> pw.SiteError:
    before_rows, before_spent = len(fed.audit_log()), fed.budget().analyst_spent
    with pytest.raises(error, match=cause) as info:
        fed.run(spec, epsilon=fresh_epsilon())
    assert info.value.site == site
    assert_failed_cleanly(fed, before_rows, before_spent, site, cause)
    return info.value


def next_query_succeeds(fed: pw.Federation) -> None:
    release = fed.run(pw.Count(by=["sex"]), epsilon=fresh_epsilon())
    assert not release.card.repeated
    assert fed.status()["alive"].all()


def test_a_kernel_killed_mid_query_is_named_and_restarted_next_query(kfed2):
    site = kfed2._sites[1]
    old_pid, key = site.pid, site.verify_key
    before_rows, before_spent = len(kfed2.audit_log()), kfed2.budget().analyst_spent
    caught: list[BaseException] = []

    def query() -> None:
        try:
            kfed2.run(SPECS[1], epsilon=fresh_epsilon())
        except BaseException as exc:
            caught.append(exc)

    with faulty_respond(site, "import time\ntime.sleep(60)"):
        worker = threading.Thread(target=query)
        worker.start()
        time.sleep(1.0)  # the query is now inside the site's respond
        t_kill = time.monotonic()
        os.kill(old_pid, signal.SIGKILL)
        worker.join(30)
        detected = time.monotonic() - t_kill
    assert not worker.is_alive() and len(caught) == 1
    error = caught[0]
    assert isinstance(error, pw.SiteError) and error.site == "NCI"
    assert "kernel died" in error.cause and "-9" in error.cause
    assert detected < 5
    assert_failed_cleanly(kfed2, before_rows, before_spent, "NCI", "kernel died")
    status = kfed2.status()
    assert not status.loc["NCI", "alive"] and status.loc["NCI", "state"] == "down"
    next_query_succeeds(kfed2)
    assert site.pid != old_pid and site.restarts == 1
    assert site.verify_key == key  # the restarted kernel signs with the registered key


def test_a_kernel_that_died_while_idle_is_restarted_before_the_next_query(kfed2):
    site = kfed2._sites[0]
    old_pid, restarts = site.pid, site.restarts
    os.kill(old_pid, signal.SIGKILL)
    time.sleep(0.3)
    next_query_succeeds(kfed2)  # no failed query: the dead kernel is noticed and replaced
    assert site.pid != old_pid and site.restarts == restarts + 1


def test_a_hanging_site_times_out_is_interrupted_and_stays_usable(kfed2):
    site = kfed2._sites[0]
    pid, site.timeout = site.pid, 2.0
    try:
        with faulty_respond(site, "import time\ntime.sleep(60)"):
            t0 = time.monotonic()
            error = run_fault(kfed2, pw.SiteError, "NDRS", "did not answer respond within 2 s")
            assert time.monotonic() - t0 < 10
        assert "interrupted" in error.cause
    finally:
        site.timeout = 60.0
    next_query_succeeds(kfed2)
    assert site.pid == pid  # the interrupt brought it back: no restart needed


@pytest.mark.parametrize(("body", "error", "cause"), [
    ('return {"aggregate": "garbage"}', SiteIntegrityError, "malformed"),
    ("return None", SiteIntegrityError, "no result"),
    ("raise ZeroDivisionError", pw.SiteError, "ZeroDivisionError in the site kernel"),
    # a request rewritten to another spec with the same layout: the token admits another query
    ("""import json
request = json.loads(args["request"])
request["spec"]["where"] = {"sex": ["F"]}
return _k._test_original({"request": json.dumps(request)})""",
     SiteAttestationError, "trust.admission"),
    # a correctly signed aggregate encrypted to another enclave key
    ("""import dataclasses
from pets_widgets.core.paillier import encrypt, key_fingerprint
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave.decryption import generate_paillier_keypair
agg = EncryptedAggregate.from_json(_k._test_original(args)["aggregate"])
pk, _ = generate_paillier_keypair(1024)
agg = dataclasses.replace(agg, key_fingerprint=key_fingerprint(pk),
                          ciphertexts=tuple(encrypt(pk, [1] * len(agg.ciphertexts))))
return {"aggregate": agg.signed(_k._STATE["site"]._signing_key).to_json()}""",
     SiteIntegrityError, "another enclave key"),
], ids=["garbage", "no-result", "exception", "foreign-spec", "foreign-key"])
def test_a_faulty_reply_aborts_the_query_naming_the_site(kfed2, body, error, cause):
    site = kfed2._sites[1]
    with faulty_respond(site, body):
        run_fault(kfed2, error, "NCI", cause)
    next_query_succeeds(kfed2)


def test_a_token_the_site_cannot_verify_fails_attestation(kfed2, monkeypatch):
    enclave = kfed2.enclave
    impostor = PlatformVerifier()
    real = enclave.issue_nonce

    def forged(admission, site, nonce):
        token = real(admission, site, nonce)
        return impostor._sign(jwt.decode(token, options={"verify_signature": False}))

    monkeypatch.setattr(enclave, "issue_nonce", forged)
    error = run_fault(kfed2, SiteAttestationError, "NDRS", "trust.signature")
    assert error.rule == "trust.signature"
    monkeypatch.undo()
    next_query_succeeds(kfed2)


def test_a_site_that_cannot_be_restarted_is_reported_down(kfed2, monkeypatch):
    site = kfed2._sites[0]
    os.kill(site.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while site._alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kfed2.status().loc["NDRS", "state"] == "down"

    def broken_launch(timeout: float) -> None:
        raise OSError("no kernel can be started here")

    monkeypatch.setattr(site, "_launch", broken_launch)
    before_rows = len(kfed2.audit_log())
    with pytest.raises(pw.SiteError, match="could not be restarted") as info:
        kfed2.run(SPECS[1], epsilon=fresh_epsilon())
    assert info.value.site == "NDRS" and len(kfed2.audit_log()) == before_rows + 1
    assert kfed2.status().loc["NDRS", "detail"].endswith("restart failed")
    monkeypatch.undo()
    next_query_succeeds(kfed2)


# --------------------------------------------------------------------------- endurance
def test_200_mixed_queries_no_crash_no_leak_memory_steady(kfed2):
    sites = kfed2._sites
    pids = [s.pid for s in sites]
    children = sorted(p.pid for p in pw_children())
    enclave = kfed2.enclave

    def stale_request(spec: pw.QuerySpec) -> AggregateRequest:
        admission = testing.admit_exact(enclave, spec, "t", kfed2.site_names)
        token = enclave.issue_nonce(admission, kfed2.site_names[0], new_nonce())
        return AggregateRequest(admission.spec, token, enclave.public_key,
                                admission.packing)

    def one(i: int) -> None:
        spec = SPECS[i % len(SPECS)]
        kind = i % 5
        if kind == 0:  # valid, through both kernels, exact
            pw.testing.noiseless(kfed2, spec)
        elif kind == 1:  # invalid run parameter: refused before any site works
            with pytest.raises(pw.QueryValidationError):
                kfed2.run(spec, epsilon=-1)
        elif kind == 2:  # below the policy's k: refused by the enclave
            with pytest.raises(pw.QueryRefused):
                kfed2.run(spec, k=1)
        elif kind == 3:  # a replayed quote straight to a site kernel: refused there
            with pytest.raises(SiteAttestationError):
                sites[i % 2].respond(stale_request(spec))
        else:  # a request the site's own validation rejects
            with pytest.raises(pw.SiteError, match="rejected the request"):
                sites[i % 2]._call("respond", {"request": '{"spec": {"kind": "exec"}}'}, 10)

    for i in range(20):  # warm-up: imports, caches, allocator arenas
        one(i)
    rss_before = [rss_mb(os.getpid())] + [rss_mb(p) for p in pids]
    t0 = time.monotonic()
    for i in range(200):
        one(i)
    seconds = time.monotonic() - t0
    rss_after = [rss_mb(os.getpid())] + [rss_mb(p) for p in pids]
    assert [s.pid for s in sites] == pids and all(s.state == "up" for s in sites)
    assert sorted(p.pid for p in pw_children()) == children
    growth = [a - b for a, b in zip(rss_after, rss_before, strict=True)]
    assert growth[0] < 40, f"coordinator RSS grew {growth[0]:.1f} MB"
    assert max(growth[1:]) < 25, f"kernel RSS grew {growth[1:]} MB"
    assert seconds < 120
    print(f"200 mixed queries in {seconds:.1f} s; RSS growth MB (coordinator, kernels): "
          f"{[round(g, 1) for g in growth]}")


def pw_children():
    from .kernel_helpers import kernel_children

    return kernel_children()


def test_closing_stops_every_kernel(tmp_path):
    fed = pw.demo_federation(seed=3, n_sites=1, rows_per_site=300, key_bits=TEST_KEY_BITS,
                             backend="kernel", ledger=tmp_path / "ledger.sqlite")
    pids = [s.pid for s in fed._sites]
    assert all(pids)
    fed.close()
    fed.close()  # twice is harmless
    import psutil

    assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                   for p in pids)
    assert all(s.state == "closed" for s in fed._sites)
    with pytest.raises(pw.SiteError, match="closed"):
        fed.run(pw.Count())
