"""The researcher's query builder: menus from the schema, a Run button, the released result.

Thin composition over :mod:`pets_widgets.ui.forms` (menu options, spec building),
:mod:`pets_widgets.coordinator.progress` and :mod:`pets_widgets.ui.render` (HTML of tables, cards,
refusals); the same functions are unit-tested headless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import ipywidgets as W

from pets_widgets.coordinator.federation import Federation
from pets_widgets.core.analyst import default_analyst, hub_user
from pets_widgets.core.errors import PetsError, QueryValidationError
from pets_widgets.core.query import QuerySpec
from pets_widgets.core.release import Release
from pets_widgets.core.sentences import question
from pets_widgets.ui import forms, render
from pets_widgets.ui.widgets._common import ProgressPanel, classed, html, log, show, styles

#: Epsilon values offered per release (those above the policy maximum are left out).
EPSILON_CHOICES = (0.05, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0, 2.0, 3.0, 5.0, 10.0)

#: Widget value standing for "no choice" (ipywidgets uses None for "nothing selected").
EMPTY = ""

FIELD_CLASSES = {name: "pw-" + name.replace("_", "-") for name in forms.FIELD_LABELS}

_WIDE = {"description_width": "110px"}
_FULL = W.Layout(width="370px")


def _to_widget(options: forms.Options) -> list[tuple[str, Any]]:
    return [(label, EMPTY if value is None else value) for label, value in options]


def _from_widget(value: Any) -> Any:
    return None if value == EMPTY else value


class QueryBuilder(W.VBox):
    """Build a query from menus, run it across the federation, read the release.

    ``QueryBuilder(fed)`` is a widget: display it in a notebook or a Voila page. Controls are
    attributes (``kind``, ``fields["rows"]``, ``filters["sex"]``, ``years``, ``epsilon``,
    ``k``, ``analyst``, ``run_button``) and so are the result areas (``message``,
    ``table``, ``plot``, ``card``, ``downloads``), so scripts and tests can drive it.
    """

    def __init__(self, fed: Federation):
        self.fed = fed
        self.schema = fed.schema
        self.policy = fed.policy
        self.release: Release | None = None
        self.error: BaseException | None = None
        self._syncing = False
        self._spec_listeners: list[Callable[[QuerySpec | None], None]] = []
        self._result_listeners: list[Callable[[QueryBuilder], None]] = []

        start = forms.default_form(self.schema, forms.kinds()[0])
        self.kind = classed(W.Dropdown(options=forms.kind_options(), value=start.kind,
                                       description="Question", style=_WIDE,
                                       layout=_FULL), "pw-kind")
        self.fields: dict[str, W.Dropdown] = {}
        for name, label in forms.FIELD_LABELS.items():
            self.fields[name] = classed(W.Dropdown(options=[("", EMPTY)], description=label,
                                                   style=_WIDE, layout=W.Layout(width="370px")),
                                        FIELD_CLASSES[name])

        self.filters: dict[str, W.SelectMultiple] = {}
        for name in self.schema.groupable:
            opts = forms.filter_options(self.schema, name)
            label = self.schema[name].label.split(" (")[0]
            self.filters[name] = classed(
                W.SelectMultiple(options=opts, value=(), rows=min(len(opts), 4),
                                 description=label, style={"description_width": "130px"},
                                 layout=W.Layout(width="350px")),
                "pw-filter", f"pw-filter-{name.replace('_', '-')}")
        lo, hi = forms.year_bounds(self.schema)
        self.years = classed(W.IntRangeSlider(value=(lo, hi), min=lo, max=hi,
                                              description="Years of diagnosis",
                                              style={"description_width": "130px"},
                                              continuous_update=False), "pw-years")
        filter_box = W.VBox([html('<span class="pw-note">Nothing selected = everyone.</span>'),
                             self.years, *self.filters.values()])
        self.filter_panel = classed(W.Accordion(children=[filter_box]), "pw-filters")
        self.filter_panel.set_title(0, "Filters")
        self.filter_panel.selected_index = None

        eps_opts = sorted({e for e in EPSILON_CHOICES if e <= self.policy.max_epsilon}
                          | {float(self.policy.max_epsilon)})
        self.epsilon = classed(W.SelectionSlider(
            options=[(f"{e:g}", e) for e in eps_opts], value=min(1.0, eps_opts[-1]),
            description="Epsilon ε", style=_WIDE, continuous_update=False), "pw-epsilon")
        self.k = classed(W.IntSlider(value=self.policy.k, min=self.policy.k,
                                     max=max(20, 4 * self.policy.k), description="Hide below k",
                                     style=_WIDE, continuous_update=False), "pw-k")
        self.policy_note = html(
            f'<span class="pw-note">Policy: at most ε {self.policy.max_epsilon:g} per release; '
            f"k at least {self.policy.k}; filters must keep at least "
            f"{self.policy.min_subset} patients; budget {self.policy.analyst_budget:g} per "
            "analyst.</span>", "pw-policy")
        # An enclave service charges the owner of this process's analyst token: the box shows
        # that name and cannot be edited (the in-process simulation may play other analysts).
        hub = hub_user()
        fixed = fed.analyst if fed.is_service else hub
        self.analyst = classed(W.Text(value=fixed or default_analyst(), description="Analyst",
                                      style=_WIDE, continuous_update=False,
                                      disabled=fixed is not None,
                                      tooltip="the analyst your token belongs to: the enclave "
                                      "charges every query to this name" if fed.is_service
                                      else "the analyst charged (a one-process simulation "
                                      "may play several)"), "pw-analyst")
        self.budget = html("", "pw-budget")
        self.intervals = classed(W.Checkbox(value=False, description="Show 95% intervals",
                                            indent=False), "pw-intervals")
        self.spec_text = html("", "pw-spec")
        self.run_button = classed(W.Button(description="Run query", button_style="primary",
                                           icon="play"), "pw-run")
        self.progress = ProgressPanel(fed.site_names)

        self.message = html("", "pw-message-area")
        self.table = html("", "pw-table-area")
        self.plot = html("", "pw-plot-area")
        self.card = html("", "pw-card-area")
        self.downloads = html("", "pw-downloads-area")
        results = classed(W.VBox([self.message, self.table, self.plot, self.card,
                                  self.downloads], layout=W.Layout(flex="1 1 auto",
                                                                   min_width="420px")),
                          "pw-result")
        controls = classed(W.VBox([self.kind, *self.fields.values(), self.filter_panel,
                                   self.epsilon, self.k, self.policy_note, self.analyst,
                                   self.budget, self.intervals, self.spec_text, self.run_button,
                                   self.progress],
                                  layout=W.Layout(flex="0 0 390px", width="390px")),
                           "pw-controls")
        super().__init__([styles(), W.HBox([controls, results])])
        classed(self, "pw-root", "pw-query-builder")

        self.kind.observe(self._on_kind, names="value")
        for widget in (*self.fields.values(), *self.filters.values(), self.years):
            widget.observe(self._on_change, names="value")
        self.analyst.observe(lambda _: self.show_budget(), names="value")
        self.intervals.observe(lambda _: self._show_release(), names="value")
        self.run_button.on_click(lambda _: self.run())
        self._apply(start)
        self.show_budget()

    # -- form <-> widgets ---------------------------------------------------------------------
    def form(self) -> forms.QueryForm:
        """The controls' values as a :class:`~pets_widgets.ui.forms.QueryForm`."""
        values = {name: _from_widget(w.value) for name, w in self.fields.items()}
        filters = {name: tuple(w.value) for name, w in self.filters.items() if w.value}
        years = tuple(self.years.value)
        return forms.QueryForm(kind=self.kind.value, filters=filters,
                               years=years if years != forms.year_bounds(self.schema) else None,
                               **values)

    def _apply(self, form: forms.QueryForm) -> None:
        """Show the fields of ``form.kind`` with the options its values allow."""
        self._syncing = True
        try:
            form = forms.refit(self.schema, form)
            used = forms.KIND_FIELDS.get(form.kind, ())
            for name, widget in self.fields.items():
                show(widget, name in used)
                if name not in used:
                    continue
                options = _to_widget(forms.choices(self.schema, form, name))
                value = getattr(form, name)
                value = EMPTY if value is None else value
                if list(widget.options) != options:
                    widget.options = options
                widget.value = value
                # later fields' options depend on this one's value
                form = replace(form, **{name: _from_widget(widget.value)})
                form = forms.refit(self.schema, form)
            allowed = set(forms.filter_variables(self.schema, form.kind))
            for name, widget in self.filters.items():
                show(widget, name in allowed)
                if name not in allowed:
                    widget.value = ()
            show(self.years, forms.year_filter_allowed(self.schema, form.kind))
        finally:
            self._syncing = False
        self._spec_changed()

    def _on_kind(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        base = forms.default_form(self.schema, change["new"])
        current = self.form()
        self._apply(replace(base, filters=current.filters, years=current.years))

    def _on_change(self, change: dict[str, Any]) -> None:
        if self._syncing:
            return
        self._apply(self.form())

    # -- the spec -----------------------------------------------------------------------------
    @property
    def spec(self) -> QuerySpec:
        """The spec the controls describe (raises :class:`QueryValidationError` if none)."""
        return forms.build_spec(self.form(), self.schema)

    def _current_spec(self) -> QuerySpec | None:
        try:
            return self.spec
        except QueryValidationError as exc:
            self.spec_text.value = render.error_html(exc)
            return None

    def _spec_changed(self) -> None:
        spec = self._current_spec()
        self.run_button.disabled = spec is None
        if spec is not None:
            self.spec_text.value = (f'<span class="pw-note">Query: '
                                    f"{render.esc(question(spec, self.schema))}</span>")
        for listener in self._spec_listeners:
            listener(spec)

    def on_spec_change(self, callback: Callable[[QuerySpec | None], None]) -> None:
        """Call ``callback(spec)`` whenever the controls describe a new spec."""
        self._spec_listeners.append(callback)

    def on_result(self, callback: Callable[[QueryBuilder], None]) -> None:
        """Call ``callback(builder)`` after every run, released or not."""
        self._result_listeners.append(callback)

    # -- running ------------------------------------------------------------------------------
    def run(self) -> Release | None:
        """Run the current spec across the federation and show the release or the refusal."""
        spec = self._current_spec()
        if spec is None:
            return None
        self.release, self.error = None, None
        for area in (self.message, self.table, self.plot, self.card, self.downloads):
            area.value = ""
        self.message.value = render.info_html("Running across the sites...")
        self.run_button.disabled = True
        self.progress.start()
        try:
            self.release = self.fed.run(spec, epsilon=float(self.epsilon.value),
                                        k=int(self.k.value), analyst=self.analyst.value or None,
                                        progress=self.progress.callback)
        except PetsError as exc:
            self.error = exc
            self.progress.finish(False)
            self.message.value = render.error_html(exc)
        except Exception as exc:  # never a traceback on the page; the log keeps it
            log.exception("query failed")
            self.error = exc
            self.progress.finish(False)
            self.message.value = render.error_html(exc)
        else:
            self._show_release()
            self.progress.finish(True, "stored release returned (nothing spent)"
                                 if self.release.card.repeated else "released")
        finally:
            self.run_button.disabled = False
            self.show_budget()
        for listener in self._result_listeners:
            listener(self)
        return self.release

    def _show_release(self) -> None:
        rel = self.release
        if rel is None:
            return
        intervals = True if self.intervals.value else None
        note = ("Asked before: the stored release is shown and nothing was spent."
                if rel.card.repeated else "Released.")
        # build every piece first, then show them together (the plot is the slow part)
        pieces = (render.info_html(note, "pw-info"),
                  render.release_html(rel, self.schema, intervals), render.plot_html(rel),
                  render.card_html(rel.card), render.download_html(rel))
        for area, html_text in zip((self.message, self.table, self.plot, self.card,
                                    self.downloads), pieces, strict=True):
            area.value = html_text

    def show_budget(self) -> None:
        """Refresh the budget line for the analyst named in the form."""
        try:
            budget = self.fed.budget(self.analyst.value or None)
        except PetsError as exc:
            self.budget.value = render.error_html(exc)
            return
        self.budget.value = render.budget_html(budget, self.policy)
