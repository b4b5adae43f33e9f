"""The enclave as its own service (``enclave serve``): the private key, the policy and the
ledger live in the enclave's process, launched and measured by the platform verifier, and
every attack from the analyst's process is tried and shown to fail.

The federation here has its two sites and its enclave as services on 127.0.0.1, as the
dashboard's embedded default does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import requests

import pets_widgets as pw
from pets_widgets.coordinator.enclaves import EnclaveProcess, ServiceEnclave
from pets_widgets.coordinator.federation import Federation
from pets_widgets.core.enclave_config import write_enclave_config
from pets_widgets.core.errors import EnclaveError, SiteAttestationError

from .conftest import SMALL_ROWS, TEST_KEY_BITS, TESTING
from .test_integrity import overflowing, with_site0

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_kernels")]
ROUTES = ("/status", "/admit", "/release", "/budget", "/audit")


@pytest.fixture(scope="module")
def efed(tmp_path_factory):
    """Site services and an enclave service, all started here (the embedded default)."""
    with pw.demo_federation(seed=7, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                            backend="service", **TESTING,
                            ledger=tmp_path_factory.mktemp("efed") / "ledger.sqlite") as fed:
        yield fed


def operator(fed: Federation, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pets_widgets enclave ...`` on the federation's enclave configuration, as
    its operator runs it (out of band)."""
    config = fed.enclave._process.config
    return subprocess.run([sys.executable, "-m", "pets_widgets", "enclave", *args,
                           "--config", str(config)], capture_output=True, text=True,
                          timeout=120, check=False)


def another_analyst(fed: Federation, name: str) -> Federation:
    """The same sites and enclave, reached with a token the operator issued for ``name``."""
    done = operator(fed, "add-analyst", name)
    assert done.returncode == 0, done.stderr
    client = ServiceEnclave(fed.enclave.url, token=done.stdout.strip()).start()
    return Federation(fed._sites, client)


# --------------------------------------------------------------------------- the service
def test_the_enclave_is_its_own_process_with_the_routes_only(efed):
    assert efed.is_service and "enclave service" in repr(efed)
    assert efed.enclave._process.pid != os.getpid()
    session = efed.enclave._session  # everything this process holds: URL and its token
    for route in ("/api/kernels", "/api/kernelspecs", "/api/sessions", "/api/contents",
                  "/ledger", "/unlock", "/add-analyst"):
        reply = session.get(efed.enclave.url + route, timeout=10)
        assert reply.status_code in (404, 405), route
    for route in ROUTES:  # every route wants an analyst's token
        assert requests.get(efed.enclave.url + route, timeout=10).status_code == 401
        assert requests.get(efed.enclave.url + route, timeout=10, headers={
            "Authorization": "token pa_" + "x" * 43}).status_code == 401


def test_status_publishes_the_measured_image_and_the_token_owner(efed):
    info = efed.enclave.status()
    assert info["debug"] is True and info["image_digest"].startswith("sha256:")
    from pets_widgets.platform.measurement import expected_image_digest

    assert info["image_digest"] == expected_image_digest(efed.policy, efed.schema.digest,
                                                         debug=True)
    assert info["image_digest"] != expected_image_digest(efed.policy, efed.schema.digest)
    assert info["analyst"] == efed.analyst and info["sites"] == list(efed.site_names)


def test_a_release_through_the_enclave_service_and_its_repeat(efed):
    spec = pw.Crosstab(rows="tumour_group", cols="age_band", where={"sex": ["F"]})
    first = efed.run(spec, epsilon=0.3)
    again = efed.run(spec, epsilon=0.3)
    assert again.card.repeated and not first.card.repeated
    assert again.table.equals(first.table) and again.suppressed.equals(first.suppressed)
    assert first.card.analyst == efed.analyst
    log = efed.audit_log()
    assert list(log.outcome[-2:]) == ["released", "repeated"]
    assert set(log.analyst) == {efed.analyst}  # an analyst sees their own rows only


def test_an_invalid_or_refused_query_is_raised_as_in_process(efed):
    with pytest.raises(pw.QueryValidationError) as info:
        efed.run(pw.Count(by=["sex"]), epsilon=-1)
    assert info.value.field == "epsilon"
    with pytest.raises(pw.QueryRefused) as refused:
        efed.run(pw.Count(by=["sex"]), k=1)
    assert refused.value.rule == "k"
    assert efed.audit_log().iloc[-1].rule == "k"


# --------------------------------------------------------------------------- who is charged
def test_the_analyst_cannot_choose_the_name_it_is_charged_to(efed, monkeypatch):
    owner = efed.analyst
    with pytest.raises(pw.QueryValidationError) as info:
        efed.run(pw.Count(by=["sex"]), analyst="somebody-else")
    assert info.value.field == "analyst"
    monkeypatch.setenv("JUPYTERHUB_USER", "somebody-else")
    monkeypatch.setenv("USER", "somebody-else")
    release = efed.run(pw.Count(by=["age_band"]), epsilon=0.05)
    assert release.card.analyst == owner
    # A second Federation, or a second process, with the same token is the same analyst.
    second = Federation(efed._sites, ServiceEnclave(
        efed.enclave.url, token=efed.enclave._session.headers["Authorization"][6:]).start())
    assert second.budget() == efed.budget()
    # A made-up token is nobody.
    with pytest.raises(EnclaveError) as bad:
        ServiceEnclave(efed.enclave.url, token="pa_" + "y" * 43).start()
    assert bad.value.rule == "token"


def test_a_revoked_token_stops_working(efed):
    bob = another_analyst(efed, "bob-revoked")
    bob.run(pw.Count(by=["sex"]), epsilon=0.05)
    assert operator(efed, "revoke", "bob-revoked").returncode == 0
    with pytest.raises(EnclaveError) as info:
        bob.run(pw.Count(by=["sex"]), epsilon=0.06)
    assert info.value.rule == "token"


def test_one_analysts_refused_probes_cost_nobody_else(efed):
    mallory, ann = another_analyst(efed, "mallory"), another_analyst(efed, "ann")
    ann_before, fed_before = ann.budget().analyst_spent, ann.budget().federation_spent
    refused = 0
    for sex in ("F", "M"):
        for year in (2001, 2002, 2003):
            try:
                mallory.run(pw.Count(where={"subtype": ["PPB"], "sex": [sex],
                                            "diagnosis_year": (year, year)}), epsilon=0.2)
            except pw.QueryRefused as exc:
                refused += exc.rule == "min_subset"
    assert refused >= 2
    spent = mallory.budget()
    assert ann.budget().analyst_spent == ann_before
    assert ann.budget().federation_spent - fed_before == spent.analyst_spent


def test_eight_concurrent_identical_queries_cost_one_epsilon_and_give_one_answer(efed):
    carol = another_analyst(efed, "carol")
    spec = pw.Count(by=["tumour_group"], where={"diagnosis_period": ["2005-2009"]})
    before = carol.budget().analyst_spent
    results: list[pw.Release] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            results.append(carol.run(spec, epsilon=0.25))
        except BaseException as exc:  # collected: the assertion below shows them
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert len(results) == 8
    assert all(r.table.equals(results[0].table) for r in results)
    assert carol.budget().analyst_spent - before == pytest.approx(0.25)
    assert sum(not r.card.repeated for r in results) == 1


# --------------------------------------------------------------------------- the ledger
def test_the_analysts_process_holds_no_key_ledger_rows_or_totals(tmp_path):
    """An object walk of a fresh analyst process after a service query."""
    script = textwrap.dedent(f"""
        import gc, json, os, sqlite3
        import pandas as pd
        import pets_widgets as pw
        from phe import paillier
        from pets_widgets.enclave.enclave import Enclave
        from pets_widgets.enclave.decryption import Decryptor
        from pets_widgets.enclave.ledger import Ledger
        from pets_widgets.site.site import Site
        fed = pw.demo_federation(rows_per_site={SMALL_ROWS}, key_bits={TEST_KEY_BITS},
                                 backend="service", ledger={str(tmp_path / "l.sqlite")!r})
        fed.run(pw.Crosstab(rows="tumour_group", cols="sex"), epsilon=0.5)
        gc.collect()
        objects = gc.get_objects()
        kinds = (paillier.PaillierPrivateKey, Enclave, Decryptor, Ledger, Site,
                 sqlite3.Connection)
        held = sorted({{type(o).__name__ for o in objects if isinstance(o, kinds)}})
        frames = [o for o in objects if isinstance(o, pd.DataFrame) and len(o) >= 100]
        fds = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                fds.append(os.readlink(f"/proc/self/fd/{{fd}}"))
            except OSError:
                pass
        print(json.dumps({{"held": held, "big_frames": len(frames),
                          "ledger_fds": [f for f in fds if "sqlite" in f or "ledger" in f]}}))
        fed.close()
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found == {"held": [], "big_frames": 0, "ledger_fds": []}


def test_a_hidden_cells_noisy_value_is_nowhere_in_the_ledger(fresh_fed):
    """Stored releases keep what was released: a hidden cell's value, noisy or not, and its
    interval are missing from the stored payload (the in-process enclave runs the same
    ledger code as the service)."""
    from pets_widgets.core.release_wire import release_to_dict

    spec = pw.Crosstab(rows="tumour_group", cols="age_band",
                       where={"diagnosis_year": (2010, 2010)})
    release = fresh_fed.run(spec, epsilon=0.5, analyst="eve")
    hidden = release.suppressed.to_numpy()
    assert hidden.any()
    con = fresh_fed.ledger._connections[next(iter(fresh_fed.ledger._connections))]
    (payload,) = con.execute("SELECT payload FROM releases WHERE spec_hash = ?",
                             (spec.canonical(fresh_fed.schema).hash,)).fetchone()
    stored = json.loads(payload)
    assert set(stored) == {"release", "time"}
    table = stored["release"]["table"]
    for name in ("table", "lower", "upper"):
        columns = stored["release"][name]["data"]
        for j, column in enumerate(columns):
            for i, value in enumerate(column):
                if hidden[i, j]:
                    assert value is None, (name, i, j)
    assert table == release_to_dict(release)["table"]


def test_a_ledger_of_another_policy_is_refused_by_the_enclave_service(efed, tmp_path):
    from pets_widgets.core.enclave_config import load_enclave_config
    from pets_widgets.enclave.ledger import Ledger

    mine = load_enclave_config(efed.enclave._process.config)
    path = write_enclave_config(
        tmp_path, sites=mine.sites, site_keys=mine.site_keys, policy=pw.Policy(k=6),
        key_bits=TEST_KEY_BITS, ledger=str(mine.ledger), verifier=str(tmp_path / "v"))
    for command in ("add-analyst", "audit", "unlock"):  # the operator's tools refuse it too
        args = [command, "x"] if command == "add-analyst" else [command]
        done = subprocess.run([sys.executable, "-m", "pets_widgets", "enclave", *args,
                               "--config", str(path)], capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 2 and "another policy" in done.stderr, command
    token = Ledger(mine.ledger).add_analyst("looser-policy")  # as its operator, on disk
    process = EnclaveProcess(path, log=tmp_path / "log")
    try:
        with pytest.raises(EnclaveError) as info:
            ServiceEnclave("", token=token, process=process).start()
        assert info.value.rule == "ledger" and "another policy" in str(info.value)
    finally:
        process.stop()


def test_a_cheating_sites_overflow_costs_max_epsilon_and_locks_until_unlocked(tmp_path):
    """Local (in-process) sites, one of them cheating, with the enclave as a service."""
    with pw.demo_federation(rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS, **TESTING,
                            enclave="service", ledger=tmp_path / "l.sqlite") as fed:
        evil = with_site0(fed, overflowing(fed))
        with pytest.raises(pw.IntegrityError):
            evil.run(pw.Count(by=["sex"]), epsilon=0.05)
        assert fed.budget().analyst_spent == 1  # max_epsilon, not 0.05
        assert fed.audit_log().iloc[-1].rule == "integrity_incident"
        with pytest.raises(pw.QueryRefused) as info:
            fed.run(pw.Count(by=["age_band"]))
        assert info.value.rule == "locked"
        assert not hasattr(fed, "ledger")  # no unlock from the analyst's process
        done = operator(fed, "unlock")
        assert done.returncode == 0 and "unlocked" in done.stdout
        fed.run(pw.Count(by=["age_band"]), epsilon=0.05)


def test_a_debug_enclave_is_refused_by_sites_that_do_not_allow_one(tmp_path):
    with pw.demo_federation(rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS, debug=True,
                            enclave="service", ledger=tmp_path / "l.sqlite") as fed:
        from pets_widgets.site.trust import SiteTrust

        site = fed._sites[0]._site
        trust = site._trust
        site.enroll(SiteTrust(trust.verifier_jwks, trust.approved_images, trust.issuer, False))
        with pytest.raises(SiteAttestationError) as info:
            fed.run(pw.Count(by=["sex"]), epsilon=0.05)
        assert info.value.rule == "trust.debug"
        assert fed.budget().analyst_spent == 0


def test_pages_of_one_dashboard_server_share_one_ledger(efed, tmp_path, monkeypatch):
    """The dashboard's server starts the services once; each page's kernel reaches them
    through the federation file it wrote (tokens in the environment)."""
    path = tmp_path / "federation.toml"
    env = efed.write_config(path)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert not any(token in path.read_text() for token in env.values())  # names only
    spec = pw.Count(by=["stage"], where={"diagnosis_period": ["2010-2014"]})
    first_page = pw.Federation.from_config(path)
    second_page = pw.Federation.from_config(path)
    released = first_page.run(spec, epsilon=0.15)
    again = second_page.run(spec, epsilon=0.15)
    assert again.card.repeated and again.table.equals(released.table)
    assert second_page.budget() == first_page.budget() == efed.budget()
    first_page.close()  # closing a page stops nothing it did not start
    assert efed.enclave.status()["analyst"] == efed.analyst


def test_write_config_needs_services(fed2, tmp_path):
    with pytest.raises(pw.ConfigError, match="services"):
        fed2.write_config(tmp_path / "f.toml")


def test_the_launch_secret_is_read_once_and_gone(efed):
    """The enclave proves itself to its verifier with a secret it read from a file that no
    longer exists, and that is in no process's environment."""
    import psutil

    tree = psutil.Process(efed.enclave._process.pid).children(recursive=True)
    kernel = next(p for p in tree if "ipykernel" in " ".join(p.cmdline()))
    path = kernel.environ().get("PETS_VERIFIER_SECRET_FILE")
    assert path and not os.path.exists(path)
    assert "PETS_VERIFIER_SECRET" not in kernel.environ()


def test_an_exact_fraction_epsilon_travels_to_the_enclave(efed):
    from fractions import Fraction

    release = efed.run(pw.Count(by=["sex"]), epsilon=Fraction(1, 7))
    assert release.card.epsilon == pytest.approx(1 / 7)
