"""Paillier keys, slot packing, encrypted aggregates, Ed25519 signatures and attestation quotes.

Paillier (``phe`` with gmpy2) is additively homomorphic: multiplying ciphertexts adds their
plaintexts, so an untrusted aggregator can total the sites' encrypted vectors without
seeing them. Many integer cells share one plaintext in fixed-width slots; the width is
chosen from the number of sites and the largest possible cell value so that the sum over
all sites cannot carry from one slot into the next (overflow is impossible by construction,
and every site checks its own values against the bound before encrypting).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import hashlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import gmpy2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from phe import paillier

from pets_widgets.errors import AttestationError, IntegrityError, PackingError

DEFAULT_KEY_BITS = 2048
ALLOWED_KEY_BITS = (1024, 2048, 3072)  # 1024 only for tests about logic, never for releases
#: Largest number of patients one site may hold; public, part of the packing parameters.
DEFAULT_SITE_CAPACITY = 2**22


def capacity_for(n_rows: int) -> int:
    """A public packing bound for a site of ``n_rows`` patients: ``n_rows`` rounded up to
    two significant figures, and at least to the next hundred (never finer than the nearest
    hundred a status display shows).

    The bound sets the slot width, so a tight one packs more cells into each ciphertext:
    2 sites of 100,000 patients need 18-bit slots, against 24 bits for the default bound.
    """
    step = max(100, 10 ** (len(str(max(n_rows, 1))) - 2))
    return max(step, -(-n_rows // step) * step)


PublicKey = paillier.PaillierPublicKey
PrivateKey = paillier.PaillierPrivateKey


def generate_paillier_keypair(n_length: int = DEFAULT_KEY_BITS) -> tuple[PublicKey, PrivateKey]:
    """A fresh Paillier key pair (``phe``; gmpy2 makes it fast)."""
    if n_length not in ALLOWED_KEY_BITS:
        raise ValueError(f"key_bits must be one of {ALLOWED_KEY_BITS}, got {n_length}")
    return paillier.generate_paillier_keypair(n_length=n_length)


def key_fingerprint(public_key: PublicKey) -> str:
    """SHA-256 (hex) of the Paillier modulus: names the enclave key in quotes and aggregates."""
    n = public_key.n
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()


# --------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Packing:
    """Fixed-width slots: ``slots`` cells of ``slot_bits`` bits in each Paillier plaintext.

    ``cell_bound`` is the largest value one site may put in a cell; ``slot_bits`` holds
    ``n_sites * cell_bound`` so the homomorphic sum over all sites never overflows a slot.
    """

    n_cells: int
    n_sites: int
    cell_bound: int
    key_bits: int
    slot_bits: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_cells < 1 or self.n_sites < 1 or self.cell_bound < 1:
            raise PackingError("packing needs at least one cell, one site and a positive bound")
        slot_bits = (self.n_sites * self.cell_bound).bit_length()
        # Plaintexts stay below 2**(key_bits - 1) < n, whatever the exact modulus.
        slots = (self.key_bits - 1) // slot_bits
        if slots < 1:
            raise PackingError(f"a {slot_bits}-bit slot does not fit a {self.key_bits}-bit key")
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots", slots)

    @classmethod
    def for_layout(cls, n_cells: int, max_contribution: int, n_sites: int, key_bits: int,
                   site_capacity: int = DEFAULT_SITE_CAPACITY) -> Packing:
        """Packing for a query whose cells grow by at most ``max_contribution`` per patient."""
        return cls(n_cells, n_sites, site_capacity * max_contribution, key_bits)

    @property
    def n_ciphertexts(self) -> int:
        return math.ceil(self.n_cells / self.slots)

    def pack(self, values: Sequence[int]) -> list[int]:
        """Plaintexts holding ``values`` (each in ``[0, cell_bound]``), first cell lowest."""
        if len(values) != self.n_cells:
            raise PackingError(f"expected {self.n_cells} cells, got {len(values)}")
        bound = self.cell_bound
        out = []
        for start in range(0, self.n_cells, self.slots):
            m = 0
            for value in reversed(values[start:start + self.slots]):
                v = int(value)
                if not 0 <= v <= bound:
                    # Never echo the value: it is per-site plaintext.
                    raise PackingError(
                        f"a cell is outside the agreed range 0-{bound}; the site holds more "
                        f"patients than its declared capacity or the layout is wrong"
                    )
                m = (m << self.slot_bits) | v
            out.append(m)
        return out

    def unpack(self, plaintexts: Sequence[int]) -> list[int]:
        """Cell values from summed plaintexts (the inverse of :meth:`pack` on sums)."""
        if len(plaintexts) != self.n_ciphertexts:
            raise PackingError(f"expected {self.n_ciphertexts} plaintexts, got {len(plaintexts)}")
        mask = (1 << self.slot_bits) - 1
        most = self.n_sites * self.cell_bound  # the largest total honest sites can produce
        out: list[int] = []
        for i, m in enumerate(plaintexts):
            count = min(self.slots, self.n_cells - i * self.slots)
            m = int(m)
            if m >> (count * self.slot_bits):
                raise IntegrityError("a decrypted total has bits beyond its slots: a site "
                                     "encrypted values outside the agreed range")
            for _ in range(count):
                value = m & mask
                if value > most:
                    raise IntegrityError("a decrypted total exceeds what honest sites can "
                                         "produce: a site encrypted values outside the range")
                out.append(value)
                m >>= self.slot_bits
        return out

    def to_dict(self) -> dict[str, int]:
        return {"n_cells": self.n_cells, "n_sites": self.n_sites,
                "cell_bound": self.cell_bound, "key_bits": self.key_bits}


# --------------------------------------------------------------------------- Paillier
def gil_released() -> contextlib.AbstractContextManager[object]:
    """A block in which gmpy2 releases the GIL during its arithmetic (in this thread only).

    Only the modular exponentiations (encryption without a precomputed obfuscator,
    decryption) run inside one: they last milliseconds, so other threads use the other
    cores meanwhile. Cheap multiplications stay outside, where giving the GIL away would
    cost a thread switch each.
    """
    return gmpy2.context(gmpy2.get_context(), allow_release_gil=True)


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


def encrypt(public_key: PublicKey, plaintexts: Sequence[int],
            pool: ObfuscatorPool | None = None) -> list[int]:
    """Raw Paillier ciphertexts ``(1 + n m) r^n mod n^2`` of integer plaintexts.

    Each ciphertext gets its own fresh obfuscator ``r^n``: taken from ``pool`` when one is
    given (precomputed off the query path, never reused), computed on the spot otherwise.
    """
    if pool is None:
        with gil_released():
            return [public_key.raw_encrypt(int(m)) for m in plaintexts]
    if pool.n != public_key.n:
        raise ValueError("the obfuscator pool belongs to another key")
    n, nsq = gmpy2.mpz(public_key.n), gmpy2.mpz(public_key.nsquare)
    out = []
    for m, r_n in zip(plaintexts, pool.take(len(plaintexts)), strict=True):
        m = int(m)
        if not 0 <= m < public_key.n:
            raise PackingError("a plaintext is outside [0, n)")
        out.append(int((1 + n * m) * r_n % nsq))
    return out


class ObfuscatorPool:
    """Precomputed Paillier obfuscators ``r^n mod n^2`` for one public key.

    Computing ``r^n`` is the whole cost of a Paillier encryption; the pool does it ahead of
    time in a daemon thread, between queries, so a query only multiplies. Each obfuscator
    is handed out once (popped) and never reused; ``r`` comes from the OS's secure source.
    The thread pauses while any query runs in this process and for a moment after it
    (:func:`foreground`), so it never competes with the query path; when the pool runs dry,
    obfuscators are computed on the spot, as a cold encryption would.
    """

    def __init__(self, public_key: PublicKey, target: int = 64, background: bool = True):
        self.n = public_key.n
        self._n = gmpy2.mpz(public_key.n)
        self._nsq = gmpy2.mpz(public_key.nsquare)
        self.target = target
        self._items: collections.deque[gmpy2.mpz] = collections.deque()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._fill_forever, daemon=True,
                                            name="paillier-obfuscators")
            self._thread.start()

    def __len__(self) -> int:
        return len(self._items)

    def _one(self) -> gmpy2.mpz:
        r = secrets.randbelow(self.n - 1) + 1
        while math.gcd(r, self.n) != 1:  # probability ~2^-1023: a factor of n found
            r = secrets.randbelow(self.n - 1) + 1
        with gil_released():
            return gmpy2.powmod(r, self._n, self._nsq)

    def fill(self, count: int | None = None) -> None:
        """Precompute until ``count`` (default: the target) obfuscators wait in the pool."""
        wanted = self.target if count is None else count
        while len(self._items) < wanted and not self._stop.is_set():
            item = self._one()
            with self._lock:
                self._items.append(item)

    def _fill_forever(self) -> None:
        while not self._stop.is_set():
            if _FOREGROUND.busy() or len(self._items) >= self.target:
                self._stop.wait(0.02)
                continue
            item = self._one()
            with self._lock:
                self._items.append(item)

    def take(self, count: int) -> list[gmpy2.mpz]:
        """``count`` obfuscators, each removed from the pool for good."""
        with self._lock:
            got = [self._items.popleft() for _ in range(min(count, len(self._items)))]
        got.extend(self._one() for _ in range(count - len(got)))
        return got

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class _Foreground:
    """Counts queries running in this process, so background precomputation can wait.

    It also waits ``GRACE`` seconds after the last query ends: the rest of that query (the
    enclave's decryption, when the sites are kernels on the same machine, or the dashboard
    drawing the result) finishes first, and precomputation uses the time a researcher
    spends reading.
    """

    GRACE = 0.5

    def __init__(self) -> None:
        self._running = 0
        self._ended = -math.inf
        self._lock = threading.Lock()

    def busy(self) -> bool:
        return self._running > 0 or time.monotonic() - self._ended < self.GRACE

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            self._running += 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                self._ended = time.monotonic()


_FOREGROUND = _Foreground()
#: ``with foreground():`` marks a query in progress; background precomputation pauses.
foreground = _FOREGROUND


def add_encrypted(public_key: PublicKey, vectors: Sequence[Sequence[int]]) -> list[int]:
    """Homomorphic sum of ciphertext vectors: element-wise product modulo n^2."""
    if not vectors:
        raise ValueError("nothing to add")
    nsq = gmpy2.mpz(public_key.nsquare)
    total = [gmpy2.mpz(c) for c in vectors[0]]
    for vec in vectors[1:]:
        if len(vec) != len(total):
            raise IntegrityError("encrypted vectors of different lengths cannot be added")
        total = [(a * b) % nsq for a, b in zip(total, vec, strict=True)]
    return [int(c) for c in total]


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


def check_ciphertexts(public_key: PublicKey, ciphertexts: Sequence[int]) -> None:
    """Reject values that cannot be ciphertexts under this key (out of range or not units)."""
    nsq = public_key.nsquare
    for c in ciphertexts:
        if not isinstance(c, int) or not 0 < c < nsq or math.gcd(c, public_key.n) != 1:
            raise IntegrityError("a ciphertext is not a valid Paillier ciphertext for this key")


# --------------------------------------------------------------------------- signatures
class SigningKey:
    """An Ed25519 signing key (``cryptography``); ``public`` is what others verify with."""

    def __init__(self, key: Ed25519PrivateKey | None = None):
        self._key = key or Ed25519PrivateKey.generate()
        self.public = VerifyKey(self._key.public_key())

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


@dataclass(frozen=True)
class VerifyKey:
    """An Ed25519 public key."""

    key: Ed25519PublicKey

    @classmethod
    def from_bytes(cls, raw: bytes) -> VerifyKey:
        return cls(Ed25519PublicKey.from_public_bytes(raw))

    def to_bytes(self) -> bytes:
        return self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()[:16]

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            self.key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- attestation
@dataclass(frozen=True)
class Quote:
    """A simulated attestation quote: the enclave's measured identity, bound to a fresh nonce.

    ``measurement`` hashes the enclave's code and policy; ``key_fingerprint`` names the
    Paillier key whose private half lives inside it; the platform key signs all of it.
    """

    measurement: str
    nonce: str
    key_fingerprint: str
    policy_hash: str
    signature: bytes = b""

    def body(self) -> bytes:
        return _canonical({"measurement": self.measurement, "nonce": self.nonce,
                           "key_fingerprint": self.key_fingerprint,
                           "policy_hash": self.policy_hash})


def new_nonce() -> str:
    """A fresh 128-bit challenge (hex) from the OS's secure source."""
    return secrets.token_hex(16)


def verify_quote(quote: Quote, *, platform_key: VerifyKey, approved_measurement: str,
                 nonce: str, public_key: PublicKey) -> None:
    """Raise :class:`AttestationError` unless the quote is genuine, fresh and approved."""
    if not platform_key.verify(quote.signature, quote.body()):
        raise AttestationError("the attestation quote's signature does not verify")
    if quote.nonce != nonce:
        raise AttestationError("the attestation quote does not answer this site's challenge")
    if quote.measurement != approved_measurement:
        raise AttestationError(
            "the enclave's measurement is not the approved one (its code or policy changed)"
        )
    if quote.key_fingerprint != key_fingerprint(public_key):
        raise AttestationError("the encryption key is not the attested enclave's key")


# --------------------------------------------------------------------------- aggregates
@dataclass(frozen=True)
class EncryptedAggregate:
    """One site's packed, encrypted aggregate for one query, signed by the site.

    Carries no plaintext: only ciphertexts, the spec hash, the query's nonce and the
    packing parameters (public), so it can travel through untrusted code and kernels.
    """

    site: str
    spec_hash: str
    nonce: str
    key_fingerprint: str
    packing: Packing
    ciphertexts: tuple[int, ...]
    signature: bytes = b""

    def body(self) -> bytes:
        digest = hashlib.sha256()
        for c in self.ciphertexts:
            digest.update(c.to_bytes((c.bit_length() + 7) // 8 or 1, "big"))
            digest.update(b"|")
        return _canonical({"site": self.site, "spec_hash": self.spec_hash, "nonce": self.nonce,
                           "key_fingerprint": self.key_fingerprint,
                           "packing": self.packing.to_dict(),
                           "ciphertexts_sha256": digest.hexdigest()})

    def signed(self, key: SigningKey) -> EncryptedAggregate:
        return EncryptedAggregate(self.site, self.spec_hash, self.nonce, self.key_fingerprint,
                                  self.packing, self.ciphertexts, key.sign(self.body()))

    def to_json(self) -> str:
        """Wire form for kernels and gateways: ciphertexts as hex strings."""
        return json.dumps({
            "site": self.site, "spec_hash": self.spec_hash, "nonce": self.nonce,
            "key_fingerprint": self.key_fingerprint, "packing": self.packing.to_dict(),
            "ciphertexts": [format(c, "x") for c in self.ciphertexts],
            "signature": self.signature.hex(),
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncryptedAggregate:
        """Parse the wire form; any malformed field is an :class:`IntegrityError`."""
        try:
            d = json.loads(text)
            return cls(str(d["site"]), str(d["spec_hash"]), str(d["nonce"]),
                       str(d["key_fingerprint"]), Packing(**d["packing"]),
                       tuple(int(c, 16) for c in d["ciphertexts"]), bytes.fromhex(d["signature"]))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise IntegrityError(f"malformed encrypted aggregate ({type(exc).__name__})") from None
