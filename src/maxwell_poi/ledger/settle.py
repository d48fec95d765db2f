"""A lease's money at intake, in a few Core SQL statements: the energy debit and the stake's move.

The general path (`Ledger.settle_energy`, then `release_stake` / `slash_stake`) posts each transfer
on its own: it looks up its key, re-reads the hold's and the stake's legs, locks the accounts, and
writes through the ORM — about twenty statements for one receipt, the hot path's main cost
(`bench/results/intake_profile.stacks.txt`). Intake knows both amounts already (the lease row keeps
the hold and the stake that issuing it escrowed), so here the two transfers are written together:
one key check, one lock query, one insert of transfers, one of entries, one executemany of balance
increments. Any earlier transfer under one of the lease's keys (a retried or raced settlement, an
expired lease, a rival release or slash) returns None, and the caller takes the general path, which
answers replays and refuses rivals exactly as before.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from .errors import LedgerError
from .posting import EnergySettled, Legs, normalise_legs
from .schema import Account, Entry, Transfer

ACCOUNTS, TRANSFERS, ENTRIES = Account.__table__, Transfer.__table__, Entry.__table__
STAKE_VERBS = {"release": "stake_release", "slash": "stake_slash"}


@dataclass(frozen=True)
class LeaseMoney:
    """What intake settles for one lease: the measured energy and what the verdict does to the stake."""

    agent: str
    lease_id: str
    held_micro: int  # the energy hold escrowed when the lease was issued (its row's hold_micro)
    staked_micro: int  # the stake escrowed with it (0: none)
    charge_micro: int  # round(joules × price), from `book.energy_charge`
    memo: str  # the measurement the charge came from
    stake: str = ""  # "release", "slash", or "" (the stake stays escrowed: pending or held)


def settle_lease(session: Session, money: LeaseMoney, energy: str, slashed: str) -> EnergySettled | None:
    """Post the lease's energy debit (and its stake's release or slash) in the caller's write
    transaction; None when a transfer under one of the lease's keys exists already."""
    lease = money.lease_id
    escrow, wallet = f"escrow:{money.agent}", f"wallet:{money.agent}"
    keys = [f"energy:{lease}", *(f"{verb}:{lease}" for verb in STAKE_VERBS)]
    if session.execute(select(Transfer.id).where(Transfer.idempotency_key.in_(keys)).limit(1)).first():
        return None
    names = sorted({escrow, wallet, energy} | ({slashed} if money.stake == "slash" else set()))
    locked = {
        row.name: row
        for row in session.execute(
            select(Account.id, Account.name, Account.balance_micro, Account.allow_negative)
            .where(Account.name.in_(names))
            .order_by(Account.name)
            .with_for_update()
        )
    }
    missing = sorted(set(names) - set(locked))
    if missing:
        raise LedgerError("every leg on an open account", f"unknown account(s) {', '.join(missing)}")
    charge, memo = money.charge_micro, money.memo
    if charge > money.held_micro:  # beyond the hold: from the wallet, as far as it goes
        charge = min(charge, money.held_micro + max(0, locked[wallet].balance_micro))
        memo += f" beyond_hold={charge - money.held_micro}"
        if charge < money.charge_micro:
            memo += f" unpaid={money.charge_micro - charge}"
    legs = {escrow: -money.held_micro, energy: charge, wallet: money.held_micro - charge}
    transfers: list[tuple[str, str, Legs, str]] = [
        (f"energy:{lease}", "energy_debit", normalise_legs({k: v for k, v in legs.items() if v}), memo)
    ]
    if money.stake and money.staked_micro > 0:
        to = wallet if money.stake == "release" else slashed
        stake_legs = normalise_legs({escrow: -money.staked_micro, to: money.staked_micro})
        transfers.append((f"{money.stake}:{lease}", STAKE_VERBS[money.stake], stake_legs, ""))
    _check_floors(locked, transfers)
    now = datetime.now(UTC)
    sql = session.connection()  # Core statements: no unit of work, no identity map for these rows
    ids = (
        sql.execute(
            insert(TRANSFERS).returning(TRANSFERS.c.id, sort_by_parameter_order=True),
            [
                {"idempotency_key": key, "kind": kind, "memo": memo_, "lease_id": lease, "created_at": now}
                for key, kind, _, memo_ in transfers
            ],
        )
        .scalars()
        .all()
    )
    entries = [
        {"transfer_id": tid, "account_id": locked[name].id, "amount_micro": amount}
        for tid, (_, _, legs_, _) in zip(ids, transfers, strict=True)
        for name, amount in legs_
    ]
    sql.execute(insert(ENTRIES), entries)
    sql.execute(
        ACCOUNTS.update()
        .where(ACCOUNTS.c.id == bindparam("account"))
        .values(balance_micro=ACCOUNTS.c.balance_micro + bindparam("delta")),
        [{"account": locked[name].id, "delta": delta} for name, delta in _net(transfers).items() if delta],
    )
    return EnergySettled(ids[0], True, charge, memo)


def _net(transfers: list[tuple[str, str, Legs, str]]) -> dict[str, int]:
    net: dict[str, int] = defaultdict(int)
    for _, _, legs, _ in transfers:
        for name, amount in legs:
            net[name] += amount
    return dict(sorted(net.items()))


def _check_floors(locked: dict, transfers: list[tuple[str, str, Legs, str]]) -> None:
    """The same overdraft refusal as a single posting, after both transfers' legs."""
    for name, delta in _net(transfers).items():
        account = locked[name]
        after = account.balance_micro + delta
        if after < 0 and not account.allow_negative:
            expected = f"{name} to stay ≥ 0 (balance {account.balance_micro}, legs {delta})"
            raise LedgerError(expected, f"{after}")
