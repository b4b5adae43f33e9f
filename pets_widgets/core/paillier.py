"""Paillier primitives shared by every domain: public keys, encryption with fresh
obfuscators, the homomorphic sum and ciphertext checks (``phe`` with gmpy2).

Paillier is additively homomorphic: multiplying ciphertexts adds their plaintexts, so an
untrusted aggregator can total the sites' encrypted vectors without seeing them. The
private half of a key and decryption live in the enclave only
(:mod:`pets_widgets.enclave.decryption`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import math
import secrets
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TypeAlias

import gmpy2
from phe import paillier

from pets_widgets.core.errors import IntegrityError, PackingError

DEFAULT_KEY_BITS = 2048


ALLOWED_KEY_BITS = (1024, 2048, 3072)  # 1024 only for tests about logic, never for releases


PublicKey: TypeAlias = paillier.PaillierPublicKey


def key_fingerprint(public_key: PublicKey) -> str:
    """SHA-256 (hex) of the Paillier modulus: names the enclave key in quotes and aggregates."""
    n = public_key.n
    return hashlib.sha256(n.to_bytes((n.bit_length() + 7) // 8, "big")).hexdigest()


# --------------------------------------------------------------------------- Paillier
def gil_released() -> contextlib.AbstractContextManager[object]:
    """A block in which gmpy2 releases the GIL during its arithmetic (in this thread only).

    Only the modular exponentiations (encryption without a precomputed obfuscator,
    decryption) run inside one: they last milliseconds, so other threads use the other
    cores meanwhile. Cheap multiplications stay outside, where giving the GIL away would
    cost a thread switch each.
    """
    return gmpy2.context(gmpy2.get_context(), allow_release_gil=True)


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


def check_ciphertexts(public_key: PublicKey, ciphertexts: Sequence[int]) -> None:
    """Reject values that cannot be ciphertexts under this key (out of range or not units)."""
    nsq = public_key.nsquare
    for c in ciphertexts:
        if not isinstance(c, int) or not 0 < c < nsq or math.gcd(c, public_key.n) != 1:
            raise IntegrityError("a ciphertext is not a valid Paillier ciphertext for this key")
