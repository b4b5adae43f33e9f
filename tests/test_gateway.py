"""Sites behind a Jupyter Kernel Gateway started here, on 127.0.0.1, with a token.

The same configuration as a kernel federation, with ``backend = "gateway"``, ``url`` and
``token_env``: nothing else changes, and the totals are the same.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

import pets_widgets as pw

from .conftest import TEST_KEY_BITS, TESTING
from .kernel_helpers import kernel_gateway

#: Slow; every kernel and gateway this module starts is gone when it ends.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_leaked_kernels")]

SITES = """
[[sites]]
name = "NDRS"
backend = "{backend}"
{extra}
source = {{ kind = "synthetic", seed = 5, size = 1200, cases_per_year = 1650 }}

[[sites]]
name = "NORDIC"
backend = "{backend}"
{extra}
source = {{ kind = "csv", path = "{csv}" }}
"""



@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    with kernel_gateway(tmp_path_factory.mktemp("kg-runtime")) as gw:
        yield gw


def write_config(folder, backend: str, url: str = "", token_env: str = "") -> str:
    from .test_config import EXAMPLES

    extra = f'url = "{url}"\ntoken_env = "{token_env}"' if backend == "gateway" else ""
    path = folder / f"{backend}-{token_env or 'local'}.toml"
    # An absolute path: a gateway site reads its file on the gateway's machine (here, this one)
    path.write_text(SITES.format(backend=backend, extra=extra,
                                 csv=EXAMPLES / "registry_example.csv"))
    return str(path)


def test_two_sites_behind_a_gateway_answer_queries(gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("PETS_TEST_KG_TOKEN", gateway.token)
    path = write_config(tmp_path, "gateway", gateway.url, "PETS_TEST_KG_TOKEN")
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "gw.sqlite", **TESTING) as fed, \
         pw.Federation.from_config(write_config(tmp_path, "local"), key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "local.sqlite", **TESTING) as local:
        status = fed.status()
        assert (status["backend"] == "gateway").all() and status["alive"].all()
        assert status["rows"].tolist() == [1200, 400]
        for site in fed._sites:
            assert site.kernel_id and site.kernel_info["pid"] != os.getpid()
            assert site.kernel_info["module"] == str(Path(pw.__file__).resolve().parent)
        for spec in (pw.Crosstab(rows="site", cols="tumour_group"),
                     pw.Mean(variable="age_at_diagnosis", by=["died"])):
            pd.testing.assert_frame_equal(pw.testing.noiseless(fed, spec).table,
                                          pw.testing.noiseless(local, spec).table)
        release = fed.run(pw.Count(by=["sex"]), epsilon=0.5)
        assert release.card.sites == ("NDRS", "NORDIC")
    assert all(s.state == "closed" for s in fed._sites)


def test_a_wrong_token_is_refused_naming_the_site(gateway, tmp_path, monkeypatch):
    monkeypatch.setenv("PETS_TEST_KG_TOKEN", "not-the-token")
    path = write_config(tmp_path, "gateway", gateway.url, "PETS_TEST_KG_TOKEN")
    with pytest.raises(pw.SiteError, match="refused the token in \\$PETS_TEST_KG_TOKEN") as info:
        pw.Federation.from_config(path, key_bits=TEST_KEY_BITS, ledger=tmp_path / "l.sqlite")
    assert info.value.site == "NDRS" and "HTTP 401" in info.value.cause
    assert "not-the-token" not in str(info.value)


def test_a_missing_token_variable_is_named(gateway, tmp_path, monkeypatch):
    monkeypatch.delenv("PETS_TEST_KG_TOKEN", raising=False)
    path = write_config(tmp_path, "gateway", gateway.url, "PETS_TEST_KG_TOKEN")
    with pytest.raises(pw.SiteError, match=r"PETS_TEST_KG_TOKEN .* is not set"):
        pw.Federation.from_config(path, key_bits=TEST_KEY_BITS, ledger=tmp_path / "l.sqlite")


def test_an_unreachable_gateway_is_named(tmp_path, monkeypatch):
    from pets_widgets.ui.serve import free_port

    monkeypatch.setenv("PETS_TEST_KG_TOKEN", "x")
    path = write_config(tmp_path, "gateway", f"http://127.0.0.1:{free_port()}/",
                        "PETS_TEST_KG_TOKEN")
    with pytest.raises(pw.SiteError, match="cannot be reached") as info:
        pw.Federation.from_config(path, key_bits=TEST_KEY_BITS, ledger=tmp_path / "l.sqlite")
    assert info.value.site == "NDRS"


def test_a_gateway_kernel_killed_while_idle_is_restarted_with_the_same_key(gateway, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("PETS_TEST_KG_TOKEN", gateway.token)
    path = tmp_path / "one.toml"
    path.write_text(
        f'[[sites]]\nname = "A"\nbackend = "gateway"\nurl = "{gateway.url}"\n'
        f'token_env = "PETS_TEST_KG_TOKEN"\nkey_file = "{tmp_path / "a-key.pem"}"\n'
        'source = { kind = "synthetic", seed = 1, size = 300 }\n')
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "l.sqlite", **TESTING) as fed:
        site = fed._sites[0]
        key, pid = site.verify_key, site.kernel_info["pid"]
        before = pw.testing.noiseless(fed, pw.Count(by=["sex"])).table
        os.kill(pid, signal.SIGKILL)
        time.sleep(1.5)  # the gateway notices and restarts the kernel, which loses its site
        after = pw.testing.noiseless(fed, pw.Count(by=["sex"])).table
        pd.testing.assert_frame_equal(before, after)
        assert site.restarts == 1 and site.kernel_info["pid"] != pid
        assert site.verify_key == key and fed.status().loc["A", "alive"]
