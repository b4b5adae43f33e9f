"""Seeded synthetic childhood cancer registries and their population denominators.

The registries look like real ones (incidence mix by ICCC-3 group and age, survival that
differs by group and stage, administrative censoring at the end of 2023) but describe no
one. Population denominators are public-style tables of person-years per site, year, sex
and age band, the kind a statistics office publishes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S

#: Share of childhood cancers in each ICCC-3 group (ages 0-14; UK and US registries).
GROUP_SHARE = {
    "Leukaemia": 0.31, "Lymphoma": 0.10, "CNS": 0.25, "Neuroblastoma": 0.065,
    "Retinoblastoma": 0.03, "Renal": 0.055, "Hepatic": 0.013, "Bone": 0.045,
    "Soft tissue": 0.07, "Germ cell": 0.03, "Epithelial": 0.03, "Other": 0.012,
}

#: Relative incidence by single year of age 0..14 within each group.
AGE_WEIGHTS: dict[str, list[float]] = {
    "Leukaemia": [3, 6, 9, 9, 8, 6, 5, 4, 3.5, 3, 3, 3, 3, 3, 3],
    "Lymphoma": [0.3, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 6, 7, 8, 9],
    "CNS": [3, 4, 5, 5, 5, 5, 5, 5, 5, 4.5, 4.5, 4.5, 4, 4, 4],
    "Neuroblastoma": [12, 8, 5, 4, 3, 1.5, 1, 0.7, 0.5, 0.4, 0.3, 0.3, 0.2, 0.2, 0.2],
    "Retinoblastoma": [12, 10, 6, 3, 1.5, 0.5, 0.2, 0.1, 0.05, 0.05, 0.02, 0.02, 0.01, 0.01, 0.01],
    "Renal": [3, 6, 8, 7, 6, 4, 3, 2, 1.5, 1, 1, 0.7, 0.6, 0.5, 0.5],
    "Hepatic": [8, 10, 6, 3, 1.5, 1, 0.8, 0.6, 0.6, 0.6, 0.7, 0.8, 0.9, 1, 1],
    "Bone": [0.1, 0.2, 0.3, 0.5, 0.8, 1, 1.5, 2, 3, 4, 6, 8, 10, 11, 11],
    "Soft tissue": [3, 4, 4, 4, 4, 3.5, 3.5, 3.5, 3.5, 3.5, 4, 4, 4.5, 5, 5],
    "Germ cell": [6, 3, 1.5, 1, 0.8, 0.6, 0.5, 0.5, 0.6, 0.8, 1.5, 2.5, 3.5, 4.5, 5.5],
    "Epithelial": [0.2, 0.2, 0.3, 0.3, 0.4, 0.5, 0.7, 1, 1.5, 2, 3, 4, 5, 6, 7],
    "Other": [1] * 15,
}

#: Survival: (cured fraction, median months of the uncured, Weibull shape of the uncured).
#: Chosen so 5-year survival is about 0.88 for leukaemia, 0.96 for retinoblastoma, and
#: 2-year survival under 0.1 for DIPG, as in published registry series.
SURVIVAL = {
    "Leukaemia": (0.86, 18, 1.2), "Lymphoma": (0.91, 12, 1.2), "CNS": (0.76, 20, 1.2),
    "Neuroblastoma": (0.78, 18, 1.2), "Retinoblastoma": (0.96, 24, 1.2),
    "Renal": (0.89, 18, 1.2), "Hepatic": (0.78, 15, 1.2), "Bone": (0.66, 24, 1.2),
    "Soft tissue": (0.68, 20, 1.2), "Germ cell": (0.93, 15, 1.2),
    "Epithelial": (0.88, 20, 1.2), "Other": (0.70, 18, 1.2),
}
SUBTYPE_SURVIVAL = {
    "DIPG": (0.01, 10, 2.0), "ATRT": (0.30, 12, 1.2),
    "Hepatoblastoma": (0.80, 15, 1.2), "PPB": (0.60, 18, 1.2),
}
STAGE_MIX = {"Neuroblastoma": (0.3, 0.2, 0.5)}  # Localised, Regional, Metastatic
DEFAULT_STAGE_MIX = (0.55, 0.25, 0.20)
#: Multiplier on the cured fraction by stage (metastatic disease does worse).
STAGE_CURE = {"Localised": 1.08, "Regional": 1.0, "Metastatic": 0.6, "Not applicable": 1.0}

#: Children aged 0-14 diagnosed with cancer per million per year (about 160 in the UK and US).
INCIDENCE_PER_MILLION = 160.0
AGE_BAND_SHARE = {"<1": 1 / 15, "1-4": 4 / 15, "5-9": 5 / 15, "10-14": 5 / 15}
SEX_SHARE = {"F": 0.488, "M": 0.512}


@dataclass(frozen=True)
class SiteProfile:
    """A synthetic registry: its name, new cases per year and loss to follow-up per year."""

    name: str
    cases_per_year: int
    loss_to_follow_up: float = 0.0

    @property
    def population(self) -> float:
        """Children aged 0-14 the registry covers, implied by its case load."""
        return self.cases_per_year / (INCIDENCE_PER_MILLION * 1e-6)


#: England's registry (NDRS, about 1,650 cases a year) and a larger US registry (NCI).
DEMO_PROFILES = (SiteProfile("NDRS", 1650), SiteProfile("NCI", 4000, loss_to_follow_up=0.01))
N_YEARS = S.LAST_YEAR - S.FIRST_YEAR + 1


def site_names(n_sites: int) -> tuple[str, ...]:
    """Names of the demo sites: NDRS and NCI first, then SITE3, SITE4, ..."""
    if n_sites < 1:
        raise ValueError(f"n_sites must be at least 1, got {n_sites}")
    names = [p.name for p in DEMO_PROFILES] + [f"SITE{i}" for i in range(3, n_sites + 1)]
    return tuple(names[:n_sites])


def profiles(n_sites: int = 2, rows_per_site: int | None = None) -> tuple[SiteProfile, ...]:
    """Profiles of ``n_sites`` demo sites; ``rows_per_site`` fixes every site's size."""
    out = []
    for i, name in enumerate(site_names(n_sites)):
        base = DEMO_PROFILES[i] if i < len(DEMO_PROFILES) else DEMO_PROFILES[0]
        per_year = base.cases_per_year if rows_per_site is None else rows_per_site / N_YEARS
        out.append(SiteProfile(name, max(1, round(per_year)), base.loss_to_follow_up))
    return tuple(out)


def _normalised(weights: Sequence[float] | np.ndarray) -> np.ndarray:
    w = np.asarray(weights, dtype=float)
    return w / w.sum()


def registry(profile: SiteProfile, seed: int, n_rows: int | None = None) -> pd.DataFrame:
    """Patient-level rows of one synthetic registry, reproducible from ``seed`` and the name.

    Columns and values follow :mod:`pets_widgets.core.schema` exactly; categoricals use the
    schema's category order.
    """
    n = profile.cases_per_year * N_YEARS if n_rows is None else n_rows
    name_key = int.from_bytes(profile.name.encode(), "little") % (2**32)
    rng = np.random.default_rng([seed, name_key])

    groups = np.array(S.TUMOUR_GROUP.categories)
    g_idx = rng.choice(len(groups), size=n, p=_normalised([GROUP_SHARE[g] for g in groups]))
    age = np.empty(n, dtype=np.int64)
    for gi, g in enumerate(groups):
        sel = g_idx == gi
        age[sel] = rng.choice(S.MAX_AGE + 1, size=int(sel.sum()), p=_normalised(AGE_WEIGHTS[g]))
    group = groups[g_idx]

    years = np.arange(S.FIRST_YEAR, S.LAST_YEAR + 1)
    year = rng.choice(years, size=n, p=_normalised(1 + 0.01 * (years - S.FIRST_YEAR)))
    month = rng.integers(0, 12, size=n)
    sex = np.where(rng.random(n) < SEX_SHARE["M"] + 0.03, "M", "F")

    subtype = np.full(n, "Other", dtype=object)
    u = rng.random(n)
    subtype[group == "Retinoblastoma"] = "Retinoblastoma"
    subtype[(group == "Hepatic") & (u < np.where(age < 5, 0.95, 0.30))] = "Hepatoblastoma"
    cns = group == "CNS"
    subtype[cns & (u < np.where(age < 3, 0.15, 0.01))] = "ATRT"
    dipg_p = np.where((age >= 4) & (age <= 10), 0.12, 0.04)
    subtype[cns & (subtype == "Other") & (rng.random(n) < dipg_p)] = "DIPG"
    subtype[(group == "Other") & (u < np.where(age < 6, 0.30, 0.05))] = "PPB"

    stage = np.full(n, "Not applicable", dtype=object)
    staged = np.isin(group, S.STAGED_GROUPS)
    v = rng.random(n)
    for g in S.STAGED_GROUPS:
        loc, reg, _ = STAGE_MIX.get(g, DEFAULT_STAGE_MIX)
        sel = staged & (group == g)
        stage[sel] = np.where(v[sel] < loc, "Localised",
                              np.where(v[sel] < loc + reg, "Regional", "Metastatic"))

    params = np.array([SURVIVAL[g] for g in groups])[g_idx]
    for st, p in SUBTYPE_SURVIVAL.items():
        params[subtype == st] = p
    stage_cure = np.ones(n)
    for st, factor in STAGE_CURE.items():
        stage_cure[stage == st] = factor
    cure = np.clip(params[:, 0] * stage_cure, 0.0, 0.99)
    median, shape = params[:, 1], params[:, 2]
    scale = median / np.log(2) ** (1 / shape)
    death = np.where(rng.random(n) < cure, np.inf, scale * rng.weibull(shape))
    admin = (S.FOLLOW_UP_END_YEAR - year) * 12 + (12 - month) - rng.random(n)
    lost = (rng.exponential(12 / profile.loss_to_follow_up, size=n)
            if profile.loss_to_follow_up > 0 else np.full(n, np.inf))
    censor = np.minimum(admin, lost)
    died = death <= censor
    follow_up = np.floor(np.minimum(death, censor)).astype(np.int64)

    rows = pd.DataFrame({
        "site": profile.name,
        "sex": sex,
        "age_at_diagnosis": age,
        "age_band": np.array([S.age_band_of(a) for a in range(S.MAX_AGE + 1)])[age],
        "diagnosis_year": year.astype(np.int64),
        "diagnosis_period": np.array([S.period_of(int(y)) for y in years])[year - S.FIRST_YEAR],
        "tumour_group": group,
        "subtype": subtype.astype(str),
        "stage": stage.astype(str),
        "follow_up_months": np.clip(follow_up, 0, S.MAX_FOLLOW_UP_MONTHS),
        "died": died,
    })
    return as_schema_dtypes(rows)


def as_schema_dtypes(rows: pd.DataFrame) -> pd.DataFrame:
    """Registry rows with categorical columns as pandas Categoricals in schema order."""
    out = rows.copy()
    for var in S.VARIABLES:
        if var.kind is S.Kind.CATEGORICAL:
            out[var.name] = pd.Categorical(out[var.name], categories=var.categories)
    return out


def population(profile: SiteProfile) -> pd.DataFrame:
    """Person-years at risk per year, sex and age band for the children a registry covers.

    Public denominators, not patient rows: released rates use them unnoised.
    """
    records = []
    for year in range(S.FIRST_YEAR, S.LAST_YEAR + 1):
        growth = 1 + 0.003 * (year - S.FIRST_YEAR)
        for sex, s_share in SEX_SHARE.items():
            for band, a_share in AGE_BAND_SHARE.items():
                person_years = round(profile.population * growth * s_share * a_share)
                records.append((profile.name, year, sex, band, person_years))
    return pd.DataFrame(
        records, columns=["site", "diagnosis_year", "sex", "age_band", "person_years"]
    )
