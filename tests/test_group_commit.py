"""ledger.group_commit: settlements that queue up are committed together, one savepoint each; one
that fails costs only itself; a commit that fails answers none of them as stored."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from maxwell_poi.ledger import Ledger, LedgerError, check_ledger
from maxwell_poi.ledger.group_commit import GroupCommit


def _pay(book: Ledger, key: str, micro: int = 1):
    return lambda session: book.transfer(
        key, "other", {"wallet:alice": -micro, "wallet:bob": micro}, session=session
    )


def test_settlements_that_queue_up_commit_together(book: Ledger) -> None:
    group = GroupCommit(book.session)
    gate, started = threading.Event(), threading.Event()

    def held(session: Session):
        started.set()
        gate.wait(30)  # the writer is busy: the next settlements queue up behind it
        return _pay(book, "first")(session)

    try:
        with ThreadPoolExecutor(8) as pool:
            first = pool.submit(group.run, held)
            assert started.wait(30)
            rest = [pool.submit(group.run, _pay(book, f"t{i}")) for i in range(6)]
            while group._queue.qsize() < 6:  # all six waiting before the writer is let go
                threading.Event().wait(0.01)
            gate.set()
            results = [first.result(30)] + [f.result(30) for f in rest]
    finally:
        group.close()
    assert all(r.created for r in results)
    assert (group.batches, group.items) == (2, 7)  # the held one alone, then the six in one commit
    assert book.balance("wallet:bob") == 1_000_000 + 7 and check_ledger(book.engine).ok


def test_a_failing_settlement_rolls_back_alone(book: Ledger) -> None:
    group = GroupCommit(book.session)
    gate, started = threading.Event(), threading.Event()

    def held(session: Session):
        started.set()
        gate.wait(30)
        return None

    try:
        with ThreadPoolExecutor(4) as pool:
            blocker = pool.submit(group.run, held)
            assert started.wait(30)
            good = pool.submit(group.run, _pay(book, "good"))
            bad = pool.submit(group.run, _pay(book, "overdraft", micro=10**12))
            after = pool.submit(group.run, _pay(book, "after"))
            while group._queue.qsize() < 3:
                threading.Event().wait(0.01)
            gate.set()
            blocker.result(30)
            assert good.result(30).created and after.result(30).created
            with pytest.raises(LedgerError, match="wallet:alice to stay"):
                bad.result(30)
    finally:
        group.close()
    assert group.batches == 2 and book.balance("wallet:bob") == 1_000_000 + 2
    assert check_ledger(book.engine).ok


def test_a_commit_that_fails_fails_every_settlement_of_its_group(book: Ledger) -> None:
    def failing_session() -> Session:
        session = book.session()
        event.listen(session, "before_commit", lambda _s: (_ for _ in ()).throw(OSError("disk full")))
        return session

    group = GroupCommit(failing_session)
    try:
        with pytest.raises(OSError, match="disk full"):
            group.run(_pay(book, "lost"))
    finally:
        group.close()
    assert book.balance("wallet:bob") == 1_000_000  # nothing stored, and the caller was told
    assert check_ledger(book.engine).ok


class _Deadlock(Exception):
    sqlstate = "40P01"  # as psycopg names PostgreSQL's "deadlock detected"


def test_a_settlement_that_meets_a_deadlock_is_tried_again_in_a_later_group(book: Ledger) -> None:
    from sqlalchemy.exc import OperationalError

    tries = []

    def deadlocked_once(session: Session):
        tries.append(1)
        if len(tries) == 1:
            raise OperationalError("SELECT … FOR UPDATE", {}, _Deadlock("deadlock detected"))
        return _pay(book, "retried")(session)

    group = GroupCommit(book.session)
    try:
        assert group.run(deadlocked_once).created
    finally:
        group.close()
    assert (len(tries), group.retried) == (2, 1) and book.balance("wallet:bob") == 1_000_000 + 1


def test_a_settlement_that_keeps_meeting_deadlocks_fails_after_its_retries(book: Ledger) -> None:
    from sqlalchemy.exc import OperationalError

    from maxwell_poi.ledger.group_commit import RETRIES

    def always(_session: Session):
        raise OperationalError("SELECT … FOR UPDATE", {}, _Deadlock("deadlock detected"))

    group = GroupCommit(book.session)
    try:
        with pytest.raises(OperationalError, match="deadlock"):
            group.run(always)
    finally:
        group.close()
    assert group.retried == RETRIES and check_ledger(book.engine).ok


def test_groups_of_two_processes_that_cross_accounts_wait_instead_of_deadlocking(
    book: Ledger, opener
) -> None:
    """Two writers (as two API processes would run, each on its own engine) commit groups that move
    alice then bob, and bob then alice. Each settlement holds its account at a barrier until the other
    group's first settlement holds the other one: without the accounts locked in name order before a
    group starts (`Ledger.lock_in_order`), both get there and PostgreSQL breaks the deadlock (a retry);
    with them, the second group waits in `prepare`, the barrier times out, and nobody is retried."""
    other = Ledger(opener())
    barrier = threading.Barrier(2, timeout=2)

    def pay(ledger: Ledger, agent: str, key: str, first: bool):
        def work(session: Session):
            done = ledger.transfer(
                key, "other", {f"wallet:{agent}": -5, "maxwell:energy": 5}, session=session
            )
            if first:
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()  # both groups holding their first account, if nothing ordered them
            return done

        return work

    groups = [GroupCommit(ledger.session, prepare=ledger.lock_in_order) for ledger in (book, other)]
    orders = (("alice", "bob"), ("bob", "alice"))
    gate = threading.Event()
    try:
        with ThreadPoolExecutor(8) as pool:
            held = [pool.submit(g.run, lambda _s: gate.wait(30)) for g in groups]
            while any(g._queue.qsize() for g in groups) or not all(g._thread.is_alive() for g in groups):
                threading.Event().wait(0.01)  # each writer busy with its held item
            futures = [
                pool.submit(g.run, pay(ledger, agent, f"{i}-{agent}", k == 0), (f"wallet:{agent}",))
                for i, (g, ledger, order) in enumerate(zip(groups, (book, other), orders, strict=True))
                for k, agent in enumerate(order)
            ]
            while any(g._queue.qsize() < 2 for g in groups):  # each group's two settlements queued
                threading.Event().wait(0.01)
            gate.set()
            results = [f.result(60) for f in (*held, *futures)]
    finally:
        for g in groups:
            g.close()
    assert all(r.created for r in results[2:])
    assert [g.retried for g in groups] == [0, 0]
    assert [g.items for g in groups] == [3, 3]
    assert book.balance("maxwell:energy") == 20 and check_ledger(book.engine).ok
