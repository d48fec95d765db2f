"""Ledger postings in a few Core SQL statements: any transfer in a caller's transaction (`post_new`:
a lease's holds at issue, the gateway's payment), and a lease's energy debit with its stake's move at
intake (`settle_lease`).

The general path (`Ledger.hold_energy` and `escrow_stake` at issue; `settle_energy`, then
`release_stake` / `slash_stake` at intake) posts each transfer on its own: it looks up its key,
re-reads the hold's and the stake's legs, locks the accounts, and writes through the ORM — about
twenty statements for one receipt, the hot path's main cost (`bench/results/intake_profile.stacks.txt`),
and a third of a gateway request's issue transaction. The amounts are known (the lease row keeps the
hold and the stake), so here a lease's transfers are written together: one key check, one lock query,
one insert of transfers, one of entries, one executemany of balance increments. Any earlier transfer
under one of the lease's keys (a retried or raced settlement, an expired lease, a rival release or
slash), or an account not open yet (an agent's first lease opens its escrow), returns None, and the
caller takes the general path, which opens accounts, answers replays and refuses rivals exactly as before.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import Session

from .errors import LedgerError
from .posting import EnergySettled, Legs, TransferRequest, normalise_legs
from .schema import SUMMED_ACCOUNTS, Account, Entry, Transfer
from .summed import lock_accounts

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
    names = sorted({escrow, wallet, energy} | ({slashed} if money.stake == "slash" else set()))
    locked = _fresh_and_locked(session, keys, names)
    if locked is None:
        return None
    charge, memo = money.charge_micro, money.memo
    if charge > money.held_micro:  # beyond the hold: from the wallet, as far as it goes
        charge = min(charge, money.held_micro + max(0, locked[wallet].balance_micro))
        memo += f" beyond_hold={charge - money.held_micro}"
        if charge < money.charge_micro:
            memo += f" unpaid={money.charge_micro - charge}"
    legs = {escrow: -money.held_micro, energy: charge, wallet: money.held_micro - charge}
    transfers: list[Posting] = [
        (f"energy:{lease}", "energy_debit", normalise_legs({k: v for k, v in legs.items() if v}), memo)
    ]
    if money.stake and money.staked_micro > 0:
        to = wallet if money.stake == "release" else slashed
        stake_legs = normalise_legs({escrow: -money.staked_micro, to: money.staked_micro})
        transfers.append((f"{money.stake}:{lease}", STAKE_VERBS[money.stake], stake_legs, ""))
    ids = _write(session, locked, lease, transfers)
    return EnergySettled(ids[0], True, charge, memo)


Posting = tuple[str, str, Legs, str]  # (idempotency key, kind, legs, memo)


def post_new(session: Session, request: TransferRequest) -> int | None:
    """One transfer in the caller's write transaction, in Core statements: its id; None (the general
    path, `posting.post_in`, answers) when its key or a rival key was posted, or an account is not
    open as the request would open it."""
    names = [name for name, _ in request.legs]
    locked = _fresh_and_locked(session, [request.key, *request.exclusive_with], names)
    if locked is None:
        return None
    for spec in request.opens:
        if (locked[spec.name].kind, locked[spec.name].allow_negative) != (spec.kind, spec.allow_negative):
            return None
    return _write(
        session, locked, request.lease_id, [(request.key, request.kind, request.legs, request.memo)]
    )[0]


def _fresh_and_locked(session: Session, keys: list[str], names: list[str]) -> dict[str, Any] | None:
    """The accounts `names`, locked in name order; None when an account is missing (the general path
    opens it, or says which is unknown) or a transfer under one of `keys` exists. The keys are looked
    up only once the accounts are locked, as the general path does: a racer with the same key that
    locked them first has committed by then, and is answered as a replay, not a duplicate key."""
    locked = lock_accounts(session, names)  # a summed account read, not locked (ledger.summed)
    if len(locked) != len(set(names)):
        return None
    if session.execute(select(Transfer.id).where(Transfer.idempotency_key.in_(keys)).limit(1)).first():
        return None
    return locked


def _write(
    session: Session, locked: dict[str, Any], lease: str | None, transfers: list[Posting]
) -> list[int]:
    """Refuse an overdraft, then insert the transfers and their entries and move the balances."""
    _check_floors(locked, transfers)
    now = datetime.now(UTC)
    sql = session.connection()  # Core statements: no unit of work, no identity map for these rows
    ids = (
        sql.execute(
            insert(TRANSFERS).returning(TRANSFERS.c.id, sort_by_parameter_order=True),
            [
                {"idempotency_key": key, "kind": kind, "memo": memo, "lease_id": lease, "created_at": now}
                for key, kind, _, memo in transfers
            ],
        )
        .scalars()
        .all()
    )
    entries = [
        {"transfer_id": tid, "account_id": locked[name].id, "amount_micro": amount}
        for tid, (_, _, legs, _) in zip(ids, transfers, strict=True)
        for name, amount in legs
    ]
    sql.execute(insert(ENTRIES), entries)
    moves = [
        {"account": locked[name].id, "delta": delta}
        for name, delta in _net(transfers).items()
        if delta and name not in SUMMED_ACCOUNTS
    ]
    if moves:  # none when every leg is a summed account's
        sql.execute(
            ACCOUNTS.update()
            .where(ACCOUNTS.c.id == bindparam("account"))
            .values(balance_micro=ACCOUNTS.c.balance_micro + bindparam("delta")),
            moves,
        )
    return list(ids)


def _net(transfers: list[Posting]) -> dict[str, int]:
    net: dict[str, int] = defaultdict(int)
    for _, _, legs, _ in transfers:
        for name, amount in legs:
            net[name] += amount
    return dict(sorted(net.items()))


def _check_floors(locked: dict, transfers: list[Posting]) -> None:
    """The same overdraft refusal as a single posting, after all the transfers' legs."""
    for name, delta in _net(transfers).items():
        account = locked[name]
        after = account.balance_micro + delta
        if after < 0 and not account.allow_negative:
            expected = f"{name} to stay ≥ 0 (balance {account.balance_micro}, legs {delta})"
            raise LedgerError(expected, f"{after}")
