"""Named survival presets: ``pw.presets``, re-exported from :mod:`pets_widgets.ui.presets`."""

from pets_widgets.ui.presets import *  # noqa: F403
