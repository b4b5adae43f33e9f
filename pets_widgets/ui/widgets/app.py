"""The Voila app: a header with the sites and their status, then the query builder, the
epsilon explorer and the audit log in tabs."""

from __future__ import annotations

import os
from typing import Any

import ipywidgets as W

from pets_widgets.coordinator.config import load_config
from pets_widgets.coordinator.federation import Federation, build_federation, demo_federation
from pets_widgets.core.errors import ConfigError, PetsError
from pets_widgets.ui import render
from pets_widgets.ui.widgets._common import classed, html, log, styles
from pets_widgets.ui.widgets.audit_view import AuditView
from pets_widgets.ui.widgets.explorer import EpsilonExplorer
from pets_widgets.ui.widgets.query_builder import QueryBuilder

TAB_TITLES = ("Query builder", "Epsilon explorer", "Audit log")


class Dashboard(W.VBox):
    """Header (federation, sites and their status), then tabs: :class:`QueryBuilder`,
    :class:`EpsilonExplorer` (following the builder's current query) and :class:`AuditView`
    (refreshed after every run)."""

    def __init__(self, fed: Federation, title: str = "Federated statistics on rare "
                 "childhood cancers", note: str = ""):
        self.fed = fed
        self.status = html("", "pw-status-area")
        self.status_button = classed(W.Button(description="Check sites", icon="refresh",
                                              layout=W.Layout(width="130px")),
                                     "pw-status-refresh")
        header = W.VBox([
            html(f"<h2 style='margin:4px 0'>{render.esc(title)}</h2>"
                 f'<div class="pw-note">{render.esc(fed.policy.describe())}</div>'
                 + (f'<div class="pw-note">{render.esc(note)}</div>' if note else ""),
                 "pw-title"),
            W.HBox([self.status, self.status_button]),
        ])
        header.add_class("pw-header")
        self.builder = QueryBuilder(fed)
        self.explorer = EpsilonExplorer(fed, self._builder_spec())
        self.audit = AuditView(fed)
        self.tabs = classed(W.Tab(children=[self.builder, self.explorer, self.audit]), "pw-tabs")
        for i, name in enumerate(TAB_TITLES):
            self.tabs.set_title(i, name)
        super().__init__([styles(), header, self.tabs])
        classed(self, "pw-root", "pw-dashboard")

        self.builder.on_spec_change(lambda spec: self.explorer.set_spec(
            spec, update=self.tabs.selected_index == 1))
        self.builder.on_result(self._after_run)
        self.tabs.observe(self._on_tab, names="selected_index")
        self.status_button.on_click(lambda _: self.refresh_status())
        self.refresh_status()

    def _builder_spec(self) -> Any:
        try:
            return self.builder.spec
        except PetsError:
            return None

    def _on_tab(self, change: dict[str, Any]) -> None:
        if change["new"] == 1:
            self.explorer.refresh()
        elif change["new"] == 2:
            self.audit.refresh()

    def _after_run(self, _builder: QueryBuilder) -> None:
        self.audit.refresh()
        self.refresh_status()

    def refresh_status(self) -> None:
        """Ask every site for its status (liveness where the backend reports it)."""
        try:
            self.status.value = render.status_html(self.fed.status())
        except Exception as exc:  # a status check must not break the page
            log.exception("status failed")
            self.status.value = render.error_html(exc)


#: Environment variable naming a site configuration file for :func:`dashboard` (set by
#: ``python -m pets_widgets dashboard --config FILE``, read inside the Voila kernel).
CONFIG_ENV = "PETS_SITES_CONFIG"


def dashboard(fed: Federation | None = None, backend: str = "service", seed: int = 7,
              config: str | os.PathLike[str] | None = None, **kwargs: Any) -> Dashboard:
    """The dashboard over ``fed``, over the sites of a configuration file, or over the
    synthetic demo federation.

    ``config`` (or, when it is None, the file named by ``$PETS_SITES_CONFIG``) is a TOML site
    configuration (:mod:`pets_widgets.coordinator.config`): site services (by URL, or
    started here) or local sites, so the same dashboard runs against the registries' own
    services by changing the file only. A file
    with any real (non-synthetic) registry must name its ledger (``[federation] ledger``):
    every page load is a new kernel, and a temporary ledger would give each one a fresh
    budget. Without
    either, each of the demo's registries is its own site service process on 127.0.0.1
    (``backend="service"``, ``site serve``); when services cannot be started there, the
    sites run in this process and the header says why.
    """
    note = ""
    config = config if config is not None else os.environ.get(CONFIG_ENV) or None
    if fed is None and config is not None:
        settings = load_config(config)
        if (settings.ledger is None and "ledger" not in kwargs and not settings.synthetic_only
                and settings.enclave.url is None):
            raise ConfigError(f"{os.fspath(config)}: name the audit ledger ([federation] ledger "
                              "= \"ledger.sqlite\") so the privacy budget and stored releases "
                              "last across page loads")
        fed = build_federation(settings, **kwargs)
        note = f"Sites from the configuration file {os.fspath(config)}."
    if fed is None:
        try:
            fed = demo_federation(seed=seed, backend=backend, **kwargs)
        except (PetsError, ValueError) as exc:
            if backend == "local":
                raise
            fed = demo_federation(seed=seed, backend="local", **kwargs)
            log.info("backend %r not available (%s); using local sites", backend, exc)
            note = (f"The {backend} sites could not be started ({exc}); the sites run "
                    "inside this notebook's process instead.")
    return Dashboard(fed, note=note)
