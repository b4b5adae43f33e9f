"""Where the embedded default keeps its state across runs, and how to start over.

The dashboard's server keeps the demo's services' state (the enclave's ledger with its
budget, audit log, stored releases and analysts' tokens; the platform verifier's key; the
synthetic sites' keys and lifetime budgets) in one folder, so every page load and every
restart of the server sees the same budget. ``python -m pets_widgets demo reset`` removes it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: An environment variable naming the state folder (default: the XDG state folder).
STATE_ENV = "PETS_STATE_DIR"


def state_dir() -> Path:
    """``$PETS_STATE_DIR``, else ``$XDG_STATE_HOME/pets_widgets``, else
    ``~/.local/state/pets_widgets``."""
    given = os.environ.get(STATE_ENV)
    if given:
        return Path(given).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "pets_widgets"


def demo_state() -> Path:
    """The demo federation's state folder (created, mode 0700)."""
    folder = state_dir() / "demo"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    return folder


def reset_demo() -> Path | None:
    """Remove the demo's state (budget, audit log, stored releases, keys); the folder that
    was removed, or None when there was none. Stop the dashboard first."""
    folder = state_dir() / "demo"
    if not folder.exists():
        return None
    shutil.rmtree(folder)
    return folder
