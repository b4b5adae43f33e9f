"""The harmonised variables (the data dictionary): ``pw.schema``, re-exported from
:mod:`pets_widgets.core.schema`."""

from pets_widgets.core.schema import *  # noqa: F403
