"""Maxwell's revenue accounts are summed when read (ledger.summed): no settlement writes or locks their
row, their balance is still exact, a debit of them is refused, and check_ledger holds them to it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select, text

from maxwell_poi.ledger import ENERGY, SLASHED, Ledger, LedgerError, check_ledger, migrate
from maxwell_poi.ledger.schema import Account


def _cached(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return conn.scalar(select(Account.balance_micro).where(Account.name == name))


def _settle(book: Ledger, lease: str, joules: float, stake: str) -> None:
    book.hold_energy("alice", lease, 5_000)
    book.escrow_stake("alice", lease, 1_000)
    with book.session() as session, session.begin():
        book.settle_lease("alice", lease, (5_000, 1_000), joules, 10, stake, session=session)


def test_revenue_is_credited_without_touching_its_row_and_reads_as_the_sum(book: Ledger) -> None:
    _settle(book, "L1", 123.4, "release")  # 1,234 micro of energy
    _settle(book, "L2", 10.0, "slash")  # 100 of energy, the 1,000 stake slashed
    book.debit_energy("bob", "L3", 7.0, 10)  # the general path, outside any lease settlement
    assert (book.balance(ENERGY), book.balance(SLASHED)) == (1_234 + 100 + 70, 1_000)
    assert book.balances()[ENERGY] == 1_404
    assert (_cached(book.engine, ENERGY), _cached(book.engine, SLASHED)) == (0, 0)  # never written
    assert book.balance("wallet:alice") == 1_000_000 - 1_334 - 1_000
    report = check_ledger(book.engine)
    assert report.ok, report.problems


def test_a_debit_of_revenue_is_refused_and_writes_nothing(book: Ledger) -> None:
    book.debit_energy("alice", "L1", 50.0, 10)
    before = check_ledger(book.engine).transfers
    with pytest.raises(LedgerError, match="only credits to maxwell:energy") as refused:
        book.transfer("refund", "other", {ENERGY: -500, "wallet:alice": 500})
    assert "a leg of -500" in str(refused.value)
    assert check_ledger(book.engine).transfers == before and book.balance(ENERGY) == 500


def test_check_ledger_catches_a_cached_revenue_balance_and_a_debit_written_by_hand(book: Ledger) -> None:
    book.debit_energy("alice", "L1", 50.0, 10)
    with book.engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_micro = 500 WHERE name = 'maxwell:energy'"))
    assert check_ledger(book.engine).problems == [
        "account maxwell:energy: expected no cached balance (0: summed when read), found 500"
    ]
    with book.engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_micro = 0 WHERE name = 'maxwell:energy'"))
        conn.execute(
            text(
                "UPDATE entries SET amount_micro = -amount_micro WHERE account_id IN "
                "(SELECT id FROM accounts WHERE name IN ('maxwell:energy', 'wallet:alice')) "
                "AND transfer_id = (SELECT MAX(id) FROM transfers)"
            )
        )
    problems = check_ledger(book.engine).problems
    assert any("expected only credits to maxwell:energy (summed revenue), found -500" in p for p in problems)


def test_a_database_from_before_keeps_its_revenue_when_migrated(opener: Callable[[], Engine]) -> None:
    engine = opener()
    book = Ledger(engine)
    book.deposit("alice", 10_000, "dep")
    book.debit_energy("alice", "L1", 42.0, 10)
    with engine.begin() as conn:  # as revision 0002 left it: the revenue's balance cached on its row
        conn.execute(text("UPDATE accounts SET balance_micro = 420 WHERE name = 'maxwell:energy'"))
        conn.execute(text("UPDATE alembic_version SET version_num = '0002'"))
    migrate(engine)
    assert _cached(engine, ENERGY) == 0 and Ledger(engine).balance(ENERGY) == 420
    assert check_ledger(engine).ok
