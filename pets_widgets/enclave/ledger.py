"""The enclave's ledger: audit log, privacy budget and stored releases, in one SQLite file.

Budget arithmetic is exact (``fractions.Fraction`` stored as text, never floats). A query's
epsilon is reserved in one ``BEGIN IMMEDIATE`` transaction that first sums what is already
reserved or spent, so concurrent threads or processes can never overspend; the reservation
becomes "spent" in the same transaction that stores the release and its audit row, or is
returned, with an audit row, when anything fails. A reservation left behind by a process
that died is returned, with an audit row, the next time the ledger is opened.

``python -m pets_widgets.audit LEDGER [--json]`` prints the audit log and budgets.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
import sqlite3
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

from pets_widgets.core.budget import Budget, overspend
from pets_widgets.core.clock import now

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    analyst TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    spec_json TEXT NOT NULL,
    sites TEXT NOT NULL,
    epsilon_asked TEXT NOT NULL,
    epsilon_spent TEXT NOT NULL,
    outcome TEXT NOT NULL,
    rule TEXT NOT NULL DEFAULT '',
    reason TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time TEXT NOT NULL,
    analyst TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('reserved', 'spent', 'returned')),
    host TEXT NOT NULL,
    pid INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    release_key TEXT PRIMARY KEY,
    time TEXT NOT NULL,
    spec_hash TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    sites TEXT NOT NULL,
    payload TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS analysts (
    name TEXT PRIMARY KEY,
    token_hash TEXT NOT NULL UNIQUE,
    created TEXT NOT NULL,
    revoked TEXT
);
CREATE INDEX IF NOT EXISTS reservations_analyst ON reservations (analyst, state);
"""


RELEASED = "released"


REPEATED = "repeated"


REFUSED = "refused"


INVALID = "invalid"


FAILED = "failed"


TEST = "test-noiseless"


#: What an analyst's name may be (it is shown in audit rows and on cards).
ANALYST_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def token_hash(token: str) -> str:
    """What the ledger keeps of an analyst's token (tokens are 256-bit random: a plain
    SHA-256 cannot be inverted)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True)
class QueryRecord:
    """Who asked what of which sites at which epsilon: the five facts every audit row, budget
    reservation and stored release is written with (``epsilon`` is None for a request that
    was invalid before an epsilon could be read)."""

    analyst: str
    spec_hash: str
    spec_json: str
    sites: tuple[str, ...]
    epsilon: Fraction | None

    @property
    def charge(self) -> Fraction:
        """The epsilon to reserve, spend or store (a valid request always has one)."""
        if self.epsilon is None:
            raise ValueError("a query without an epsilon cannot be charged")
        return self.epsilon


def fraction_text(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"


def parse_fraction(text: str) -> Fraction:
    return Fraction(text)


class Ledger:
    """One SQLite file (WAL mode) holding the audit log, budget reservations and releases.

    Each thread keeps its own connection (opening one costs more than most of the queries),
    so one Ledger can be shared by threads, and several processes may open the same file.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        self._setup_connections()
        with self._connect() as con:
            # Switching the journal mode needs the file to itself, and can fail at once
            # ("database is locked") while another process writes: switch only once.
            if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                con.execute("PRAGMA journal_mode=WAL")
            con.executescript(SCHEMA)
        self.recover()

    def _setup_connections(self) -> None:
        #: Open connections by (process id, thread id). A forked child finds its parent's
        #: here and leaves them alone: a connection is never used, nor closed, across fork.
        self._connections: dict[tuple[int, int], sqlite3.Connection] = {}
        self._connections_lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path}  # connections stay with their process

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path = state["path"]
        self._setup_connections()

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection, opened on first use (also in a forked child)."""
        key = (os.getpid(), threading.get_ident())
        con = self._connections.get(key)
        if con is None:
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None)
            con.execute("PRAGMA busy_timeout=60000")
            with self._connections_lock:
                self._close_finished_threads()
                self._connections[key] = con
        yield con

    def _close_finished_threads(self) -> None:
        """Close the connections of this process's threads that have ended."""
        pid, alive = os.getpid(), {t.ident for t in threading.enumerate()}
        for key in [k for k in self._connections if k[0] == pid and k[1] not in alive]:
            self._connections.pop(key).close()

    def _discard(self, con: sqlite3.Connection) -> None:
        """Drop a connection whose state is unknown (a failed rollback)."""
        with self._connections_lock:
            for key in [k for k, c in self._connections.items() if c is con]:
                del self._connections[key]
        with contextlib.suppress(sqlite3.Error):
            con.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An immediate (write-locked) transaction: committed on success, rolled back on error
        (including a failed commit), so a kept connection never stays inside a transaction
        holding the write lock."""
        with self._connect() as con:
            if con.in_transaction:  # cannot happen through this class; never build on one
                con.execute("ROLLBACK")
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
                con.execute("COMMIT")
            except BaseException:
                try:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                except sqlite3.Error:
                    self._discard(con)
                raise

    def set_meta(self, key: str, value: str) -> None:
        """Store a published fact about the ledger's enclave (its policy, image digest)."""
        with self.transaction() as con:
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def meta(self, key: str) -> str | None:
        with self._connect() as con:
            row = con.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    # -- audit --------------------------------------------------------------------------------
    @staticmethod
    def _audit(con: sqlite3.Connection, query: QueryRecord, *, epsilon_spent: Fraction,
               outcome: str, rule: str = "", reason: str = "") -> None:
        con.execute(
            "INSERT INTO audit (time, analyst, spec_hash, spec_json, sites, epsilon_asked, "
            "epsilon_spent, outcome, rule, reason) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (now(), query.analyst, query.spec_hash, query.spec_json, ",".join(query.sites),
             "" if query.epsilon is None else fraction_text(query.epsilon),
             fraction_text(epsilon_spent), outcome, rule, reason))

    def record(self, query: QueryRecord, outcome: str, rule: str = "",
               reason: str = "") -> None:
        """Write one audit row for an outcome that spent nothing (refused, invalid, failed...)."""
        with self.transaction() as con:
            self._audit(con, query, epsilon_spent=Fraction(0), outcome=outcome, rule=rule,
                        reason=reason)

    def audit_rows(self, analyst: str | None = None) -> list[dict[str, Any]]:
        """The audit log, oldest first (one analyst's rows when ``analyst`` is given)."""
        with self._connect() as con:
            cursor = con.cursor()
            cursor.row_factory = sqlite3.Row
            sql = "SELECT * FROM audit"
            args: tuple[str, ...] = ()
            if analyst is not None:
                sql += " WHERE analyst = ?"
                args = (analyst,)
            return [dict(r) for r in cursor.execute(sql + " ORDER BY id", args)]

    # -- budget -------------------------------------------------------------------------------
    @staticmethod
    def _committed(con: sqlite3.Connection, analyst: str | None) -> Fraction:
        sql = "SELECT epsilon FROM reservations WHERE state IN ('reserved', 'spent')"
        args: tuple[str, ...] = ()
        if analyst is not None:
            sql += " AND analyst = ?"
            args = (analyst,)
        return sum((parse_fraction(e) for (e,) in con.execute(sql, args)), Fraction(0))

    @classmethod
    def _budget(cls, con: sqlite3.Connection, analyst: str, analyst_budget: Fraction,
                federation_budget: Fraction) -> Budget:
        mine = cls._committed(con, analyst)
        everyone = cls._committed(con, None)
        return Budget(analyst, mine, analyst_budget - mine, everyone, federation_budget - everyone)

    def budget(self, analyst: str, analyst_budget: Fraction,
               federation_budget: Fraction) -> Budget:
        """What ``analyst`` and the federation have spent (or reserved) and have left."""
        with self._connect() as con:
            return self._budget(con, analyst, analyst_budget, federation_budget)

    def reserve(self, query: QueryRecord, analyst_budget: Fraction,
                federation_budget: Fraction) -> int:
        """Atomically reserve the query's epsilon; raise :class:`BudgetExceeded` and reserve
        nothing if the analyst's or the federation's total would be exceeded."""
        epsilon = query.charge
        with self.transaction() as con:
            budget = self._budget(con, query.analyst, analyst_budget, federation_budget)
            refusal = overspend(budget, epsilon, analyst_budget, federation_budget)
            if refusal is not None:
                raise refusal
            cur = con.execute(
                "INSERT INTO reservations (time, analyst, spec_hash, epsilon, state, host, pid) "
                "VALUES (?,?,?,?, 'reserved', ?, ?)",
                (now(), query.analyst, query.spec_hash, fraction_text(epsilon),
                 socket.gethostname(), os.getpid()))
            assert cur.lastrowid is not None
            return cur.lastrowid

    def commit_release(self, reservation: int, query: QueryRecord, *, release_key: str,
                       payload: str) -> bool:
        """Mark the reservation spent, store the release and write its audit row: one
        transaction, so a release never exists without its charge and its audit row.

        Returns False, and hands the reservation back, when a concurrent query already
        stored a release under the same key: the caller must return that stored release.
        """
        epsilon = query.charge
        with self.transaction() as con:
            if con.execute("SELECT 1 FROM releases WHERE release_key = ?",
                           (release_key,)).fetchone():
                con.execute("UPDATE reservations SET state = 'returned' WHERE id = ?",
                            (reservation,))
                return False
            updated = con.execute(
                "UPDATE reservations SET state = 'spent' WHERE id = ? AND state = 'reserved'",
                (reservation,)).rowcount
            if updated != 1:
                raise RuntimeError(f"reservation {reservation} is not open")
            self._store(con, query, release_key, payload)
            self._audit(con, query, epsilon_spent=epsilon, outcome=RELEASED)
        return True

    @staticmethod
    def _store(con: sqlite3.Connection, query: QueryRecord, key: str, payload: str) -> None:
        con.execute(
            "INSERT OR IGNORE INTO releases (release_key, time, spec_hash, epsilon, sites, "
            "payload) VALUES (?,?,?,?,?,?)",
            (key, now(), query.spec_hash, fraction_text(query.charge), ",".join(query.sites),
             payload))

    def return_reservation(self, reservation: int, query: QueryRecord, *, outcome: str,
                           rule: str, reason: str) -> None:
        """Give an open reservation back and write the audit row saying why."""
        with self.transaction() as con:
            con.execute("UPDATE reservations SET state = 'returned' WHERE id = ? "
                        "AND state = 'reserved'", (reservation,))
            self._audit(con, query, epsilon_spent=Fraction(0), outcome=outcome, rule=rule,
                        reason=reason)

    def refuse_charged(self, reservation: int, query: QueryRecord, *, keys: Sequence[str],
                       payload: str, rule: str, reason: str) -> None:
        """A refusal decided on fresh noise: its epsilon is charged to the analyst who asked
        (a refusal is an answer: charging a shared account let one analyst's probes drain
        everyone's budget at no cost to themselves), the decision is stored under every key
        given so asking again returns it without new noise, and the audit row says so. One
        transaction."""
        with self.transaction() as con:
            con.execute("UPDATE reservations SET state = 'spent' WHERE id = ? "
                        "AND state = 'reserved'", (reservation,))
            for key in keys:
                self._store(con, query, key, payload)
            self._audit(con, query, epsilon_spent=query.charge, outcome=REFUSED, rule=rule,
                        reason=f"{reason}; the check drew noise, so its epsilon "
                               f"{float(query.charge):g} was charged to the analyst who "
                               "asked")

    def incident(self, reservation: int, query: QueryRecord, *, reason: str,
                 at_least: Fraction = Fraction(0)) -> None:
        """A decrypted total broke the packing bounds (a site encrypted what no honest site
        can): the reservation stays spent at no less than ``at_least`` (the policy's epsilon
        per release: each such failure answers a threshold question about the other sites'
        exact totals, so probing with tiny epsilons must not be cheap), the federation is
        locked, the audit row says why."""
        charge = max(query.charge, at_least)
        with self.transaction() as con:
            con.execute("UPDATE reservations SET state = 'spent', epsilon = ? WHERE id = ?",
                        (fraction_text(charge), reservation))
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('locked', ?)",
                        (f"{now()}: {reason}",))
            self._audit(con, query, epsilon_spent=charge, outcome=FAILED,
                        rule="integrity_incident",
                        reason=f"{reason}; nothing released, the epsilon is charged and the "
                               "federation is locked until an operator unlocks it")

    def unlock(self) -> None:
        """Lift the lock set by an integrity incident (an operator's decision)."""
        with self.transaction() as con:
            con.execute("DELETE FROM meta WHERE key = 'locked'")

    def stored(self, release_key: str) -> str | None:
        """The stored payload of an earlier release (or refusal) with this key, if any."""
        with self._connect() as con:
            row = con.execute("SELECT payload FROM releases WHERE release_key = ?",
                              (release_key,)).fetchone()
        return None if row is None else row[0]

    def recover(self) -> int:
        """Return reservations left open by processes on this host that no longer exist."""
        host = socket.gethostname()
        returned = 0
        with self.transaction() as con:
            rows = con.execute("SELECT id, analyst, spec_hash, epsilon, pid FROM reservations "
                               "WHERE state = 'reserved' AND host = ?", (host,)).fetchall()
            for rid, analyst, spec_hash, epsilon, pid in rows:
                if _alive(pid):
                    continue
                con.execute("UPDATE reservations SET state = 'returned' WHERE id = ?", (rid,))
                lost = QueryRecord(analyst, spec_hash, "{}", (), parse_fraction(epsilon))
                self._audit(con, lost, epsilon_spent=Fraction(0), outcome=FAILED, rule="crash",
                            reason="the process holding this reservation ended before the "
                                   "release; the budget was returned")
                returned += 1
        return returned

    def unreleased(self, analyst: str, since: str) -> Fraction:
        """The epsilon ``analyst`` asked for, since ``since`` (ISO time), in queries that
        were admitted and never released (a site failed, or the admission was abandoned):
        sites may have charged their own lifetime epsilon for them."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT epsilon_asked FROM audit WHERE analyst = ? AND time >= ? AND outcome = "
                "? AND (rule = 'abandoned' OR rule LIKE 'site%') AND epsilon_asked != ''",
                (analyst, since, FAILED)).fetchall()
        return sum((parse_fraction(e) for (e,) in rows), Fraction(0))

    # -- analysts -----------------------------------------------------------------------------
    def add_analyst(self, name: str) -> str:
        """A new token for analyst ``name`` (an operator's act, out of band); only its hash is
        kept. A name that had a token gets a new one and the old one stops working; a revoked
        name is enabled again. Budget and audit rows stay with the name."""
        if not isinstance(name, str) or not ANALYST_NAME.fullmatch(name):
            raise ValueError("an analyst's name is 1 to 64 letters, digits, '.', '_', '@' "
                             "or '-'")
        token = "pa_" + secrets.token_urlsafe(32)
        with self.transaction() as con:
            con.execute("INSERT INTO analysts (name, token_hash, created, revoked) "
                        "VALUES (?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET "
                        "token_hash = excluded.token_hash, created = excluded.created, "
                        "revoked = NULL", (name, token_hash(token), now()))
        return token

    def revoke_analyst(self, name: str) -> bool:
        """Stop ``name``'s token from working; False when there was no such analyst."""
        with self.transaction() as con:
            return con.execute("UPDATE analysts SET revoked = ? WHERE name = ? AND revoked IS "
                               "NULL", (now(), name)).rowcount == 1

    def analyst_for(self, token: str) -> str | None:
        """The analyst a token belongs to (None: unknown or revoked). The token is hashed
        first, so looking it up says nothing about other tokens."""
        with self._connect() as con:
            row = con.execute("SELECT name FROM analysts WHERE token_hash = ? AND revoked IS "
                              "NULL", (token_hash(token),)).fetchone()
        return None if row is None else str(row[0])

    def analyst_accounts(self) -> list[dict[str, Any]]:
        """Every analyst with a token: name, created, revoked (never a hash)."""
        with self._connect() as con:
            rows = con.execute("SELECT name, created, revoked FROM analysts ORDER BY name")
            return [{"name": n, "created": c, "revoked": r} for n, c, r in rows]

    def analysts(self) -> list[str]:
        with self._connect() as con:
            rows = con.execute("SELECT DISTINCT analyst FROM audit UNION "
                               "SELECT DISTINCT analyst FROM reservations ORDER BY 1")
            return [r[0] for r in rows]


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Print a ledger's audit log and the budget spent per analyst."""
    parser = argparse.ArgumentParser(prog="python -m pets_widgets.audit",
                                     description=main.__doc__)
    parser.add_argument("ledger", help="path of the SQLite ledger")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    if not Path(args.ledger).exists():
        parser.error(f"no ledger at {args.ledger}")
    ledger = Ledger(args.ledger)
    policy = json.loads(ledger.meta("policy") or "{}")
    if not policy:
        parser.error(f"{args.ledger} holds no policy: it was not written by an enclave")
    a_budget = Fraction(str(policy["analyst_budget"]))
    f_budget = Fraction(str(policy["federation_budget"]))
    rows = ledger.audit_rows()
    budgets = [ledger.budget(a, a_budget, f_budget) for a in ledger.analysts()]
    if args.json:
        json.dump({
            "audit": rows,
            "budgets": [{"analyst": b.analyst, "spent": float(b.analyst_spent),
                         "left": float(b.analyst_left)} for b in budgets],
            "federation": {"spent": float(budgets[0].federation_spent) if budgets else 0.0,
                           "left": float(budgets[0].federation_left) if budgets
                           else float(f_budget)},
        }, sys.stdout, indent=1)
        print()
        return 0
    print(f"{'id':>4}  {'time':24}  {'analyst':12}  {'spec':12}  {'eps':>6}  outcome  reason")
    for r in rows:
        print(f"{r['id']:>4}  {r['time']:24}  {r['analyst'][:12]:12}  {r['spec_hash'][:12]:12}  "
              f"{float(parse_fraction(r['epsilon_spent'])):>6g}  {r['outcome']:8} "
              f"{r['rule']}{': ' if r['rule'] else ''}{r['reason']}")
    print()
    print(f"{'analyst':20} {'spent':>8} {'left':>8}")
    for b in budgets:
        print(f"{b.analyst:20} {float(b.analyst_spent):>8g} {float(b.analyst_left):>8g}")
    if budgets:
        print(f"{'(federation)':20} {float(budgets[0].federation_spent):>8g} "
              f"{float(budgets[0].federation_left):>8g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
