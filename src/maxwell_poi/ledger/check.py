"""Prove the book from its entries: balanced transfers, honest cached balances, no forbidden overdraft."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from sqlalchemy import Connection, Engine, func, or_, select

from .db import reader
from .schema import SUMMED_ACCOUNTS, Account, Entry, Transfer


@dataclass(frozen=True)
class LedgerCheck:
    ok: bool
    problems: list[str] = field(default_factory=list)
    accounts: int = 0
    transfers: int = 0
    entries: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_ledger(engine: Engine) -> LedgerCheck:
    """Re-derive everything from the entries, in one snapshot, and list each disagreement."""
    with reader(engine).connect() as conn, conn.begin():
        problems = [
            *_unbalanced_transfers(conn),
            *_dishonest_balances(conn),
            *_zero_entries(conn),
            *_debited_revenue(conn),
        ]
        counts = [conn.scalar(select(func.count()).select_from(t)) or 0 for t in (Account, Transfer, Entry)]
    return LedgerCheck(not problems, problems, *counts)


def _unbalanced_transfers(conn: Connection) -> list[str]:
    count, total = func.count(Entry.id), func.coalesce(func.sum(Entry.amount_micro), 0)
    rows = conn.execute(
        select(Transfer.id, Transfer.idempotency_key, count, total)
        .outerjoin(Entry, Entry.transfer_id == Transfer.id)
        .group_by(Transfer.id, Transfer.idempotency_key)
        .having(or_(count < 2, total != 0))
        .order_by(Transfer.id)
    )
    problems = []
    for transfer_id, key, n, s in rows:
        if n < 2:
            problems.append(f"transfer #{transfer_id} {key!r}: expected ≥ 2 entries, found {n}")
        if s != 0:
            problems.append(f"transfer #{transfer_id} {key!r}: expected entries summing to 0, found {s}")
    return problems


def _dishonest_balances(conn: Connection) -> list[str]:
    derived = func.coalesce(func.sum(Entry.amount_micro), 0)
    rows = conn.execute(
        select(Account.name, Account.allow_negative, Account.balance_micro, derived)
        .outerjoin(Entry, Entry.account_id == Account.id)
        .group_by(Account.id, Account.name, Account.allow_negative, Account.balance_micro)
        .order_by(Account.name)
    )
    problems = []
    for name, allow_negative, cached, summed in rows:
        if name in SUMMED_ACCOUNTS:  # no cache: its balance is the sum, read when asked (ledger.summed)
            if cached != 0:
                expected = "no cached balance (0: summed when read)"
                problems.append(f"account {name}: expected {expected}, found {cached}")
        elif cached != summed:
            problems.append(
                f"account {name}: expected cached balance {summed} (sum of its entries), found {cached}"
            )
        if not allow_negative and min(cached, summed) < 0:
            problems.append(
                f"account {name}: expected a balance ≥ 0 (non-negative account), "
                f"found cached {cached}, entries {summed}"
            )
    return problems


def _zero_entries(conn: Connection) -> list[str]:
    rows = conn.execute(select(Entry.id, Entry.transfer_id).where(Entry.amount_micro == 0).order_by(Entry.id))
    return [f"entry #{e} of transfer #{t}: expected a non-zero amount, found 0" for e, t in rows]


def _debited_revenue(conn: Connection) -> list[str]:
    rows = conn.execute(
        select(Account.name, Entry.id, Entry.transfer_id, Entry.amount_micro)
        .join(Entry, Entry.account_id == Account.id)
        .where(Account.name.in_(SUMMED_ACCOUNTS), Entry.amount_micro < 0)
        .order_by(Entry.id)
    )
    return [
        f"entry #{e} of transfer #{t}: expected only credits to {name} (summed revenue), found {amount}"
        for name, e, t, amount in rows
    ]
