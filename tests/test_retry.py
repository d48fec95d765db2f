"""ledger.retry: a transaction PostgreSQL aborts to break a deadlock is run again — a real deadlock
between two transfers locking accounts in opposite orders; a pull the database aborts once; and a
request whose transaction keeps meeting deadlocks is a 503 with Retry-After, never a 500."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from maxwell_poi.ledger import Ledger, check_ledger
from maxwell_poi.ledger.retry import RETRIES, retried
from maxwell_poi.ledger.schema import Account
from maxwell_poi.service.market import Market
from tests.test_service_api import Plane, plane  # noqa: F401 - the control-plane fixture


class _Deadlock(Exception):
    sqlstate = "40P01"  # as psycopg names PostgreSQL's "deadlock detected"


def _deadlock() -> OperationalError:
    return OperationalError("SELECT … FOR UPDATE", {}, _Deadlock("deadlock detected"))


def test_two_transfers_locking_in_opposite_orders_both_commit_once(
    pg_schema: tuple[str, dict[str, str]],
) -> None:
    from maxwell_poi.ledger.db import open_ledger_db

    url, args = pg_schema
    engine: Engine = open_ledger_db(url, connect_args=args)
    book = Ledger(engine)
    book.deposit("alice", 1_000, "dep:alice")
    book.deposit("bob", 1_000, "dep:bob")
    both_hold_one = threading.Barrier(2, timeout=10)
    tries = {"a-first": 0, "b-first": 0}

    def transfer(first: str, second: str, label: str) -> Callable[[], None]:
        def once() -> None:
            tries[label] += 1
            with book.session() as session, session.begin():
                lock = select(Account).where(Account.name == first).with_for_update()
                session.execute(lock)
                if tries[label] == 1:  # the first try holds one account while the other holds the other
                    both_hold_one.wait()
                session.execute(select(Account).where(Account.name == second).with_for_update())
                legs = {first: -10, second: 10}
                book.transfer(f"t:{label}", "deposit", legs, session=session)

        return lambda: retried(once, label)

    errors: list[BaseException] = []

    def run(work: Callable[[], None]) -> None:
        try:
            work()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(transfer("wallet:alice", "wallet:bob", "a-first"),)),
        threading.Thread(target=run, args=(transfer("wallet:bob", "wallet:alice", "b-first"),)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert sum(tries.values()) == 3, tries  # PostgreSQL broke the deadlock by failing one of them once
    assert book.balance("wallet:alice") == book.balance("wallet:bob") == 1_000  # each moved 10 once
    report = check_ledger(engine)
    assert report.ok and report.transfers == 4, report.problems
    engine.dispose()


def test_a_transaction_that_keeps_meeting_deadlocks_raises_after_its_tries() -> None:
    calls = []

    def always() -> None:
        calls.append(1)
        raise _deadlock()

    with pytest.raises(OperationalError, match="deadlock"):
        retried(always, "test")
    assert len(calls) == RETRIES


def test_other_database_errors_are_not_retried() -> None:
    calls = []

    def broken() -> None:
        calls.append(1)
        raise OperationalError("SELECT 1", {}, Exception("the server closed the connection"))

    with pytest.raises(OperationalError, match="closed"):
        retried(broken, "test")
    assert len(calls) == 1


def test_a_pull_the_database_aborts_once_is_run_again(plane: Plane, monkeypatch) -> None:  # noqa: F811
    assert plane.bid().status_code in (200, 201)
    real, calls = Market._pull, []

    def aborted_once(self: Market, node_id, body):  # noqa: ANN001, ANN202
        calls.append(1)
        if len(calls) == 1:
            raise _deadlock()
        return real(self, node_id, body)

    monkeypatch.setattr(Market, "_pull", aborted_once)
    answer = plane.pull(agents=["alice"])
    assert answer.status_code == 200, answer.text
    assert len(calls) == 2 and len(answer.json()["leases"]) == 1
    assert plane.ledger()["check"]["ok"]


def test_a_pull_that_keeps_meeting_deadlocks_is_a_503_with_retry_after(plane: Plane, monkeypatch) -> None:  # noqa: F811
    def always(self: Market, node_id, body):  # noqa: ANN001, ANN202
        raise _deadlock()

    monkeypatch.setattr(Market, "_pull", always)
    answer = plane.pull()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1", answer.text
    error = answer.json()["error"]
    assert "nothing of it was stored" in error["expected"] and "deadlock" in error["got"]
    with Session(plane.cp.ledger.engine) as session:  # nothing issued
        assert session.scalar(select(Account).where(Account.name == "escrow:alice")) is None
