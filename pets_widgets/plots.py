"""Figures of releases: ``pw.plots``, re-exported from :mod:`pets_widgets.ui.plots`."""

from pets_widgets.ui.plots import *  # noqa: F403
