"""Kaplan-Meier curves, noise-aware bands and the log-rank test from aggregated (noisy) counts.

Runs inside the enclave (it is part of the measured code) on the noisy totals of a
:class:`~pets_widgets.core.query.Survival` query, and only on them: every number here is
post-processing of differentially private counts and costs no privacy budget.

The counts, per stratum, are deaths ``d_j`` and censorings ``c_j`` in each interval ``j`` of
the spec's grid (a death after ``T`` completed months sits at grid time ``(T // w + 1) w``)
and the patients still followed at the horizon. From them:

* numbers at risk ``n_j`` (followed at the start of interval ``j``) are sums of noisy cells
  from ``j`` onwards, made non-increasing (isotonic regression), rounded and clamped at zero;
* the product-limit estimate ``S(t_{j+1}) = prod_{i<=j} (1 - d_i / n_i)`` uses the noisy
  deaths *unclamped*: clamping every small monthly count at zero would add about half a death
  per interval and bias the curve down; negative noise instead shows up as a small rise,
  which the next step removes;
* the curve is made non-increasing by isotonic regression (pool-adjacent-violators, the
  least-squares non-increasing fit) and clipped to [0, 1];
* 95% bands are computed on the log scale, ``S exp(+-1.96 sqrt(V))``, clipped to [0, 1], with
  ``V`` the sum of Greenwood's variance of ``log S`` (sampling error) and the variance of
  ``log S`` due to the discrete Laplace noise, propagated by the delta method through every
  noisy cell (a death cell moves its own hazard and, through ``n``, all earlier ones; a
  censoring cell moves the earlier numbers at risk). The noise part is exact to first order
  and deterministic, so a stored release rebuilt from its stored noisy cells is identical.
  In seeded simulations (tests/test_survival.py) the noise part alone matches the spread of
  noisy curves (z-scores with SD about 1); with Greenwood added, the bands cover the
  noiseless pooled curve more than 95% of the time (scripts/survival_coverage.py).

Hiding: a stratum is drawn only when its noisy size is at least k and
:data:`MIN_STRATUM_SDS` noise standard deviations above zero (an empty stratum's noisy size
is a sum of many noisy cells); a curve stops, and numbers at risk are hidden, where fewer
than k remain at risk. The log-rank test uses the shown strata only.

With exact counts (the test door) every step is the identity and the curve is lifelines'
``KaplanMeierFitter`` on grid durations, to rounding error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.errors import QueryValidationError
from pets_widgets.core.query import Layout, Survival
from pets_widgets.core.release import ALL, Release
from pets_widgets.enclave.pipeline.noise import noise_sd
from pets_widgets.enclave.pipeline.tables import NoisyBlocks, Tables, _index

if TYPE_CHECKING:  # lifelines and scipy are imported when first needed (slow to import)
    from lifelines.statistics import StatisticalResult

Z95 = 1.959963984540054
#: Survival reported in the table: column name -> months (when the month is on the grid).
LANDMARKS = {"1 year": 12, "3 years": 36, "5 years": 60}
#: Quantities of :attr:`Release.curves` (the first level of its columns).
CURVE_QUANTITIES = ("survival", "lower", "upper", "at_risk")
#: A stratum is drawn only when its noisy size is this many noise standard deviations above
#: zero (and at least k): its size is the sum of 2 (J + 1) noisy cells, so an empty stratum
#: has a noisy size of 0 +- 15 at epsilon 1 on a monthly 5-year grid, and would otherwise
#: be drawn as a curve of pure noise about a third of the time (2% with this threshold).
MIN_STRATUM_SDS = 2.0


# --------------------------------------------------------------------------- estimation


@dataclass(frozen=True)
class KMEstimate:
    """Kaplan-Meier on a grid from counts, before any hiding.

    ``timeline``, ``survival``, ``at_risk``, ``var_greenwood`` and ``var_noise`` have one
    value per grid time ``t_0 = 0 .. t_J`` (variances are of ``log S``); ``deaths`` has one
    per interval: the deaths consistent with the released curve and numbers at risk.
    ``adjusted`` says whether the monotone post-processing changed anything.
    """

    timeline: np.ndarray
    survival: np.ndarray
    at_risk: np.ndarray
    deaths: np.ndarray
    var_greenwood: np.ndarray
    var_noise: np.ndarray
    adjusted: bool

    @property
    def var_log(self) -> np.ndarray:
        """Total variance of ``log S``: sampling (Greenwood) plus noise."""
        return self.var_greenwood + self.var_noise

    def band(self, z: float = Z95) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise band ``S exp(+-z sqrt(V))`` on the log scale, within [0, 1]."""
        se = np.sqrt(self.var_log)
        with np.errstate(invalid="ignore", over="ignore"):
            lower = self.survival * np.exp(-z * se)
            upper = self.survival * np.exp(z * se)
        lower = np.where(np.isnan(lower), 0.0, lower)
        upper = np.where(np.isnan(upper), 1.0, upper)  # S = 0 with infinite variance
        return np.clip(lower, 0.0, 1.0), np.clip(upper, self.survival, 1.0)


def _non_increasing(y: np.ndarray) -> tuple[np.ndarray, bool]:
    """The least-squares non-increasing fit of ``y`` (itself when already non-increasing)."""
    if not np.any(np.diff(y) > 0):
        return y.astype(float), False
    from scipy.optimize import isotonic_regression  # only when noise made a rise

    return np.asarray(isotonic_regression(y, increasing=False).x, dtype=float), True


def kaplan_meier_from_counts(deaths: np.ndarray, censored: np.ndarray, beyond: np.ndarray,
                             timeline: np.ndarray, noise_variance: float = 0.0) -> KMEstimate:
    """Kaplan-Meier curve, numbers at risk and variances from (noisy) interval counts.

    Parameters
    ----------
    deaths, censored
        Counts per grid interval ``j = 0 .. J-1`` (noisy integers; may be negative).
    beyond
        The cells of patients still followed at the horizon (noisy).
    timeline
        The ``J + 1`` grid times.
    noise_variance
        Variance of the noise on every cell (0 for exact counts).

    Privacy: a function of noisy counts only (post-processing), so it spends nothing.
    """
    d = np.asarray(deaths, dtype=float)
    c = np.asarray(censored, dtype=float)
    rest = np.asarray(beyond, dtype=float)
    n_int = d.size
    tail = np.concatenate([np.cumsum((d + c)[::-1])[::-1], [0.0]]) + rest.sum()
    fitted, adjusted = _non_increasing(tail)
    at_risk = np.maximum(np.rint(fitted), 0.0)
    n = at_risk[:-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        hazard = np.where(n > 0, d / np.where(n > 0, n, 1.0), 0.0)
    hazard = np.minimum(hazard, 1.0)
    raw = np.cumprod(1.0 - hazard)
    shape_changed = bool(np.any(hazard < 0))
    curve, pooled = _non_increasing(raw)
    curve = np.clip(curve, 0.0, 1.0)
    survival = np.concatenate([[1.0], curve])
    adjusted = adjusted or pooled or shape_changed or bool(np.any(d > n))

    if adjusted:  # deaths consistent with the post-processed curve and numbers at risk
        prev = survival[:-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(prev > 0, survival[1:] / np.where(prev > 0, prev, 1.0), 1.0)
        d_used = np.clip(n * (1.0 - ratio), 0.0, n)
    else:
        d_used = np.where(n > 0, d, 0.0)

    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(n > 0, d_used / (n * (n - d_used)), 0.0)
    g = np.where((n > 0) & (d_used >= n) & (d_used > 0), np.inf, g)
    big_g = np.cumsum(g)
    var_greenwood = np.concatenate([[0.0], big_g])

    var_noise = np.zeros(n_int + 1)
    if noise_variance > 0:
        inv_n = np.where(n > 0, 1.0 / np.where(n > 0, n, 1.0), 0.0)
        g_prev = np.concatenate([[0.0], big_g[:-1]])
        with np.errstate(invalid="ignore"):
            own = np.cumsum((g_prev - inv_n) ** 2)  # death cells of intervals before t_i
            cens = np.cumsum(big_g**2)  # censoring cells of intervals before t_i
            later = (2 * (n_int - np.arange(1, n_int + 1)) + rest.size) * big_g**2
            var_noise[1:] = noise_variance * (own + cens + later)
        var_noise = np.where(np.isnan(var_noise), np.inf, var_noise)
    return KMEstimate(np.asarray(timeline, dtype=float), survival, at_risk, d_used,
                      var_greenwood, var_noise, adjusted)


def logrank_from_counts(deaths: np.ndarray, at_risk: np.ndarray, labels: list[str],
                        *, horizon: float, noisy: bool) -> StatisticalResult | None:
    """Multivariate log-rank test across strata from per-interval deaths and numbers at risk.

    ``deaths`` and ``at_risk`` are ``(strata, intervals)`` arrays. Observed ``O_s = sum_j
    d_sj`` and expected ``E_s = sum_j n_sj d_j / n_j`` deaths, the hypergeometric covariance
    ``V`` summed over intervals, and ``U = (O - E)' V^- (O - E)`` on all strata but one,
    chi-square with ``strata - 1`` degrees of freedom: the computation of lifelines'
    ``multivariate_logrank_test``. From noisy counts the variance does not include the noise,
    so the p-value is approximate; the result says so. None for fewer than two strata.
    """
    from lifelines.statistics import StatisticalResult
    from scipy import stats

    d = np.asarray(deaths, dtype=float)
    n = np.asarray(at_risk, dtype=float)
    groups = d.shape[0]
    if groups < 2:
        return None
    d_tot, n_tot = d.sum(0), n.sum(0)
    live = n_tot > 0
    d, n, d_tot, n_tot = d[:, live], n[:, live], d_tot[live], n_tot[live]
    observed = d.sum(1)
    expected = (n * (d_tot / n_tot)).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(n_tot > 1, (n_tot - d_tot) / (n_tot - 1), 1.0)
    factor = spread * d_tot / n_tot**2
    cov = -(n * factor) @ n.T
    cov[np.diag_indices(groups)] += (n * factor * n_tot).sum(1)
    z = (observed - expected)[:-1]
    statistic = float(z @ np.linalg.pinv(cov[:-1, :-1]) @ z)
    p_value = float(stats.chi2.sf(statistic, groups - 1))
    name = "multivariate_logrank_test" + (" (from noisy counts)" if noisy else "")
    result = StatisticalResult(p_value, statistic, test_name=name, t_0=horizon,
                               null_distribution="chi squared", degrees_of_freedom=groups - 1)
    result.table = pd.DataFrame(
        {"observed": observed, "expected": expected}, index=pd.Index(labels, name="stratum"))
    result.noisy = noisy
    result.note = (
        "computed from noisy counts (numbers at risk and deaths after post-processing); the "
        "noise is not in the variance, so the p-value is approximate" if noisy else
        "computed from exact counts (test door)")
    return result


# --------------------------------------------------------------------------- the release


def stratum_labels(by: tuple[str, ...], schema: S.Schema) -> list[str]:
    """Readable stratum names in layout order: ``"CNS"``, ``"CNS / F"`` or ``"All patients"``."""
    index = _index(by, schema)
    if not by:
        return [ALL]
    if len(by) == 1:
        return [str(v) for v in index]
    return [" / ".join(str(v) for v in key) for key in index]


def _landmarks(spec: Survival) -> dict[str, int]:
    """Landmark columns whose month lies on the spec's grid."""
    grid = set(spec.grid)
    return {name: month for name, month in LANDMARKS.items() if month in grid}


def stratum_threshold(k: int, noise_variance: float, n_intervals: int) -> int:
    """Smallest noisy stratum size that is drawn: ``k``, or :data:`MIN_STRATUM_SDS` noise
    standard deviations of a stratum's noisy size when that is larger."""
    sd = math.sqrt(noise_variance * 2 * (n_intervals + 1))
    return max(k, math.ceil(MIN_STRATUM_SDS * sd))


def _postprocessing(k: int, suppress: bool) -> str:
    steps = (
        "Kaplan-Meier from the noisy counts: numbers at risk are sums of noisy cells, made "
        "non-increasing (isotonic regression), rounded and clamped at 0; noisy deaths are used "
        "unclamped (no bias from clamping); the curve is made non-increasing by isotonic "
        "regression and clipped to [0, 1]. 95% bands on the log scale with variance = "
        "Greenwood (sampling) + discrete Laplace noise (delta method through every cell).")
    if suppress:
        steps += (f" A stratum with fewer noisy patients than k={k}, or than {MIN_STRATUM_SDS:g} "
                  "noise standard deviations of its noisy size, is hidden and not drawn; "
                  f"a curve stops where fewer than {k} remain at risk, and numbers at risk "
                  f"below {k} are not shown.")
    return steps


def build_survival(spec: Survival, schema: S.Schema, layout: Layout, noisy: NoisyBlocks, k: int,
                   protection: int, suppress: bool) -> Tables:
    """The survival release: 1/3/5-year table, curves with bands, and the log-rank test.

    Privacy: post-processing of the one noisy block (sensitivity 1, scale 1/epsilon); hiding
    decisions use noisy values only. A stratum is hidden when its noisy number of patients
    is below ``k``; each curve stops once fewer than ``k`` remain at risk, and numbers at risk
    below ``k`` are not shown, so no released number rests on fewer than ``k`` noisy patients.
    """
    block = layout.blocks[0]
    n_int = spec.n_intervals
    cells = np.asarray(noisy.values[block.name], dtype=float).reshape(-1, n_int + 1, 2)
    sigma2 = noise_sd(noisy.scales[block.name]) ** 2
    grid = np.asarray(spec.grid, dtype=float)
    labels = stratum_labels(spec.by, schema)
    index = _index(spec.by, schema)
    marks = _landmarks(spec)
    cols = ["patients", *marks]
    n_strata = len(labels)

    value = np.full((n_strata, len(cols)), np.nan)
    low = np.full_like(value, np.nan)
    high = np.full_like(value, np.nan)
    hidden = np.zeros(value.shape, dtype=bool)
    curves = {q: np.full((n_int + 1, n_strata), np.nan) for q in CURVE_QUANTITIES}
    shown_strata: list[int] = []
    hidden_strata: list[str] = []
    estimates: list[KMEstimate] = []
    patients_half = Z95 * math.sqrt(sigma2 * 2 * (n_int + 1))
    smallest = stratum_threshold(k, sigma2, n_int)

    for s in range(n_strata):
        est = kaplan_meier_from_counts(cells[s, :n_int, 1], cells[s, :n_int, 0],
                                       cells[s, n_int, :], grid, sigma2)
        estimates.append(est)
        patients = est.at_risk[0]
        value[s, 0] = patients
        low[s, 0], high[s, 0] = max(patients - patients_half, 0.0), patients + patients_half
        if suppress and patients < smallest:
            hidden[s, :] = True
            hidden_strata.append(labels[s])
            continue
        if patients == 0:  # empty stratum (exact counts only): no curve to draw
            continue
        shown_strata.append(s)
        visible = np.ones(n_int + 1, dtype=bool)
        if suppress:
            visible[1:] = est.at_risk[:-1] >= k
        lower, upper = est.band()
        curves["survival"][:, s] = np.where(visible, est.survival, np.nan)
        curves["lower"][:, s] = np.where(visible, lower, np.nan)
        curves["upper"][:, s] = np.where(visible, upper, np.nan)
        shown_at_risk = est.at_risk >= k if suppress else np.ones(n_int + 1, dtype=bool)
        curves["at_risk"][:, s] = np.where(shown_at_risk, est.at_risk, np.nan)
        for c, month in enumerate(marks.values(), start=1):
            i = month // spec.interval_months
            if visible[i]:
                value[s, c], low[s, c], high[s, c] = est.survival[i], lower[i], upper[i]
            else:
                hidden[s, c] = True

    mask = pd.DataFrame(hidden, index=index, columns=cols)
    table = pd.DataFrame(value, index=index, columns=cols)
    table["patients"] = pd.array(np.rint(value[:, 0]).astype(np.int64), dtype="Int64")
    lower_t = pd.DataFrame(low, index=index, columns=cols).mask(mask)
    upper_t = pd.DataFrame(high, index=index, columns=cols).mask(mask)
    columns = pd.MultiIndex.from_product([CURVE_QUANTITIES, labels],
                                         names=["quantity", "stratum"])
    curve_frame = pd.DataFrame(np.hstack([curves[q] for q in CURVE_QUANTITIES]),
                               index=pd.Index(spec.grid, name="months"), columns=columns)

    exact = sigma2 == 0
    logrank = logrank_from_counts(
        np.array([estimates[s].deaths for s in shown_strata]).reshape(len(shown_strata), n_int),
        np.array([estimates[s].at_risk[:-1] for s in shown_strata]).reshape(len(shown_strata),
                                                                           n_int),
        [labels[s] for s in shown_strata], horizon=float(spec.horizon_months), noisy=not exact)
    notes = [f"Survival grid: {spec.interval_months}-month intervals to {spec.horizon_months} "
             "months; a death or censoring after T completed months is placed at the end of "
             "its interval."]
    if hidden_strata:
        notes.append(f"Hidden strata (fewer than {smallest} noisy patients, not drawn): "
                     + ", ".join(hidden_strata) + ".")
    if logrank is not None:
        notes.append(f"Log-rank test across the {len(shown_strata)} shown strata: "
                     f"{logrank.note}.")
    extras: dict[str, Any] = {
        "curves": curve_frame, "logrank": logrank, "suppressed_strata": tuple(hidden_strata),
        "strata": tuple(labels), "landmarks": marks, "k": k, "smallest_stratum": smallest,
    }
    rule = (f"a stratum whose noisy number of patients is below {smallest} (k={k}, or "
            f"{MIN_STRATUM_SDS:g} standard deviations of the noise on a stratum's size) is "
            f"hidden (listed, not drawn); curves stop, and numbers at risk are hidden, where "
            f"fewer than {k} (noisy) remain at risk; per-interval counts are not listed, "
            f"though the curve and numbers at risk imply their noisy values")
    return Tables(table.mask(mask), mask, lower_t, upper_t, margins="none released",
                  postprocessing=_postprocessing(k, suppress), extras=extras,
                  notes=tuple(notes), suppression=rule)


def logrank(release: Release) -> StatisticalResult | None:
    """The log-rank test across the shown strata of a survival release (None for one stratum).

    Computed in the enclave from the release's noisy counts and labelled so (``test_name``
    ends with "(from noisy counts)"); ``result.table`` has observed and expected deaths.
    """
    if release.spec.kind != Survival.kind:
        raise QueryValidationError("release", f"is a {release.spec.kind} release, not survival",
                                   [Survival.kind])
    return release.extras.get("logrank")



def median_survival(release: Release) -> pd.DataFrame:
    """Median survival of each stratum of a survival release, with its 95% interval, in
    months: read off the released curve and band, so it costs no budget (post-processing).

    The median is the first grid time at which the curve is at or below 0.5 (as lifelines'
    ``median_survival_time_`` on the same grid); the interval runs from the first time the
    band's lower edge is at or below 0.5 to the first time its upper edge is
    (Brookmeyer and Crowley's construction, on the noise-aware band). ``inf`` means not
    reached while the curve is shown (it stops where fewer than k remain at risk); a hidden
    stratum has NaN throughout. Columns: ``median``, ``lower``, ``upper``, ``shown``.
    """
    if release.spec.kind != Survival.kind or release.curves is None:
        raise QueryValidationError("release", f"is a {release.spec.kind} release, not survival",
                                   [Survival.kind])
    curves = release.curves
    times = curves.index.to_numpy(dtype=float)

    def first_at_or_below_half(values: np.ndarray) -> float:
        hits = np.flatnonzero(values <= 0.5)  # NaN compares False: a stopped curve never hits
        return float(times[hits[0]]) if hits.size else math.inf

    rows = {}
    for label in curves["survival"].columns:
        curve = curves["survival"][label].to_numpy(dtype=float)
        if np.isnan(curve).all():
            rows[label] = (math.nan, math.nan, math.nan, False)
            continue
        rows[label] = (first_at_or_below_half(curve),
                       first_at_or_below_half(curves["lower"][label].to_numpy(dtype=float)),
                       first_at_or_below_half(curves["upper"][label].to_numpy(dtype=float)),
                       True)
    out = pd.DataFrame.from_dict(rows, orient="index",
                                 columns=["median", "lower", "upper", "shown"])
    out.index.name = "stratum"
    return out
