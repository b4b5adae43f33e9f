"""Trust stays at the site: every attestation token is checked by the site itself against its
own pinned verifier keys, approved images and floors; it computes its own encoding, keeps its
own budget and refuses breakdowns by site. Each test is an attack that must fail, naming only
the rule that stopped it."""

from __future__ import annotations

import dataclasses
import shutil
from fractions import Fraction

import pytest

import pets_widgets as pw
from pets_widgets.coordinator.federation import Federation
from pets_widgets.core.errors import SiteRefusal
from pets_widgets.core.evidence import DEBUG_DISABLED, DEBUG_ENABLED
from pets_widgets.core.wire import AggregateRequest
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.decryption import generate_paillier_keypair
from pets_widgets.enclave.enclave import Enclave
from pets_widgets.platform import measurement
from pets_widgets.platform.verifier import PlatformVerifier
from pets_widgets.site.budget import SiteBudget

from .attest import claims_of, expired, real_request, resigned, verifier_of
from .conftest import SMALL_ROWS, TEST_KEY_BITS, make_fed

SPEC = pw.Count(by=["tumour_group"])


def site_of(fed, i=0):
    return fed._sites[i]._site


def refused(site, request, rule):
    with pytest.raises(pw.AttestationError) as info:
        site.respond(request)
    assert info.value.rule == rule, str(info.value)
    return info.value


# --------------------------------------------------------------------------- the token
def test_a_genuine_token_has_the_eat_claims_and_is_accepted(fresh_fed):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    claims = claims_of(request.token)
    assert claims["aud"] == site.name and claims["iss"] == "https://verifier.pets.invalid"
    assert claims["nbf"] <= claims["iat"] < claims["exp"]
    assert claims["dbgstat"] == DEBUG_ENABLED  # test federations run a debug enclave
    mine = claims["submods"]["pets_widgets"]
    assert mine["policy"]["k"] == 5 and mine["dictionary"] == fresh_fed.schema.digest
    assert mine["admission"]["spec_hash"] == SPEC.canonical(fresh_fed.schema).hash
    assert claims["submods"]["container"]["image_digest"] == fresh_fed.enclave.image_digest
    assert site.respond(request).site == site.name


def test_a_token_signed_by_another_key_is_refused(fresh_fed):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    impostor = PlatformVerifier()
    impostor.kid = verifier_of(fresh_fed).kid  # even under the pinned key id
    forged = impostor._sign(claims_of(request.token))
    refused(site, dataclasses.replace(request, token=forged), "trust.signature")


@pytest.mark.parametrize(("change", "rule"), [
    (lambda c: c.update(aud="NCI"), "trust.audience"),
    (expired, "trust.expired"),
    (lambda c: c.update(iss="https://elsewhere.invalid"), "trust.issuer"),
    (lambda c: c.pop("eat_nonce"), "trust.claims"),
    (lambda c: c["eat_nonce"].__setitem__(1, "0" * 64), "trust.key_binding"),
    (lambda c: c["submods"]["container"].update(image_digest="sha256:" + "0" * 64),
     "trust.image"),
    (lambda c: c["submods"]["pets_widgets"].update(dictionary="sha256:other"),
     "trust.dictionary"),
    (lambda c: c["submods"]["pets_widgets"]["policy"].update(k=2), "floor.k"),
    (lambda c: c["submods"]["pets_widgets"]["policy"].update(max_epsilon=5.0),
     "floor.max_epsilon"),
    (lambda c: c["submods"]["pets_widgets"]["policy"].update(min_subset=0), "floor.min_subset"),
    (lambda c: c.update(iat=c["iat"] + 3600), "trust.not_yet_valid"),
    (lambda c: c.update(exp=float("inf")), "trust.claims"),
    (lambda c: c.update(exp=True), "trust.claims"),
    (lambda c: c.update(exp=c["iat"] + 30 * 24 * 3600), "trust.expired"),
    (lambda c: c.update(aud=["NDRS", "NCI"]), "trust.audience"),
], ids=["audience", "expired", "issuer", "no-nonce", "binding", "image", "dictionary",
        "floor-k", "floor-epsilon", "floor-subset", "iat-future", "exp-infinite", "exp-bool",
        "lives-a-month", "two-audiences"])
def test_a_token_with_a_wrong_claim_is_refused_by_name(fresh_fed, change, rule):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    error = refused(site, dataclasses.replace(request, token=resigned(fresh_fed, request.token,
                                                                      change)), rule)
    assert "NCI" not in str(error) and "sha256" not in str(error)  # the rule, no claim value


def test_a_reused_or_foreign_nonce_is_refused(fresh_fed):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    site.respond(request)
    refused(site, request, "trust.nonce")  # the same token again
    _, other = real_request(fresh_fed, site, SPEC)
    foreign = resigned(fresh_fed, other.token, lambda c: c["eat_nonce"].__setitem__(0, "f" * 32))
    refused(site, dataclasses.replace(other, token=foreign), "trust.nonce")


def test_a_token_for_another_key_is_refused(fresh_fed):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    other_key, _ = generate_paillier_keypair(TEST_KEY_BITS)
    refused(site, dataclasses.replace(request, public_key=other_key), "trust.key_binding")


def test_a_token_for_another_query_is_refused(fresh_fed):
    site = site_of(fresh_fed)
    _, request = real_request(fresh_fed, site, SPEC)
    other = pw.Count(by=["sex"])
    refused(site, dataclasses.replace(request, spec=other), "trust.admission")


def test_a_debug_enclave_is_refused_unless_the_site_allows_it(fresh_fed):
    site = site_of(fresh_fed)
    site.enroll(dataclasses.replace(site._trust, allow_debug=False))
    with pytest.raises(pw.SiteError) as info:
        fresh_fed.run(SPEC)
    assert info.value.rule == "trust.debug" and info.value.site == site.name
    assert fresh_fed.budget().analyst_spent == 0
    assert fresh_fed.audit_log().iloc[-1].rule == "site.trust.debug"


def test_the_default_demo_runs_a_production_enclave(tmp_path):
    fed = pw.demo_federation(seed=2, rows_per_site=500, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite")
    assert not fed.enclave.debug
    release = fed.run(SPEC)
    assert release.table.shape[0] > 0
    with pytest.raises(RuntimeError, match="debug enclave"):
        pw.testing.noiseless(fed, SPEC)
    site = site_of(fed)
    _, request = real_request_production(fed, site)
    assert claims_of(request.token)["dbgstat"] == DEBUG_DISABLED


def real_request_production(fed, site):
    """A genuine request from a production enclave (admitted through its own door)."""
    admission = fed.enclave.admit(SPEC.canonical(fed.schema), 0.5, 5, "t", fed.site_names)
    token = fed.enclave.issue_nonce(admission, site.name, site.challenge())
    return admission, AggregateRequest(admission.spec, token, fed.enclave.public_key,
                                       admission.packing)


# --------------------------------------------------------------------------- the image
def test_one_byte_of_enclave_code_or_policy_changes_the_image_digest(tmp_path, monkeypatch):
    base = measurement.expected_image_digest()
    assert measurement.expected_image_digest(pw.Policy(k=6)) != base
    copy = tmp_path / "pets_widgets"
    for folder in measurement.MEASURED_FOLDERS:
        shutil.copytree(measurement.PACKAGE / folder, copy / folder)
    monkeypatch.setattr(measurement, "PACKAGE", copy)
    assert measurement.expected_image_digest() == base
    target = copy / "enclave" / "pipeline" / "noise.py"
    target.write_bytes(target.read_bytes() + b" ")
    assert measurement.expected_image_digest() != base


def test_every_default_site_refuses_an_enclave_whose_code_changed(fresh_fed, tmp_path,
                                                                   monkeypatch):
    copy = tmp_path / "pets_widgets"
    for folder in measurement.MEASURED_FOLDERS:
        shutil.copytree(measurement.PACKAGE / folder, copy / folder)
    target = copy / "enclave" / "pipeline" / "suppression.py"
    target.write_bytes(target.read_bytes().replace(b"k", b"k ", 1))
    monkeypatch.setattr(measurement, "PACKAGE", copy)
    launched = verifier_of(fresh_fed).launch(fresh_fed.policy, fresh_fed.schema.digest,
                                             debug=True)
    changed = Enclave(fresh_fed.schema, audit.Ledger(tmp_path / "l.sqlite"), fresh_fed.policy,
                      TEST_KEY_BITS, issuer=launched)
    for i in range(len(fresh_fed._sites)):
        site = site_of(fresh_fed, i)
        site.enroll(site._trust)
        admission = changed.admit(SPEC.canonical(fresh_fed.schema), 0.5, 5, "t",
                                  fresh_fed.site_names)
        token = changed.issue_nonce(admission, site.name, site.challenge())
        refused(site, AggregateRequest(admission.spec, token, changed.public_key,
                                       admission.packing), "trust.image")
        changed.abort(admission, audit.FAILED, "site.trust.image", "refused")  # as run does


def test_an_enclave_policy_changed_after_launch_is_refused(fresh_fed):
    fresh_fed.enclave._gate._policy = pw.Policy(k=1, min_subset=0)
    try:
        with pytest.raises(pw.AttestationError) as info:
            fresh_fed.run(pw.Count(by=["subtype"]), k=1)
        assert info.value.rule == "trust.image"
    finally:
        fresh_fed.enclave._gate._policy = pw.Policy()


@pytest.mark.parametrize(("policy", "rule"), [
    (pw.Policy(k=1), "floor.k"),
    (pw.Policy(max_epsilon=2.0), "floor.max_epsilon"),
    (pw.Policy(min_subset=0), "floor.min_subset"),
], ids=["k", "max_epsilon", "min_subset"])
def test_a_site_refuses_an_approved_enclave_whose_policy_is_below_its_floors(
        tmp_path_factory, policy, rule):
    # The demo's sites approve this policy's image: only their floors stand in the way.
    fed = make_fed(tmp_path_factory, "floors", seed=3, rows_per_site=500, policy=policy)
    with pytest.raises(pw.SiteError) as info:
        fed.run(SPEC, k=policy.k)
    assert info.value.rule == rule
    assert fed.budget().analyst_spent == 0


# --------------------------------------------------------------------------- the encoding
@pytest.mark.parametrize("change", [
    lambda p: dataclasses.replace(p, cell_bound=3),       # a threshold probe on a site's cells
    lambda p: dataclasses.replace(p, cell_bound=p.cell_bound * 4),
    lambda p: dataclasses.replace(p, n_sites=p.n_sites + 1),
    lambda p: dataclasses.replace(p, key_bits=p.key_bits * 2),
], ids=["small-bound", "large-bound", "sites", "key-bits"])
def test_a_forged_packing_gets_one_generic_refusal_and_costs_the_site_nothing(fresh_fed,
                                                                              change):
    site = site_of(fresh_fed)
    used = site.budget.used()
    _, request = real_request(fresh_fed, site, SPEC)
    with pytest.raises(SiteRefusal) as info:
        site.respond(dataclasses.replace(request, packing=change(request.packing)))
    assert info.value.rule == "encoding"
    assert str(info.value) == ("the request's encoding does not match this site's "
                               "(rule encoding)")
    assert site.budget.used() == used


# --------------------------------------------------------------------------- its own budget
def test_a_spent_site_refuses_even_after_the_enclave_ledger_is_replaced(fresh_fed, tmp_path):
    site = site_of(fresh_fed)
    site.budget = SiteBudget(tmp_path / "ndrs-budget.sqlite", lifetime=1.5)
    fresh_fed.run(SPEC, epsilon=1.0)
    with pytest.raises(pw.SiteError) as info:
        fresh_fed.run(pw.Count(by=["sex"]), epsilon=1.0)
    assert info.value.rule == "lifetime_epsilon" and info.value.site == site.name
    assert fresh_fed.budget().analyst_spent == 1  # the refused query was returned
    # A new enclave with a new, empty ledger: the site's own budget does not reset.
    launched = verifier_of(fresh_fed).launch(fresh_fed.policy, fresh_fed.schema.digest,
                                             debug=True)
    reborn = Enclave(fresh_fed.schema, audit.Ledger(tmp_path / "new.sqlite"), fresh_fed.policy,
                     TEST_KEY_BITS, fresh_fed.enclave.site_capacity, issuer=launched)
    with pytest.raises(pw.SiteError) as info:
        Federation(fresh_fed._sites, reborn).run(pw.Count(by=["sex"]), epsilon=1.0)
    assert info.value.rule == "lifetime_epsilon"
    # and the budget survives the site's restart (its file)
    again = SiteBudget(tmp_path / "ndrs-budget.sqlite", lifetime=1.5)
    assert again.used() == Fraction(1)


def test_status_shows_each_sites_epsilon_used_and_left(fresh_fed):
    fresh_fed.run(SPEC, epsilon=0.5)
    status = fresh_fed.status()
    lifetime = site_of(fresh_fed).floors.lifetime_epsilon
    assert list(status.epsilon_used) == [0.5, 0.5]
    assert list(status.epsilon_left) == [lifetime - 0.5] * 2


# --------------------------------------------------------------------------- breakdowns
@pytest.mark.parametrize("spec", [
    pw.Count(by=["site"]),
    pw.Crosstab(rows="site", cols="sex"),
    pw.Count(by=["sex"], where={"site": ["NDRS"]}),
], ids=["by", "crosstab", "where"])
def test_numbers_by_site_are_refused_by_default(tmp_path, spec):
    fed = pw.demo_federation(seed=4, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite")
    with pytest.raises(pw.SiteError) as info:
        fed.run(spec)
    assert info.value.rule == "floor.site_breakdown"
    assert fed.budget().analyst_spent == 0
    log = fed.audit_log().iloc[-1]
    assert log.outcome == "failed" and log.rule == "site.floor.site_breakdown"
    fed.run(pw.Count(by=["sex"], where={"site": ["NDRS", "NCI"]}))  # every site: no breakdown


# --------------------------------------------------------------------------- the enclave
def test_the_enclave_issues_no_token_outside_an_open_admission(fresh_fed):
    enclave = fresh_fed.enclave
    assert not hasattr(enclave, "quote")
    site = site_of(fresh_fed)
    admission, _ = real_request(fresh_fed, site, SPEC)
    enclave.abort(admission, audit.FAILED, "test", "closed by the test")
    with pytest.raises(pw.IntegrityError, match="not open"):
        enclave.issue_nonce(admission, site.name, site.challenge())
    forged = dataclasses.replace(admission, id="0" * 32)
    with pytest.raises(pw.IntegrityError, match="not open"):
        enclave.issue_nonce(forged, site.name, site.challenge())
