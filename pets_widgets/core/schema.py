"""The harmonised registry variables: the one source of truth for validation, data and dropdowns.

Every category list, numeric bound, clipping range and histogram bin edge used anywhere in
pets_widgets comes from here and is fixed in advance, never inferred from data: a layout that
depended on the data would itself disclose the data.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

SCHEMA_VERSION = "1"

FIRST_YEAR = 2000
LAST_YEAR = 2022
#: Follow-up of every registry ends here (administrative censoring at the end of 2023).
FOLLOW_UP_END_YEAR = 2023
MAX_FOLLOW_UP_MONTHS = (FOLLOW_UP_END_YEAR - FIRST_YEAR + 1) * 12  # 288
MAX_AGE = 14


class Kind(StrEnum):
    """How a variable is stored and which query roles it may play."""

    CATEGORICAL = "categorical"
    INTEGER = "integer"
    BOOLEAN = "boolean"


@dataclass(frozen=True)
class Variable:
    """One harmonised registry column.

    Categorical and boolean variables list their ``categories`` (in display order) and may
    be grouped by. Integer variables have inclusive ``bounds``, the ``clip`` range used for
    sums and means, and histogram ``bins``: edges of half-open bins ``[lo, hi)``, the last
    edge one above the upper bound so every allowed value falls in exactly one bin.
    """

    name: str
    label: str
    kind: Kind
    categories: tuple[str, ...] = ()
    category_labels: Mapping[str, str] = field(default_factory=dict)
    bounds: tuple[int, int] | None = None
    clip: tuple[int, int] | None = None
    bins: tuple[int, ...] = ()
    unit: str = ""
    description: str = ""

    @property
    def is_categorical(self) -> bool:
        """Categorical or boolean: has a finite, fixed list of values to group by."""
        return self.kind is not Kind.INTEGER

    @property
    def values(self) -> tuple[object, ...]:
        """The allowed values as stored in data: strings, or ``(False, True)`` for booleans."""
        if self.kind is Kind.BOOLEAN:
            return (False, True)
        return self.categories

    def label_of(self, value: object) -> str:
        """The human label of one category (the value itself when it has none)."""
        if self.kind is Kind.BOOLEAN:
            return "yes" if value else "no"
        return self.category_labels.get(str(value), str(value))

    def bin_labels(self) -> tuple[str, ...]:
        """Readable labels of the histogram bins, e.g. ``"0-11"`` for integer edges 0 and 12."""
        edges = self.bins
        return tuple(
            str(lo) if lo == hi - 1 else f"{lo}-{hi - 1}"
            for lo, hi in itertools.pairwise(edges)
        )


def _ages_in(band: str) -> range:
    lo, _, hi = band.partition("-")
    return range(0, 1) if band == "<1" else range(int(lo), int(hi) + 1)


SEX = Variable(
    "sex", "Sex", Kind.CATEGORICAL, ("F", "M"), {"F": "Female", "M": "Male"},
    description="Sex recorded at registration.",
)
AGE = Variable(
    "age_at_diagnosis", "Age at diagnosis", Kind.INTEGER,
    bounds=(0, MAX_AGE), clip=(0, MAX_AGE), bins=tuple(range(0, MAX_AGE + 2)), unit="years",
    description="Completed years of age at diagnosis (children 0-14).",
)
AGE_BANDS = ("<1", "1-4", "5-9", "10-14")
AGE_BAND = Variable(
    "age_band", "Age band", Kind.CATEGORICAL, AGE_BANDS,
    {b: ("under 1 year" if b == "<1" else f"{b} years") for b in AGE_BANDS},
    description="Age at diagnosis in the standard childhood cancer bands.",
)
YEAR = Variable(
    "diagnosis_year", "Year of diagnosis", Kind.INTEGER,
    bounds=(FIRST_YEAR, LAST_YEAR), clip=(FIRST_YEAR, LAST_YEAR),
    bins=(2000, 2005, 2010, 2015, 2020, LAST_YEAR + 1), unit="year",
    description="Calendar year of diagnosis.",
)
PERIODS = ("2000-2004", "2005-2009", "2010-2014", "2015-2019", "2020-2022")
PERIOD = Variable(
    "diagnosis_period", "Period of diagnosis", Kind.CATEGORICAL, PERIODS,
    description="Five-year period of diagnosis (the last one is three years).",
)

#: ICCC-3 main diagnostic groups: value used in data -> readable label.
TUMOUR_GROUPS: Mapping[str, str] = MappingProxyType({
    "Leukaemia": "I Leukaemias, myeloproliferative and myelodysplastic diseases",
    "Lymphoma": "II Lymphomas and reticuloendothelial neoplasms",
    "CNS": "III CNS and miscellaneous intracranial and intraspinal neoplasms",
    "Neuroblastoma": "IV Neuroblastoma and other peripheral nervous cell tumours",
    "Retinoblastoma": "V Retinoblastoma",
    "Renal": "VI Renal tumours",
    "Hepatic": "VII Hepatic tumours",
    "Bone": "VIII Malignant bone tumours",
    "Soft tissue": "IX Soft tissue and other extraosseous sarcomas",
    "Germ cell": "X Germ cell tumours, trophoblastic tumours and neoplasms of gonads",
    "Epithelial": "XI Other malignant epithelial neoplasms and malignant melanomas",
    "Other": "XII Other and unspecified malignant neoplasms",
})
TUMOUR_GROUP = Variable(
    "tumour_group", "Tumour group (ICCC-3)", Kind.CATEGORICAL,
    tuple(TUMOUR_GROUPS), TUMOUR_GROUPS,
    description="International Classification of Childhood Cancer, third edition, main group.",
)

#: Ultra-rare subtypes studied across registries, with the ICCC-3 group each belongs to.
SUBTYPES: Mapping[str, tuple[str, str]] = MappingProxyType({
    "Retinoblastoma": ("Retinoblastoma", "Retinoblastoma"),
    "Hepatoblastoma": ("Hepatoblastoma", "Hepatic"),
    "ATRT": ("Atypical teratoid/rhabdoid tumour", "CNS"),
    "DIPG": ("Diffuse intrinsic pontine glioma", "CNS"),
    "PPB": ("Pleuropulmonary blastoma", "Other"),
    "Other": ("Any other diagnosis", ""),
})
SUBTYPE = Variable(
    "subtype", "Rare subtype", Kind.CATEGORICAL,
    tuple(SUBTYPES), {k: v[0] for k, v in SUBTYPES.items()},
    description="Ultra-rare diagnoses followed individually; everything else is 'Other'.",
)

STAGES = ("Localised", "Regional", "Metastatic", "Not applicable")
#: Tumour groups staged at diagnosis (Toronto staging); the others are "Not applicable".
STAGED_GROUPS = ("Neuroblastoma", "Retinoblastoma", "Renal", "Hepatic", "Bone",
                 "Soft tissue", "Germ cell")
STAGE = Variable(
    "stage", "Stage at diagnosis", Kind.CATEGORICAL, STAGES,
    description="Toronto stage, collapsed; 'Not applicable' for leukaemias, lymphomas, CNS "
                "and others.",
)
FOLLOW_UP = Variable(
    "follow_up_months", "Follow-up", Kind.INTEGER,
    bounds=(0, MAX_FOLLOW_UP_MONTHS), clip=(0, MAX_FOLLOW_UP_MONTHS),
    bins=(*range(0, MAX_FOLLOW_UP_MONTHS, 24), MAX_FOLLOW_UP_MONTHS + 1), unit="months",
    description="Completed months from diagnosis to death or end of follow-up.",
)
DIED = Variable(
    "died", "Died", Kind.BOOLEAN,
    description="True when follow-up ended with death, False when it was censored.",
)

#: The registry columns every site holds, in order (``site`` is added by the schema).
VARIABLES: tuple[Variable, ...] = (
    SEX, AGE, AGE_BAND, YEAR, PERIOD, TUMOUR_GROUP, SUBTYPE, STAGE, FOLLOW_UP, DIED,
)


def age_band_of(age: int) -> str:
    """The age band of an age in completed years."""
    for band in AGE_BANDS:
        if age in _ages_in(band):
            return band
    raise ValueError(f"age_at_diagnosis: {age} is outside 0-{MAX_AGE}")


def period_of(year: int) -> str:
    """The diagnosis period of a calendar year."""
    for period in PERIODS:
        lo, hi = (int(x) for x in period.split("-"))
        if lo <= year <= hi:
            return period
    raise ValueError(f"diagnosis_year: {year} is outside {FIRST_YEAR}-{LAST_YEAR}")


def stage_applies(tumour_group: str) -> bool:
    """Whether records of this ICCC-3 group carry a stage (else 'Not applicable')."""
    return tumour_group in STAGED_GROUPS


#: Groups that consist of one listed subtype only (ICCC-3 group V is retinoblastoma).
SINGLE_SUBTYPE_GROUPS = ("Retinoblastoma",)


def subtype_allowed(subtype: str, tumour_group: str) -> bool:
    """Whether a rare subtype can occur in a tumour group: a listed subtype only in its own
    group; 'Other' in every group except those made of one listed subtype."""
    owner = SUBTYPES[subtype][1]
    if not owner:
        return tumour_group not in SINGLE_SUBTYPE_GROUPS
    return owner == tumour_group


#: Groups of linked variables and every combination a valid record can hold. A cell whose
#: coordinates (with the query's filter) allow none of them is a structural zero: impossible
#: by the schema's rules, public knowledge, never a disclosure.
LINKED: tuple[tuple[tuple[str, ...], frozenset[tuple[object, ...]]], ...] = (
    (("tumour_group", "subtype", "stage"), frozenset(
        (g, st, sg) for g in TUMOUR_GROUPS for st in SUBTYPES if subtype_allowed(st, g)
        for sg in (STAGES[:3] if stage_applies(g) else STAGES[3:]))),
    (("age_at_diagnosis", "age_band"), frozenset(
        (a, age_band_of(a)) for a in range(MAX_AGE + 1))),
    (("diagnosis_year", "diagnosis_period"), frozenset(
        (y, period_of(y)) for y in range(FIRST_YEAR, LAST_YEAR + 1))),
)


@dataclass(frozen=True)
class Schema:
    """The variables of one federation, including ``site`` whose categories are its site names."""

    sites: tuple[str, ...]
    variables: Mapping[str, Variable] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.sites:
            raise ValueError("a federation needs at least one site")
        if len(set(self.sites)) != len(self.sites):
            raise ValueError(f"site names must be unique, got {self.sites}")
        site = Variable("site", "Site", Kind.CATEGORICAL, tuple(self.sites),
                        description="The registry that holds the record.")
        object.__setattr__(
            self, "variables", MappingProxyType({v.name: v for v in (site, *VARIABLES)})
        )

    def __getitem__(self, name: str) -> Variable:
        return self.variables[name]

    @property
    def digest(self) -> str:
        """SHA-256 of the data dictionary (every variable but ``site``, and the linked rules):
        what every party must enforce alike. The site names are not part of it."""
        return dictionary_digest()

    def __contains__(self, name: object) -> bool:
        return name in self.variables

    @property
    def names(self) -> tuple[str, ...]:
        """All variable names, ``site`` first."""
        return tuple(self.variables)

    def names_of_kind(self, *kinds: Kind) -> tuple[str, ...]:
        """Variable names of the given kinds, in schema order."""
        return tuple(n for n, v in self.variables.items() if v.kind in kinds)

    @property
    def groupable(self) -> tuple[str, ...]:
        """Variables a query may group by, cross-tabulate or stratify on (finite categories)."""
        return self.names_of_kind(Kind.CATEGORICAL, Kind.BOOLEAN)

    @property
    def numeric(self) -> tuple[str, ...]:
        """Variables with bounds: for means, histograms and range filters."""
        return self.names_of_kind(Kind.INTEGER)

    @property
    def summable(self) -> tuple[str, ...]:
        """Variables a mean may be taken of: bounded integers and booleans (a proportion)."""
        return self.names_of_kind(Kind.INTEGER, Kind.BOOLEAN)

    def columns(self) -> tuple[str, ...]:
        """Column order of a registry table."""
        return self.names


def default_schema(sites: Sequence[str] = ("NDRS", "NCI")) -> Schema:
    """The schema of the default two-registry demo (or of the sites given)."""
    return Schema(tuple(sites))


@functools.cache
def dictionary_digest() -> str:
    """SHA-256 (``sha256:`` hex) over the harmonised variables and the linked rules, in a
    canonical JSON form: bins, clip bounds and rules decide what is released, so they are
    part of what an enclave attests and a site checks."""
    variables = [{"name": v.name, "label": v.label, "kind": str(v.kind),
                  "categories": list(v.categories),
                  "category_labels": dict(sorted(v.category_labels.items())),
                  "bounds": list(v.bounds) if v.bounds else None,
                  "clip": list(v.clip) if v.clip else None, "bins": list(v.bins),
                  "unit": v.unit} for v in VARIABLES]
    linked = [[list(names), sorted([str(x) for x in combo] for combo in combos)]
              for names, combos in LINKED]
    text = json.dumps({"version": SCHEMA_VERSION, "variables": variables, "linked": linked},
                      sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()
