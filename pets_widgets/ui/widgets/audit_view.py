"""The analyst's audit view: every query, its outcome and reason, and the budget left."""

from __future__ import annotations

from typing import Any

import ipywidgets as W

from pets_widgets.coordinator.federation import Federation
from pets_widgets.core.analyst import default_analyst, hub_user
from pets_widgets.core.errors import PetsError
from pets_widgets.ui import render
from pets_widgets.ui.widgets._common import classed, html, styles

_WIDE = {"description_width": "80px"}


class AuditView(W.VBox):
    """``AuditView(fed)``: the ledger's audit rows for one analyst (or everyone), newest
    first, with outcomes (released, repeated, refused, failed), reasons and budget left.
    Areas: ``budget``, ``counts``, ``table``; :meth:`refresh` re-reads the ledger."""

    def __init__(self, fed: Federation, analyst: str | None = None):
        self.fed = fed
        hub = hub_user()
        # An enclave service shows each analyst their own rows only (the token's owner).
        fixed = fed.analyst if fed.is_service else None
        self.analyst = classed(W.Text(value=fixed or analyst or hub or default_analyst(),
                                      description="Analyst", style=_WIDE,
                                      continuous_update=False, disabled=fixed is not None),
                               "pw-audit-analyst")
        self.everyone = classed(W.Checkbox(value=False, description="all analysts",
                                           indent=False, disabled=fixed is not None),
                                "pw-audit-all")
        if fixed is not None:
            self.everyone.layout.display = "none"
        self.refresh_button = classed(W.Button(description="Refresh", icon="refresh"),
                                      "pw-audit-refresh")
        self.budget = html("", "pw-audit-budget")
        self.counts = html("", "pw-audit-counts")
        self.table = html("", "pw-audit-area")
        super().__init__([styles(), W.HBox([self.analyst, self.everyone, self.refresh_button]),
                          self.budget, self.counts, self.table])
        classed(self, "pw-root", "pw-audit")
        self.analyst.observe(self._on_change, names="value")
        self.everyone.observe(self._on_change, names="value")
        self.refresh_button.on_click(lambda _: self.refresh())
        self.refresh()

    def _on_change(self, _change: dict[str, Any]) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Re-read the ledger and redraw."""
        name = self.analyst.value.strip() or None
        try:
            budget = self.fed.budget(name)
            self.budget.value = render.budget_html(budget, self.fed.policy)
        except PetsError as exc:
            self.budget.value = render.error_html(exc)
        rows = self.fed.audit_log(None if self.everyone.value else name)
        counts = render.outcome_counts(rows)
        who = "all analysts" if self.everyone.value else render.esc(name or "")
        summary = ", ".join(f"{n} {outcome}" for outcome, n in counts.items()) or "none"
        self.counts.value = (f'<div class="pw-note">Queries by {who}: {len(rows)} '
                             f"({render.esc(summary)}).</div>")
        self.table.value = render.audit_html(rows)
