"""Tampering and attestation: each attack raises its own error and releases nothing."""

from __future__ import annotations

import dataclasses

import pytest

import pets_widgets as pw
from pets_widgets.coordinator.federation import Federation, LocalSite, aggregate
from pets_widgets.core.errors import PackingError
from pets_widgets.core.packing import Packing
from pets_widgets.core.paillier import (
    ObfuscatorPool,
    add_encrypted,
    encrypt,
    foreground,
    key_fingerprint,
)
from pets_widgets.core.signing import SigningKey
from pets_widgets.core.wire import EncryptedAggregate, new_nonce
from pets_widgets.enclave import ledger as audit
from pets_widgets.enclave.decryption import decrypt, generate_paillier_keypair
from pets_widgets.enclave.enclave import Enclave

from .attest import real_request, verifier_of

SPEC = pw.Count(by=["tumour_group"])


class Tamper:
    """Wraps a site backend and rewrites its replies."""

    def __init__(self, inner: LocalSite, rewrite):
        self._inner, self._rewrite = inner, rewrite
        self.name, self.backend, self.verify_key = inner.name, "local", inner.verify_key

    def challenge(self):
        return self._inner.challenge()

    def respond(self, request):
        return self._rewrite(self._inner.respond(request), request)


def with_site0(fed: pw.Federation, rewrite) -> Federation:
    sites = list(fed._sites)
    sites[0] = Tamper(sites[0], rewrite)
    return Federation(sites, fed.enclave)


def overflowing(fed: pw.Federation):
    """A rewrite making site 0 cheat: every slot of every ciphertext filled past its bound,
    re-signed with the site's own key (what only a colluding site can send)."""
    key = fed._sites[0]._site._signing_key

    def rewrite(agg, request):
        packing = request.packing
        huge = packing.pack([packing.cell_bound] * packing.n_cells)
        forged = [int(c) for c in encrypt(request.public_key, [m * 2 for m in huge])]
        return dataclasses.replace(agg, ciphertexts=tuple(forged)).signed(key)

    return rewrite


def assert_nothing_released(fed: pw.Federation, before_rows: int) -> None:
    log = fed.audit_log()
    assert len(log) == before_rows + 1
    assert log.iloc[-1].outcome == "failed"
    assert fed.budget().analyst_spent == 0


@pytest.mark.parametrize("rewrite", [
    # flip a ciphertext: the signature no longer verifies
    lambda agg, req: dataclasses.replace(agg, ciphertexts=(agg.ciphertexts[0] ^ 2,
                                                           *agg.ciphertexts[1:])),
    # claim another spec
    lambda agg, req: dataclasses.replace(agg, spec_hash=pw.Count().hash),
    # sign garbage with another key
    lambda agg, req: dataclasses.replace(agg, spec_hash="0" * 64).signed(SigningKey()),
    # replay: answer with an aggregate for another nonce
    lambda agg, req: dataclasses.replace(agg, nonce=new_nonce()),
], ids=["tampered-ciphertext", "wrong-spec-hash", "bad-signature", "replayed-nonce"])
def test_tampered_aggregates_raise_integrity_error(fresh_fed, rewrite):
    before = len(fresh_fed.audit_log())
    fed = with_site0(fresh_fed, rewrite)
    with pytest.raises(pw.IntegrityError) as info:
        fed.run(SPEC)
    assert isinstance(info.value, pw.SiteError) and info.value.site == "NDRS"
    assert_nothing_released(fresh_fed, before)


def test_correctly_signed_foreign_key_aggregate_is_refused(fresh_fed):
    """A site that encrypts to some other key (and signs it honestly) is caught by the
    fingerprint check before anything is decrypted."""
    other_pk, _ = generate_paillier_keypair(1024)
    site = fresh_fed._sites[0]._site

    def rewrite(agg, req):
        cts = tuple(encrypt(other_pk, [1] * len(agg.ciphertexts)))
        forged = dataclasses.replace(agg, ciphertexts=cts,
                                     key_fingerprint=key_fingerprint(other_pk))
        return forged.signed(site._signing_key)

    before = len(fresh_fed.audit_log())
    with pytest.raises(pw.IntegrityError, match="another enclave key"):
        with_site0(fresh_fed, rewrite).run(SPEC)
    assert_nothing_released(fresh_fed, before)


def test_tampered_homomorphic_sum_is_caught(fresh_fed, monkeypatch):
    before = len(fresh_fed.audit_log())
    real = aggregate

    def evil(pk, aggregates):
        total = real(pk, aggregates)
        return [total[0] * 2 % pk.nsquare, *total[1:]]

    monkeypatch.setattr("pets_widgets.coordinator.federation.aggregate", evil)
    with pytest.raises(pw.IntegrityError, match="aggregator"):
        fresh_fed.run(SPEC)
    assert_nothing_released(fresh_fed, before)


def test_sites_refuse_a_genuine_enclave_whose_policy_was_loosened(fresh_fed, tmp_path):
    """A real verifier launched it and signs its tokens; but its policy is not the approved
    one, so its image digest is not either."""
    launched = verifier_of(fresh_fed).launch(pw.Policy(k=1), fresh_fed.schema.digest,
                                             debug=True)
    # (on a ledger of its own: the federation's ledger refuses any other policy)
    loosened = Enclave(fresh_fed.schema, audit.Ledger(tmp_path / "loose.sqlite"),
                       pw.Policy(k=1), key_bits=1024, issuer=launched)
    with pytest.raises(pw.AttestationError, match="image digest") as info:
        Federation(fresh_fed._sites, loosened).run(SPEC)
    assert info.value.site == "NDRS" and info.value.rule == "trust.image"
    log = loosened.ledger.audit_rows()
    assert len(log) == 1 and log[-1]["outcome"] == "failed"


def test_packing_overflow_is_impossible_and_checked():
    packing = Packing.for_layout(n_cells=100, max_contribution=14, n_sites=10,
                                        key_bits=1024, site_capacity=1000)
    assert packing.slot_bits == (10 * 14 * 1000).bit_length()
    with pytest.raises(PackingError):
        packing.pack([14 * 1000 + 1] + [0] * 99)
    with pytest.raises(PackingError):
        packing.pack([-1] + [0] * 99)
    # the largest sum over all sites still fits its slot
    full = [packing.cell_bound] * 100
    summed = [sum(v) for v in zip(*[packing.pack(full)] * 10, strict=True)]
    assert packing.unpack(summed) == [10 * packing.cell_bound] * 100


@pytest.mark.parametrize("values", [[0], [1, 2, 3], list(range(500))])
def test_pack_encrypt_sum_decrypt_round_trip(values):
    pk, sk = generate_paillier_keypair(1024)
    packing = Packing.for_layout(len(values), 1, 3, 1024, site_capacity=1000)
    enc = [encrypt(pk, packing.pack(values)) for _ in range(3)]
    total = decrypt(sk, add_encrypted(pk, enc))
    assert packing.unpack(total) == [3 * v for v in values]
    assert packing.n_ciphertexts == len(enc[0])


def test_aggregate_wire_form_round_trips_and_rejects_garbage(fed2):
    site = fed2._sites[1]._site
    _, request = real_request(fed2, site, SPEC)
    agg = site.respond(request)
    assert EncryptedAggregate.from_json(agg.to_json()) == agg
    with pytest.raises(pw.IntegrityError):
        EncryptedAggregate.from_json('{"site": "NCI"}')
    with pytest.raises(pw.IntegrityError):
        EncryptedAggregate.from_json("garbage")


def test_obfuscator_pool_hands_out_each_obfuscator_once():
    pk, sk = generate_paillier_keypair(1024)
    pool = ObfuscatorPool(pk, target=8, background=False)
    pool.fill()
    assert len(pool) == 8
    first = pool.take(5)
    second = pool.take(5)  # 3 from the pool, 2 computed on the spot
    assert len(pool) == 0
    assert len({int(x) for x in first + second}) == 10  # never reused
    cts = encrypt(pk, [0, 1, 2**100], pool)
    assert decrypt(sk, cts) == [0, 1, 2**100]
    assert len(set(encrypt(pk, [7, 7], pool))) == 2  # fresh randomness each time
    other, _ = generate_paillier_keypair(1024)
    with pytest.raises(ValueError):
        encrypt(other, [1], pool)


def test_background_pool_fills_between_queries_and_pauses_during_them():
    import time

    pk, _ = generate_paillier_keypair(1024)
    with foreground():
        pool = ObfuscatorPool(pk, target=4)
        time.sleep(0.2)
        assert len(pool) == 0  # paused while a query runs
    deadline = time.monotonic() + 30
    while len(pool) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(pool) == 4
    pool.close()
