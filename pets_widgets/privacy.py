"""Differential privacy and disclosure control: the policy, the noise, suppression, the card.

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

import hashlib
import json
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from functools import lru_cache
from typing import Protocol

import highspy
import numpy as np

from pets_widgets.errors import InternalError

# --------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Policy:
    """The release rules the enclave enforces, whatever a caller or a widget asks for.

    ``k``: noisy cells below it are hidden (and the smallest ``k`` a query may ask for).
    ``max_epsilon``: the most epsilon one release may spend. ``analyst_budget`` and
    ``federation_budget``: total epsilon one analyst, and all analysts together, may spend.
    ``min_subset``: a filtered query whose pooled noisy subset is smaller is refused
    (DataSHIELD's nfilter.subset). ``protection``: the narrowest feasible range an attacker
    may derive for any hidden cell from the released table and its margins.
    """

    k: int = 5
    max_epsilon: float = 1.0
    analyst_budget: float = 10.0
    federation_budget: float = 50.0
    min_subset: int = 10
    protection: int = 5
    mechanism: str = "discrete_laplace"

    def __post_init__(self) -> None:
        checks = {
            "k": self.k >= 1, "max_epsilon": 0 < self.max_epsilon <= 10,
            "analyst_budget": self.analyst_budget > 0,
            "federation_budget": self.federation_budget >= self.analyst_budget,
            "min_subset": self.min_subset >= 0, "protection": self.protection >= 0,
            "mechanism": self.mechanism == "discrete_laplace",
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
            f"Each release may spend at most epsilon {self.max_epsilon:g}. Every released "
            f"number carries exact discrete Laplace noise; any cell whose noisy value is below "
            f"{self.k} is hidden, and further cells are hidden where needed so a hidden cell "
            f"cannot be worked out from totals to within {self.protection}. Queries whose "
            f"filter selects fewer than {self.min_subset} patients (noisy count) are refused. "
            f"Each analyst may spend epsilon {self.analyst_budget:g} in total and all analysts "
            f"together {self.federation_budget:g}; asking the same question again returns the "
            f"stored answer and spends nothing."
        )


# --------------------------------------------------------------------------- noise


class NoiseMechanism(Protocol):
    """Adds noise of a given scale to integer cells. ``name`` is published on the card."""

    name: str

    def sample(self, values: Sequence[int], scale: Fraction) -> list[int]: ...


@lru_cache(maxsize=64)
def _opendp_measurement(scale: float):  # type: ignore[no-untyped-def]
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


# --------------------------------------------------------------------------- suppression


def primary_suppression(noisy: np.ndarray, k: int) -> np.ndarray:
    """Hide every cell whose *noisy* value is below ``k`` (deciding on noisy values keeps the
    decision itself differentially private)."""
    return np.asarray(noisy) < k


def _line_constraints(shape: tuple[int, int]) -> list[list[tuple[int, int, int]]]:
    """Additivity of a table with margins in its last row and column: each line's interior
    cells sum to the line's total. Returns lists of (row, col, coefficient)."""
    n_rows, n_cols = shape
    lines = []
    for i in range(n_rows):
        lines.append([(i, j, 1) for j in range(n_cols - 1)] + [(i, n_cols - 1, -1)])
    for j in range(n_cols):
        lines.append([(i, j, 1) for i in range(n_rows - 1)] + [(n_rows - 1, j, -1)])
    return lines


_BANNER_SHOWN = threading.Lock()
_banner_done = False


def _new_lp() -> highspy.Highs:
    """A silent HiGHS model. HiGHS prints a banner to the process's stdout (file descriptor
    1, which Jupyter kernels forward to the notebook) the first time one is created; the
    first creation happens with that descriptor pointed at /dev/null."""
    global _banner_done
    with _BANNER_SHOWN:
        if not _banner_done:
            sys.stdout.flush()
            saved = os.dup(1)
            try:
                with open(os.devnull, "w") as null:
                    os.dup2(null.fileno(), 1)
                    lp = highspy.Highs()
            finally:
                os.dup2(saved, 1)
                os.close(saved)
            _banner_done = True
        else:
            lp = highspy.Highs()
    lp.setOptionValue("output_flag", False)
    return lp


def feasible_ranges(table: np.ndarray, hidden: np.ndarray,
                    cells: Sequence[tuple[int, int]] | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """What an attacker learns: for each hidden cell of a table with margins (last row and
    column), its smallest and largest value consistent with the published cells, the
    additivity of the table and non-negativity, by linear programming (HiGHS, warm-started:
    one model, only the objective changes between solves).

    Returns ``(lower, upper)`` arrays of the table's shape, NaN where the cell is published
    (or not among ``cells``, when given); ``upper`` is ``inf`` where nothing bounds it.
    """
    table = np.asarray(table, dtype=float)
    hidden = np.asarray(hidden, dtype=bool)
    unknowns = list(zip(*np.nonzero(hidden), strict=True))
    lower = np.full(table.shape, np.nan)
    upper = np.full(table.shape, np.nan)
    if not unknowns:
        return lower, upper
    index = {c: n for n, c in enumerate(unknowns)}
    n_vars = len(unknowns)
    lp = _new_lp()
    lp.addVars(n_vars, np.zeros(n_vars), np.full(n_vars, highspy.kHighsInf))
    for line in _line_constraints(table.shape):
        idx, coefs, rhs = [], [], 0.0
        for i, j, coef in line:
            if (i, j) in index:
                idx.append(index[(i, j)])
                coefs.append(float(coef))
            else:
                rhs -= coef * table[i, j]
        if idx:
            lp.addRow(rhs, rhs, len(idx), np.array(idx, dtype=np.int32), np.array(coefs))
    all_cols = np.arange(n_vars, dtype=np.int32)
    unbounded = (highspy.HighsModelStatus.kUnbounded,
                 highspy.HighsModelStatus.kUnboundedOrInfeasible)
    for cell in unknowns if cells is None else cells:
        cost = np.zeros(n_vars)
        cost[index[cell]] = 1.0
        lp.changeColsCost(n_vars, all_cols, cost)
        found = []
        for sense in (highspy.ObjSense.kMinimize, highspy.ObjSense.kMaximize):
            lp.changeObjectiveSense(sense)
            lp.run()
            status = lp.getModelStatus()
            if status not in unbounded and status != highspy.HighsModelStatus.kOptimal:
                lp.clearSolver()  # a warm start can end undecided; solve from scratch
                lp.run()
                status = lp.getModelStatus()
            if status in unbounded:
                found.append(math.inf)
            elif status == highspy.HighsModelStatus.kOptimal:
                found.append(lp.getInfo().objective_function_value)
            else:
                raise InternalError(f"feasible-range LP failed: {lp.modelStatusToString(status)}")
        lower[cell], upper[cell] = found
    return lower, upper


def secondary_suppression(table: np.ndarray, hidden: np.ndarray, protection: int,
                          published: np.ndarray | None = None) -> np.ndarray:
    """Complementary suppression for a table with margins (last row and column).

    Adds hidden cells until every hidden cell's feasible range (see
    :func:`feasible_ranges`) is at least ``protection`` wide, so no hidden cell can be
    recovered from the published cells and margins by subtraction or linear algebra.
    Heuristic in the spirit of the hypercube method: for each under-protected cell, hide the
    cheapest rectangle of cells (a cycle of the table's additivity) whose shift can move it by
    the protection width, preferring cells already hidden and avoiding margins; every choice
    is then checked exactly by linear programming. Hiding more cells only widens feasible
    ranges, so a protected cell stays protected and the loop ends. Decided on the noisy,
    released values only: post-processing. Cells in ``published`` (structural zeros, known
    to everyone) are never chosen: hiding them would protect nothing.
    """
    table = np.asarray(table, dtype=float)
    hidden = np.array(hidden, dtype=bool)
    penalty = np.ones(table.shape)
    penalty[-1, :] *= 10.0  # hiding a margin loses more than hiding a cell
    penalty[:, -1] *= 10.0
    cost = np.maximum(table, 1.0) * penalty
    fixed = np.zeros(table.shape, bool) if published is None else np.asarray(published, bool)
    protected: set[tuple[int, int]] = set()
    while True:
        todo = [c for c in zip(*np.nonzero(hidden), strict=True) if c not in protected]
        if not todo:
            return hidden
        lower, upper = feasible_ranges(table, hidden, todo)
        weak = [c for c in todo if upper[c] - lower[c] < protection]
        protected.update(c for c in todo if c not in weak)
        if not weak:
            return hidden
        # One rectangle per weak cell in lines no other rectangle touched this round (those
        # may be protected already), then check again: few rounds, little over-hiding.
        touched_rows: set[int] = set()
        touched_cols: set[int] = set()
        added = False
        for i, j in weak:
            if i in touched_rows or j in touched_cols:
                continue
            best = _best_rectangle(table, hidden, cost, (i, j), protection, fixed)
            if best is None:
                continue
            for r, c in best:
                hidden[r, c] = True
                touched_rows.add(r)
                touched_cols.add(c)
            added = True
        if not added:
            # Every rectangle through the weak cells is hidden already, yet they are still
            # too narrow: nothing short of hiding the whole table protects them.
            hidden[~fixed] = True
            return hidden


def _best_rectangle(table: np.ndarray, hidden: np.ndarray, cost: np.ndarray,
                    cell: tuple[int, int], protection: int,
                    fixed: np.ndarray) -> list[tuple[int, int]] | None:
    """The cheapest set of cells to hide with ``cell`` so that one cycle of the table's
    additivity can move it by at least ``protection`` (or the widest such move)."""
    i, j = cell
    n_rows, n_cols = table.shape
    best: tuple[tuple[bool, float, float], list[tuple[int, int]]] | None = None
    for i2 in range(n_rows):
        for j2 in range(n_cols):
            if i2 == i or j2 == j:
                continue
            corners = [(i, j), (i, j2), (i2, j), (i2, j2)]
            if any(fixed[c] for c in corners):
                continue  # a known zero cannot move: no protection through it
            new = [c for c in corners[1:] if not hidden[c]]
            if not new:
                continue
            width = _rectangle_width(table, corners, n_rows, n_cols)
            score = (width < protection, sum(float(cost[c]) for c in new), -width)
            if best is None or score < best[0]:
                best = (score, new)
    return None if best is None else best[1]


def _rectangle_width(table: np.ndarray, corners: list[tuple[int, int]], n_rows: int,
                     n_cols: int) -> float:
    """How far the rectangle's cycle can move its first corner: up by the smallest value of
    the corners that move the other way, down by the smallest of those moving with it."""
    (i, j), (_, j2), (i2, _), _ = corners
    same_row = (i2 == n_rows - 1) or (i == n_rows - 1)  # a total moves with its line
    same_col = (j2 == n_cols - 1) or (j == n_cols - 1)
    s_row = {i: 1, i2: 1 if same_row else -1}
    s_col = {j: 1, j2: 1 if same_col else -1}
    with_it = [table[c] for c in corners if s_row[c[0]] * s_col[c[1]] > 0]
    against = [table[c] for c in corners if s_row[c[0]] * s_col[c[1]] < 0]
    up = min(against) if against else math.inf
    down = min(with_it)
    return up + down


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class NoiseComponent:
    """The noise on one block of cells: its share of epsilon, sensitivity, scale, interval."""

    block: str
    epsilon: float
    sensitivity: int
    noise_scale: float
    noise_interval_95: int


@dataclass(frozen=True)
class ParameterCard:
    """Everything a reviewer needs to read a release: how it was noised, hidden and charged."""

    mechanism: str
    epsilon: float
    epsilon_per_cell: float
    sensitivity: int
    noise_scale: float
    noise_interval_95: int
    k: int
    suppression_rule: str
    spec_hash: str
    sites: tuple[str, ...]
    time: str
    components: tuple[NoiseComponent, ...] = ()
    margins: str = ""
    postprocessing: str = ""
    analyst: str = ""
    budget_spent: float = 0.0
    budget_left: float = math.inf
    federation_budget_left: float = math.inf
    repeated: bool = False
    policy: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["sites"] = list(self.sites)
        out["components"] = [asdict(c) for c in self.components]
        out["notes"] = list(self.notes)
        return out

    def describe(self) -> str:
        """The card in plain words."""
        lines = [
            f"Noise: {self.mechanism}; epsilon {self.epsilon:g} for this release "
            f"({self.epsilon_per_cell:g} per cell).",
        ]
        for c in self.components:
            lines.append(
                f"  {c.block}: sensitivity {c.sensitivity}, noise scale {c.noise_scale:.4g}, "
                f"95% of noise within +/-{c.noise_interval_95}."
            )
        lines.append(f"Suppression: {self.suppression_rule}")
        if self.margins:
            lines.append(f"Margins: {self.margins}")
        if self.postprocessing:
            lines.append(f"Post-processing: {self.postprocessing}")
        lines.append(f"Sites: {', '.join(self.sites)}. Spec hash {self.spec_hash[:12]}...")
        if self.repeated:
            lines.append("This question was asked before: the stored release is returned and "
                         "nothing was spent.")
        if self.analyst:
            lines.append(
                f"Budget: analyst {self.analyst!r} spent {self.budget_spent:g} in total, "
                f"{self.budget_left:g} left; federation {self.federation_budget_left:g} left."
            )
        if self.policy:
            p = self.policy
            lines.append(
                f"Policy (enforced in the enclave): k at least {p.get('k')}, at most epsilon "
                f"{p.get('max_epsilon')} per release, filters must select at least "
                f"{p.get('min_subset')} patients, budget {p.get('analyst_budget')} per analyst "
                f"and {p.get('federation_budget')} for the federation.")
        lines.extend(self.notes)
        return "\n".join(lines)
