"""What epsilon and k would do to a query, simulated on public synthetic data: no budget spent.

The epsilon explorer never touches a registry. It builds *public* synthetic registries
shaped like the federation's sites (same names, same rounded sizes, a published seed,
:data:`PUBLIC_SEED`), computes the query's exact cells on them with the sites' own code,
and then does what the enclave would do at the chosen epsilon and k: discrete Laplace noise
at scale sensitivity / epsilon, the same table builders (margins, suppression, means,
curves). Because nothing private is involved, the simulation may use an ordinary random
generator, and it spends no budget.

What it reports, per noise block: the scale, standard deviation and 95% interval of the
noise; the expected number of cells the k rule would hide (exactly, from the discrete
Laplace distribution); one simulated release with its hidden cells; and, by Monte Carlo,
the 95% error of every released value (for survival, of the Kaplan-Meier curve).

Example
-------
>>> import pets_widgets as pw
>>> from pets_widgets import explore
>>> fed = pw.demo_federation()
>>> ref = explore.PublicReference.for_federation(fed)
>>> sim = explore.simulate(ref, pw.Crosstab(rows="subtype", cols="age_band"), epsilon=0.5, k=5)
>>> sim.blocks[0].interval95
6
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.policy import Policy
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.enclave.pipeline import release as pipeline
from pets_widgets.enclave.pipeline.builders import PUBLIC_INPUTS
from pets_widgets.enclave.pipeline.noise import noise_interval, noise_sd
from pets_widgets.enclave.pipeline.tables import NoisyBlocks, Tables
from pets_widgets.site import synthetic
from pets_widgets.site.site import Site

#: Seed of the public synthetic registries (published; no registry's data uses it).
PUBLIC_SEED = 20_241_125

#: What the explorer tells its reader it simulates.
SOURCE = ("Simulated on public synthetic registries shaped like this federation's sites "
          f"(same names and rounded sizes, published seed {PUBLIC_SEED}); no registry's data "
          "is used and no privacy budget is spent. Numbers are illustrations, not results.")

#: The card's mechanism line for a simulation (so it can never pass for a release).
SIMULATED = "SIMULATED discrete Laplace on public synthetic data (not a release)"

#: Slider range of the explorer (a log scale).
EPSILON_RANGE = (0.05, 10.0)

#: Kinds whose released values are noisy cells themselves: their 95% error is the noise
#: interval, known exactly, so no Monte Carlo is needed.
CELL_KINDS = frozenset({"count", "crosstab", "histogram"})

#: Kinds whose released cells are hidden one by one when their noisy count is below k (for
#: survival and rates, whole strata and curve ends are hidden instead).
CELL_HIDING_KINDS = CELL_KINDS | {"mean"}


# --------------------------------------------------------------------------- discrete Laplace


def _q(scale: float) -> float:
    return math.exp(-1.0 / scale)


def pmf(x: np.ndarray, scale: float) -> np.ndarray:
    """P(X = x) for discrete Laplace noise of this scale: (1-q)/(1+q) q^|x|."""
    q = _q(scale)
    return (1 - q) / (1 + q) * q ** np.abs(np.asarray(x, dtype=float))


def cdf(x: np.ndarray, scale: float) -> np.ndarray:
    """P(X <= x): q^-x/(1+q) below zero, 1 - q^(x+1)/(1+q) from zero up."""
    q = _q(scale)
    x = np.floor(np.asarray(x, dtype=float))
    with np.errstate(over="ignore", divide="ignore"):
        below = q ** (-x) / (1 + q)
        above = 1 - q ** (x + 1) / (1 + q)
    return np.where(x < 0, below, above)


def probability_hidden(true_values: np.ndarray, k: int, scale: float) -> np.ndarray:
    """Probability that each cell's noisy value falls below ``k`` (the primary rule)."""
    return cdf(k - 1 - np.asarray(true_values, dtype=float), scale)


def sample_noise(size: int, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Discrete Laplace draws as a difference of two geometric variables (simulation only:
    the enclave uses OpenDP's exact sampler and the operating system's secure randomness)."""
    p = 1 - _q(scale)
    return (rng.geometric(p, size) - rng.geometric(p, size)).astype(np.int64)


# --------------------------------------------------------------------------- public data


class PublicReference:
    """Public synthetic registries shaped like a federation: the explorer's only data.

    ``sizes`` gives each site's number of patients (a federation publishes them rounded to
    100 in :meth:`Federation.status`); ``public_inputs`` holds public tables some builders
    need (population denominators for rates).
    """

    def __init__(self, schema: S.Schema, sizes: Mapping[str, int], seed: int = PUBLIC_SEED,
                 public_inputs: Mapping[str, Any] | None = None):
        self.schema = schema
        self.sizes = {s: max(100, int(sizes.get(s, 0) or _default_size(s)))
                      for s in schema.sites}
        self.seed = seed
        self.public_inputs = dict(public_inputs or {})
        self._sites: list[Site] | None = None

    @classmethod
    def for_federation(cls, fed: Any, seed: int = PUBLIC_SEED) -> PublicReference:
        """Shape a reference like ``fed``: its sites, their rounded sizes, its public tables."""
        sizes: dict[str, int] = {}
        try:
            status = fed.status()
            if "rows" in status:
                sizes = {str(s): int(r) for s, r in status["rows"].items()
                         if r is not None and not pd.isna(r)}
        except Exception:  # status is best effort: an offline site still has a default size
            sizes = {}
        public: dict[str, Any] = {}
        for kind_inputs in PUBLIC_INPUTS.values():
            for name in kind_inputs:
                value = _public_input(fed, name)
                if value is not None:
                    public[name] = value
        return cls(fed.schema, sizes, seed, public)

    def _site_objects(self) -> list[Site]:
        if self._sites is None:
            sites = []
            for name in self.schema.sites:
                n = self.sizes[name]
                profile = synthetic.SiteProfile(name, max(1, round(n / synthetic.N_YEARS)))
                rows = synthetic.registry(profile, self.seed, n)
                sites.append(Site(name, rows, self.schema))
            self._sites = sites
        return self._sites

    def cells(self, spec: QuerySpec) -> dict[str, np.ndarray]:
        """Exact totals of every block of ``spec`` over the public registries.

        Computed by the sites' own aggregation code (so every query kind a site can answer
        works here), on public data only: this is not a door to any registry.
        """
        spec = spec.validate(self.schema)
        layout = spec.layout(self.schema)
        total: np.ndarray = sum((site._aggregate(spec) for site in self._site_objects()),
                                np.zeros(layout.size, dtype=np.int64))
        out, slices = {}, layout.slices()
        for block in layout.blocks:
            out[block.name] = np.asarray(total[slices[block.name]], dtype=np.int64)
        return out


def _default_size(site: str) -> int:
    for profile in synthetic.DEMO_PROFILES:
        if profile.name == site:
            return profile.cases_per_year * synthetic.N_YEARS
    return synthetic.DEMO_PROFILES[0].cases_per_year * synthetic.N_YEARS


def _public_input(fed: Any, name: str) -> Any:
    value = getattr(getattr(fed, "enclave", None), name, None)
    if value is None and name == "population":
        frame = fed.population()
        value = None if frame.empty else frame
    return value


# --------------------------------------------------------------------------- simulation


@dataclass(frozen=True)
class NoiseBlock:
    """The noise one block of cells would get at the chosen epsilon."""

    name: str
    epsilon: float
    sensitivity: int
    scale: float
    sd: float
    interval95: int
    cells: int
    expected_hidden: float | None  # count blocks only


@dataclass(frozen=True)
class Simulation:
    """What epsilon and k would do to one query, on public synthetic data."""

    spec: QuerySpec
    epsilon: float
    k: int
    blocks: tuple[NoiseBlock, ...]
    release: Release
    draws: int
    error95: pd.DataFrame | None = None
    curve_error95: float | None = None
    notes: tuple[str, ...] = ()
    source: str = SOURCE
    seconds: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)

    def column_errors(self) -> dict[str, float]:
        """The 95% error of each released column, at its worst row (Monte Carlo)."""
        if self.error95 is None or self.draws == 0:
            return {}
        worst = self.error95.max(skipna=True)
        return {str(c): float(v) for c, v in worst.items() if not math.isnan(float(v))}

    @property
    def hidden_in_draw(self) -> int:
        """Table cells hidden in the simulated release (primary and secondary)."""
        return int(np.asarray(self.release.suppressed, dtype=bool).sum())

    @property
    def table_cells(self) -> int:
        return int(np.asarray(self.release.suppressed).size)

    @property
    def expected_hidden(self) -> float:
        """Expected number of aggregate cells whose noisy count falls below k."""
        return float(sum(b.expected_hidden or 0.0 for b in self.blocks))

    @property
    def count_cells(self) -> int:
        return sum(b.cells for b in self.blocks if b.expected_hidden is not None)

    def summary(self) -> str:
        """The simulation in a few plain sentences."""
        lines = [f"At epsilon {self.epsilon:g} and k={self.k}:"]
        for b in self.blocks:
            lines.append(
                f"{b.name}: noise scale {b.scale:.3g} (sensitivity {b.sensitivity} / epsilon "
                f"{b.epsilon:g}), standard deviation {b.sd:.3g}; 95% of the noise is within "
                f"±{b.interval95}.")
        if self.count_cells:
            lines.append(
                f"On average {self.expected_hidden:.1f} of {self.count_cells} cells would "
                f"have a noisy count below {self.k} and be hidden; in the simulated release "
                f"{self.hidden_in_draw} of {self.table_cells} table cells are hidden "
                "(including cells hidden to protect others from the totals).")
        else:
            lines.append(f"In the simulated release {self.hidden_in_draw} of "
                         f"{self.table_cells} table values are hidden.")
        errors = self.column_errors()
        if errors:
            lines.append(f"95% error over {self.draws} simulated releases (worst row): "
                         + ", ".join(f"{c} ±{v:.3g}" for c, v in errors.items()) + ".")
        if self.curve_error95 is not None:
            lines.append(
                f"Kaplan-Meier curve error: in 95% of {self.draws} simulated releases the "
                f"curve stays within ±{self.curve_error95:.3f} (worst time point) of the "
                "noiseless curve.")
        lines.extend(self.notes)
        return "\n".join(lines)


def _builder_kwargs(kind: str, ref: PublicReference) -> dict[str, Any]:
    names = PUBLIC_INPUTS.get(kind, ())
    return {n: ref.public_inputs[n] for n in names if n in ref.public_inputs}


def _numeric(frame: pd.DataFrame) -> np.ndarray:
    return frame.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def simulate(ref: PublicReference, spec: QuerySpec, epsilon: float, k: int,
             policy: Policy | None = None, draws: int | None = None, time_budget: float = 0.4,
             rng: np.random.Generator | None = None) -> Simulation:
    """Simulate releasing ``spec`` at ``epsilon`` and ``k`` on the public reference.

    For estimates (means, survival, rates) ``draws`` Monte Carlo releases (200 by default;
    at least 20, then as many as fit in ``time_budget`` seconds) give the 95% error of each
    released value; for plain counts the error is the noise interval and ``draws`` defaults
    to 0. ``rng`` fixes the simulation's random draws (tests).
    """
    if draws is None:
        draws = 0 if spec.kind in CELL_KINDS else 200
    t0 = time.monotonic()
    policy = policy or Policy()
    rng = rng if rng is not None else np.random.default_rng()
    eps = Fraction(str(float(epsilon)))
    if eps <= 0:
        raise ValueError(f"epsilon must be above 0, got {epsilon!r}")
    k = int(k)
    schema = ref.schema
    layout = spec.layout(schema)
    exact = ref.cells(spec)
    # The enclave's own pipeline: the same scales, structural zeros, tables and card.
    base = pipeline.noise_params(layout, eps, {}, spec.where, schema)
    impossible = base.structural
    scales, intervals = base.scales, base.intervals
    blocks = tuple(
        NoiseBlock(b.name, float(eps * b.budget_share), b.sensitivity, scales[b.name],
                   noise_sd(scales[b.name]), intervals[b.name], b.size,
                   float(probability_hidden(exact[b.name], k,
                                            scales[b.name])[~impossible[b.name]].sum())
                   if b.summand is None and spec.kind in CELL_HIDING_KINDS else None)
        for b in layout.blocks)
    extra = _builder_kwargs(spec.kind, ref)

    def draw() -> NoisyBlocks:
        noise = {b: sample_noise(exact[b].size, scales[b], rng) for b in exact}
        return pipeline.add_noise(base, exact, noise)

    def build(noisy: NoisyBlocks, suppress: bool) -> Tables:
        return pipeline.build_tables(spec, schema, layout, noisy, k, policy, extra,
                                     suppress=suppress)

    shown_noisy = draw()
    shown = build(shown_noisy, suppress=True)
    truth = build(replace(pipeline.exact_blocks(exact), structural=impossible), suppress=False)
    truth_values = _numeric(truth.table)
    errors, curves, n = [], [], 0
    truth_curve = _survival_curves(truth)
    while n < draws and (n < 20 or time.monotonic() - t0 < time_budget):
        tables = build(draw(), suppress=False)
        errors.append(np.abs(_numeric(tables.table) - truth_values))
        curve = _survival_curves(tables)
        if truth_curve is not None and curve is not None:
            curves.append(np.nanmax(np.abs(curve - truth_curve), axis=0))
        n += 1
    error95 = None
    if errors:
        with np.errstate(all="ignore"):
            q = np.nanpercentile(np.stack(errors), 95, axis=0)
        error95 = pd.DataFrame(q, index=truth.table.index, columns=truth.table.columns)
    curve_error = None
    if curves:
        curve_error = float(np.nanmax(np.nanpercentile(np.stack(curves), 95, axis=0)))

    notes = []
    if float(eps) > policy.max_epsilon:
        notes.append(f"Epsilon {float(eps):g} is above the policy maximum of "
                     f"{policy.max_epsilon:g} per release: the enclave would refuse it.")
    if k < policy.k:
        notes.append(f"k={k} is below the policy minimum of {policy.k}: the enclave would "
                     "refuse it.")
    card = pipeline.parameter_card(spec, layout, eps, k, shown_noisy, shown, policy,
                                   mechanism=SIMULATED, sites=schema.sites, notes=(SOURCE,))
    sim_release = Release(spec, shown.table, shown.suppressed, card, shown.lower, shown.upper,
                          shown.extras)
    return Simulation(spec, float(eps), k, blocks, sim_release, n, error95, curve_error,
                      tuple(notes), SOURCE, time.monotonic() - t0)


def _survival_curves(tables: Tables) -> np.ndarray | None:
    """The survival columns of a survival release's curves (time x stratum), if any."""
    curves = tables.extras.get("curves")
    if not isinstance(curves, pd.DataFrame) or curves.empty:
        return None
    try:
        cols = [c for c in curves.columns
                if (c[0] if isinstance(c, tuple) else c) == "survival"]
    except (TypeError, IndexError):
        return None
    if not cols:
        return None
    return _numeric(curves[cols])


# --------------------------------------------------------------------------- figure


def noise_figure(blocks: Sequence[NoiseBlock], epsilon: float | None = None,
                 smallest_epsilon: float = EPSILON_RANGE[0]) -> Any:
    """The noise distribution of each block: probability of each noise value, the 95%
    interval in colour. A matplotlib Figure (no pyplot state); drawn as filled steps, one
    artist per block, so redrawing while a slider moves stays fast.

    With the query's ``epsilon``, each block's horizontal axis is fixed at the width its
    noise has at ``smallest_epsilon`` (the slider's smallest), so moving epsilon visibly
    narrows or widens the noise instead of rescaling the axis to look the same."""
    stretch = max(1.0, epsilon / smallest_epsilon) if epsilon else 1.0
    from matplotlib.figure import Figure

    n = max(1, len(blocks))
    height = 2.0 * n
    fig = Figure(figsize=(5.6, height))
    fig.subplots_adjust(left=0.13, right=0.97, top=1 - 0.3 / height, bottom=0.5 / height,
                        hspace=0.75)
    axes = fig.subplots(n, 1, squeeze=False)[:, 0]
    for ax, b in zip(axes, blocks, strict=True):
        widest = noise_interval(b.scale * stretch)  # the scale at the smallest epsilon
        reach = max(3, int(2 * max(b.interval95, widest)))
        x = np.arange(-reach, reach + 1)
        p = pmf(x, b.scale)
        edges = np.append(x - 0.5, reach + 0.5)
        ax.stairs(p, edges, fill=True, color="#c8c8c8")
        inside = np.where(np.abs(x) <= b.interval95, p, 0.0)
        ax.stairs(inside, edges, fill=True, color="#3b73b9",
                  label=f"95% within ±{b.interval95}")
        ax.set_xlim(edges[0], edges[-1])
        ax.set_title(f"Noise added to each {b.name} cell (epsilon {b.epsilon:g}, "
                     f"scale {b.scale:.3g})", fontsize=9)
        ax.set_xlabel("noise added", fontsize=8)
        ax.set_ylabel("probability", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(loc="upper right", fontsize=7, frameon=False)
    return fig
