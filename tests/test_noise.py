"""Statistical tests of the noise: the discrete Laplace law at the published scale.

Each test uses many samples and a fixed, very small p-value (1e-6), and checks that the same
test rejects a scale 30% off, so a passing test means something.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

import pets_widgets as pw
from pets_widgets.enclave.pipeline.noise import NoisePool, OpenDPDiscreteLaplace, noise_interval

from .conftest import make_fed

P_MIN = 1e-6


def pmf(x: np.ndarray, scale: float) -> np.ndarray:
    q = math.exp(-1 / scale)
    return (1 - q) / (1 + q) * q ** np.abs(x)


def gof_pvalue(samples: np.ndarray, scale: float) -> float:
    """Chi-square goodness of fit against discrete Laplace(scale), tails pooled."""
    bound = max(2, int(3 * scale))
    inner = np.arange(-bound, bound + 1)
    observed = [np.sum(samples < -bound), *(np.sum(samples == v) for v in inner),
                np.sum(samples > bound)]
    p_in = pmf(inner, scale)
    tail = (1 - p_in.sum()) / 2
    expected = np.array([tail, *p_in, tail]) * len(samples)
    return float(stats.chisquare(observed, expected).pvalue)


@pytest.mark.parametrize("scale", [1, 2, 14])
def test_opendp_sampler_follows_discrete_laplace(scale):
    samples = np.array(OpenDPDiscreteLaplace().sample([0] * 100_000, Fraction(scale)))
    assert gof_pvalue(samples, scale) > P_MIN
    assert gof_pvalue(samples, 1.3 * scale) < P_MIN  # a 30% wrong scale is rejected
    assert gof_pvalue(samples, scale / 1.3) < P_MIN


def test_opendp_sampler_is_not_reproducible():
    sampler = OpenDPDiscreteLaplace()
    assert sampler.sample([0] * 50, Fraction(2)) != sampler.sample([0] * 50, Fraction(2))


def test_pooled_noise_follows_discrete_laplace_and_each_draw_is_used_once():
    pool = NoisePool(size=40_000)
    sampler = OpenDPDiscreteLaplace(pool)
    pool.warm([Fraction(2)], 40_000)
    assert pool.wait()
    first = sampler.draw(Fraction(2), 20_000)
    assert pool.held(Fraction(2)) == 20_000  # taken out, not copied
    second = sampler.draw(Fraction(2), 20_000)
    assert not np.array_equal(first, second)
    samples = np.concatenate([first, second])
    assert gof_pvalue(samples, 2) > P_MIN and gof_pvalue(samples, 2.6) < P_MIN
    # Values added to the pooled noise are the mechanism on those values.
    shifted = np.array(sampler.sample([100] * 20_000, Fraction(2))) - 100
    assert gof_pvalue(shifted, 2) > P_MIN


def test_a_pool_too_small_draws_afresh_and_refills_in_the_background():
    pool = NoisePool(size=1000)
    sampler = OpenDPDiscreteLaplace(pool)
    assert pool.held(Fraction(5)) == 0
    assert len(sampler.draw(Fraction(5), 300)) == 300  # drawn afresh
    assert pool.wait() and pool.held(Fraction(5)) == 600  # refilled to twice the last use
    assert len(sampler.draw(Fraction(5), 300)) == 300  # from the pool this time


def test_seeded_test_sampler_is_exact_and_reproducible():
    a = pw.testing.seeded_sampler(1).sample([0] * 20_000, Fraction(3, 2))
    b = pw.testing.seeded_sampler(1).sample([0] * 20_000, Fraction(3, 2))
    assert a == b
    samples = np.array(a)
    assert gof_pvalue(samples, 1.5) > P_MIN
    assert gof_pvalue(samples, 1.5 * 1.3) < P_MIN


@pytest.mark.parametrize("scale", [0.5, 1, 2, 7.5, 28])
def test_noise_interval_is_the_narrowest_95_percent_interval(scale):
    a = noise_interval(scale)
    inside = pmf(np.arange(-a, a + 1), scale).sum()
    assert inside >= 0.95
    assert pmf(np.arange(-a + 1, a), scale).sum() < 0.95


@pytest.fixture(scope="module")
def released_noise(tmp_path_factory):
    """Noise of several real releases (released minus exact), cells far from suppression."""
    fed = make_fed(tmp_path_factory, "noise", seed=5, rows_per_site=100_000)
    by = ["tumour_group", "age_band", "sex", "diagnosis_period"]
    noise: dict[float, list[int]] = {1.0: [], 0.5: []}
    covered: dict[float, list[bool]] = {1.0: [], 0.5: []}
    cards = []
    with pw.testing.use_mechanism(fed, pw.testing.seeded_sampler(2026)):
        runs = [(eps, {"diagnosis_year": (2000 + i, 2022)})
                for eps, n in ((1.0, 6), (0.5, 8)) for i in range(n)]
        for i, (eps, where) in enumerate(runs):
            spec = pw.Count(by=by, where=where)
            release = fed.run(spec, epsilon=eps, analyst=f"stats{i}")
            exact_table = pw.testing.noiseless(fed, spec).table  # in the dictionary's order
            exact = (exact_table.reorder_levels(list(release.table.index.names))
                     .loc[release.table.index, "count"].to_numpy(float))
            got = release.table["count"].to_numpy(float, na_value=np.nan)
            far = exact >= 40
            assert not np.isnan(got[far]).any()
            noise[eps].extend((got[far] - exact[far]).astype(int).tolist())
            a = release.card.noise_interval_95
            covered[eps].extend((np.abs(got[far] - exact[far]) <= a).tolist())
            cards.append(release.card)
    return noise, covered, cards


def test_released_noise_follows_the_published_scale(released_noise):
    noise, _, cards = released_noise
    for eps, samples in noise.items():
        scale = 1 / eps
        assert all(c.noise_scale == scale for c in cards if c.epsilon == eps)
        arr = np.array(samples)
        assert len(arr) > 1_500, len(arr)
        assert gof_pvalue(arr, scale) > P_MIN
        assert gof_pvalue(arr, 1.3 * scale) < P_MIN


def test_card_interval_covers_the_truth_95_percent_of_the_time(released_noise):
    _, covered, _ = released_noise
    for eps, hits in covered.items():
        scale = 1 / eps
        a = noise_interval(scale)
        p = pmf(np.arange(-a, a + 1), scale).sum()  # exact coverage of the discrete interval
        n = len(hits)
        rate = float(np.mean(hits))
        assert rate >= 0.95 - 5 * math.sqrt(0.95 * 0.05 / n)
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / n)
