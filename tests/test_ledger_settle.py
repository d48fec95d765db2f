"""ledger.settle: intake's few-statement settlement posts exactly what the general path posts
(`settle_energy`, then `release_stake` / `slash_stake`), on SQLite and on PostgreSQL, and hands
anything it has seen before back to the general path."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from maxwell_poi.ledger import Ledger, LedgerError, check_ledger
from maxwell_poi.ledger.posting import legs_of
from maxwell_poi.ledger.schema import Transfer

HOLD, STAKE = 50_000, 20_000


def _issue(book: Ledger, agent: str, lease: str, stake: int = STAKE) -> None:
    book.hold_energy(agent, lease, HOLD)
    if stake:
        book.escrow_stake(agent, lease, stake)


def _general(book: Ledger, agent: str, lease: str, joules: float, stake: str) -> int:
    settled = book.settle_energy(agent, lease, joules, 10)
    {"release": book.release_stake, "slash": book.slash_stake}.get(stake, lambda *_: None)(agent, lease)
    return settled.charge_micro


def _fast(book: Ledger, agent: str, lease: str, joules: float, stake: str, staked: int = STAKE) -> int:
    with book.session() as session, session.begin():
        settled = book.settle_lease(agent, lease, (HOLD, staked), joules, 10, stake, session=session)
    return settled.charge_micro


def _written(book: Ledger, lease: str) -> dict[str, tuple[str, tuple, str]]:
    """Every transfer of the lease after its issue: key -> (kind, legs, memo)."""
    with Session(book.engine) as session:
        rows = session.scalars(select(Transfer).where(Transfer.lease_id == lease)).all()
        return {
            t.idempotency_key.split(":")[0]: (t.kind, legs_of(session, t.id), t.memo)
            for t in rows
            if not t.idempotency_key.startswith(("hold:", "stake:"))
        }


CASES = [  # (stake move, joules): within the hold, beyond it, nothing measured
    ("release", 1234.5),
    ("slash", 1234.5),
    ("", 1234.5),
    ("release", 9_000.0),
    ("slash", 0.0),
]


@pytest.mark.parametrize(("stake", "joules"), CASES)
def test_the_fast_path_writes_what_the_general_path_writes(book: Ledger, stake: str, joules: float) -> None:
    book.deposit("carol", 1_000_000, "dep:carol")
    _issue(book, "alice", "A")
    _issue(book, "carol", "C")
    general = _general(book, "alice", "A", joules, stake)
    fast = _fast(book, "carol", "C", joules, stake)
    assert fast == general
    rename = {"wallet:alice": "wallet:carol", "escrow:alice": "escrow:carol"}
    expected = {
        key: (kind, tuple(sorted((rename.get(n, n), a) for n, a in legs)), memo)
        for key, (kind, legs, memo) in _written(book, "A").items()
    }
    assert _written(book, "C") == expected
    balances = book.balances()
    assert (balances["wallet:carol"], balances["escrow:carol"]) == (
        balances["wallet:alice"],
        balances["escrow:alice"],
    )
    report = check_ledger(book.engine)
    assert report.ok, report.problems


def test_a_wallet_short_of_the_charge_pays_what_it_has_and_the_rest_is_named_unpaid(book: Ledger) -> None:
    book.deposit("dave", HOLD + STAKE + 3_000, "dep:dave")
    _issue(book, "dave", "D")  # 3,000 left in the wallet
    charge = _fast(book, "dave", "D", 10_000.0, "release")  # 100,000 measured
    assert charge == HOLD + 3_000
    memo = _written(book, "D")["energy"][2]
    assert "beyond_hold=3000" in memo and f"unpaid={100_000 - HOLD - 3_000}" in memo
    assert book.balance("wallet:dave") == STAKE  # only the released stake is left
    assert check_ledger(book.engine).ok


def test_a_lease_settled_before_gets_its_first_answer_and_nothing_moves_twice(book: Ledger) -> None:
    _issue(book, "alice", "A")
    first = _fast(book, "alice", "A", 1234.5, "release")
    before = book.balances()
    again = _fast(book, "alice", "A", 99.0, "release")  # the general path answers the replay
    assert again == first and book.balances() == before


def test_a_rival_stake_move_is_refused_and_the_whole_settlement_rolls_back(book: Ledger) -> None:
    _issue(book, "alice", "A")
    book.slash_stake("alice", "A")  # e.g. a failed exact challenge got there first
    before, count = book.balances(), check_ledger(book.engine).transfers
    with pytest.raises(LedgerError, match="exclude each other"):
        _fast(book, "alice", "A", 1234.5, "release")
    assert book.balances() == before and check_ledger(book.engine).transfers == count


def test_unknown_stake_moves_and_agents_are_refused(book: Ledger) -> None:
    _issue(book, "alice", "A")
    with pytest.raises(LedgerError, match="a stake move in"):
        _fast(book, "alice", "A", 1.0, "keep")
    with pytest.raises(LedgerError, match="an agent id without"):
        _fast(book, "a:b", "A", 1.0, "release")


def test_no_stake_escrowed_moves_only_the_energy(opener: Callable[[], Engine]) -> None:
    ledger = Ledger(opener())
    ledger.deposit("erin", 100_000, "dep:erin")
    _issue(ledger, "erin", "E", stake=0)
    _fast(ledger, "erin", "E", 100.0, "release", staked=0)
    assert set(_written(ledger, "E")) == {"energy"}
    assert ledger.balance("wallet:erin") == 100_000 - 1_000 and check_ledger(ledger.engine).ok


def _holds(book: Ledger, lease: str) -> dict[str, tuple[str, tuple]]:
    """The lease's issue transfers: key prefix -> (kind, legs)."""
    with Session(book.engine) as session:
        rows = session.scalars(select(Transfer).where(Transfer.lease_id == lease)).all()
        return {t.idempotency_key.split(":")[0]: (t.kind, legs_of(session, t.id)) for t in rows}


def _hold(book: Ledger, agent: str, lease: str, stake: int = STAKE) -> None:
    with book.session() as session, session.begin():
        book.hold_lease(agent, lease, HOLD, stake, session=session)


@pytest.mark.parametrize("stake", [STAKE, 0])
def test_the_fast_hold_writes_what_the_general_path_writes(book: Ledger, stake: int) -> None:
    book.deposit("carol", 1_000_000, "dep:carol")
    _hold(book, "carol", "C0")  # an agent's first lease: its escrow is opened by the general path
    _issue(book, "alice", "A", stake=stake)
    _hold(book, "carol", "C", stake=stake)
    rename = {"wallet:alice": "wallet:carol", "escrow:alice": "escrow:carol"}
    expected = {
        key: (kind, tuple(sorted((rename.get(n, n), a) for n, a in legs)))
        for key, (kind, legs) in _holds(book, "A").items()
    }
    assert _holds(book, "C") == expected and set(expected) == ({"hold", "stake"} if stake else {"hold"})
    assert book.balance("escrow:carol") == 2 * HOLD + STAKE + stake
    assert check_ledger(book.engine).ok


def test_a_hold_the_wallet_cannot_cover_is_refused_and_writes_nothing(book: Ledger) -> None:
    book.deposit("dave", 2 * HOLD + STAKE - 1, "dep:dave")
    _hold(book, "dave", "D0", stake=0)  # opens the escrow; HOLD + STAKE - 1 left
    before, count = book.balances(), check_ledger(book.engine).transfers
    with pytest.raises(LedgerError, match="wallet:dave to stay ≥ 0"):
        _hold(book, "dave", "D")
    assert book.balances() == before and check_ledger(book.engine).transfers == count


def test_a_hold_posted_before_is_answered_by_the_general_path_and_moves_nothing_twice(book: Ledger) -> None:
    _hold(book, "alice", "A0")
    _hold(book, "alice", "A")
    before = book.balances()
    _hold(book, "alice", "A")  # the same lease again: the replay is accepted, nothing moves
    assert book.balances() == before
    with pytest.raises(LedgerError, match="reused"):
        _hold(book, "alice", "A", stake=STAKE + 1)  # the same key asking for another amount
    assert book.balances() == before and check_ledger(book.engine).ok


def test_a_transfer_in_a_callers_transaction_posts_once_and_refuses_as_the_general_path(book: Ledger) -> None:
    def move(key: str, legs: dict[str, int]) -> int:
        with book.session() as session, session.begin():
            return book.transfer(key, "deposit", legs, session=session).transfer_id

    legs = {"wallet:alice": -700, "maxwell:energy": 700}
    first = move("t1", legs)
    before = book.balances()
    assert move("t1", legs) == first and book.balances() == before  # a replay moves nothing
    with pytest.raises(LedgerError, match="reused"):
        move("t1", {"wallet:alice": -1, "maxwell:energy": 1})
    with pytest.raises(LedgerError, match="unknown account"):
        move("t2", {"wallet:nobody": -1, "maxwell:energy": 1})
    with pytest.raises(LedgerError, match="to stay ≥ 0"):
        move("t3", {"wallet:alice": -(10**9), "maxwell:energy": 10**9})
    assert book.balances() == before and check_ledger(book.engine).ok
