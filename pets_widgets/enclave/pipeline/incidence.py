"""Incidence rates per million person-years from noisy case counts and public denominators.

Runs inside the enclave (measured code). Cases come from one noisy block (stratum x age band,
sensitivity 1); person-years are the sites' public population tables, registered with the
enclave when the federation is built, and are not noised: they describe the population
covered, not patients. A rate is post-processing of noisy counts with public numbers, so it
costs nothing beyond the block's epsilon.

* crude rate = cases / person-years x 10^6;
* age-standardised rate (direct method) = sum over age bands of ``w_a cases_a / PY_a``
  x 10^6, with ``w_a`` the standard population's weights renormalised over the bands the
  query covers (see :mod:`pets_widgets.core.standards`);
* 95% intervals: the gamma interval of Fay and Feuer (1997) for a weighted sum of Poisson
  counts, with the variance ``sum (w_a / PY_a)^2 (cases_a + sigma^2)`` that adds the discrete
  Laplace noise variance ``sigma^2`` of every noisy cell to its Poisson variance. With no
  noise and one weight it is the exact (Garwood) Poisson interval.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core import standards
from pets_widgets.core.query import IncidenceRate, Layout
from pets_widgets.enclave.pipeline.noise import noise_sd
from pets_widgets.enclave.pipeline.tables import (
    NoisyBlocks,
    Tables,
    _index,
)

PER = 1_000_000
Z95 = 1.959963984540054
#: Columns of a population table: public person-years per site, year, sex and age band.
POPULATION_COLUMNS = ("site", "diagnosis_year", "sex", "age_band", "person_years")
COLUMNS = ("cases", "person_years", "crude_rate", "asr")


def check_population(frame: pd.DataFrame, sites: tuple[str, ...]) -> pd.DataFrame:
    """A clean copy of a population table, or ValueError naming what is wrong with it."""
    missing = [c for c in POPULATION_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"population table lacks columns {missing}; needs "
                         f"{list(POPULATION_COLUMNS)}")
    out = frame.loc[:, list(POPULATION_COLUMNS)].copy()
    if out.empty:
        raise ValueError("population table has no rows")
    for name, allowed in (("site", sites), ("sex", S.SEX.categories),
                          ("age_band", S.AGE_BANDS)):
        out[name] = out[name].astype(str)
        if not out[name].isin(allowed).all():
            raise ValueError(f"population column {name!r} holds values outside {list(allowed)}")
    years = pd.to_numeric(out["diagnosis_year"], errors="coerce")
    if years.isna().any() or (years != years.round()).any():
        raise ValueError("population column 'diagnosis_year' must hold whole years")
    out["diagnosis_year"] = years.astype(np.int64)
    if out.duplicated(list(POPULATION_COLUMNS[:-1])).any():
        raise ValueError("population table lists a (site, diagnosis_year, sex, age_band) "
                         "more than once: its person-years would be counted twice")
    py = pd.to_numeric(out["person_years"])
    if (py < 0).any() or not np.isfinite(py).all():
        raise ValueError("population person_years must be finite and not negative")
    out["person_years"] = py.astype(float)
    out["diagnosis_period"] = [S.period_of(int(y)) for y in out["diagnosis_year"]]
    return out.reset_index(drop=True)


def population_hash(frame: pd.DataFrame) -> str:
    """SHA-256 of a population table's canonical CSV: names the denominators on the card."""
    cols = list(POPULATION_COLUMNS)
    text = frame.loc[:, cols].sort_values(cols[:-1]).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _restrict(population: pd.DataFrame, where: Any) -> pd.DataFrame:
    """Rows of the population the query's filters cover (population variables only)."""
    keep = np.ones(len(population), dtype=bool)
    for name, values in where.items():
        if name in ("site", "sex", "age_band", "diagnosis_period"):
            keep &= population[name].isin(list(values)).to_numpy()
        elif name == "diagnosis_year":
            keep &= population[name].between(values[0], values[1]).to_numpy()
        elif name == "age_at_diagnosis":
            bands = {S.age_band_of(a) for a in range(values[0], values[1] + 1)}
            keep &= population["age_band"].isin(sorted(bands)).to_numpy()
    return population[keep]


def gamma_interval(rate: float, variance: float, max_weight: float,
                   level: float = 0.95) -> tuple[float, float]:
    """Fay and Feuer (1997) interval of a weighted sum of Poisson counts.

    ``rate`` is the weighted sum, ``variance`` its variance (here including the noise), and
    ``max_weight`` the largest weight: lower ``v/(2y) chi2_{2y^2/v}(a/2)``, upper
    ``(v+w^2)/(2(y+w)) chi2_{2(y+w)^2/(v+w^2)}(1-a/2)``.
    """
    from scipy import stats  # slow to import: only when a rate is computed

    alpha = 1.0 - level
    y = max(rate, 0.0)
    lo = 0.0
    if y > 0 and variance > 0:
        lo = variance / (2 * y) * float(stats.chi2.ppf(alpha / 2, 2 * y * y / variance))
    v_hi = variance + max_weight**2
    hi = v_hi / (2 * (y + max_weight)) * float(
        stats.chi2.ppf(1 - alpha / 2, 2 * (y + max_weight) ** 2 / v_hi))
    return lo, hi


def build_incidence(spec: IncidenceRate, schema: S.Schema, layout: Layout, noisy: NoisyBlocks,
                    k: int, protection: int, suppress: bool, *,
                    population: pd.DataFrame) -> Tables:
    """Crude and age-standardised rates per million person-years, by stratum.

    Privacy: post-processing of one noisy block (sensitivity 1) with public denominators;
    a stratum whose noisy number of cases is below ``k`` has its cases and rates hidden,
    decided on the noisy value.
    """
    block = layout.blocks[0]
    dims = [d.name for d in block.dims]
    cells = pd.Series(np.asarray(noisy.values[block.name], dtype=float),
                      index=pd.MultiIndex.from_product([list(d.levels) for d in block.dims],
                                                       names=dims))
    sigma2 = noise_sd(noisy.scales[block.name]) ** 2
    pop = _restrict(population, spec.where)
    pop_by = [b for b in spec.by if b in pop.columns and b != "age_band"]
    denominators = pop.groupby([*pop_by, "age_band"])["person_years"].sum()
    std = standards.standard(spec.standard)
    index = _index(spec.by, schema)
    keys = [()] if not spec.by else [key if isinstance(key, tuple) else (key,) for key in index]

    rows, lows, highs, hidden = [], [], [], []
    for key in keys:
        stratum = dict(zip(spec.by, key, strict=True))
        bands = [stratum["age_band"]] if "age_band" in stratum else list(S.AGE_BANDS)
        counts, years = [], []
        for band in bands:
            cell_key = tuple(band if d == "age_band" else stratum[d] for d in dims)
            counts.append(float(cells.loc[cell_key]))
            denom_key = (*(stratum[b] for b in pop_by), band)
            years.append(float(denominators.get(denom_key if len(denom_key) > 1
                                                else denom_key[0], 0.0)))
        c, py = np.array(counts), np.array(years)
        covered = py > 0
        cases = max(float(c.sum()), 0.0)
        m = len(c)
        case_half = Z95 * math.sqrt(sigma2 * m)
        crude = asr = crude_lo = crude_hi = asr_lo = asr_hi = math.nan
        if covered.any():
            total_py = float(py.sum())
            crude = cases / total_py * PER
            var_crude = float((np.maximum(c, 0) + sigma2).sum()) / total_py**2
            lo, hi = gamma_interval(cases / total_py, var_crude, 1.0 / total_py)
            crude_lo, crude_hi = lo * PER, hi * PER
            fractions = std.fractions([b for b, ok in zip(bands, covered, strict=True) if ok])
            w = np.array([float(fractions[b]) for b, ok in zip(bands, covered, strict=True)
                          if ok]) / py[covered]
            cc = c[covered]
            y = max(float(w @ cc), 0.0)
            var_asr = float((w**2 * (np.maximum(cc, 0) + sigma2)).sum())
            lo, hi = gamma_interval(y, var_asr, float(w.max()))
            asr, asr_lo, asr_hi = y * PER, lo * PER, hi * PER
        total_years = float(py.sum())
        rows.append((cases, total_years, crude, asr))
        lows.append((max(cases - case_half, 0.0), total_years, crude_lo, asr_lo))
        highs.append((cases + case_half, total_years, crude_hi, asr_hi))
        hide = suppress and cases < k
        hidden.append((hide, False, hide, hide))

    mask = pd.DataFrame(hidden, index=index, columns=list(COLUMNS))
    table = pd.DataFrame(rows, index=index, columns=list(COLUMNS))
    table["cases"] = pd.array(np.rint(table["cases"]).astype(np.int64), dtype="Int64")
    table["person_years"] = pd.array(np.rint(table["person_years"]).astype(np.int64),
                                     dtype="Int64")
    lower = pd.DataFrame(lows, index=index, columns=list(COLUMNS)).mask(mask)
    upper = pd.DataFrame(highs, index=index, columns=list(COLUMNS)).mask(mask)
    covered_bands = sorted(set(pop["age_band"]), key=S.AGE_BANDS.index) or list(S.AGE_BANDS)
    notes = (
        "Denominators: the sites' public person-years (population estimates, not patient "
        "data), pooled over the sites and restricted by the filters on site, sex, age, year "
        "and period; not noised. Table SHA-256 "
        f"{population_hash(population)[:16]}...",
        f"Age-standardised to the {std.describe(covered_bands)}; direct method, weights "
        "renormalised over the age bands covered.",
        "Rates are per million person-years; 95% intervals: Fay-Feuer gamma interval with the "
        "variance of each noisy count = its Poisson variance + the discrete Laplace noise "
        "variance.",
    )
    return Tables(table.mask(mask), mask, lower, upper, margins="none released",
                  postprocessing=(f"cases = sum of noisy cells, clamped at 0; hidden when the "
                                  f"noisy number of cases is below {k}; rates from noisy cases "
                                  "over public person-years"),
                  extras={"standard": std.name, "per": PER}, notes=notes,
                  suppression=(f"a stratum whose noisy number of cases is below k={k} has its "
                               "cases and rates hidden; person-years are public and shown"))

