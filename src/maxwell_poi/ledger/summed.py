"""Accounts whose balance is summed from their entries when read (`schema.SUMMED_ACCOUNTS`: Maxwell's
energy and slashed-stake revenue), so that no settlement locks or updates a row all settlements share.

They take credits only: a debit would need their balance to check the floor, which is not cached, and
Maxwell's revenue never pays anything out through the ledger. A posting reads their ids without a
lock, in the statement that locks its other accounts (`lock_accounts`), writes their entries, and
leaves their row alone; every reader
of a balance goes through `current_balances`. The cost moves to reading: one indexed SUM over the
account's entries (`entries.account_id` is indexed), paid by the dashboard and the CLI, not by intake.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, union_all
from sqlalchemy.orm import Session

from .errors import LedgerError
from .schema import SUMMED_ACCOUNTS, Account, Entry


def refuse_debits(legs: Iterable[tuple[str, int]]) -> None:
    for name, amount in legs:
        if name in SUMMED_ACCOUNTS and amount < 0:
            raise LedgerError(
                f"only credits to {name} (Maxwell's revenue: credited, never debited, summed when read)",
                f"a leg of {amount}",
            )


def lock_accounts(session: Session, names: Iterable[str]) -> dict[str, Any]:
    """{name: row (id, name, kind, balance_micro, allow_negative)} of the open accounts among `names`,
    in one statement: locked in name order (so two transactions never wait on each other in a
    cycle), except summed accounts, which are read without a lock (their row is never written)."""
    unique = sorted(set(names))
    to_lock = [n for n in unique if n not in SUMMED_ACCOUNTS]
    summed = [n for n in unique if n in SUMMED_ACCOUNTS]
    columns = (Account.id, Account.name, Account.kind, Account.balance_micro, Account.allow_negative)
    locked = select(*columns).where(Account.name.in_(to_lock)).order_by(Account.name).with_for_update()
    read = select(*columns).where(Account.name.in_(summed))
    if not summed:
        query = locked
    elif not to_lock:
        query = read
    else:  # PostgreSQL locks every row a FOR UPDATE select returns: the locked ones in a CTE of their own
        query = union_all(select(locked.cte("locked")), read)
    return {row.name: row for row in session.execute(query)}


def current_balances(session: Session, accounts: Iterable[Any]) -> dict[str, int]:
    """{name: balance} for account rows with `id`, `name` and `balance_micro`: the cached balance, or
    for a summed account the sum of its entries."""
    rows = list(accounts)
    summed_ids = [row.id for row in rows if row.name in SUMMED_ACCOUNTS]
    sums: dict[int, int] = {}
    if summed_ids:
        query = (
            select(Entry.account_id, func.coalesce(func.sum(Entry.amount_micro), 0))
            .where(Entry.account_id.in_(summed_ids))
            .group_by(Entry.account_id)
        )
        sums = {account_id: int(total) for account_id, total in session.execute(query)}
    return {
        row.name: (sums.get(row.id, 0) if row.name in SUMMED_ACCOUNTS else row.balance_micro) for row in rows
    }
