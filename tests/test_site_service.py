"""Sites as services with fixed routes (``site serve``, Kernel Gateway's notebook-http
personality): the same totals as in-process sites, no route from the coordinator to code,
and clean faults. Every site here is its own ``site serve`` process on 127.0.0.1."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import os
import secrets
import signal

import pandas as pd
import psutil
import pytest
import requests

import pets_widgets as pw
from pets_widgets.coordinator.service import ServiceSite, SiteProcess
from pets_widgets.core.errors import SiteAttestationError, SiteIntegrityError
from pets_widgets.core.net import free_port

from .conftest import SMALL_ROWS, TEST_KEY_BITS, TESTING
from .test_site_config import site_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_kernels")]
_EPSILONS = itertools.count(1)
#: Every query kind, each of which must give a site service federation the local totals.
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
    pw.Survival(by="tumour_group", horizon_months=60, interval_months=3),
    pw.Survival(where={"age_band": ["<1"]}),
    pw.IncidenceRate(by="tumour_group", where={"diagnosis_period": ["2015-2019"]}),
]


def fresh_epsilon() -> float:
    return round(0.02 + 0.001 * next(_EPSILONS), 4)


@pytest.fixture(scope="module")
def sfed2(tmp_path_factory):
    with pw.demo_federation(seed=7, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                            backend="service", **TESTING,
                            ledger=tmp_path_factory.mktemp("sfed2") / "l.sqlite") as fed:
        yield fed


# --------------------------------------------------------------------------- the same totals
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
def test_two_site_services_equal_local_sites(sfed2, fed2, spec):
    got, want = pw.testing.noiseless(sfed2, spec), pw.testing.noiseless(fed2, spec)
    pd.testing.assert_frame_equal(got.table, want.table, obj=spec.describe())


def test_five_site_services_answer_every_query_kind_like_local_sites(fed5, tmp_path):
    with pw.demo_federation(seed=11, n_sites=5, rows_per_site=1_500, key_bits=TEST_KEY_BITS,
                            backend="service", **TESTING, ledger=tmp_path / "l.sqlite") as fed:
        assert {s.backend for s in fed._sites} == {"service"}
        for spec in SPECS:
            got, want = pw.testing.noiseless(fed, spec), pw.testing.noiseless(fed5, spec)
            pd.testing.assert_frame_equal(got.table, want.table, obj=spec.describe())


def test_a_noisy_release_and_status_through_services(sfed2):
    release = sfed2.run(pw.Count(by=["tumour_group"]), epsilon=fresh_epsilon())
    assert release.table is not None and not release.card.repeated
    status = sfed2.status()
    assert (status["backend"] == "service").all() and status["alive"].all()
    assert (status["rows"] == SMALL_ROWS).all() and (status["epsilon_used"] > 0).all()


# --------------------------------------------------------------------------- no route to code
def _session(site: ServiceSite) -> requests.Session:
    return site._session  # everything the coordinator holds: URL, token, connection


@pytest.mark.parametrize(("method", "route"), [
    ("GET", "/api/kernels"), ("POST", "/api/kernels"), ("GET", "/api/kernelspecs"),
    ("GET", "/api/sessions"), ("POST", "/api/sessions"), ("GET", "/_api/source"),
    ("GET", "/api/kernels/x/channels"), ("GET", "/api/contents"), ("POST", "/status"),
    ("GET", "/aggregate"),
])
def test_no_route_but_the_two_answers_even_with_the_token(sfed2, method, route):
    site = sfed2._sites[0]
    response = _session(site).request(method, site.url + route, json={}, timeout=10)
    assert response.status_code in (404, 405), (route, response.status_code)
    assert "Traceback" not in response.text


def test_no_websocket_reaches_a_kernel(sfed2):
    import websocket

    site = sfed2._sites[0]
    url = site.url.replace("http", "ws") + "/api/kernels/anything/channels"
    auth = f"Authorization: {site._session.headers['Authorization']}"
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(url, timeout=10, header=[auth])


@pytest.mark.parametrize("body", [
    "import os; os.system('id')",
    {"admission": "__import__('os').system('id')", "token": "x"},
    {"admission": {"spec": {"kind": "count", "by": ["sex"]}, "public_key_n": "ff",
                   "packing": {}}, "token": "x", "code": "print(open('/etc/passwd').read())"},
    {"admission": {"spec": "SELECT * FROM registry", "public_key_n": "ff", "packing": {}},
     "token": "x"},
    {"admission": {"spec": {"kind": "count", "by": ["sex; rm -rf /"]}, "public_key_n": "ff",
                   "packing": {}}, "token": "x"},
])
def test_code_in_a_request_body_is_a_validation_error(sfed2, body):
    site = sfed2._sites[0]
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    response = _session(site).post(site.url + "/aggregate", timeout=10, **kwargs)
    assert response.status_code in (400, 415), response.text  # 415: not even JSON
    reply = response.json()
    assert reply["error"] in ("QueryValidationError", "PetsError", "RequestRefused")
    assert reply["rule"]
    assert "root" not in response.text and "Traceback" not in response.text


def test_a_request_without_or_with_another_token_is_401(sfed2):
    site = sfed2._sites[0]
    assert requests.get(site.url + "/status", timeout=10).status_code == 401
    bad = requests.get(site.url + "/status", timeout=10,
                       headers={"Authorization": "token " + "0" * 32})
    assert bad.status_code == 401


def test_errors_are_json_with_a_rule_and_no_traceback(sfed2):
    site = sfed2._sites[0]
    response = _session(site).post(site.url + "/aggregate", json={"admission": {}, "token": 1},
                                   timeout=10)
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/json")
    assert set(response.json()) == {"error", "rule", "message"}


def test_a_body_over_the_limit_is_refused_before_the_site_reads_it(sfed2):
    site = sfed2._sites[0]
    huge = {"admission": {"spec": {}, "public_key_n": "f" * (9 * 2**20), "packing": {}},
            "token": "x"}
    try:
        # tornado refuses a body above max_body (8 MiB by default) and closes the connection
        status = requests.post(site.url + "/aggregate", json=huge, timeout=30,
                               headers=dict(site._session.headers)).status_code
    except requests.ConnectionError:
        status = None
    assert status in (None, 400, 413)
    assert sfed2.status()["alive"].all()  # and the site keeps answering


# --------------------------------------------------------------------------- faults
def assert_failed_cleanly(fed, before_rows, before_spent, site, cause):
    log = fed.audit_log()
    assert len(log) == before_rows + 1
    last = log.iloc[-1]
    assert last.outcome == "failed" and site in last.reason and cause in last.reason
    assert fed.budget().analyst_spent == before_spent


def run_fault(fed, error, site, cause):
    before_rows, before_spent = len(fed.audit_log()), fed.budget().analyst_spent
    with pytest.raises(error, match=cause) as info:
        fed.run(SPECS[1], epsilon=fresh_epsilon())
    assert info.value.site == site
    assert_failed_cleanly(fed, before_rows, before_spent, site, cause)
    return info.value


def next_query_succeeds(fed):
    release = fed.run(pw.Count(by=["sex"]), epsilon=fresh_epsilon())
    assert not release.card.repeated
    assert fed.status()["alive"].all()


def test_a_site_killed_mid_query_is_named_and_answers_again_once_restarted(sfed2, monkeypatch):
    site = sfed2._sites[1]
    process = site._process
    real_call = site._call

    def killed_before_reply(method, route, body, timeout, op):
        if route == "/aggregate":
            os.killpg(process.pid, signal.SIGKILL)
            process._proc.wait(10)
        return real_call(method, route, body, timeout, op)

    monkeypatch.setattr(site, "_call", killed_before_reply)
    run_fault(sfed2, pw.SiteError, "NCI", "cannot be reached")
    monkeypatch.undo()
    assert sfed2.status().loc["NCI", "state"] == "down"
    # its operator starts it again, same configuration, port and token
    site._process = SiteProcess(process.config, process.port, process.token,
                                process.token_env, log=process.log)
    site.start()
    next_query_succeeds(sfed2)


def test_a_site_that_hangs_past_the_timeout_is_named(sfed2, monkeypatch):
    site = sfed2._sites[0]
    monkeypatch.setattr(site, "timeout", 0.001)
    monkeypatch.setattr(site, "_nonce", ("unused", 0.0))  # force no cached nonce either
    run_fault(sfed2, pw.SiteError, "NDRS", "did not answer")
    monkeypatch.undo()
    next_query_succeeds(sfed2)


def _tampered(site, monkeypatch, change):
    real_call = site._call

    def tampering(method, route, body, timeout, op):
        reply = real_call(method, route, body, timeout, op)
        return change(reply) if route == "/aggregate" else reply

    monkeypatch.setattr(site, "_call", tampering)


def _flip_a_ciphertext_bit(aggregate):
    aggregate["ciphertexts"][0] = format(int(aggregate["ciphertexts"][0], 16) ^ 1, "x")


def _claim_to_be_ndrs(aggregate):
    aggregate["site"] = "NDRS"


@pytest.mark.parametrize(("change", "cause"), [
    (_flip_a_ciphertext_bit, "signature"),
    (_claim_to_be_ndrs, "another site"),
], ids=["tampered", "another-site"])
def test_a_tampered_or_foreign_reply_is_refused_naming_the_site(sfed2, monkeypatch, change,
                                                                cause):
    def tamper(reply):
        change(reply["aggregate"])
        return reply

    _tampered(sfed2._sites[1], monkeypatch, tamper)
    run_fault(sfed2, SiteIntegrityError, "NCI", cause)
    monkeypatch.undo()
    next_query_succeeds(sfed2)


def test_a_wrong_token_is_named(sfed2, monkeypatch):
    site = sfed2._sites[0]
    monkeypatch.setitem(site._session.headers, "Authorization", "token " + "1" * 32)
    monkeypatch.setattr(site, "_nonce", None)
    error = run_fault(sfed2, pw.SiteError, "NDRS", "token")
    assert error.rule == "token"
    monkeypatch.undo()
    next_query_succeeds(sfed2)


def test_a_forged_token_is_refused_by_the_service(sfed2, monkeypatch):
    from pets_widgets.platform.verifier import PlatformVerifier

    impostor, real = PlatformVerifier(), sfed2._port.admit

    def forged(*args):  # the coordinator re-signs the enclave's tokens with its own key
        import dataclasses

        import jwt

        receipt = real(*args)
        tokens = {site: impostor._sign(jwt.decode(token, options={"verify_signature": False}))
                  for site, token in receipt.tokens.items()}
        return dataclasses.replace(receipt, tokens=tokens)

    monkeypatch.setattr(sfed2._port, "admit", forged)
    error = run_fault(sfed2, SiteAttestationError, "NDRS", "trust.signature")
    assert error.rule == "trust.signature"
    monkeypatch.undo()
    next_query_succeeds(sfed2)


def test_a_site_whose_key_is_not_the_pinned_one_is_refused_at_start(sfed2):
    site = sfed2._sites[0]
    impostor = ServiceSite(site.name, site.url, token=site._session.headers[
        "Authorization"].split()[1], verify_key="ab" * 32, sites=site.sites)
    with pytest.raises(SiteIntegrityError, match="pins"):
        impostor.start()
    impostor.close()


# --------------------------------------------------------------------------- TLS
def _certificates(folder):
    """A CA, a server certificate for 127.0.0.1 and a client certificate (P-256)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(text):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])

    def write(stem, key, cert):
        (folder / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{stem}.key.pem").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("test CA")).issuer_name(name("test CA"))
          .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    write("ca", ca_key, ca)
    for stem, extension in (("server", x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (x509.CertificateBuilder().subject_name(name(stem)).issuer_name(name("test CA"))
                   .public_key(key.public_key()).serial_number(2 if stem == "server" else 3)
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1)))
        if extension is not None:
            builder = builder.add_extension(extension, critical=False)
        write(stem, key, builder.sign(ca_key, hashes.SHA256()))


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path):
    _certificates(tmp_path)
    path = site_file(tmp_path, "NDRS", sites=["NDRS"], capacity=500,
                     source={"kind": "synthetic", "seed": 1, "size": 300})
    text = path.read_text().replace('# certfile = "server.pem"',
                                    f'certfile = "{tmp_path / "server.pem"}"')
    text = text.replace('# keyfile = "server.key.pem"',
                        f'keyfile = "{tmp_path / "server.key.pem"}"')
    text = text.replace('# client_ca = "clients-ca.pem"', f'client_ca = "{tmp_path / "ca.pem"}"')
    path.write_text(text)
    token, port = secrets.token_hex(16), free_port()
    process = SiteProcess(path, port, token, "PETS_SITE_TOKEN", log=tmp_path / "log")
    url = f"https://127.0.0.1:{port}"
    try:
        good = ServiceSite("NDRS", url, token=token, ca_file=str(tmp_path / "ca.pem"),
                           client_cert=str(tmp_path / "client.pem"),
                           client_key=str(tmp_path / "client.key.pem"), process=None)
        good.start()
        assert good.status()["alive"]
        without = ServiceSite("NDRS", url, token=token, ca_file=str(tmp_path / "ca.pem"),
                              start_timeout=2)
        with pytest.raises(pw.SiteError) as info:
            without.start()
        assert info.value.rule == "tls" or "cannot be reached" in info.value.cause
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/status", timeout=5)  # no plain http
        good.close()
        without.close()
    finally:
        process.stop()


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_the_site_service_command_stops_cleanly(tmp_path, stop):
    path = site_file(tmp_path, "NDRS", sites=["NDRS"], capacity=500,
                     source={"kind": "synthetic", "seed": 1, "size": 300})
    token, port = secrets.token_hex(16), free_port()
    process = SiteProcess(path, port, token, "PETS_SITE_TOKEN", log=tmp_path / "log")
    site = ServiceSite("NDRS", f"http://127.0.0.1:{port}", token=token, process=process)
    site.start()
    kernels = psutil.Process(process.pid).children(recursive=True)
    assert kernels  # its one kernel
    process._proc.send_signal(stop)
    assert process._proc.wait(20) == 0
    log = (tmp_path / "log").read_text()
    assert "serving at http://127.0.0.1" in log and "verify key" in log
    assert "Kernel shutdown" in log
    _, alive = psutil.wait_procs(kernels, timeout=10)
    assert not alive  # no kernel left behind
    site.close()


def test_a_site_service_with_broken_data_says_why_by_rule_and_count(tmp_path):
    from .test_config import SENTINELS, bad_csv

    (tmp_path / "bad.csv").write_text(bad_csv().replace("CSVREG", "NDRS"))
    path = site_file(tmp_path, "NDRS", sites=["NDRS"], capacity=500,
                     source={"kind": "csv", "path": str(tmp_path / "bad.csv")})
    token, port = secrets.token_hex(16), free_port()
    process = SiteProcess(path, port, token, "PETS_SITE_TOKEN")
    site = ServiceSite("NDRS", f"http://127.0.0.1:{port}", token=token, process=process,
                       start_timeout=30)
    try:
        with pytest.raises(pw.SiteError) as info:
            site.start()
        assert info.value.rule == "data" and "2 rows" in info.value.cause
        assert "bad.csv" not in info.value.cause
        for value in SENTINELS.values():
            assert value not in info.value.cause
    finally:
        site.close()


def test_site_services_of_a_killed_coordinator_stop_by_themselves():
    """A notebook kernel killed with SIGKILL runs no atexit: its embedded site services see
    their parent gone and stop (with their kernels) within seconds."""
    import subprocess
    import sys

    code = ("import pets_widgets as pw, time\n"
            "fed = pw.demo_federation(backend='service', key_bits=1024, rows_per_site=500)\n"
            "print('up', flush=True)\ntime.sleep(120)\n")
    coordinator = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert coordinator.stdout is not None and coordinator.stdout.readline() == b"up\n"
        services = psutil.Process(coordinator.pid).children(recursive=True)
        assert len([p for p in services if "site" in p.cmdline()]) == 2
        coordinator.kill()
        coordinator.wait(10)
        _, alive = psutil.wait_procs(services, timeout=20)
        assert not alive, [p.cmdline()[:5] for p in alive]
    finally:
        coordinator.kill()


# --------------------------------------------------------------------------- endurance
def test_200_mixed_queries_leave_the_services_answering_and_memory_steady(sfed2):
    from pets_widgets.coordinator.enclaves import Receipt
    from pets_widgets.core.wire import AggregateRequest, new_nonce

    from .kernel_helpers import rss_mb

    sites, names = sfed2._sites, sfed2.site_names
    kernels = [psutil.Process(s._process.pid).children(recursive=True)[0].pid for s in sites]
    kernels += [p.pid for p in psutil.Process(sfed2.enclave._process.pid).children(
        recursive=True) if "ipykernel" in " ".join(p.cmdline())]  # the enclave's kernel

    def stale_request(spec: pw.QuerySpec) -> tuple[AggregateRequest, Receipt]:
        receipt = sfed2._port.admit_exact(spec, "t", names,
                                          lambda: {n: new_nonce() for n in names})
        return AggregateRequest(receipt.spec, receipt.tokens[names[0]], receipt.public_key,
                                receipt.packing), receipt

    def one(i: int) -> None:
        spec = SPECS[i % len(SPECS)]
        kind = i % 5
        if kind == 0:  # valid, through both services, exact
            pw.testing.noiseless(sfed2, spec)
        elif kind == 1:  # invalid run parameter: refused before any site works
            with pytest.raises(pw.QueryValidationError):
                sfed2.run(spec, epsilon=-1)
        elif kind == 2:  # below the policy's k: refused by the enclave
            with pytest.raises(pw.QueryRefused):
                sfed2.run(spec, k=1)
        elif kind == 3:  # a token for a nonce the site never issued: refused there
            request, receipt = stale_request(spec)
            with pytest.raises(SiteAttestationError):
                sites[i % 2].respond(request)
            sfed2._port.abort(receipt, "site.trust", "refused by the site")  # as fed.run does
        else:  # a request the site's own validation rejects
            with pytest.raises(pw.SiteError, match="rejected the request"):
                sites[i % 2]._call("POST", "/aggregate", {"admission": {"spec": {
                    "kind": "exec"}, "public_key_n": "ff", "packing": {}}, "token": "x"},
                    10, "aggregate")

    for i in range(20):  # warm-up: imports, caches, allocator arenas
        one(i)
    rss_before = [rss_mb(os.getpid())] + [rss_mb(p) for p in kernels]
    for i in range(200):
        one(i)
    rss_after = [rss_mb(os.getpid())] + [rss_mb(p) for p in kernels]
    assert sfed2.status()["alive"].all()
    growth = [a - b for a, b in zip(rss_after, rss_before, strict=True)]
    assert growth[0] < 40, f"coordinator RSS grew {growth[0]:.1f} MB"
    assert max(growth[1:]) < 25, f"site and enclave kernel RSS grew {growth[1:]} MB"


# --------------------------------------------------------------------------- review findings
def test_status_hands_out_one_nonce_until_it_is_used(sfed2):
    site = sfed2._sites[0]
    first, second = site._status()["nonce"], site._status()["nonce"]
    assert first == second  # polling the status cannot flood the site's nonce table
    sfed2.run(pw.Count(by=["sex"]), epsilon=fresh_epsilon())
    assert site._status()["nonce"] != first or site._nonce is not None


def test_the_site_kernel_keeps_no_request_in_its_history(sfed2):
    import sqlite3
    from pathlib import Path

    marker = "MARKER-" + secrets.token_hex(8)
    site = sfed2._sites[0]
    _session(site).post(site.url + "/aggregate", json={"admission": marker, "token": marker},
                        timeout=10)
    site._status()
    history = Path.home() / ".ipython" / "profile_default" / "history.sqlite"
    if history.exists():
        with sqlite3.connect(history) as db:
            rows = db.execute("SELECT count(*) FROM history WHERE source LIKE ?",
                              (f"%{marker}%",)).fetchone()[0]
        assert rows == 0


def test_a_service_whose_kernel_died_stops_with_a_failure_status(tmp_path):
    path = site_file(tmp_path, "NDRS", sites=["NDRS"], capacity=500,
                     source={"kind": "synthetic", "seed": 1, "size": 300})
    token, port = secrets.token_hex(16), free_port()
    process = SiteProcess(path, port, token, "PETS_SITE_TOKEN", log=tmp_path / "log")
    site = ServiceSite("NDRS", f"http://127.0.0.1:{port}", token=token, process=process)
    try:
        site.start()
        kernel = psutil.Process(process.pid).children(recursive=True)[0]
        kernel.kill()
        assert process._proc.wait(20) == 1  # a supervisor restarts it; nothing hangs
        assert "kernel died" in (tmp_path / "log").read_text()
    finally:
        site.close()


@pytest.mark.parametrize("pause", [0.5, 5.0], ids=["dripping", "stalled"])
def test_a_site_dripping_or_stalling_its_reply_is_held_to_the_timeout(pause):
    import contextlib
    import http.server
    import threading
    import time

    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up, as it should
                for _ in range(30):
                    self.wfile.write(b" ")
                    self.wfile.flush()
                    time.sleep(pause)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    site = ServiceSite("NDRS", f"http://127.0.0.1:{server.server_port}", token="t" * 32,
                       timeout=2.0)
    t0 = time.monotonic()
    with pytest.raises(pw.SiteError, match="did not answer"):
        site._status()
    assert time.monotonic() - t0 < 5
    server.shutdown()
    site.close()


@pytest.mark.parametrize(("method", "route", "kwargs", "status", "rule"), [
    ("POST", "/aggregate", {"data": b"\xff\xfe", "headers": {"Content-Type":
                                                              "application/json"}}, 400,
     "encoding"),
    ("PUT", "/aggregate", {"json": {}}, 405, "method"),
    ("DELETE", "/status", {}, 405, "method"),
    ("POST", "/status", {"json": {}}, 405, "method"),
    ("GET", "/aggregate", {}, 405, "method"),
    ("OPTIONS", "/status", {}, 405, "method"),
    ("POST", "/aggregate", {"data": "x=1", "headers": {
        "Content-Type": "application/x-www-form-urlencoded"}}, 415, "content_type"),
])
def test_requests_the_routes_do_not_take_are_refused_in_json_before_the_kernel(
        sfed2, method, route, kwargs, status, rule):
    site = sfed2._sites[0]
    response = _session(site).request(method, site.url + route, timeout=10, **kwargs)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["rule"] == rule


def test_the_token_counts_only_in_the_authorization_header(sfed2):
    site = sfed2._sites[0]
    token = site._session.headers["Authorization"].split()[1]
    assert requests.get(f"{site.url}/status?token={token}", timeout=10).status_code == 401
    assert requests.options(site.url + "/status", timeout=10).status_code == 401


def test_a_json_body_with_a_charset_is_json(sfed2):
    site = sfed2._sites[0]
    response = _session(site).post(site.url + "/aggregate", data=b'{"admission": 1}',
                                   headers={"Content-Type": "application/json; charset=utf-8"},
                                   timeout=10)
    assert response.status_code == 400 and response.json()["rule"] == "validation"
