"""The budget ledger: atomic reservations, no overspend under concurrency, crash recovery,
restarts, and the audit command."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import threading
from fractions import Fraction

import pytest

import pets_widgets as pw
from pets_widgets.enclave.ledger import Ledger, QueryRecord, main

from .conftest import SMALL_ROWS, TEST_KEY_BITS


def test_budget_is_charged_exactly_and_refused_when_exceeded(fresh_fed):
    fed = fresh_fed
    for i in range(10):
        fed.run(pw.Count(by=["sex"], where={"diagnosis_year": (2000, 2012 + i)}),
                epsilon=1.0, analyst="ada")
    assert fed.budget("ada").analyst_spent == Fraction(10)
    rows_before = len(fed.audit_log())
    with pytest.raises(pw.BudgetExceeded) as info:
        fed.run(pw.Count(by=["age_band"]), epsilon=0.1, analyst="ada")
    assert info.value.rule == "analyst_budget" and isinstance(info.value, pw.QueryRefused)
    assert fed.budget("ada").analyst_spent == Fraction(10)
    last = fed.audit_log().iloc[-1]
    assert len(fed.audit_log()) == rows_before + 1
    assert (last.outcome, last.rule, last.epsilon_spent) == ("refused", "analyst_budget", "0/1")
    # another analyst still has budget; fractions stay exact (0.1 * 3 is 3/10, not 0.30000000004)
    for i in range(3):
        fed.run(pw.Count(by=["died"], where={"diagnosis_year": (2001 + i, 2022)}), epsilon=0.1,
                analyst="bea")
    assert fed.budget("bea").analyst_spent == Fraction(3, 10)


def test_federation_budget_caps_renamed_analysts(tmp_path):
    policy = pw.Policy(analyst_budget=1.0, federation_budget=3.0)
    fed = pw.demo_federation(seed=1, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite", policy=policy)
    for i, name in enumerate(["eve", "eve2", "eve3"]):
        fed.run(pw.Count(by=["sex"], where={"diagnosis_year": (2000 + i, 2022)}), analyst=name)
    with pytest.raises(pw.BudgetExceeded) as info:
        fed.run(pw.Count(by=["sex"], where={"diagnosis_year": (2010, 2022)}), analyst="eve4")
    assert info.value.rule == "federation_budget"
    assert fed.budget("eve4").federation_left == 0


def test_jupyterhub_user_is_the_analyst(fresh_fed, monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "hub-user")
    fresh_fed.run(pw.Count(by=["sex"]))
    assert fresh_fed.audit_log().iloc[-1].analyst == "hub-user"
    with pytest.raises(pw.QueryValidationError) as info:
        fresh_fed.run(pw.Count(by=["age_band"]), analyst="someone-else")
    assert info.value.field == "analyst"


def test_eight_threads_cannot_overspend(tmp_path):
    policy = pw.Policy(analyst_budget=3.0, federation_budget=5.0)
    fed = pw.demo_federation(seed=2, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=tmp_path / "l.sqlite", policy=policy)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        spec = pw.Count(by=["tumour_group"], where={"diagnosis_year": (2000 + i, 2022)})
        try:
            fed.run(spec, epsilon=1.0, analyst="racer")
            result = "released"
        except pw.BudgetExceeded:
            result = "refused"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert outcomes.count("released") == 3 and outcomes.count("refused") == 5
    assert fed.budget("racer").analyst_spent == Fraction(3)
    log = fed.audit_log()
    assert (log.outcome == "released").sum() == 3 and (log.outcome == "refused").sum() == 5


def _spend_in_process(ledger_path: str | Ledger, worker: int, results) -> None:
    """Run in another process: reserve and spend directly against the shared ledger file
    (through a Ledger of its own, or one inherited through ``fork``)."""
    ledger = ledger_path if isinstance(ledger_path, Ledger) else Ledger(ledger_path)
    got = 0
    for i in range(6):
        try:
            query = QueryRecord("proc", f"{worker}-{i}", "{}", ("A",), Fraction(1, 2))
            rid = ledger.reserve(query, analyst_budget=Fraction(4),
                                 federation_budget=Fraction(4))
        except pw.BudgetExceeded:
            continue
        ledger.commit_release(rid, query, release_key=f"{worker}-{i}", payload="{}")
        got += 1
    results.put(got)


def test_two_processes_cannot_overspend(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    Ledger(path)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_spend_in_process, args=(path, w, results)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    granted = results.get(timeout=5) + results.get(timeout=5)
    assert granted == 8  # 8 x 1/2 = the whole budget of 4, never more
    budget = Ledger(path).budget("proc", Fraction(4), Fraction(4))
    assert budget.analyst_spent == Fraction(4)


def _query_in_process(ledger_path: str, worker: int, results) -> None:
    """Run in another process: a whole federation of its own on the shared ledger file."""
    fed = pw.demo_federation(seed=worker, rows_per_site=500, key_bits=TEST_KEY_BITS,
                             ledger=ledger_path,
                             policy=pw.Policy(analyst_budget=2.0, federation_budget=3.0))
    outcomes = []
    for i in range(4):
        try:
            fed.run(pw.Count(by=["sex"]), epsilon=0.5 + 0.01 * (4 * worker + i),
                    analyst=f"proc{worker}")
            outcomes.append("released")
        except pw.BudgetExceeded as exc:
            outcomes.append(exc.rule)
    results.put(outcomes)


def test_two_processes_running_queries_cannot_overspend_and_audit_every_refusal(tmp_path):
    path = str(tmp_path / "shared.sqlite")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_query_in_process, args=(path, w, results)) for w in range(2)]
    for p in procs:
        p.start()
    outcomes = results.get(timeout=120) + results.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    # Two analysts with 2.0 each but a federation budget of 3.0: six releases of about 0.5.
    ledger = Ledger(path)
    assert ledger.budget("proc0", Fraction(2), Fraction(3)).federation_spent <= 3
    rows = ledger.audit_rows()
    refused = [r for r in rows if r["outcome"] == "refused"]
    assert outcomes.count("released") == sum(r["outcome"] == "released" for r in rows)
    assert len(refused) == len(outcomes) - outcomes.count("released") > 0
    assert all(r["rule"] in ("analyst_budget", "federation_budget") and r["reason"]
               for r in refused)


def test_a_forked_child_opens_its_own_connection(tmp_path):
    ledger = Ledger(tmp_path / "forked.sqlite")
    # the parent's connection is open
    ledger.record(QueryRecord("parent", "p", "{}", ("A",), None), "invalid")
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    child = ctx.Process(target=_spend_in_process, args=(ledger, 9, results))
    child.start()
    assert results.get(timeout=60) == 6
    child.join(60)
    assert child.exitcode == 0
    # The parent's own connection still works and sees what the child committed.
    assert ledger.budget("proc", Fraction(4), Fraction(4)).analyst_spent == 3
    assert len(ledger.audit_rows("proc")) == 6


@pytest.mark.parametrize(("part", "stage", "fault", "said"), [
    ("_releaser", "_noisy", RuntimeError("disk on fire"), "nothing released"),
    # Like the kernel's interrupt button: not an Exception, and while the totals decrypt.
    ("_decryptor", "totals", SystemExit("stopped"), "SystemExit after the budget was reserved"),
])
def test_a_fault_after_the_reservation_returns_it(fresh_fed, monkeypatch, part, stage, fault,
                                                   said):
    def boom(*args, **kwargs):
        raise fault

    monkeypatch.setattr(getattr(fresh_fed.enclave, part), stage, boom)
    with pytest.raises(type(fault)):
        fresh_fed.run(pw.Count(by=["sex"]))
    assert fresh_fed.budget().analyst_spent == 0
    last = fresh_fed.audit_log().iloc[-1]
    assert last.outcome == "failed" and said in last.reason
    monkeypatch.undo()
    fresh_fed.run(pw.Count(by=["sex"]))  # and the next query works
    assert fresh_fed.budget().analyst_spent == 1


CRASH = """
import os, sys
import pets_widgets as pw
fed = pw.demo_federation(seed=3, rows_per_site=500, key_bits=1024, ledger=sys.argv[1])
def die(*a, **k):
    os._exit(17)   # the process dies between the reservation and the release
fed.enclave._releaser._noisy = die
fed.run(pw.Count(by=["sex"]), analyst="crashy")
"""


def test_a_crash_between_reservation_and_release_leaves_no_spend(tmp_path):
    path = tmp_path / "crash.sqlite"
    proc = subprocess.run([sys.executable, "-c", CRASH, str(path)], capture_output=True,
                          timeout=120)
    assert proc.returncode == 17, proc.stderr.decode()[-2000:]
    ledger = Ledger(path)  # reopening recovers the dead process's reservation
    budget = ledger.budget("crashy", Fraction(10), Fraction(50))
    assert budget.analyst_spent == 0
    rows = ledger.audit_rows("crashy")
    assert rows[-1]["outcome"] == "failed" and rows[-1]["rule"] == "crash"


def test_ledger_survives_restart_and_repeats_across_restarts(tmp_path):
    path = tmp_path / "persist.sqlite"
    spec = pw.Crosstab(rows="sex", cols="age_band")
    fed = pw.demo_federation(seed=4, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=path)
    first = fed.run(spec, analyst="ann")
    again = pw.demo_federation(seed=4, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                               ledger=path)
    assert again.budget("ann").analyst_spent == 1
    second = again.run(spec, analyst="ann")
    assert second.card.repeated
    assert second.table.equals(first.table)
    assert again.budget("ann").analyst_spent == 1


def test_audit_command_prints_ledger_and_budgets(tmp_path, capsys):
    path = tmp_path / "cli.sqlite"
    fed = pw.demo_federation(seed=4, rows_per_site=SMALL_ROWS, key_bits=TEST_KEY_BITS,
                             ledger=path)
    fed.run(pw.Count(by=["sex"]), analyst="cli-user")
    with pytest.raises(pw.QueryRefused):
        fed.run(pw.Count(by=["sex"]), epsilon=5, analyst="cli-user")
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "cli-user" in out and "released" in out and "max_epsilon" in out
    assert main([str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["outcome"] for r in data["audit"]] == ["released", "refused"]
    assert data["budgets"] == [{"analyst": "cli-user", "spent": 1.0, "left": 9.0}]
    proc = subprocess.run([sys.executable, "-m", "pets_widgets.audit", str(path), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and json.loads(proc.stdout)["federation"]["spent"] == 1.0
