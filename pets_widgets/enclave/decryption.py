"""The enclave's Paillier key pair and decryption: the only place a private key exists.

:class:`Decryptor` holds the key and decrypts one thing only: the homomorphic sum of a query's
aggregates, after checking that every aggregate is signed by its site for this query. Decryption
uses ``phe``'s CRT form, with the halves of all ciphertexts spread over the
cores (gmpy2 releases the GIL during the exponentiations).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeAlias

import gmpy2
import numpy as np
from phe import paillier

from pets_widgets.core.errors import IntegrityError, SiteIntegrityError
from pets_widgets.core.paillier import (
    ALLOWED_KEY_BITS,
    DEFAULT_KEY_BITS,
    PublicKey,
    add_encrypted,
    check_ciphertexts,
    gil_released,
    key_fingerprint,
)
from pets_widgets.core.signing import VerifyKey
from pets_widgets.core.wire import EncryptedAggregate
from pets_widgets.enclave.admission import Admission

PrivateKey: TypeAlias = paillier.PaillierPrivateKey


def generate_paillier_keypair(n_length: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh Paillier key pair (``phe``; gmpy2 makes it fast)."""
    if n_length not in ALLOWED_KEY_BITS:
        raise ValueError(f"key_bits must be one of {ALLOWED_KEY_BITS}, got {n_length}")
    return paillier.generate_paillier_keypair(n_length=n_length)


def _decrypt_half(ciphertext: gmpy2.mpz, prime: gmpy2.mpz, prime_square: gmpy2.mpz,
                  h: gmpy2.mpz) -> gmpy2.mpz:
    """One half of ``phe``'s CRT decryption: ``L_p(c^(p-1) mod p^2) * h_p mod p``."""
    with gil_released():
        x = gmpy2.powmod(ciphertext, prime - 1, prime_square)
    return (x - 1) // prime * h % prime


@functools.cache
def _decrypt_workers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1,
                              thread_name_prefix="paillier-decrypt")


# A forked child has none of its parent's threads: it starts its own workers when it needs them.
os.register_at_fork(after_in_child=_decrypt_workers.cache_clear)


def decrypt(private_key: PrivateKey, ciphertexts: Sequence[int]) -> list[int]:
    """Raw Paillier decryption of each ciphertext, as ``phe``'s ``raw_decrypt`` computes it
    (CRT: one exponentiation modulo p^2 and one modulo q^2, recombined by ``phe``), with the
    halves of all ciphertexts spread over the cores (gmpy2 releases the GIL meanwhile)."""
    key = private_key
    p, q = gmpy2.mpz(key.p), gmpy2.mpz(key.q)
    halves = [(p, gmpy2.mpz(key.psquare), gmpy2.mpz(key.hp)),
              (q, gmpy2.mpz(key.qsquare), gmpy2.mpz(key.hq))]
    tasks = [(gmpy2.mpz(c), *half) for c in ciphertexts for half in halves]
    done = list(_decrypt_workers().map(_decrypt_half, *zip(*tasks, strict=True))) if tasks else []
    return [int(key.crt(int(mp), int(mq))) for mp, mq in zip(done[::2], done[1::2], strict=True)]


class Decryptor:
    """The Paillier key pair and the sites' verify keys; decrypts verified sums only."""

    def __init__(self, key_bits: int = DEFAULT_KEY_BITS):
        self.public_key, self._private_key = generate_paillier_keypair(key_bits)
        self.key_fingerprint = key_fingerprint(self.public_key)
        self._site_keys: dict[str, VerifyKey] = {}

    def register_site(self, name: str, verify_key: VerifyKey) -> None:
        """Record a site's signing key (done once, when the site joins the federation)."""
        self._site_keys[name] = verify_key

    def verify(self, admission: Admission, nonces: Mapping[str, str],
               aggregates: Sequence[EncryptedAggregate], summed: Sequence[int]) -> None:
        """Raise :class:`IntegrityError` unless every aggregate is signed by its site, for this
        spec, this query's nonce, this key and packing, and ``summed`` is their product."""
        seen = sorted(a.site for a in aggregates)
        if seen != sorted(admission.sites):
            raise IntegrityError("the aggregates do not come from exactly the query's sites")
        for agg in aggregates:
            problem = self._problem(admission, nonces, agg)
            if problem:
                raise SiteIntegrityError(agg.site, problem)
        expected = add_encrypted(self.public_key, [a.ciphertexts for a in aggregates])
        if list(summed) != expected:
            raise IntegrityError("the aggregator's sum does not match the signed site "
                                 "aggregates")

    def _problem(self, admission: Admission, nonces: Mapping[str, str],
                 agg: EncryptedAggregate) -> str:
        """Why one site's aggregate cannot be accepted ("" when it can)."""
        key = self._site_keys.get(agg.site)
        if key is None:
            return "the site is not registered with the enclave"
        if not key.verify(agg.signature, agg.body()):
            return "its aggregate has a bad signature (tampered or not signed by the site)"
        if agg.spec_hash != admission.spec.hash:
            return "its aggregate is for another query"
        if agg.nonce != nonces.get(agg.site):
            return "its aggregate answers another challenge (a replay)"
        if agg.admission != admission.id:
            return "its aggregate answers another admission (a replay)"
        if agg.key_fingerprint != self.key_fingerprint:
            return "its aggregate is encrypted to another enclave key"
        if agg.packing != admission.packing:
            return "its aggregate uses another packing"
        if len(agg.ciphertexts) != admission.packing.n_ciphertexts:
            return "its aggregate has the wrong number of ciphertexts"
        try:
            check_ciphertexts(self.public_key, agg.ciphertexts)
        except IntegrityError as exc:
            return str(exc)
        return ""

    def totals(self, admission: Admission, summed: Sequence[int]) -> dict[str, np.ndarray]:
        """The decrypted totals of a verified sum, by block (raises :class:`IntegrityError`
        when a slot overflowed its packing bound)."""
        plaintexts = decrypt(self._private_key, summed)
        cells = np.array(admission.packing.unpack(plaintexts), dtype=np.int64)
        slices = admission.layout.slices()
        return {block.name: cells[slices[block.name]] for block in admission.layout.blocks}
