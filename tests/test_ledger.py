"""The double-entry ledger, on SQLite and on PostgreSQL: flows, refusals, idempotency, races, tampering."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, func, select, text

from maxwell_poi.ledger import (
    DEPOSITS,
    ENERGY,
    SLASHED,
    Ledger,
    LedgerError,
    check_ledger,
    default_ledger_path,
    ledger_url,
    migrate,
    open_ledger_db,
)
from maxwell_poi.ledger.schema import Base, Transfer


def _counts(engine: Engine) -> tuple[int, int]:
    report = check_ledger(engine)
    return report.transfers, report.entries


def test_stake_energy_release_and_slash_flows(book: Ledger) -> None:
    book.escrow_stake("alice", "L1", 200_000)
    book.debit_energy("alice", "L1", joules=1234.56, micro_per_joule=10)
    book.release_stake("alice", "L1")
    book.escrow_stake("bob", "L2", 300_000)
    book.slash_stake("bob", "L2")
    assert book.balances() == {
        DEPOSITS: -2_000_000,
        ENERGY: 12_346,  # round(1234.56 × 10)
        SLASHED: 300_000,
        "escrow:alice": 0,
        "escrow:bob": 0,
        "wallet:alice": 1_000_000 - 12_346,
        "wallet:bob": 700_000,
    }
    energy = [e for e in book.entries_for("wallet:alice") if e.kind == "energy_debit"]
    assert [(e.amount_micro, e.lease_id, e.memo) for e in energy] == [
        (-12_346, "L1", "joules=1234.56 micro_per_joule=10")
    ]
    report = check_ledger(book.engine)
    assert report.ok, report.problems
    assert report.as_dict()["transfers"] == 7 and report.entries == 14


def test_refusals_explain_themselves_and_write_nothing(book: Ledger) -> None:
    before, balances = _counts(book.engine), book.balances()
    refusals = [
        (lambda: book.transfer("t1", "other", {"wallet:alice": -5, "wallet:bob": 4}), "legs summing to 0"),
        (
            lambda: book.transfer("t2", "other", {"wallet:alice": -2_000_000, "wallet:bob": 2_000_000}),
            "wallet:alice to stay ≥ 0",
        ),
        (lambda: book.transfer("t3", "other", {"wallet:alice": -1, "wallet:nobody": 1}), "unknown account"),
        (lambda: book.transfer("t4", "other", {"wallet:alice": 0, "wallet:bob": 0}), "non-zero amount"),
        (lambda: book.transfer("t5", "other", {"wallet:alice": -0.5, "wallet:bob": 0.5}), "integer micro"),
        (lambda: book.transfer("t6", "other", {}), "at least two legs"),
        (lambda: book.transfer("t7", "bribe", {"wallet:alice": -1, "wallet:bob": 1}), "transfer kind"),
        (lambda: book.escrow_stake("alice", "L9", 5_000_000), "wallet:alice to stay ≥ 0"),
        (lambda: book.release_stake("alice", "never-staked"), "a transfer 'stake:never-staked' into escrow"),
        (lambda: book.open_account("wallet:carol", "wallet", allow_negative=True), "only external"),
    ]
    for attempt, reason in refusals:
        with pytest.raises(LedgerError, match="^ledger: expected .*, got ") as caught:
            attempt()
        assert reason in str(caught.value)
    assert _counts(book.engine) == before
    assert book.balances() == balances


def test_energy_hold_settles_the_measured_charge_and_returns_the_rest(book: Ledger) -> None:
    book.hold_energy("alice", "L1", 50_000)
    book.hold_energy("bob", "L2", 1_000)
    with book.session() as session, session.begin():  # in the caller's transaction
        first = book.settle_energy("alice", "L1", joules=1234.5, micro_per_joule=10, session=session)
    again = book.settle_energy("alice", "L1", joules=1234.5, micro_per_joule=10)
    beyond = book.settle_energy("bob", "L2", joules=500.0, micro_per_joule=10)  # 5,000 > the 1,000 held
    assert first.created and not again.created and again.transfer_id == first.transfer_id
    balances = book.balances()
    assert balances["wallet:alice"] == 1_000_000 - 12_345 and balances["escrow:alice"] == 0
    # the energy Maxwell measured is paid in full: the hold, then the wallet (issue 23: hidden work)
    assert balances["wallet:bob"] == 1_000_000 - 5_000 and balances["escrow:bob"] == 0
    assert balances[ENERGY] == 12_345 + 5_000
    assert beyond.charge_micro == 5_000 and "beyond_hold=4000" in book.entries_for(ENERGY)[-1].memo
    assert beyond.created and check_ledger(book.engine).ok
    # asked again (a retried intake): the first charge, nothing moved twice
    repeat = book.settle_energy("bob", "L2", joules=900.0, micro_per_joule=10)
    assert (repeat.created, repeat.charge_micro, repeat.transfer_id) == (False, 5_000, beyond.transfer_id)


def test_energy_beyond_the_hold_takes_what_the_wallet_has_and_names_the_rest_unpaid(book: Ledger) -> None:
    book.deposit("carol", 3_000, "carol-1")
    book.hold_energy("carol", "L9", 1_000)  # wallet 2,000 left
    settled = book.settle_energy("carol", "L9", joules=1_000.0, micro_per_joule=10)  # 10,000 measured
    assert settled.charge_micro == 3_000 and "unpaid=7000" in settled.memo
    balances = book.balances()
    assert (balances["wallet:carol"], balances["escrow:carol"]) == (0, 0)
    assert check_ledger(book.engine).ok


def test_a_rolled_back_caller_transaction_moves_no_money(book: Ledger) -> None:
    before = book.balances()
    with pytest.raises(RuntimeError), book.session() as session, session.begin():
        book.escrow_stake("alice", "L1", 10_000, session=session)
        raise RuntimeError("the caller's own write failed after the stake was posted")
    assert book.balances() == before
    assert not [e for e in book.entries_for("wallet:alice") if e.kind == "stake_escrow"]


def test_same_key_posts_once_and_different_legs_are_refused(book: Ledger) -> None:
    legs = {"wallet:alice": -10, "wallet:bob": 10}
    first = book.transfer("pay:1", "other", legs)
    again = book.transfer("pay:1", "other", dict(reversed(legs.items())))
    assert first.created and not again.created and again.transfer_id == first.transfer_id
    with pytest.raises(LedgerError, match="reused with its original"):
        book.transfer("pay:1", "other", {"wallet:alice": -11, "wallet:bob": 11})
    assert book.balance("wallet:bob") == 1_000_010
    assert book.deposit("alice", 1_000_000, "dep:alice").created is False


def test_release_and_slash_of_one_lease_exclude_each_other(book: Ledger) -> None:
    book.escrow_stake("alice", "L1", 100)
    book.slash_stake("alice", "L1")
    with pytest.raises(LedgerError, match="'slash:L1'"):
        book.release_stake("alice", "L1")
    book.escrow_stake("bob", "L2", 100)
    book.release_stake("bob", "L2")
    assert book.release_stake("bob", "L2").created is False  # a retry, not a second release
    with pytest.raises(LedgerError, match="'release:L2'"):
        book.slash_stake("bob", "L2")
    assert book.balance(SLASHED) == 100 and book.balance("wallet:bob") == 1_000_000


def _in_threads(n: int, work: Callable[[int], object]) -> list[object]:
    barrier, results, errors = threading.Barrier(n), [None] * n, []

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # collected and re-raised in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return results


def test_concurrent_transfers_lose_no_update(book: Ledger) -> None:
    def work(i: int) -> None:
        for j in range(25):
            payer, payee = ("alice", "bob") if (i + j) % 2 else ("bob", "alice")
            book.transfer(f"t{i}-{j}", "other", {f"wallet:{payer}": -(j + 1), f"wallet:{payee}": j + 1})

    _in_threads(8, work)
    assert book.balance("wallet:alice") + book.balance("wallet:bob") == 2_000_000
    report = check_ledger(book.engine)
    assert report.ok, report.problems
    assert report.transfers == 2 + 8 * 25


def test_concurrent_overdrafts_are_refused_by_the_locked_balance(book: Ledger) -> None:
    def work(i: int) -> str:
        try:
            book.transfer(f"w{i}", "other", {"wallet:alice": -300_000, "wallet:bob": 300_000})
            return "paid"
        except LedgerError as exc:
            return "overdraft" if "wallet:alice to stay ≥ 0" in str(exc) else str(exc)

    outcomes = _in_threads(8, work)
    assert sorted(outcomes) == ["overdraft"] * 5 + ["paid"] * 3
    assert book.balance("wallet:alice") == 100_000 and check_ledger(book.engine).ok


def test_racing_on_one_key_makes_exactly_one_transfer(book: Ledger) -> None:
    legs = {"wallet:alice": -1_000_000, "wallet:bob": 1_000_000}  # all of alice's money: twice would fail
    results = _in_threads(8, lambda _: book.transfer("same-key", "other", legs))
    assert sorted(r.created for r in results) == [False] * 7 + [True]
    assert len({r.transfer_id for r in results}) == 1
    with book.engine.connect() as conn:
        assert conn.scalar(select(func.count()).where(Transfer.idempotency_key == "same-key")) == 1
    assert book.balance("wallet:alice") == 0 and check_ledger(book.engine).ok


def test_racing_first_deposits_open_the_wallet_once(book: Ledger) -> None:
    results = _in_threads(8, lambda i: book.deposit("carol", 10, f"dep:carol:{i}"))
    assert all(r.created for r in results)
    assert book.balance("wallet:carol") == 80 and check_ledger(book.engine).ok


def test_racing_release_and_slash_let_exactly_one_win(book: Ledger) -> None:
    book.escrow_stake("alice", "L1", 500)

    def work(i: int) -> str:
        try:
            (book.release_stake if i % 2 else book.slash_stake)("alice", "L1")
            return "release" if i % 2 else "slash"
        except LedgerError:
            return "refused"

    outcomes = _in_threads(8, work)
    winner = "release" if "release" in outcomes else "slash"
    assert sorted(set(outcomes)) == sorted({winner, "refused"}) and outcomes.count("refused") == 4
    assert book.balance("escrow:alice") == 0
    assert book.balance(SLASHED) == (500 if winner == "slash" else 0)
    assert check_ledger(book.engine).ok


def test_check_ledger_catches_a_tampered_balance_and_entry(book: Ledger) -> None:
    with book.engine.begin() as conn:
        conn.execute(text("UPDATE accounts SET balance_micro = 999 WHERE name = 'wallet:bob'"))
    report = check_ledger(book.engine)
    assert not report.ok
    assert report.problems == [
        "account wallet:bob: expected cached balance 1000000 (sum of its entries), found 999"
    ]
    with book.engine.begin() as conn:
        conn.execute(text("UPDATE entries SET amount_micro = 5 WHERE id = (SELECT MIN(id) FROM entries)"))
    problems = check_ledger(book.engine).problems
    assert any("transfer #1 'dep:alice': expected entries summing to 0, found 1000005" in p for p in problems)


def test_default_database_lives_under_poi_home(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    assert default_ledger_path() == tmp_path / "home" / "ledger.sqlite"
    assert ledger_url() == f"sqlite:///{tmp_path / 'home' / 'ledger.sqlite'}"
    assert ledger_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with pytest.raises(LedgerError, match="database URL"):
        open_ledger_db("mysql://u@h/db")
    engine = open_ledger_db()
    assert Ledger(engine).balances() == {DEPOSITS: 0, ENERGY: 0, SLASHED: 0}
    engine.dispose()
    assert (tmp_path / "home" / "ledger.sqlite").is_file()


def test_migrating_again_is_a_no_op_and_matches_the_models(opener: Callable[[], Engine]) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    first = opener()
    Ledger(first).deposit("alice", 42, "dep")
    migrate(first)
    second = opener()  # a second open_ledger_db on the same database migrates once more
    assert Ledger(second).balance("wallet:alice") == 42
    with second.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == ["0003"]
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    assert check_ledger(second).ok
