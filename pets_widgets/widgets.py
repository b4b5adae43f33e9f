"""The ipywidgets user interface: ``pw.widgets``, re-exported from
:mod:`pets_widgets.ui.widgets`."""

from pets_widgets.ui.widgets import *  # noqa: F403
