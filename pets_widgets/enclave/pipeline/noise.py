"""Differential-privacy noise: the exact discrete Laplace mechanism and its intervals.

Privacy argument, in short. Each query's cells are grouped in blocks; adding or removing one
patient changes a block's cells by at most its L1 ``sensitivity`` (1 for counts, because a
patient is in exactly one cell; the clipping width for clipped sums). Adding discrete
Laplace noise of scale ``sensitivity / epsilon_block`` to every cell of a block makes the
block epsilon_block-differentially private (the geometric mechanism, Ghosh, Roughgarden and
Sundararajan 2009), and the blocks of one query compose to the query's epsilon. Everything
done afterwards (clamping at zero, margins summed from noisy cells, suppression decided on
noisy values, means and curves computed from noisy totals) is post-processing and costs no
privacy.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

import numpy as np

from pets_widgets.core.errors import InternalError


class NoiseMechanism(Protocol):
    """Adds noise of a given scale to integer cells. ``name`` is published on the card."""

    name: str

    def sample(self, values: Sequence[int], scale: Fraction) -> list[int]: ...


@lru_cache(maxsize=64)
def _opendp_measurement(scale: float):
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale
    )


def _draw(scale: Fraction, n: int) -> np.ndarray:
    """``n`` fresh draws of discrete Laplace noise at ``scale`` (one vectorised OpenDP call)."""
    return np.asarray(_opendp_measurement(float(scale))([0] * n), dtype=np.int64)


class NoisePool:
    """Discrete Laplace noise drawn ahead of time, per scale, each draw used once.

    The noise added to a release does not depend on the data, so it can be drawn before the
    release is asked for: a draw taken from the pool is exactly a fresh draw from the same
    secure source (OpenDP, OS randomness), handed out once and then forgotten. After each
    use, and for the scales :meth:`warm` names, a background thread refills the pool, so a
    survival release of 1,464 cells adds its noise in microseconds instead of milliseconds.
    At most ``scales`` scales are kept (the least recently used is dropped), each up to
    ``size`` draws.
    """

    def __init__(self, size: int = 4096, scales: int = 16):
        self.size, self.scales = size, scales
        self._lock = threading.Lock()
        self._pools: collections.OrderedDict[Fraction, np.ndarray] = collections.OrderedDict()
        self._wanted: collections.OrderedDict[Fraction, int] = collections.OrderedDict()
        self._filling = threading.Event()
        self._worker: threading.Thread | None = None

    def take(self, scale: Fraction, n: int) -> np.ndarray | None:
        """``n`` draws at ``scale`` taken out of the pool, or None when it holds fewer (the
        caller draws afresh); either way the pool is refilled in the background."""
        with self._lock:
            self._want(scale, n)
            pool = self._pools.get(scale)
            taken = None
            if pool is not None and len(pool) >= n:
                taken, self._pools[scale] = pool[:n].copy(), pool[n:]
                self._pools.move_to_end(scale)
        self._wake()
        return taken

    def warm(self, scales: Sequence[Fraction], n: int) -> None:
        """Fill the pool for these scales in the background, ``n`` draws each."""
        with self._lock:
            for scale in scales:
                self._want(Fraction(scale), n)
        self._wake()

    def held(self, scale: Fraction) -> int:
        with self._lock:
            pool = self._pools.get(scale)
            return 0 if pool is None else len(pool)

    def wait(self, timeout: float = 30.0) -> bool:
        """Block until the background refill has nothing left to do (benchmarks, tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if not self._missing():
                    return True
            time.sleep(0.005)
        return False

    def _want(self, scale: Fraction, n: int) -> None:
        target = min(self.size, max(2 * n, self._wanted.get(scale, 0)))
        self._wanted[scale] = max(target, n)
        self._wanted.move_to_end(scale)
        while len(self._wanted) > self.scales:
            dropped, _ = self._wanted.popitem(last=False)
            self._pools.pop(dropped, None)

    def _missing(self) -> list[tuple[Fraction, int]]:
        return [(s, want - (0 if s not in self._pools else len(self._pools[s])))
                for s, want in self._wanted.items()
                if s not in self._pools or len(self._pools[s]) < want]

    def _wake(self) -> None:
        self._filling.set()
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._fill, daemon=True,
                                            name="enclave-noise-pool")
            self._worker.start()

    def _fill(self) -> None:
        while self._filling.wait(60.0):
            with self._lock:
                missing = self._missing()
                if not missing:
                    self._filling.clear()
                    continue
            scale, n = missing[-1]  # the most recently wanted scale first
            fresh = _draw(scale, n)  # outside the lock: OpenDP runs without the GIL
            with self._lock:
                if scale in self._wanted:
                    pool = self._pools.get(scale)
                    self._pools[scale] = fresh if pool is None else np.concatenate([pool,
                                                                                     fresh])


class OpenDPDiscreteLaplace:
    """OpenDP's exact discrete Laplace sampler on 64-bit integers, OS randomness; unseedable.

    For integer inputs ``make_laplace`` samples the two-sided geometric distribution
    exactly (no floating-point arithmetic in the sampling), drawing from the operating
    system's secure random source: there is no way to seed it by accident. With a
    :class:`NoisePool` the draws come from the pool when it holds enough (each once).
    """

    name = "discrete Laplace (OpenDP make_laplace, exact, OS randomness)"

    def __init__(self, pool: NoisePool | None = None):
        self.pool = pool

    def sample(self, values: Sequence[int], scale: Fraction) -> list[int]:
        if scale <= 0:
            raise InternalError("noise scale must be positive")
        values = [int(v) for v in values]
        if not any(values):
            noise = self.draw(Fraction(scale), len(values))
            return noise.tolist()
        return list(_opendp_measurement(float(scale))(values))

    def draw(self, scale: Fraction, n: int) -> np.ndarray:
        """``n`` draws of noise at ``scale``: from the pool when it holds them, else fresh."""
        taken = self.pool.take(scale, n) if self.pool is not None else None
        return taken if taken is not None else _draw(scale, n)


def noise_interval(scale: Fraction | float, level: float = 0.95) -> int:
    """Half-width ``a`` of the narrowest interval ``[-a, a]`` holding discrete Laplace noise
    of this scale with probability at least ``level``.

    P(|X| > a) = 2 q^(a+1) / (1 + q) with q = exp(-1/scale).
    """
    scale = float(scale)
    if scale <= 0:
        return 0
    q = math.exp(-1.0 / scale)
    a = max(0, math.ceil(math.log((1 - level) * (1 + q) / 2) / math.log(q)) - 1)
    while a > 0 and 2 * q**a / (1 + q) <= 1 - level:  # guard floating-point edge cases
        a -= 1
    while 2 * q ** (a + 1) / (1 + q) > 1 - level:
        a += 1
    return a


def noise_sd(scale: Fraction | float) -> float:
    """Standard deviation of discrete Laplace noise: sqrt(2q)/(1-q), q = exp(-1/scale)."""
    scale = float(scale)
    if scale <= 0:
        return 0.0
    q = math.exp(-1.0 / scale)
    return math.sqrt(2 * q) / (1 - q)
