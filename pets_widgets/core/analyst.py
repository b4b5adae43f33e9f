"""Who a query is charged to: the one rule every domain applies to the analyst's name.

A signed-in JupyterHub user (``JUPYTERHUB_USER``, set by the hub's spawner) is the analyst
and cannot be renamed; elsewhere a name is given, or the operating-system user is taken.
"""

from __future__ import annotations

import getpass
import os

from pets_widgets.core.errors import QueryValidationError


def hub_user() -> str | None:
    """The signed-in JupyterHub user, or None outside a hub."""
    return os.environ.get("JUPYTERHUB_USER") or None


def check_analyst(analyst: object) -> str:
    """``analyst`` when it is a name this process may charge; otherwise a
    :class:`QueryValidationError` naming the field and what is allowed."""
    if not isinstance(analyst, str) or not analyst.strip():
        raise QueryValidationError("analyst", f"{analyst!r} is not a name", "a non-empty name")
    hub = hub_user()
    if hub and analyst != hub:
        raise QueryValidationError(
            "analyst", f"is fixed to the signed-in JupyterHub user {hub!r}", [hub])
    return analyst


def resolve_analyst(analyst: str | None) -> str:
    """The analyst a query is charged to: the hub user, the name given (stripped), or the
    operating-system user when none is given."""
    hub = hub_user()
    if hub and analyst in (None, ""):
        return hub
    if analyst is None:
        return default_analyst()
    return check_analyst(analyst.strip() if isinstance(analyst, str) else analyst)


def default_analyst() -> str:
    """The name to charge when none is given: the hub user or the operating-system user."""
    hub = hub_user()
    if hub:
        return hub
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "analyst"
