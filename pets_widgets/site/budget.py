"""A site's own privacy budget: the epsilon released over its data, in a small SQLite file
beside its configuration.

The site charges each query it answers, before it encrypts anything, and refuses once its
``lifetime_epsilon`` would be passed, whatever the enclave's ledger says: a replaced or reset
enclave ledger cannot reset what a site allows. It charges on answering, not on release (it
cannot see the release), so a query that fails after the site answered still counts: the
site errs on the side of spending.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from fractions import Fraction
from pathlib import Path

from pets_widgets.core.clock import now
from pets_widgets.core.errors import SiteRefusal

SCHEMA = """
CREATE TABLE IF NOT EXISTS answered (
    admission TEXT PRIMARY KEY,
    time TEXT NOT NULL,
    epsilon TEXT NOT NULL
);
"""


class SiteBudget:
    """Epsilon this site has answered for, against its lifetime limit (``None``: in memory)."""

    def __init__(self, path: str | os.PathLike[str] | None, lifetime: float):
        self.path = Path(path) if path is not None else None
        self.lifetime = Fraction(str(lifetime))
        self._lock = threading.Lock()
        self._con = sqlite3.connect(":memory:" if self.path is None else self.path,
                                    check_same_thread=False, isolation_level=None)
        self._con.executescript(SCHEMA)

    def used(self) -> Fraction:
        """The epsilon answered for so far."""
        with self._lock:
            rows = self._con.execute("SELECT epsilon FROM answered").fetchall()
        return sum((Fraction(e) for (e,) in rows), Fraction(0))

    def left(self) -> Fraction:
        return self.lifetime - self.used()

    def charge(self, admission: str, epsilon: Fraction) -> None:
        """Record ``epsilon`` for one admission, or raise :class:`SiteRefusal` (rule
        ``lifetime_epsilon``) and record nothing if the lifetime limit would be passed."""
        with self._lock:
            self._con.execute("BEGIN IMMEDIATE")
            try:
                rows = self._con.execute("SELECT epsilon FROM answered").fetchall()
                used = sum((Fraction(e) for (e,) in rows), Fraction(0))
                if used + epsilon > self.lifetime:
                    raise SiteRefusal("lifetime_epsilon", "this site's lifetime privacy budget "
                                      "would be passed; it answers no more queries")
                self._con.execute("INSERT INTO answered (admission, time, epsilon) "
                                  "VALUES (?, ?, ?)",
                                  (admission, now(), f"{epsilon.numerator}/{epsilon.denominator}"))
                self._con.execute("COMMIT")
            except BaseException:
                self._con.execute("ROLLBACK")
                raise
