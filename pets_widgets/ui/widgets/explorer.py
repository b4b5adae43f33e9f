"""The methodologist's epsilon explorer: move epsilon and k, watch noise, intervals and
hidden cells change, on public synthetic data, spending no budget.

Thin composition over :mod:`pets_widgets.ui.explore` (the simulation) and
:mod:`pets_widgets.ui.render`; slider moves are debounced so a drag runs one update.
"""

from __future__ import annotations

import math
from typing import Any

import ipywidgets as W

from pets_widgets.coordinator.federation import Federation
from pets_widgets.core.errors import PetsError
from pets_widgets.core.query import Crosstab, QuerySpec
from pets_widgets.core.sentences import question
from pets_widgets.ui import explore, render
from pets_widgets.ui.widgets._common import Debouncer, classed, html, log, styles

_WIDE = {"description_width": "110px"}


class EpsilonExplorer(W.VBox):
    """``EpsilonExplorer(fed, spec)``: what epsilon (0.05 to 10, log scale) and k would do
    to ``spec``, simulated on public synthetic registries shaped like ``fed``.

    Shows the noise distribution, the 95% interval of every cell, how many cells would be
    hidden and, for survival, the error of the Kaplan-Meier curve. Spends no budget. Areas:
    ``source``, ``spec_text``, ``summary``, ``table``, ``figure``, ``plot``.
    """

    def __init__(self, fed: Federation, spec: QuerySpec | None = None, wait: float = 0.3):
        self.fed = fed
        self.policy = fed.policy
        self.spec = spec or Crosstab(rows="tumour_group", cols="age_band")
        self.simulation: explore.Simulation | None = None
        self._reference: explore.PublicReference | None = None
        self._stale = True

        lo, hi = explore.EPSILON_RANGE
        # exponents on a 0.02 grid that holds 1 and 10 exactly; values read to 2 digits
        self.epsilon = classed(W.FloatLogSlider(
            value=min(1.0, hi), base=10, min=round(math.log10(lo), 1), max=math.log10(hi),
            step=0.02, description="Epsilon ε", readout_format=".2g", continuous_update=True,
            style=_WIDE, layout=W.Layout(width="520px")), "pw-explorer-epsilon")
        self.k = classed(W.IntSlider(value=self.policy.k, min=1, max=max(20, 4 * self.policy.k),
                                     description="Hide below k", continuous_update=True,
                                     style=_WIDE), "pw-explorer-k")
        self.source = html(render.info_html(explore.SOURCE), "pw-explorer-source")
        self.spec_text = html("", "pw-explorer-spec")
        self.summary = html("", "pw-explorer-summary")
        self.table = html("", "pw-explorer-table")
        self.figure = html("", "pw-explorer-figure")
        self.plot = html("", "pw-explorer-plot")
        self._debounced = Debouncer(self.update, wait)
        super().__init__([styles(), self.source, self.spec_text, self.epsilon, self.k,
                          self.summary, W.HBox([self.table, self.figure]), self.plot])
        classed(self, "pw-root", "pw-explorer")
        self.epsilon.observe(self._on_slider, names="value")
        self.k.observe(self._on_slider, names="value")
        self._show_spec()

    # -- inputs -------------------------------------------------------------------------------
    def _on_slider(self, _change: dict[str, Any]) -> None:
        self._stale = True
        self._debounced()

    def set_spec(self, spec: QuerySpec | None, update: bool = True) -> None:
        """Explore another spec; with ``update=False`` only remember it (see :meth:`refresh`)."""
        if spec is None or spec == self.spec:
            return
        self.spec = spec
        self._stale = True
        self._show_spec()
        if update:
            self._debounced()

    def refresh(self) -> None:
        """Bring the display up to date now (runs a pending or stale update)."""
        if self._debounced.pending or self._stale or self.simulation is None:
            self._debounced.cancel()
            self.update()

    def _show_spec(self) -> None:
        self.spec_text.value = (f'<div class="pw-note">Exploring: <b>'
                                f"{render.esc(question(self.spec))}</b></div>")

    @property
    def reference(self) -> explore.PublicReference:
        """The public synthetic registries (built on first use, about a second)."""
        if self._reference is None:
            self._reference = explore.PublicReference.for_federation(self.fed)
        return self._reference

    @property
    def epsilon_value(self) -> float:
        """The slider's epsilon to two significant digits (as its readout shows it)."""
        return float(f"{float(self.epsilon.value):.2g}")

    # -- output -------------------------------------------------------------------------------
    def update(self) -> None:
        """Simulate the current spec at the sliders' epsilon and k, and redraw."""
        try:
            sim = explore.simulate(self.reference, self.spec, self.epsilon_value,
                                   int(self.k.value), self.policy)
        except (PetsError, ValueError, KeyError) as exc:
            self.summary.value = render.error_html(exc)
            return
        except Exception as exc:  # keep the page alive; the log has the traceback
            log.exception("explorer update failed")
            self.summary.value = render.error_html(exc)
            return
        self.simulation = sim
        self._stale = False
        # build every piece first, then show them together (the figure is the slow part)
        summary = _summary_html(sim)
        table = ('<div class="pw-note"><b>One simulated release</b> (public synthetic data, '
                 "with 95% noise intervals):</div>"
                 + render.release_html(sim.release, self.fed.schema, intervals=True))
        figure = render.figure_html(explore.noise_figure(sim.blocks, sim.epsilon),
                                    alt=f"noise distribution at epsilon {sim.epsilon:g}",
                                    css_class="pw-plot pw-noise-plot", tight=False)
        plot = render.plot_html(sim.release) if sim.spec.kind == "survival" else ""
        self.summary.value, self.table.value = summary, table
        self.figure.value, self.plot.value = figure, plot


def _summary_html(sim: explore.Simulation) -> str:
    items = []
    for b in sim.blocks:
        items.append(
            f"<li><b>{render.esc(b.name)}</b>: noise scale {b.scale:.3g} (sensitivity "
            f"{b.sensitivity} / ε {b.epsilon:g}), standard deviation {b.sd:.3g}; "
            f'<span class="pw-interval">95% of the noise within ±{b.interval95}</span>.</li>')
    if sim.count_cells:
        items.append(
            f'<li><span class="pw-hidden-count">On average {sim.expected_hidden:.1f} of '
            f"{sim.count_cells} cells</span> would have a noisy count below k={sim.k} and be "
            f"hidden; in the simulated release below, {sim.hidden_in_draw} of "
            f"{sim.table_cells} table cells are hidden (including cells hidden to protect "
            "others from the totals).</li>")
    else:
        items.append(f"<li>In the simulated release below, {sim.hidden_in_draw} of "
                     f"{sim.table_cells} values are hidden.</li>")
    errors = sim.column_errors()
    if sim.curve_error95 is not None:
        marks = ", ".join(f"±{v:.2g} at {c}" for c, v in errors.items() if c != "patients")
        items.append(
            f'<li><span class="pw-curve-error">Kaplan-Meier curve error</span>: in 95% of '
            f"{sim.draws} simulated releases the survival estimate stays within {marks} "
            f"(worst stratum), and within ±{sim.curve_error95:.2g} at the worst point of "
            "the curve.</li>")
    elif errors:
        items.append(f"<li>95% error of the released values over {sim.draws} simulated "
                     "releases (worst row): " + ", ".join(
                         f"{render.esc(c)} ±{v:.3g}" for c, v in errors.items()) + ".</li>")
    notes = "".join(f'<div class="pw-warning">{render.esc(n)}</div>' for n in sim.notes)
    return (f'<div class="pw-explorer-result"><b>At ε = {sim.epsilon:.3g} and k = {sim.k}'
            f"</b> (simulated, no budget spent):<ul>{''.join(items)}</ul>{notes}</div>")
