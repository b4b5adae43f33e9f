"""The release policy: the rules the enclave enforces whatever a caller or a widget asks for.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Policy:
    """The release rules the enclave enforces, whatever a caller or a widget asks for.

    ``k``: noisy cells below it are hidden (and the smallest ``k`` a query may ask for).
    ``max_epsilon``: the most epsilon one release may spend. ``analyst_budget`` and
    ``federation_budget``: total epsilon one analyst, and all analysts together, may spend.
    ``min_subset``: a filtered query whose pooled noisy subset is smaller is refused
    (DataSHIELD's nfilter.subset). ``protection``: the narrowest feasible range an attacker
    may derive for any hidden cell from the released table and its margins.
    ``min_epsilon``: the least epsilon one release may spend (below it the noise is too wide
    to mean anything, and its scale too large to compute with). ``max_cells`` and
    ``max_strata``: the most cells one query may have, and strata one survival query: limits
    on the work one query can ask of every site, refused before any site is asked.
    """

    k: int = 5
    max_epsilon: float = 1.0
    analyst_budget: float = 10.0
    federation_budget: float = 50.0
    min_subset: int = 10
    protection: int = 5
    mechanism: str = "discrete_laplace"
    min_epsilon: float = 0.01
    max_cells: int = 20_000
    max_strata: int = 60

    def __post_init__(self) -> None:
        checks = {
            "k": self.k >= 1, "max_epsilon": 0 < self.max_epsilon <= 10,
            "analyst_budget": self.analyst_budget > 0,
            "federation_budget": self.federation_budget >= self.analyst_budget,
            "min_subset": self.min_subset >= 0, "protection": self.protection >= 0,
            "mechanism": self.mechanism == "discrete_laplace",
            "min_epsilon": 0 < self.min_epsilon <= self.max_epsilon,
            "max_cells": self.max_cells >= 1, "max_strata": self.max_strata >= 1,
        }
        for name, ok in checks.items():
            value = getattr(self, name)
            if (isinstance(value, float) and not math.isfinite(value)) or not ok:
                raise ValueError(f"Policy.{name}={value!r} is not allowed")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @property
    def hash(self) -> str:
        """SHA-256 of the canonical policy: part of the enclave's attested measurement."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def describe(self) -> str:
        """The policy in words a research governance board can read."""
        return (
            f"Each release may spend from epsilon {self.min_epsilon:g} to "
            f"{self.max_epsilon:g}, over at most {self.max_cells:,} cells (a survival query "
            f"at most {self.max_strata} strata). Every released "
            f"number carries exact discrete Laplace noise; any cell whose noisy value is below "
            f"{self.k} is hidden, and further cells are hidden where needed so a hidden cell "
            f"cannot be worked out from totals to within {self.protection}. Queries whose "
            f"filter selects fewer than {self.min_subset} patients (noisy count) are refused. "
            f"Each analyst may spend epsilon {self.analyst_budget:g} in total and all analysts "
            f"together {self.federation_budget:g}; asking the same question again returns the "
            f"stored answer and spends nothing."
        )
