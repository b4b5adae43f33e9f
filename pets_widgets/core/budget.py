"""Privacy budget as a value: epsilon spent and left, exact fractions.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Budget:
    """Epsilon spent (or reserved) and left, for one analyst and for the whole federation."""

    analyst: str
    analyst_spent: Fraction
    analyst_left: Fraction
    federation_spent: Fraction
    federation_left: Fraction
