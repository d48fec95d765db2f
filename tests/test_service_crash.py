"""The control plane survives SIGKILL: bench/service/crash.py at test size (1 run, a small corpus of
real receipts) keeps every invariant — and its checker is shown to report a broken database."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine

from bench.service import crash as service_crash
from bench.service.crash import Attempt, check_answers, check_database


@pytest.fixture(scope="module")
def crashed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("crash")
    # 48 receipts: with group commit 16 were all answered before the drawn kill point (0.37 s)
    result = service_crash.crash_suite(workdir, runs=1, n=48, agents=1, audit_p=0.3, seed=20240607)
    return workdir, result


def test_sigkill_mid_traffic_keeps_every_invariant(crashed: tuple[Path, dict[str, Any]]) -> None:
    _, result = crashed
    details = result["crash_details"]
    assert result["crash_runs"] == 1 and len(details) == 1  # more kill points: make bench-service-crash
    assert result["crash_invariant_violations"] == 0, details
    for d in details:
        assert d["answered_before_kill"] < d["corpus"], d  # killed mid-stream, not after the fact
        assert d["receipts"] == d["corpus"], d  # every receipt in, once
        assert d["ledger_check_ok"], d
        assert d["market_ops_life1"] > 0, d  # bids, pulls and deposits moved money beside intake


def _copy(run_db: Path, to: Path) -> Path:
    """A consistent copy of a run's SQLite database (the backup API also takes in any WAL)."""
    src, dst = sqlite3.connect(run_db), sqlite3.connect(to)
    src.backup(dst)
    src.close()
    dst.close()
    return to


def _problems(db: Path) -> list[str]:
    engine = create_engine(f"sqlite:///{db}")
    try:
        return check_database(engine)
    finally:
        engine.dispose()


def _tamper(db: Path, sql: str) -> Path:
    with sqlite3.connect(db) as conn:
        changed = conn.execute(sql).rowcount
    assert changed == 1, sql
    return db


def test_the_checker_reports_a_dishonest_balance_and_a_lost_verdict(
    crashed: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    workdir, _ = crashed
    run_db = workdir / "run-0" / "ledger.sqlite"
    assert _problems(_copy(run_db, tmp_path / "honest.sqlite")) == []  # the untouched copy passes

    balance = _tamper(
        _copy(run_db, tmp_path / "balance.sqlite"),
        "UPDATE accounts SET balance_micro = balance_micro + 1 WHERE name = 'wallet:bench-agent-0'",
    )
    assert any("wallet:bench-agent-0: expected cached balance" in p for p in _problems(balance))

    verdict = _tamper(
        _copy(run_db, tmp_path / "verdict.sqlite"),
        "DELETE FROM cp_verdicts WHERE lease_id = (SELECT min(lease_id) FROM cp_verdicts)",
    )
    assert any("without a verdict row" in p for p in _problems(verdict))

    energy = _tamper(
        _copy(run_db, tmp_path / "energy.sqlite"),
        "UPDATE transfers SET kind = 'other' WHERE id = "
        "(SELECT min(id) FROM transfers WHERE kind = 'energy_debit')",
    )
    assert any(p.startswith("energy settlements: expected") for p in _problems(energy))


def test_the_answer_check_reports_a_receipt_accepted_twice_or_never() -> None:
    fresh = {"duplicate": False, "energy_j": 1.0, "charge_micro": 20}
    twice = {"a": [Attempt(1, 200, fresh), Attempt(2, 200, fresh)]}
    assert any("accepted as new 2 times" in p for p in check_answers(["a"], twice, {"a"}))
    dup = {**fresh, "duplicate": True}
    lost_ok = {"a": [Attempt(1, None), Attempt(2, 200, dup)]}  # committed, answer died with the server
    assert check_answers(["a"], lost_ok, {"a"}) == []
    never = {"a": [Attempt(1, 200, dup), Attempt(2, 200, dup)]}  # no answer was lost: a fresh one is owed
    assert any("never accepted as new" in p for p in check_answers(["a"], never, {"a"}))
