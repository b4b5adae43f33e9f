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

import math
from collections.abc import Sequence
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

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


class OpenDPDiscreteLaplace:
    """OpenDP's exact discrete Laplace sampler on 64-bit integers, OS randomness; unseedable.

    For integer inputs ``make_laplace`` samples the two-sided geometric distribution
    exactly (no floating-point arithmetic in the sampling), drawing from the operating
    system's secure random source: there is no way to seed it by accident.
    """

    name = "discrete Laplace (OpenDP make_laplace, exact, OS randomness)"

    def sample(self, values: Sequence[int], scale: Fraction) -> list[int]:
        if scale <= 0:
            raise InternalError("noise scale must be positive")
        return list(_opendp_measurement(float(scale))([int(v) for v in values]))


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
