"""Privacy budget as a value: epsilon spent and left, exact fractions, and the one rule that
says when a request would overspend it."""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

from pets_widgets.core.errors import BudgetExceeded


@dataclass(frozen=True)
class Budget:
    """Epsilon spent (or reserved) and left, for one analyst and for the whole federation."""

    analyst: str
    analyst_spent: Fraction
    analyst_left: Fraction
    federation_spent: Fraction
    federation_left: Fraction


def overspend(budget: Budget, epsilon: Fraction, analyst_budget: Fraction,
              federation_budget: Fraction) -> BudgetExceeded | None:
    """The refusal for spending ``epsilon`` out of ``budget``, or None when it fits.

    The analyst's own budget is checked first, then the federation's; the message names the
    rule and the totals (public policy numbers), never anything about the data.
    """
    if epsilon > budget.analyst_left:
        return BudgetExceeded("analyst_budget", (
            f"epsilon {float(epsilon):g} would take analyst {budget.analyst!r} past the "
            f"policy's budget of {float(analyst_budget):g} per analyst "
            f"({float(budget.analyst_left):g} left)"))
    if epsilon > budget.federation_left:
        return BudgetExceeded("federation_budget", (
            f"epsilon {float(epsilon):g} would take the federation past its total budget of "
            f"{float(federation_budget):g} ({float(budget.federation_left):g} left)"))
    return None
