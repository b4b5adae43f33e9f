"""Figures of releases (matplotlib): built from released numbers only, returned, never shown.

Every function returns a :class:`matplotlib.figure.Figure` made without ``pyplot``, so no
global figure state is touched and nothing pops up; the figure displays itself in Jupyter
(``_repr_png_``) whatever the backend. Hidden values are never drawn: a hidden bar is an
empty slot marked ``<k``, a hidden stratum of a survival release is listed in a note under
the plot, and the number-at-risk table shows released numbers only (``<k`` below k).

Example
-------
>>> fig = pw.plots.plot(release)        # any release: picks the figure for its kind
>>> fig.savefig("km.png")
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import blended_transform_factory

from pets_widgets.core import schema as S
from pets_widgets.core.errors import QueryValidationError
from pets_widgets.core.release import TOTAL, Release

#: ``gid`` of artists tests and the dashboard look for.
AT_RISK_GID = "pw-at-risk"
AT_RISK_LABEL_GID = "pw-at-risk-label"
NOTE_GID = "pw-suppressed-note"
HIDDEN_GID = "pw-hidden-mark"


#: The gid of the watermark on the explorer's simulated figures.
SIMULATED_GID = "pw-simulated"


class ReleaseFigure(Figure):
    """A matplotlib Figure that renders itself as PNG in Jupyter without pyplot."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()


def _caption(release: Release) -> str:
    card = release.card
    if card.noise_scale == 0:
        return "Exact totals (test only)"
    return (f"Noisy release: epsilon {card.epsilon:g}, {card.mechanism.split(' (')[0]}; "
            f"values below k={card.k} hidden")


def _lower(label: str) -> str:
    return label[:1].lower() + label[1:]


def _title(release: Release) -> str:
    """A readable title: what was counted, by what, for whom."""
    spec = release.spec
    schema = S.default_schema()
    what = {"survival": "Kaplan-Meier survival", "incidence": "Incidence per million",
            "count": "Patients", "crosstab": "Patients", "histogram": "Patients",
            "mean": f"Mean {getattr(spec, 'variable', '')}"}.get(spec.kind, spec.kind)
    by = [*getattr(spec, "by", ())] or [v for v in (getattr(spec, "rows", ""),
                                                    getattr(spec, "cols", "")) if v]
    if spec.kind == "histogram":
        by = [getattr(spec, "variable", "")]
    title = what + (" by " + " and ".join(_lower(schema[b].label) if b in schema else b
                                          for b in by) if by else "")
    if spec.where:
        title += "\n" + "; ".join(f"{_lower(schema[n].label) if n in schema else n}: "
                                  + ", ".join(str(v) for v in values)
                                  for n, values in spec.where.items())
    return title


def _footer(fig: Figure, release: Release, extra: str, notes: Sequence[str] = ()) -> None:
    """The caption (noise, k) bottom right and any note (hidden strata) bottom left."""
    fig.text(0.99, 0.005, _caption(release) + extra, ha="right", va="bottom", fontsize=7,
             color="0.4")
    if notes:
        fig.text(0.01, 0.035, "\n".join(notes), ha="left", va="bottom", fontsize=8,
                 color="0.25", gid=NOTE_GID)


def _hidden_names(release: Release) -> list[str]:
    return list(release.extras.get("suppressed_strata", ()))


# --------------------------------------------------------------------------- survival


def _ticks(grid: np.ndarray, interval: int, horizon: int) -> np.ndarray:
    """Tick times on the grid: yearly when the grid allows it, else about six steps."""
    if 12 % interval == 0 and horizon >= 24:
        step = 12
    else:
        step = interval * max(1, math.ceil(horizon / 6 / interval))
    return grid[(grid % step) == 0]


def at_risk_rows(release: Release, ticks: Sequence[float] | np.ndarray) -> pd.DataFrame:
    """The number-at-risk table under a survival plot: drawn strata x tick times, as text.

    Released numbers only: a number at risk below k was not released and shows as ``<k``.
    """
    curves = release.curves
    assert curves is not None
    k = release.card.k
    drawn = [s for s in curves["survival"].columns if curves["survival"][s].notna().any()]
    at_risk = curves["at_risk"].loc[list(ticks), drawn]
    text = at_risk.apply(lambda col: col.map(lambda v: f"<{k}" if pd.isna(v) else f"{v:.0f}"))
    return text.T


def plot_survival(release: Release, *, bands: bool = True, at_risk: bool = True,
                  ticks: Sequence[float] | None = None) -> Figure:
    """Kaplan-Meier curves of a survival release, with bands and a number-at-risk table.

    Curves are step functions of the released values; a curve stops where the release stops
    it (too few at risk). Strata hidden by the release are listed in a note, never drawn.
    The at-risk table under the axis follows lifelines' ``add_at_risk_counts`` (numbers
    followed at each tick), with released numbers only.
    """
    curves = release.curves
    if curves is None:
        raise QueryValidationError("release", "has no survival curves", ["survival"])
    spec = release.spec
    grid = curves.index.to_numpy(dtype=float)
    surv = curves["survival"]
    drawn = [s for s in surv.columns if surv[s].notna().any()]
    tick_times = (np.asarray(ticks, dtype=float) if ticks is not None else
                  _ticks(grid, getattr(spec, "interval_months", 1),
                         getattr(spec, "horizon_months", int(grid[-1]))))
    n_rows = len(drawn) if at_risk else 0
    height = 4.4 + 0.2 * n_rows + 0.9
    fig = ReleaseFigure(figsize=(8.0, height))
    grid_spec = fig.add_gridspec(2, 1, height_ratios=[4.4, 0.2 * n_rows + 0.35], left=0.2,
                                 right=0.97, top=1 - 0.55 / height, bottom=0.6 / height,
                                 hspace=0.3)
    ax = fig.add_subplot(grid_spec[0])
    palette = colormaps["tab10" if len(drawn) <= 10 else "tab20"]
    for i, stratum in enumerate(drawn):
        (line,) = ax.step(grid, surv[stratum].to_numpy(), where="post", label=str(stratum),
                          color=palette(i % palette.N))
        if bands:
            ax.fill_between(grid, curves["lower"][stratum].to_numpy(dtype=float),
                            curves["upper"][stratum].to_numpy(dtype=float), step="post",
                            alpha=0.18, color=line.get_color(), linewidth=0)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(0, 1.02)
    ax.set_xticks(tick_times)
    ax.set_ylabel("Survival probability")
    ax.set_xlabel("Months since diagnosis")
    ax.set_title(_title(release), fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8, loc="lower left", ncol=2 if len(drawn) > 6 else 1)
    if at_risk and drawn:
        _at_risk_table(fig.add_subplot(grid_spec[1], sharex=ax), release, tick_times)
    hidden = _hidden_names(release)
    smallest = release.extras.get("smallest_stratum", release.card.k)
    _footer(fig, release, "; shaded: 95% band (sampling error and noise)",
            [f"Not shown (fewer than {smallest} patients): {', '.join(hidden)}"]
            if hidden else [])
    return fig


def _at_risk_table(ax: Axes, release: Release, ticks: np.ndarray) -> None:
    rows = at_risk_rows(release, ticks)
    ax.set_ylim(-0.5, len(rows) - 0.5)
    ax.invert_yaxis()
    ax.axis("off")
    label_at = blended_transform_factory(ax.transAxes, ax.transData)
    ax.text(-0.07, -1.0, "Number at risk", transform=label_at, ha="right", va="center",
            fontsize=8, fontweight="bold")
    for row, (stratum, values) in enumerate(rows.iterrows()):
        ax.text(-0.07, row, str(stratum), transform=label_at, ha="right", va="center",
                fontsize=8, gid=AT_RISK_LABEL_GID)
        for t, text in zip(ticks, values, strict=True):
            ax.text(t, row, text, ha="center", va="center", fontsize=8, gid=AT_RISK_GID)


# --------------------------------------------------------------------------- bars


def _labels(index: pd.Index) -> list[str]:
    if isinstance(index, pd.MultiIndex):
        return [" / ".join(str(v) for v in key) for key in index]
    return [str(v) for v in index]


def _bars(ax: Axes, labels: list[str], values: pd.Series, lower: pd.Series, upper: pd.Series,
          hidden: pd.Series, k: int, *, offset: float = 0.0, width: float = 0.8,
          label: str | None = None, edges: np.ndarray | None = None) -> None:
    """Vertical bars with interval whiskers; hidden values are a ``<k`` mark, not a bar."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(dtype=float)
    lo = pd.to_numeric(lower, errors="coerce").to_numpy(dtype=float)
    hi = pd.to_numeric(upper, errors="coerce").to_numpy(dtype=float)
    hide = hidden.to_numpy(dtype=bool)
    align: Literal["center", "edge"]
    x: np.ndarray
    widths: np.ndarray
    centres: np.ndarray
    if edges is not None:
        x = edges[:-1].astype(float)
        widths = np.diff(edges).astype(float)
        align = "edge"
        centres = x + widths / 2
    else:
        x = np.arange(len(labels)) + offset
        widths = np.full(len(labels), width)
        align = "center"
        centres = x
    shown = ~hide & ~np.isnan(v)
    ax.bar(x[shown], v[shown], width=widths[shown], align=align, label=label,
           edgecolor="white")
    err = np.vstack([np.clip(v - lo, 0, None), np.clip(hi - v, 0, None)])[:, shown]
    if np.isfinite(err).any():
        ax.errorbar(centres[shown], v[shown], yerr=np.nan_to_num(err), fmt="none",
                    ecolor="0.25", elinewidth=1, capsize=2)
    for xc in centres[hide]:
        ax.text(xc, 0, f"<{k}", ha="center", va="bottom", fontsize=7, color="0.35",
                gid=HIDDEN_GID)


def _finish_bars(fig: Figure, ax: Axes, release: Release, labels: list[str],
                 ylabel: str, *, rotate: bool = True) -> Figure:
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=45 if rotate and len(labels) > 4 else 0,
                       ha="right" if rotate and len(labels) > 4 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(_title(release), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footer(fig, release, "; whiskers: 95% interval")
    return fig


def plot_incidence(release: Release, rate: str = "asr") -> Figure:
    """Bars of incidence per million person-years (``rate`` "asr" or "crude_rate") with
    their 95% intervals (Poisson error and noise); hidden strata marked ``<k``."""
    if rate not in ("asr", "crude_rate"):
        raise QueryValidationError("rate", f"{rate!r} is not a rate", ["asr", "crude_rate"])
    t = release.table
    labels = _labels(t.index)
    fig = ReleaseFigure(figsize=(max(5.0, 0.55 * len(labels) + 2), 4.2))
    ax = fig.add_subplot()
    _bars(ax, labels, t[rate], release.lower[rate], release.upper[rate],
          release.suppressed[rate], release.card.k)
    what = "Age-standardised rate" if rate == "asr" else "Crude rate"
    return _finish_bars(fig, ax, release, labels, f"{what} per million person-years")


def _two_way(release: Release, wide: pd.DataFrame, lower: pd.DataFrame, upper: pd.DataFrame,
             hidden: pd.DataFrame, ylabel: str) -> Figure:
    """Grouped bars of a two-way table without its margins."""
    wide = wide.drop(index=TOTAL, columns=TOTAL, errors="ignore")
    lower, upper = lower.loc[wide.index, wide.columns], upper.loc[wide.index, wide.columns]
    hidden = hidden.loc[wide.index, wide.columns]
    labels = _labels(wide.index)
    n = max(len(wide.columns), 1)
    width = 0.8 / n
    fig = ReleaseFigure(figsize=(min(12.0, max(5.0, 0.3 * len(labels) * n + 2)), 4.4))
    ax = fig.add_subplot()
    for j, col in enumerate(wide.columns):
        _bars(ax, labels, wide[col], lower[col], upper[col], hidden[col], release.card.k,
              offset=(j - (n - 1) / 2) * width, width=width, label=str(col))
    ax.legend(title=str(wide.columns.name or ""), fontsize=7, title_fontsize=8)
    return _finish_bars(fig, ax, release, labels, ylabel)


def plot_counts(release: Release) -> Figure:
    """Bars of a count, crosstab or mean release, with 95% noise intervals; hidden cells are
    marked ``<k``. Two-way tables are grouped bars without their margins."""
    t, k = release.table, release.card.k
    kind = release.spec.kind
    if kind == "crosstab":
        return _two_way(release, t, release.lower, release.upper, release.suppressed, "Patients")
    column = "mean" if kind == "mean" else "count"
    if isinstance(t.index, pd.MultiIndex) and t.index.nlevels == 2:
        def wide(frame: pd.DataFrame) -> pd.DataFrame:
            return frame[column].unstack(level=1)
        return _two_way(release, wide(t), wide(release.lower), wide(release.upper),
                        wide(release.suppressed.astype(bool)), "Patients")
    labels = _labels(t.index)
    fig = ReleaseFigure(figsize=(max(5.0, 0.55 * len(labels) + 2), 4.2))
    ax = fig.add_subplot()
    _bars(ax, labels, t[column], release.lower[column], release.upper[column],
          release.suppressed[column], k)
    ylabel = (f"Mean {getattr(release.spec, 'variable', '')}" if kind == "mean"
              else "Patients")
    return _finish_bars(fig, ax, release, labels, ylabel)


def plot_histogram(release: Release) -> Figure:
    """A histogram release as bars on the schema's bin edges, with 95% noise intervals."""
    t = release.table
    edges = np.asarray(release.extras.get("edges", np.arange(len(t) + 1)), dtype=float)
    fig = ReleaseFigure(figsize=(6.5, 4.2))
    ax = fig.add_subplot()
    _bars(ax, _labels(t.index), t["count"], release.lower["count"], release.upper["count"],
          release.suppressed["count"], release.card.k, edges=edges)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel(str(t.index.name))
    ax.set_ylabel("Patients")
    ax.set_title(_title(release), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    _footer(fig, release, "; whiskers: 95% noise interval")
    return fig


#: The figure for each query kind (the dashboard calls :func:`plot`).
PLOTTERS: dict[str, Callable[[Release], Figure]] = {
    "survival": plot_survival, "incidence": plot_incidence, "count": plot_counts,
    "crosstab": plot_counts, "mean": plot_counts, "histogram": plot_histogram,
}


def plot(release: Release) -> Figure:
    """The standard figure of any release, chosen by its query kind."""
    plotter = PLOTTERS.get(release.spec.kind)
    if plotter is None:
        raise QueryValidationError("release", f"no figure for query kind "
                                   f"{release.spec.kind!r}", sorted(PLOTTERS))
    fig = plotter(release)
    if release.card.mechanism.startswith("SIMULATED"):  # the explorer's, never a release
        fig.text(0.5, 0.55, "SIMULATED", ha="center", va="center", rotation=25,
                 fontsize=54, color="#b22222", alpha=0.18, gid=SIMULATED_GID)
        fig.text(0.01, 0.995, "Simulated on public synthetic data: not a release",
                 ha="left", va="top", fontsize=9, color="#b22222")
    return fig
