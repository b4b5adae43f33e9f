"""Release tables built from noisy totals by post-processing only.

Everything here happens after the noise: clamping at zero, margins as sums of noisy cells,
primary and secondary suppression decided on noisy values, means as noisy sum over noisy
count, 95% noise intervals. None of it touches exact totals, so none of it costs privacy.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.query import Block, Count, Crosstab, Histogram, Layout, Mean
from pets_widgets.core.release import ALL, TOTAL
from pets_widgets.enclave.pipeline.noise import noise_interval, noise_sd
from pets_widgets.enclave.pipeline.suppression import primary_suppression, secondary_suppression


@dataclass(frozen=True)
class NoisyBlocks:
    """Noisy (or, through the test door only, exact) totals of a query, by block name."""

    values: Mapping[str, np.ndarray]
    scales: Mapping[str, float]
    intervals: Mapping[str, int]
    #: Per block, the cells impossible by the schema's rules (published as exact zeros).
    structural: Mapping[str, np.ndarray] = field(default_factory=dict)

    def impossible(self, block: str) -> np.ndarray:
        """The structural-zero mask of a block (all False when none is known)."""
        mask = self.structural.get(block)
        return (np.zeros(len(self.values[block]), dtype=bool) if mask is None
                else np.asarray(mask, dtype=bool))


@dataclass(frozen=True)
class Tables:
    """What a builder returns: released values, the hidden mask, and 95% noise intervals."""

    table: pd.DataFrame
    suppressed: pd.DataFrame
    lower: pd.DataFrame
    upper: pd.DataFrame
    margins: str = ""
    postprocessing: str = ""
    extras: dict[str, Any] = field(default_factory=dict)
    #: Extra lines for the parameter card (e.g. the standard population of a rate).
    notes: tuple[str, ...] = ()
    #: The kind's own suppression rule for the card, when it is not the cell rule.
    suppression: str = ""
    #: Each cell's status ("shown", "primary", "complementary", "structural"); None: every
    #: hidden cell is a primary one (kinds without complementary suppression).
    status: pd.DataFrame | None = None


def _index(dims: tuple[str, ...], schema: S.Schema) -> pd.Index:
    if not dims:
        return pd.Index([ALL], name="")
    if len(dims) == 1:
        return pd.Index(list(schema[dims[0]].values), name=dims[0])
    return pd.MultiIndex.from_product([list(schema[d].values) for d in dims], names=list(dims))


def _interval(values: np.ndarray, half: float) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(values - half, 0), values + half


def _margin_half_width(n_cells: int, scale: float, exact_half: int) -> float:
    """95% half-width of a sum of ``n_cells`` independent noises (normal approximation)."""
    if n_cells <= 1:
        return float(exact_half)
    return 1.959964 * noise_sd(scale) * math.sqrt(n_cells)


def _with_margins(cells: np.ndarray) -> np.ndarray:
    """A 2-D table with row totals as the last column and column totals as the last row."""
    out = np.zeros((cells.shape[0] + 1, cells.shape[1] + 1), dtype=np.int64)
    out[:-1, :-1] = cells
    out[:-1, -1] = cells.sum(axis=1)
    out[-1, :-1] = cells.sum(axis=0)
    out[-1, -1] = cells.sum()
    return out


def _clamp_bias(scale: float) -> float:
    """E[max(X, 0)] for discrete Laplace noise X: how much clamping a true zero at zero adds
    on average (q / (1 - q^2), q = exp(-1/scale))."""
    if scale <= 0:
        return 0.0
    q = math.exp(-1.0 / scale)
    return q / (1 - q * q)


def _margin_bounds(table: np.ndarray, scale: float,
                   half: int) -> tuple[np.ndarray, np.ndarray]:
    """95% noise intervals of a table with margins. A margin sums clamped noisy cells: its
    noise is wider (normal approximation) and biased upwards by clamping, by at most the
    clamping bias of each of its cells, so its lower bound is lowered by that much."""
    r, c = table.shape[0] - 1, table.shape[1] - 1
    below = np.full(table.shape, float(half))
    above = np.full(table.shape, float(half))
    bias = _clamp_bias(scale)
    for index, n_cells in (((slice(None, -1), -1), c), ((-1, slice(None, -1)), r),
                           ((-1, -1), r * c)):
        width = _margin_half_width(n_cells, scale, half)
        above[index] = width
        below[index] = width + n_cells * bias
    values = table.astype(float)
    return np.maximum(values - below, 0), values + above


MARGINS_DERIVED = ("row, column and grand totals are sums of the released noisy cells "
                   "(post-processing, no extra budget); their intervals use a normal "
                   "approximation, lowered by the bias of clamping cells at zero")


CLAMPED = "noisy counts below zero set to zero"


STRUCTURAL = ("; cells impossible by the schema's rules (e.g. a stage for leukaemia, DIPG "
              "outside CNS tumours) shown as exact zeros, never hidden")


def _structural_2d(impossible: np.ndarray) -> np.ndarray:
    """Structural zeros of a table with margins: a total is one when its whole line is."""
    out = np.zeros((impossible.shape[0] + 1, impossible.shape[1] + 1), dtype=bool)
    out[:-1, :-1] = impossible
    out[:-1, -1] = impossible.all(axis=1)
    out[-1, :-1] = impossible.all(axis=0)
    out[-1, -1] = impossible.all()
    return out


def _protected_2d(cells: np.ndarray, k: int, protection: int, suppress: bool,
                  impossible: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The table with margins, its hidden cells, its structural zeros and its primary
    (below k) hidden cells; the others hidden are complementary. Structural zeros are
    published (they are public knowledge), so they are never hidden, and they enter the
    attacker's linear programme as the known zeros they are."""
    table = _with_margins(cells)
    structural = _structural_2d(impossible)
    if not suppress:
        nothing = np.zeros(table.shape, dtype=bool)
        return table, nothing, structural, nothing
    primary = primary_suppression(table, k) & ~structural
    hidden = secondary_suppression(table, primary, protection, published=structural)
    return table, hidden, structural, primary


Builder = Callable[..., Tables]


def build_count(spec: Count, schema: S.Schema, layout: Layout, noisy: NoisyBlocks, k: int,
                protection: int, suppress: bool) -> Tables:
    block = layout.blocks[0]
    cells = np.maximum(noisy.values["count"], 0)
    half = noisy.intervals["count"]
    if len(spec.by) == 2:
        return _count_two_way(spec, schema, block, cells, noisy, k, protection, suppress)
    index = _index(spec.by, schema)
    table = pd.DataFrame({"count": pd.array(cells, dtype="Int64")}, index=index)
    impossible = noisy.impossible("count")
    hidden = (primary_suppression(cells, k) & ~impossible if suppress
              else np.zeros(len(cells), bool))
    lo, hi = _interval(cells, half)
    return _finish(table, hidden, lo, hi, margins="none released",
                   postprocessing=CLAMPED + STRUCTURAL, exact=impossible)


def _count_two_way(spec: Count, schema: S.Schema, block: Block, cells: np.ndarray,
                   noisy: NoisyBlocks, k: int, protection: int, suppress: bool) -> Tables:
    a, b = spec.by
    grid = cells.reshape(block.shape)
    table2, hidden2, exact, primary = _protected_2d(
        grid, k, protection, suppress, noisy.impossible("count").reshape(block.shape))
    lo, hi = _margin_bounds(table2, noisy.scales["count"], noisy.intervals["count"])
    rows = [*schema[a].values, TOTAL]
    cols = [*schema[b].values, TOTAL]
    index = pd.MultiIndex.from_product([rows, cols], names=[a, b])
    flat = table2.ravel()
    table = pd.DataFrame({"count": pd.array(flat, dtype="Int64")}, index=index)
    return _finish(table, hidden2.ravel(), lo.ravel(), hi.ravel(), margins=MARGINS_DERIVED,
                   postprocessing=CLAMPED + STRUCTURAL + "; complementary suppression so "
                   "hidden cells cannot be recovered from the totals", exact=exact.ravel(),
                   primary=primary.ravel())


def build_crosstab(spec: Crosstab, schema: S.Schema, layout: Layout, noisy: NoisyBlocks, k: int,
                   protection: int, suppress: bool) -> Tables:
    block = layout.blocks[0]
    grid = np.maximum(noisy.values["count"], 0).reshape(block.shape)
    # Suppression is decided in the canonical (layout) orientation, then the table is
    # transposed for display: asking with rows and columns swapped shows the same hidden cells.
    table2, hidden2, exact, primary = _protected_2d(
        grid, k, protection, suppress, noisy.impossible("count").reshape(block.shape))
    lo, hi = _margin_bounds(table2, noisy.scales["count"], noisy.intervals["count"])
    if block.dims[0].name != spec.rows:
        table2, hidden2, lo, hi, exact, primary = (table2.T, hidden2.T, lo.T, hi.T, exact.T,
                                                   primary.T)
    index = pd.Index([*schema[spec.rows].values, TOTAL], name=spec.rows)
    columns = pd.Index([*schema[spec.cols].values, TOTAL], name=spec.cols)
    table = pd.DataFrame(table2, index=index, columns=columns).astype("Int64")
    return _finish(table, hidden2, lo, hi, margins=MARGINS_DERIVED,
                   postprocessing=CLAMPED + STRUCTURAL + "; complementary suppression so "
                   "hidden cells cannot be recovered from the totals", exact=exact,
                   primary=primary)


def build_histogram(spec: Histogram, schema: S.Schema, layout: Layout, noisy: NoisyBlocks,
                    k: int, protection: int, suppress: bool) -> Tables:
    dim = layout.blocks[0].dims[0]
    cells = np.maximum(noisy.values["count"], 0)
    index = pd.Index(list(dim.levels), name=f"{spec.variable} ({schema[spec.variable].unit})")
    table = pd.DataFrame({"count": pd.array(cells, dtype="Int64")}, index=index)
    impossible = noisy.impossible("count")
    hidden = (primary_suppression(cells, k) & ~impossible if suppress
              else np.zeros(len(cells), bool))
    lo, hi = _interval(cells, noisy.intervals["count"])
    return _finish(table, hidden, lo, hi, margins="none released",
                   postprocessing=CLAMPED + STRUCTURAL, extras={"edges": dim.edges},
                   exact=impossible)


def build_mean(spec: Mean, schema: S.Schema, layout: Layout, noisy: NoisyBlocks, k: int,
               protection: int, suppress: bool) -> Tables:
    lo_clip, hi_clip = spec.clip(schema)
    count = noisy.values["count"].astype(float)
    total = noisy.values["sum"].astype(float)
    positive = count > 0
    mean = np.where(positive, lo_clip + total / np.where(positive, count, 1), np.nan)
    mean = np.clip(mean, lo_clip, hi_clip)
    index = _index(spec.by, schema)
    table = pd.DataFrame({"mean": mean, "n": pd.array(np.maximum(count, 0).astype(np.int64),
                                                       dtype="Int64")}, index=index)
    hidden = (primary_suppression(count, k) | ~positive if suppress
              else np.zeros(len(count), bool))
    # Joint 95% noise interval: 97.5% for the sum and for the count (Bonferroni).
    a_c = noise_interval(noisy.scales["count"], 0.975)
    a_s = noise_interval(noisy.scales["sum"], 0.975)
    with np.errstate(divide="ignore", invalid="ignore"):
        m_lo = lo_clip + (total - a_s) / (count + a_c)
        m_hi = np.where(count - a_c > 0, lo_clip + (total + a_s) / (count - a_c), hi_clip)
    m_lo = np.clip(np.nan_to_num(m_lo, nan=lo_clip), lo_clip, hi_clip)
    m_hi = np.clip(np.nan_to_num(m_hi, nan=hi_clip), lo_clip, hi_clip)
    n_lo, n_hi = _interval(np.maximum(count, 0), noisy.intervals["count"])
    lower = pd.DataFrame({"mean": m_lo, "n": n_lo}, index=index)
    upper = pd.DataFrame({"mean": m_hi, "n": n_hi}, index=index)
    mask = pd.DataFrame({"mean": hidden, "n": hidden}, index=index)
    table = table.mask(mask)
    return Tables(table, mask, lower.mask(mask), upper.mask(mask), margins="none released",
                  postprocessing=("mean = clip_low + noisy clipped sum / noisy count, kept "
                                  f"within [{lo_clip}, {hi_clip}]; hidden when the noisy count "
                                  f"is below {k}; interval is the joint 95% noise interval"))


def cell_status(hidden: np.ndarray, primary: np.ndarray | None = None,
                structural: np.ndarray | None = None) -> np.ndarray:
    """Each cell's status: ``primary`` (hidden: its noisy value is below k),
    ``complementary`` (hidden to protect another hidden cell), ``structural`` (a zero the
    dictionary's rules make certain, shown as 0) or ``shown``. Without ``primary`` every
    hidden cell is a primary one."""
    hidden = np.asarray(hidden, dtype=bool)
    primary = hidden if primary is None else np.asarray(primary, dtype=bool).reshape(hidden.shape)
    status = np.full(hidden.shape, "shown", dtype=object)
    if structural is not None:
        status[np.asarray(structural, dtype=bool).reshape(hidden.shape) & ~hidden] = \
            "structural"
    status[hidden & primary] = "primary"
    status[hidden & ~primary] = "complementary"
    return status


def _finish(table: pd.DataFrame, hidden: np.ndarray, lo: np.ndarray, hi: np.ndarray, *,
            margins: str, postprocessing: str, extras: dict[str, Any] | None = None,
            exact: np.ndarray | None = None, primary: np.ndarray | None = None) -> Tables:
    hidden = np.asarray(hidden, dtype=bool).reshape(table.shape)
    if exact is not None and np.asarray(exact).any():  # structural zeros carry no noise
        known = np.asarray(exact, dtype=bool).reshape(table.shape)
        lo = np.where(known, 0.0, np.asarray(lo, float).reshape(table.shape))
        hi = np.where(known, 0.0, np.asarray(hi, float).reshape(table.shape))
    mask = pd.DataFrame(hidden, index=table.index, columns=table.columns)
    lower, upper = (pd.DataFrame(np.where(hidden, np.nan, np.asarray(bound, float)
                                          .reshape(table.shape)),
                                 index=table.index, columns=table.columns) for bound in (lo, hi))
    status = pd.DataFrame(cell_status(hidden, primary, None if exact is None else
                                      np.asarray(exact, dtype=bool).reshape(table.shape)),
                          index=table.index, columns=table.columns)
    return Tables(table.mask(mask), mask, lower, upper, margins, postprocessing, extras or {},
                  status=status)


#: The builders of this module by query kind (survival and incidence have their own modules;
#: :mod:`pets_widgets.enclave.pipeline.builders` holds the one table of every kind).
TABLE_BUILDERS: dict[str, Builder] = {
    "count": build_count, "crosstab": build_crosstab,
    "histogram": build_histogram, "mean": build_mean,
}
