"""Disclosure control on noisy tables: primary suppression (noisy value below k) and
complementary suppression checked by linear programming (HiGHS).

Every decision here is taken on released noisy values: post-processing, no privacy cost.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Sequence

import highspy
import numpy as np

from pets_widgets.core.errors import InternalError


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
