"""The ledger's front: open accounts, post transfers, and the stake/energy operations built on them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from .db import writer
from .errors import LedgerError
from .posting import (
    AccountSpec,
    EnergySettled,
    TransferRequest,
    TransferResult,
    ensure_account,
    find_transfer,
    legs_of,
    make_request,
    post,
    post_in,
)
from .schema import ACCOUNT_KINDS, DEPOSITS, ENERGY, NAME_LENGTH, SLASHED, Account, Entry, Transfer
from .settle import STAKE_VERBS, LeaseMoney, post_new, settle_lease
from .summed import current_balances, lock_accounts

TURN_LOCK = 0x504F494C  # "POIL": the advisory lock of `Ledger.take_turn` and `lock_in_order`
SYSTEM_ACCOUNTS = ((DEPOSITS, "external", True), (ENERGY, "revenue", False), (SLASHED, "revenue", False))


@dataclass(frozen=True)
class EntryView:
    """One leg as an account sees it."""

    transfer_id: int
    key: str
    kind: str
    amount_micro: int
    memo: str
    lease_id: str | None
    created_at: datetime


class Ledger:
    """Double-entry book on one database; every method is one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        for name, kind, allow_negative in SYSTEM_ACCOUNTS:
            self.open_account(name, kind, allow_negative)

    def open_account(self, name: str, kind: str, allow_negative: bool = False) -> None:
        """Create the account, or accept it if it exists exactly so (idempotent)."""
        if not name or len(name) > NAME_LENGTH:
            raise LedgerError(f"an account name of 1..{NAME_LENGTH} characters", repr(name))
        if kind not in ACCOUNT_KINDS:
            raise LedgerError(f"an account kind in {ACCOUNT_KINDS}", repr(kind))
        if allow_negative and kind != "external":
            raise LedgerError("only external accounts to allow a negative balance", f"{kind} {name}")
        with Session(writer(self.engine)) as session, session.begin():
            ensure_account(session, AccountSpec(name, kind, allow_negative))

    def session(self) -> Session:
        """A write session for callers that move money together with their own rows in one
        transaction: `with ledger.session() as s, s.begin(): ...; ledger.release_stake(..., session=s)`."""
        return Session(writer(self.engine), expire_on_commit=False)

    def transfer(
        self,
        key: str,
        kind: str,
        legs: Mapping[str, int],
        *,
        memo: str = "",
        lease_id: str | None = None,
        session: Session | None = None,
    ) -> TransferResult:
        """Move money between accounts; legs sum to 0. The same key posts at most once."""
        return self._post(make_request(key, kind, legs, memo, lease_id), session=session)

    # -- the control plane's operations ------------------------------------------------------------

    def deposit(self, agent: str, micro: int, key: str, *, session: Session | None = None) -> TransferResult:
        wallet = _agent_account("wallet", agent)
        _positive(micro, "deposit")
        request = make_request(key, "deposit", {DEPOSITS: -micro, wallet: micro}, memo=f"deposit for {agent}")
        return self._post(request, opens=(wallet,), session=session)

    def escrow_stake(
        self, agent: str, lease_id: str, micro: int, *, session: Session | None = None
    ) -> TransferResult:
        _positive(micro, "stake")
        escrow = _agent_account("escrow", agent)
        legs = {_agent_account("wallet", agent): -micro, escrow: micro}
        request = make_request(f"stake:{lease_id}", "stake_escrow", legs, lease_id=lease_id)
        return self._post(request, (escrow,), session=session)

    def release_stake(self, agent: str, lease_id: str, *, session: Session | None = None) -> TransferResult:
        """Give the lease's whole stake back to the agent's wallet; refused once it was slashed."""
        return self._unescrow(
            agent, lease_id, f"wallet:{agent}", "release", "stake_release", "slash", session
        )

    def slash_stake(self, agent: str, lease_id: str, *, session: Session | None = None) -> TransferResult:
        """Take the lease's whole stake for Maxwell; refused once it was released."""
        return self._unescrow(agent, lease_id, SLASHED, "slash", "stake_slash", "release", session)

    def debit_energy(self, agent: str, lease_id: str, joules: float, micro_per_joule: int) -> TransferResult:
        """Charge round(joules × price) for the energy Maxwell measured for the lease."""
        micro, memo = energy_charge(joules, micro_per_joule)
        if micro <= 0:
            raise LedgerError("an energy charge of at least 1 micro", f"{micro} for {joules!r} J")
        legs = {_agent_account("wallet", agent): -micro, ENERGY: micro}
        return self.transfer(f"energy:{lease_id}", "energy_debit", legs, memo=memo, lease_id=lease_id)

    def hold_energy(
        self, agent: str, lease_id: str, micro: int, *, session: Session | None = None
    ) -> TransferResult:
        """Hold the lease's largest possible energy charge from the wallet in escrow, so that the
        debit of what is measured later cannot fail for want of funds."""
        _positive(micro, "energy hold")
        escrow = _agent_account("escrow", agent)
        legs = {_agent_account("wallet", agent): -micro, escrow: micro}
        request = make_request(f"hold:{lease_id}", "energy_hold", legs, lease_id=lease_id)
        return self._post(request, (escrow,), session=session)

    def settle_energy(
        self,
        agent: str,
        lease_id: str,
        joules: float,
        micro_per_joule: int,
        *,
        session: Session | None = None,
    ) -> EnergySettled:
        """Charge round(joules × price) to Maxwell: from the lease's hold, and what the hold does not
        cover from the agent's wallet (as far as the wallet goes; what it cannot pay is named in the
        memo as unpaid). The rest of the hold goes back to the wallet. Energy Maxwell measured is the
        agent's to pay whatever the hold was: work hidden in a lease (private batch rows) is billed,
        not absorbed (issue 23). One transfer, key `energy:<lease>`; the charge is computed only here
        and returned with it; asked again, the first charge is returned."""
        if session is None:
            with self.session() as own, own.begin():
                return self.settle_energy(agent, lease_id, joules, micro_per_joule, session=own)
        escrow, wallet = _agent_account("escrow", agent), _agent_account("wallet", agent)
        key = f"energy:{lease_id}"
        if (done := find_transfer(session, key)) is not None:  # settled before: the same answer
            return EnergySettled(done.id, False, dict(legs_of(session, done.id)).get(ENERGY, 0), done.memo)
        held = self._escrowed(escrow, f"hold:{lease_id}", session)
        micro, memo = energy_charge(joules, micro_per_joule)
        charge = micro
        if micro > held:
            spare = session.scalar(select(Account.balance_micro).where(Account.name == wallet)) or 0
            charge = min(micro, held + max(0, spare))
            memo += f" beyond_hold={charge - held}"
            if charge < micro:
                memo += f" unpaid={micro - charge}"
        legs = {escrow: -held, ENERGY: charge, wallet: held - charge}
        request = make_request(key, "energy_debit", {k: v for k, v in legs.items() if v}, memo, lease_id)
        posted = self._post(request, session=session)
        return EnergySettled(posted.transfer_id, posted.created, charge, memo)

    def settle_lease(
        self,
        agent: str,
        lease_id: str,
        amounts: tuple[int, int],
        joules: float,
        micro_per_joule: int,
        stake: str,
        *,
        session: Session,
    ) -> EnergySettled:
        """Intake's money for one lease, in the caller's transaction: the energy charged as
        `settle_energy` does and the stake released (`stake="release"`), slashed ("slash") or left
        escrowed (""). `amounts` is (hold, stake) as issuing the lease escrowed them. Written by
        `ledger.settle` in a few Core statements; a lease with any transfer under its keys already
        takes the general path, which answers replays and refuses rivals."""
        if stake not in ("", *STAKE_VERBS):
            raise LedgerError(f"a stake move in {('', *STAKE_VERBS)}", repr(stake))
        micro, memo = energy_charge(joules, micro_per_joule)
        held, staked = amounts
        _agent_account("wallet", agent)  # refuses an agent id the account names cannot hold
        money = LeaseMoney(agent, lease_id, held, staked, micro, memo, stake)
        fast = settle_lease(session, money, ENERGY, SLASHED)
        if fast is not None:
            return fast
        energy = self.settle_energy(agent, lease_id, joules, micro_per_joule, session=session)
        if stake == "release":
            self.release_stake(agent, lease_id, session=session)
        elif stake == "slash":
            self.slash_stake(agent, lease_id, session=session)
        return energy

    def hold_lease(
        self, agent: str, lease_id: str, hold_micro: int, stake_micro: int, *, session: Session
    ) -> None:
        """A lease's money at issue, in the caller's transaction: `hold_energy` and (stake > 0)
        `escrow_stake` (each in Core statements via `post_new` unless an account is to be opened)."""
        if stake_micro < 0:
            raise LedgerError("a stake >= 0 micro", str(stake_micro))
        self.hold_energy(agent, lease_id, hold_micro, session=session)
        if stake_micro > 0:
            self.escrow_stake(agent, lease_id, stake_micro, session=session)

    def take_turn(self, session: Session) -> None:
        """Take the ledger's turn, first in the caller's transaction, alone: every transaction that
        locks several agents' accounts in an order of its own (a pull's expiries and holds, the
        gateway's issue, an audit's final stake move, a settlement in its own transaction) calls it,
        so two of them never lock accounts in orders that cross (a deadlock PostgreSQL breaks after
        a second; ledger.retry runs the loser again). A PostgreSQL advisory lock, not a row: nothing
        is written under it. SQLite: a no-op (its write lock lets one transaction in at a time)."""
        if _postgresql(session):
            session.execute(select(func.pg_advisory_xact_lock(TURN_LOCK)))

    def lock_in_order(self, session: Session, names: Iterable[str]) -> None:
        """A group of settlements' first statements (ledger.group_commit's `prepare`): the turn lock
        shared — groups of several API processes run side by side, a `take_turn` transaction waits
        for them — then the accounts the group will move, locked in name order, so two groups never
        wait on each other in a cycle. An account a settlement moves that was not named here is
        locked when it is reached, as before (a rare cross is a deadlock, retried by the group).
        Maxwell's revenue is not locked (ledger.summed). PostgreSQL only, as `take_turn`."""
        if not _postgresql(session):
            return
        session.execute(select(func.pg_advisory_xact_lock_shared(TURN_LOCK)))
        lock_accounts(session, names)

    @staticmethod
    def lease_accounts(agent: str) -> tuple[str, str]:
        """(escrow, wallet) of the agent: the accounts a lease's holds and settlement move."""
        return _agent_account("escrow", agent), _agent_account("wallet", agent)

    # -- reading ------------------------------------------------------------------------------------

    def balance(self, name: str) -> int:
        """The account's balance: its cached balance (check_ledger proves it equals the sum of its
        entries), or for Maxwell's revenue the sum itself (ledger.summed)."""
        with Session(self.engine) as session:
            rows = session.execute(
                select(Account.id, Account.name, Account.balance_micro).where(Account.name == name)
            ).all()
            if not rows:
                raise LedgerError("an open account", f"unknown account {name!r}")
            return current_balances(session, rows)[name]

    def balances(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(
                select(Account.id, Account.name, Account.balance_micro).order_by(Account.name)
            ).all()
            return current_balances(session, rows)

    def entries_for(self, name: str) -> list[EntryView]:
        self.balance(name)  # refuses an unknown account rather than answering "no entries"
        query = (
            select(Transfer, Entry.amount_micro)
            .join(Entry, Entry.transfer_id == Transfer.id)
            .join(Account, Account.id == Entry.account_id)
            .where(Account.name == name)
            .order_by(Transfer.id)
        )
        with Session(self.engine) as session:
            return [
                EntryView(t.id, t.idempotency_key, t.kind, amount, t.memo, t.lease_id, t.created_at)
                for t, amount in session.execute(query)
            ]

    # -- helpers ------------------------------------------------------------------------------------

    def _post(
        self,
        request: TransferRequest,
        opens: tuple[str, ...] = (),
        exclusive: str = "",
        session: Session | None = None,
    ) -> TransferResult:
        """Post with the agent accounts `opens` ("wallet:a") created in the same transaction; in
        the caller's `session` (its transaction) when one is given, else in a transaction of its own."""
        specs = tuple(AccountSpec(name, name.split(":", 1)[0]) for name in opens)
        request = replace(request, opens=specs, exclusive_with=(exclusive,) if exclusive else ())
        if session is None:
            return post(self.engine, request)
        # in Core statements when nothing is to be opened or answered as a replay (ledger.settle)
        if (transfer_id := post_new(session, request)) is not None:
            return TransferResult(transfer_id, created=True)
        return post_in(session, request)

    def _unescrow(
        self, agent: str, lease_id: str, to: str, verb: str, kind: str, rival: str, session: Session | None
    ) -> TransferResult:
        escrow = _agent_account("escrow", agent)
        staked = self._escrowed(escrow, f"stake:{lease_id}", session)
        request = make_request(f"{verb}:{lease_id}", kind, {escrow: -staked, to: staked}, lease_id=lease_id)
        # Checked inside the posting transaction, after escrow is locked: a racing rival is seen.
        return self._post(request, exclusive=f"{rival}:{lease_id}", session=session)

    def _escrowed(self, escrow: str, key: str, session: Session | None) -> int:
        """What the transfer `key` (a stake or an energy hold) put into `escrow`."""
        if session is None:
            with Session(self.engine) as own:
                return self._escrowed(escrow, key, own)
        held = find_transfer(session, key)
        legs = dict(legs_of(session, held.id)) if held is not None else {}
        if held is None:
            raise LedgerError(f"a transfer {key!r} into escrow", "none")
        if legs.get(escrow, 0) <= 0:
            raise LedgerError(f"{key!r} to have put money into {escrow}", f"legs {legs}")
        return legs[escrow]


def energy_charge(joules: float, micro_per_joule: int) -> tuple[int, str]:
    """round(joules × price) in micro-units, and a memo that keeps Maxwell's measurement."""
    if not isinstance(joules, int | float) or not math.isfinite(joules) or joules < 0:
        raise LedgerError("a finite, non-negative energy in joules", repr(joules))
    _positive(micro_per_joule, "price per joule")
    return round(joules * micro_per_joule), f"joules={joules!r} micro_per_joule={micro_per_joule}"


def _agent_account(kind: str, agent: str) -> str:
    if not agent or ":" in agent:
        raise LedgerError("an agent id without ':'", repr(agent))
    return f"{kind}:{agent}"


def _positive(micro: int, what: str) -> None:
    if isinstance(micro, bool) or not isinstance(micro, int) or micro <= 0:
        raise LedgerError(f"a positive integer {what} in micro-units", repr(micro))


def _postgresql(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"
