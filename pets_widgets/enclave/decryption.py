"""The enclave's Paillier key pair and decryption: the only place a private key exists.

Decryption uses ``phe``'s CRT form, with the halves of all ciphertexts spread over the
cores (gmpy2 releases the GIL during the exponentiations).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import gmpy2
from phe import paillier

from pets_widgets.core.paillier import ALLOWED_KEY_BITS, DEFAULT_KEY_BITS, PublicKey, gil_released

PrivateKey = paillier.PaillierPrivateKey


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
