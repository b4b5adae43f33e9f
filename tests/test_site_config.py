"""A registry's own site configuration: the file, the operator's commands (site init, site
check, attest verify) and federations whose sites are opened from the registries' own files."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

import pets_widgets as pw
from pets_widgets.__main__ import main
from pets_widgets.platform.measurement import expected_image_digest
from pets_widgets.platform.verifier import PlatformVerifier
from pets_widgets.site.config import DEFAULT_CAPACITY, load_site_config, write_site_config
from pets_widgets.site.operator import FAILED, OK, UNUSABLE, check_site, verify_token_file

from .attest import expired, real_request, resigned
from .conftest import TEST_KEY_BITS
from .test_config import SENTINELS, bad_csv

SYNTHETIC = {"kind": "synthetic", "seed": 5, "size": 400}


def site_file(tmp_path: Path, name: str = "NDRS", **kwargs) -> Path:
    kwargs.setdefault("verifier_jwks", PlatformVerifier().jwks())
    kwargs.setdefault("approved_images", [expected_image_digest()])
    kwargs.setdefault("sites", ["NDRS", "NCI"])
    return write_site_config(tmp_path / name, name, kwargs.pop("source", SYNTHETIC), **kwargs)


def edited(path: Path, old: str, new: str) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new))
    return path


# --------------------------------------------------------------------------- the file
def test_a_written_configuration_reads_back_with_absolute_paths(tmp_path):
    config = load_site_config(site_file(tmp_path, capacity=1000))
    assert config.name == "NDRS" and config.sites == ("NDRS", "NCI")
    assert config.capacity == 1000 and config.floors == pw.Floors()
    assert config.signing_key == (tmp_path / "NDRS" / "signing-key.pem").resolve()
    assert config.budget.parent == (tmp_path / "NDRS").resolve()
    assert config.trust.approved_images == (expected_image_digest(),)
    assert not config.trust.allow_debug
    assert load_site_config(tmp_path / "NDRS").path == config.path  # a folder works too


@pytest.mark.parametrize("old, new, key", [
    (f'capacity = {DEFAULT_CAPACITY}', 'capacity = -3', "capacity"),
    ('k = 5', 'k = 0', "floor.k"),
    ('k = 5', 'k = 5\nkk = 1', "[floor] has unknown keys ['kk']"),
    ('max_epsilon = 1.0', 'max_epsilon = "one"', "floor.max_epsilon"),
    ('allow_debug = false', 'allow_debug = "no"', "trust.allow_debug"),
    ('approved_images = [', 'approved_images = ["md5:1", ', "trust.approved_images"),
    ('budget = "site-budget.sqlite"', 'budget = "../../elsewhere.sqlite"', "budget leaves"),
    ('signing_key = "signing-key.pem"', 'signing_key = "../k.pem"', "signing_key leaves"),
    ('verifier_jwks = "verifier-jwks.json"', 'verifier_jwks = "missing.json"',
     "trust.verifier_jwks"),
    ('sites = ["NDRS", "NCI"]', 'sites = ["NCI"]', "dictionary.sites"),
    ('name = "NDRS"', 'name = "NDRS"\nsource_path = 1', "unknown keys ['source_path']"),
])
def test_a_bad_key_is_named_with_what_it_allows(tmp_path, old, new, key):
    path = edited(site_file(tmp_path), old, new)
    with pytest.raises(pw.ConfigError) as info:
        load_site_config(path)
    assert key in str(info.value)


def test_a_relative_data_path_may_not_leave_the_folder_but_an_absolute_one_may(tmp_path):
    (tmp_path / "rows.csv").write_text("x\n")
    outside = site_file(tmp_path, source={"kind": "csv", "path": str(tmp_path / "rows.csv")})
    assert load_site_config(outside).source.path == str(tmp_path / "rows.csv")
    edited(outside, f'path = "{tmp_path / "rows.csv"}"', 'path = "../rows.csv"')
    with pytest.raises(pw.ConfigError, match=r"source\.path leaves the configuration's folder"):
        load_site_config(outside)
    edited(outside, 'kind = "csv"\npath = "../rows.csv"',
           'kind = "sql"\nurl = "sqlite:///../../r.sqlite"\ntable = "registry"')
    with pytest.raises(pw.ConfigError, match=r"source\.url leaves"):
        load_site_config(outside)


# --------------------------------------------------------------------------- site init / check
def test_site_init_writes_a_configuration_and_a_private_key(tmp_path, capsys):
    PlatformVerifier.open(tmp_path / "platform")
    status = main(["site", "init", str(tmp_path / "ndrs"), "--name", "NDRS", "--sites",
                   "NDRS,NCI", "--synthetic", "seed=7,size=900", "--capacity", "900",
                   "--verifier-jwks", str(tmp_path / "platform" / "verifier-jwks.json")])
    out = capsys.readouterr().out
    assert status == OK and "site check" in out
    key = tmp_path / "ndrs" / "signing-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    config = load_site_config(tmp_path / "ndrs" / "site.toml")
    assert config.capacity == 900 and config.trust.approved_images == (expected_image_digest(),)
    assert main(["site", "init", str(tmp_path / "ndrs"), "--name", "NDRS", "--synthetic",
                 "seed=1,size=10"]) == UNUSABLE  # never overwrites a site's configuration
    assert "already exists" in capsys.readouterr().out
    assert main(["site", "check", "--config", str(tmp_path / "ndrs" / "site.toml")]) == OK
    out = capsys.readouterr().out
    assert "data: ok, about 900 patients" in out and "debug enclaves refused" in out


def test_site_init_refuses_a_bad_synthetic_option_by_name(tmp_path, capsys):
    assert main(["site", "init", str(tmp_path / "x"), "--name", "X",
                 "--synthetic", "seed=7,rows=3"]) == UNUSABLE
    assert "--synthetic" in capsys.readouterr().out


def test_site_check_reports_rules_and_counts_never_rows_or_values(tmp_path):
    (tmp_path / "bad.csv").write_text(bad_csv().replace("CSVREG", "NDRS"))
    path = site_file(tmp_path, source={"kind": "csv", "path": str(tmp_path / "bad.csv")})
    report = check_site(path)
    text = str(report)
    assert report.status == FAILED and "breaks" in text
    assert "column 'sex', 2 rows" in text
    for value in SENTINELS.values():
        assert value not in text
    assert "rows 3" not in text and ", 18" not in text


def test_site_check_names_an_unusable_configuration(tmp_path):
    path = edited(site_file(tmp_path), 'k = 5', 'k = -1')
    report = check_site(path)
    assert report.status == UNUSABLE and "floor.k" in str(report)


# --------------------------------------------------------------------------- attest verify
def _request_file(fed, tmp_path, change=None):
    """A genuine request's token (optionally re-signed with changed claims), with the nonce
    the site issued and the key it would encrypt to, as a governance reviewer receives it."""
    import jwt

    site = fed._sites[0]._site
    _, request = real_request(fed, site, pw.Count(by=["sex"]))
    token = request.token if change is None else resigned(fed, request.token, change)
    challenge = jwt.decode(token, options={"verify_signature": False})["eat_nonce"][0]
    path = tmp_path / "token.json"
    path.write_text(json.dumps({"token": token, "nonce": challenge,
                                "public_key_n": fed.enclave.public_key.n}))
    return path, fed._sites[0].config


def test_attest_verify_passes_a_genuine_token_check_by_check(fresh_fed, tmp_path, capsys):
    token_file, config = _request_file(fresh_fed, tmp_path)
    assert main(["attest", "verify", str(token_file), "--config", str(config)]) == OK
    out = capsys.readouterr().out
    assert out.count("PASS") == 15 and "FAIL" not in out
    assert "15 of 15 checks passed" in out


def test_attest_verify_fails_an_expired_token_and_names_the_check(fresh_fed, tmp_path):
    token_file, config = _request_file(fresh_fed, tmp_path, expired)
    report = verify_token_file(token_file, config)
    assert report.status == FAILED
    assert any(line.startswith("FAIL  trust.expired") for line in report.lines)
    assert any(line.startswith("----  trust.image") for line in report.lines)


def test_attest_verify_of_a_bare_token_says_which_checks_need_the_live_request(
        fresh_fed, tmp_path):
    token_file, config = _request_file(fresh_fed, tmp_path)
    bare = tmp_path / "token.jwt"
    bare.write_text(json.loads(token_file.read_text())["token"])
    report = verify_token_file(bare, config)
    assert report.status == FAILED  # exit 0 only if every check was made and passed
    assert any("----  trust.nonce" in line and "--nonce" in line for line in report.lines)
    assert sum(line.startswith("PASS") for line in report.lines) == 13


def test_attest_verify_fails_a_token_verified_later_than_it_expires(fresh_fed, tmp_path):
    token_file, config = _request_file(fresh_fed, tmp_path)
    report = verify_token_file(token_file, config, now=time.time() + 3600)
    assert report.status == FAILED and "FAIL  trust.expired" in str(report)


# --------------------------------------------------------------------------- registry-held files
def _registries(tmp_path: Path, size: int = 400, **floor) -> Path:
    """Two registries' own site configurations and a federation file naming them."""
    verifier = PlatformVerifier.open(tmp_path / "platform")
    for i, name in enumerate(("NDRS", "NCI")):
        site_file(tmp_path, name, source={"kind": "synthetic", "seed": 3 + i, "size": size},
                  verifier_jwks=verifier.jwks(), capacity=size,
                  floors=pw.Floors(**floor) if floor else None)
    path = tmp_path / "sites.toml"
    path.write_text(f'[federation]\nsite_capacity = {size}\nverifier = "platform"\n'
                    '[[sites]]\nname = "NDRS"\nbackend = "local"\nconfig = "NDRS/site.toml"\n'
                    '[[sites]]\nname = "NCI"\nbackend = "local"\nconfig = "NCI/site.toml"\n')
    return path


def test_a_federation_of_registry_held_configurations_answers(tmp_path):
    path = _registries(tmp_path)
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "l.sqlite") as fed:
        release = fed.run(pw.Count(by=["sex"]), epsilon=0.5)
        assert release.table is not None
        status = fed.status()
        assert list(status["epsilon_used"]) == [0.5, 0.5]
        assert list(status["rows"]) == [400, 400]


def test_a_registrys_lifetime_budget_outlives_the_enclave_and_its_ledger(tmp_path):
    path = _registries(tmp_path, lifetime_epsilon=1.0)
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "first.sqlite") as fed:
        fed.run(pw.Count(by=["sex"]), epsilon=1.0)
    (tmp_path / "first.sqlite").unlink()
    # A new enclave, a new ledger, the same registries: they remember what they released.
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "second.sqlite") as fed:
        with pytest.raises(pw.SiteError) as info:
            fed.run(pw.Count(by=["age_band"]), epsilon=0.5)
        assert info.value.rule == "lifetime_epsilon"
        assert fed.budget().analyst_spent == 0  # the refused query was returned


def test_a_registry_that_did_not_approve_this_enclave_refuses_it(tmp_path):
    path = _registries(tmp_path)
    edited(tmp_path / "NCI" / "site.toml", expected_image_digest(), "sha256:" + "0" * 64)
    with pw.Federation.from_config(path, key_bits=TEST_KEY_BITS,
                                   ledger=tmp_path / "l.sqlite") as fed:
        with pytest.raises(pw.SiteError) as info:
            fed.run(pw.Count(by=["sex"]), epsilon=0.5)
        assert info.value.site == "NCI" and info.value.rule == "trust.image"


@pytest.mark.parametrize("old, new, rule", [
    ('sites = ["NDRS", "NCI"]', 'sites = ["NDRS", "NCI", "SIOP"]', "dictionary"),
    ("capacity = 400", "capacity = 500", "capacity"),
])
def test_a_registry_in_another_study_is_named_at_start(tmp_path, old, new, rule):
    path = _registries(tmp_path)
    edited(tmp_path / "NCI" / "site.toml", old, new)
    with pytest.raises(pw.SiteError) as info:
        pw.Federation.from_config(path, key_bits=TEST_KEY_BITS, ledger=tmp_path / "l.sqlite")
    assert info.value.site == "NCI" and info.value.rule == rule


def test_a_federation_entry_with_its_own_configuration_takes_no_source(tmp_path):
    path = _registries(tmp_path)
    path.write_text(path.read_text() + 'source = { kind = "synthetic", seed = 1, size = 9 }\n')
    with pytest.raises(pw.ConfigError, match="remove source"):
        pw.Federation.from_config(path, key_bits=TEST_KEY_BITS)


def test_demo_sites_are_opened_from_generated_site_configurations(fresh_fed):
    for site in fresh_fed._sites:
        config = load_site_config(site.config)
        assert config.name == site.name and config.trust.allow_debug  # a test federation
        assert config.trust.approved_images == (fresh_fed.enclave.image_digest,)


@pytest.mark.parametrize("old, new, key", [
    ('signing_key = "signing-key.pem"', 'signing_key = "."', "signing_key"),
    ('signing_key = "signing-key.pem"', 'signing_key = "sub/k.pem"', "signing_key"),
    ('budget = "site-budget.sqlite"', 'budget = "sub/b.sqlite"', "budget"),
])
def test_an_unusable_key_or_budget_file_is_a_config_error_naming_it(tmp_path, old, new, key):
    from pets_widgets.site.config import open_site

    config = load_site_config(edited(site_file(tmp_path), old, new))
    with pytest.raises(pw.ConfigError, match=key):
        open_site(config)


def test_a_jwks_that_pyjwt_cannot_use_is_refused_when_the_file_is_read(tmp_path):
    path = site_file(tmp_path)
    jwks = json.loads((path.parent / "verifier-jwks.json").read_text())
    jwks["keys"][0]["kid"] = ["a", "list"]
    (path.parent / "verifier-jwks.json").write_text(json.dumps(jwks))
    with pytest.raises(pw.ConfigError, match=r"trust\.verifier_jwks"):
        load_site_config(path)


def test_a_sqlite_url_with_a_driver_is_kept_inside_the_folder_too(tmp_path):
    path = site_file(tmp_path, source={"kind": "sql", "table": "registry",
                                       "url": "sqlite+pysqlite:///../../x.sqlite"})
    with pytest.raises(pw.ConfigError, match=r"source\.url leaves"):
        load_site_config(path)


def test_site_init_refuses_a_site_list_without_its_own_name(tmp_path, capsys):
    assert main(["site", "init", str(tmp_path / "x"), "--name", "X", "--sites", "A,B",
                 "--synthetic", "seed=1,size=10"]) == UNUSABLE
    assert "--sites" in capsys.readouterr().out and not (tmp_path / "x").exists()


def test_a_key_file_of_another_kind_is_refused_naming_the_key(tmp_path):
    from pets_widgets.site.config import open_site

    PlatformVerifier.open(tmp_path / "platform")  # an EC key, not a site's Ed25519 key
    path = site_file(tmp_path)
    verifier_key = tmp_path / "platform" / "verifier-key.pem"
    config = load_site_config(edited(path, 'signing_key = "signing-key.pem"',
                                     f'signing_key = "{verifier_key}"'))
    with pytest.raises(pw.ConfigError, match=r"signing_key: .* holds another kind of key"):
        open_site(config)
