"""Post one balanced transfer: validate the legs, lock the accounts, write entries and balances at once.

Idempotency: the key is looked up only after the legs' accounts are locked, so a racer with the
same key that locked them first has committed and is seen. The database's UNIQUE key is the
backstop for every other interleaving: of two inserts with one key only one can commit; the other
gets an IntegrityError, rolls back, and answers with the transfer that won (or refuses, if its legs
differ). Either way a key moves money at most once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .db import writer
from .errors import LedgerError
from .schema import KEY_LENGTH, SUMMED_ACCOUNTS, TRANSFER_KINDS, Account, Entry, Transfer
from .summed import lock_accounts, refuse_debits

Legs = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class TransferResult:
    transfer_id: int
    created: bool  # False: this key was posted before, with the same legs; nothing moved now


@dataclass(frozen=True)
class EnergySettled(TransferResult):
    """A lease's energy settled: what was charged (computed here, once, from joules × price: the
    hold first, then the wallet) and the memo that keeps the measurement."""

    charge_micro: int = 0
    memo: str = ""


@dataclass(frozen=True)
class AccountSpec:
    name: str
    kind: str
    allow_negative: bool = False


@dataclass(frozen=True)
class TransferRequest:
    key: str
    kind: str
    legs: Legs  # sorted by account name
    memo: str = ""
    lease_id: str | None = None
    exclusive_with: tuple[str, ...] = ()  # keys whose transfer forbids this one (release vs slash)
    opens: tuple[AccountSpec, ...] = ()  # accounts created in the same transaction, if missing


def normalise_legs(legs: Mapping[str, int]) -> Legs:
    """Refuse anything but ≥ 2 non-zero integer amounts that sum to exactly zero."""
    for name, amount in legs.items():
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise LedgerError(f"integer micro-units for {name!r}", f"{type(amount).__name__} {amount!r}")
        if amount == 0:
            raise LedgerError(f"a non-zero amount for {name!r}", "0")
    if len(legs) < 2:
        raise LedgerError("at least two legs", f"{len(legs)}: {dict(legs)}")
    total = sum(legs.values())
    if total != 0:
        raise LedgerError("legs summing to 0", f"sum {total} from {dict(sorted(legs.items()))}")
    refuse_debits(legs.items())
    return tuple(sorted(legs.items()))


def make_request(
    key: str, kind: str, legs: Mapping[str, int], memo: str = "", lease_id: str | None = None
) -> TransferRequest:
    if not key or len(key) > KEY_LENGTH:
        raise LedgerError(f"an idempotency key of 1..{KEY_LENGTH} characters", repr(key))
    if kind not in TRANSFER_KINDS:
        raise LedgerError(f"a transfer kind in {TRANSFER_KINDS}", repr(kind))
    return TransferRequest(key, kind, normalise_legs(legs), memo, lease_id)


def post(engine: Engine, request: TransferRequest) -> TransferResult:
    """Write `request` in one transaction, or answer with the earlier transfer of the same key."""
    try:
        with Session(writer(engine), expire_on_commit=False) as session, session.begin():
            return _post_locked(session, request)
    except IntegrityError as exc:  # lost the race for the key: the winner has committed by now
        with Session(engine) as session:
            existing = find_transfer(session, request.key)
            if existing is None:
                raise LedgerError("a transfer the database accepts", f"{exc.orig}") from exc
            return _replay(session, existing, request)


def post_in(session: Session, request: TransferRequest) -> TransferResult:
    """Write `request` inside the caller's write transaction (`Ledger.session()`), so that money
    moves commit or roll back together with the caller's own rows. A duplicate key raced in by
    another transaction surfaces as IntegrityError and rolls the caller's transaction back."""
    return _post_locked(session, request)


def find_transfer(session: Session, key: str) -> Transfer | None:
    return session.scalar(select(Transfer).where(Transfer.idempotency_key == key))


def legs_of(session: Session, transfer_id: int) -> Legs:
    rows = session.execute(
        select(Account.name, Entry.amount_micro)
        .join(Entry, Entry.account_id == Account.id)
        .where(Entry.transfer_id == transfer_id)
        .order_by(Account.name)
    )
    return tuple((name, amount) for name, amount in rows)


def ensure_account(session: Session, spec: AccountSpec) -> Account:
    """Create the account unless it exists (no error when a racer creates it too); refuse a different one."""
    values = {"name": spec.name, "kind": spec.kind, "allow_negative": spec.allow_negative, "balance_micro": 0}
    dialect_insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
    session.execute(dialect_insert(Account).values(values).on_conflict_do_nothing(index_elements=["name"]))
    account = session.scalars(select(Account).where(Account.name == spec.name)).one()
    if (account.kind, account.allow_negative) != (spec.kind, spec.allow_negative):
        raise LedgerError(
            f"{spec.name} as {spec.kind}, allow_negative={spec.allow_negative}",
            f"{account.kind}, allow_negative={account.allow_negative}",
        )
    return account


def _post_locked(session: Session, request: TransferRequest) -> TransferResult:
    for spec in request.opens:  # rolled back with the transfer if it is refused
        ensure_account(session, spec)
    accounts = _lock_accounts(session, [name for name, _ in request.legs])
    # Looked up only now: a racer with the same key that locked these accounts first has committed.
    existing = find_transfer(session, request.key)
    if existing is not None:
        return _replay(session, existing, request)
    _refuse_exclusive(session, request)
    for name, amount in request.legs:
        account = accounts[name]
        after = account.balance_micro + amount
        if after < 0 and not account.allow_negative:  # a summed account takes credits only
            raise LedgerError(
                f"{name} to stay ≥ 0 (balance {account.balance_micro}, leg {amount})", f"{after}"
            )
    transfer = Transfer(
        idempotency_key=request.key,
        kind=request.kind,
        memo=request.memo,
        lease_id=request.lease_id,
        created_at=datetime.now(UTC),
    )
    session.add(transfer)
    session.flush()  # the UNIQUE key is enforced here: a racer's duplicate fails before any entry
    session.add_all(
        Entry(transfer_id=transfer.id, account_id=accounts[name].id, amount_micro=amount)
        for name, amount in request.legs
    )
    for name, amount in request.legs:
        if name not in SUMMED_ACCOUNTS:  # a summed account's row is never written (ledger.summed)
            session.execute(
                update(Account)
                .where(Account.id == accounts[name].id)
                .values(balance_micro=Account.balance_micro + amount)
            )
    return TransferResult(transfer.id, created=True)


def _lock_accounts(session: Session, names: list[str]) -> dict[str, Any]:
    """The legs' accounts, locked in name order (ledger.summed); refuses an account not open."""
    accounts = lock_accounts(session, names)
    missing = sorted(set(names) - set(accounts))
    if missing:
        raise LedgerError("every leg on an open account", f"unknown account(s) {', '.join(missing)}")
    return accounts


def _refuse_exclusive(session: Session, request: TransferRequest) -> None:
    for key in request.exclusive_with:
        other = find_transfer(session, key)
        if other is not None:
            raise LedgerError(
                f"no {key!r} before {request.key!r} (they exclude each other)",
                f"transfer #{other.id} {key!r} ({other.kind}) already posted",
            )


def _replay(session: Session, existing: Transfer, request: TransferRequest) -> TransferResult:
    """The same key again: fine if it asks for exactly what was written, a refusal otherwise."""
    written = legs_of(session, existing.id)
    if existing.kind != request.kind or written != request.legs:
        raise LedgerError(
            f"key {request.key!r} reused with its original {existing.kind} legs {dict(written)}",
            f"{request.kind} legs {dict(request.legs)}",
        )
    return TransferResult(existing.id, created=False)
