"""Standard populations for age-standardised incidence rates of childhood cancer (data only).

An age-standardised rate weights the age-specific rates of a population by a fixed, published
age structure, so rates from registries with different age structures (or periods) can be
compared. Only the 0-14 part of each standard is used, in the schema's age bands; when a
query covers fewer bands, the weights of the bands it covers are renormalised to sum to one
(the usual "truncated" rate, e.g. 0-4 years).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType

from pets_widgets.core import schema as S


@dataclass(frozen=True)
class StandardPopulation:
    """A named standard population: persons in each childhood age band (``weights``)."""

    name: str
    label: str
    weights: Mapping[str, int]
    source: str

    def fractions(self, bands: Sequence[str] = S.AGE_BANDS) -> dict[str, Fraction]:
        """Exact weights of ``bands``, renormalised to sum to one over those bands."""
        total = sum(self.weights[b] for b in bands)
        return {b: Fraction(self.weights[b], total) for b in bands}

    def describe(self, bands: Sequence[str] = S.AGE_BANDS) -> str:
        """The standard in words, with its 0-14 weights (for the parameter card)."""
        parts = "; ".join(f"{b}: {self.weights[b]:,}" for b in bands)
        total = sum(self.weights[b] for b in bands)
        return f"{self.label} ({self.source}); weights {parts} (of {total:,})"


SEGI_1960 = StandardPopulation(
    "segi_1960", "Segi (1960) world standard population",
    MappingProxyType({"<1": 2_400, "1-4": 9_600, "5-9": 10_000, "10-14": 9_000}),
    "Segi 1960, 0-4 split 1:4 by Doll, Payne and Waterhouse 1966; the standard of the "
    "International Incidence of Childhood Cancer (IICC) and ACCIS",
)
ESP_2013 = StandardPopulation(
    "esp_2013", "European Standard Population 2013",
    MappingProxyType({"<1": 1_000, "1-4": 4_000, "5-9": 5_500, "10-14": 5_500}),
    "Eurostat 2013 revision of the European Standard Population",
)
US_2000 = StandardPopulation(
    "us_2000", "US 2000 standard population",
    MappingProxyType({"<1": 13_818, "1-4": 55_317, "5-9": 72_533, "10-14": 73_032}),
    "US Census P25-1130, per million, as used by SEER",
)

#: Standard populations by name; the first is the default.
STANDARDS: Mapping[str, StandardPopulation] = MappingProxyType(
    {s.name: s for s in (SEGI_1960, ESP_2013, US_2000)})
DEFAULT_STANDARD = SEGI_1960.name


def standard(name: str) -> StandardPopulation:
    """The standard population called ``name`` (a key of :data:`STANDARDS`)."""
    return STANDARDS[name]
