"""Time stamps of audit rows, cards and releases (UTC, milliseconds, ISO 8601).
"""

from __future__ import annotations

from datetime import UTC, datetime


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")
