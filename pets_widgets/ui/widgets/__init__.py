"""The ipywidgets user interface: query builder, epsilon explorer, audit view, dashboard.

A thin layer over headless functions (:mod:`pets_widgets.ui.forms`,
:mod:`pets_widgets.ui.explore`, :mod:`pets_widgets.coordinator.progress`,
:mod:`pets_widgets.ui.render`). Nothing outside ``ui`` imports this package; ``pw.widgets``
imports it on first use.

Example
-------
>>> import pets_widgets as pw
>>> fed = pw.demo_federation()
>>> pw.widgets.QueryBuilder(fed)          # doctest: +SKIP
>>> pw.widgets.dashboard()                # the Voila app  # doctest: +SKIP
"""

from pets_widgets.ui.widgets.app import Dashboard, dashboard
from pets_widgets.ui.widgets.audit_view import AuditView
from pets_widgets.ui.widgets.explorer import EpsilonExplorer
from pets_widgets.ui.widgets.query_builder import QueryBuilder

__all__ = ["AuditView", "Dashboard", "EpsilonExplorer", "QueryBuilder", "dashboard"]
