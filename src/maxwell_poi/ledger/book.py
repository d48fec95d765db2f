"""The ledger's front: open accounts, post transfers, and the stake/energy operations built on them."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from .db import writer
from .errors import LedgerError
from .posting import (
    AccountSpec,
    TransferRequest,
    TransferResult,
    ensure_account,
    find_transfer,
    legs_of,
    make_request,
    post,
)
from .schema import ACCOUNT_KINDS, NAME_LENGTH, Account, Entry, Transfer

DEPOSITS = "external:deposits"
ENERGY = "maxwell:energy"
SLASHED = "maxwell:slashed"
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

    def transfer(
        self, key: str, kind: str, legs: Mapping[str, int], *, memo: str = "", lease_id: str | None = None
    ) -> TransferResult:
        """Move money between accounts; legs sum to 0. The same key posts at most once."""
        return post(self.engine, make_request(key, kind, legs, memo, lease_id))

    # -- the control plane's operations ------------------------------------------------------------

    def deposit(self, agent: str, micro: int, key: str) -> TransferResult:
        wallet = _agent_account("wallet", agent)
        _positive(micro, "deposit")
        request = make_request(key, "deposit", {DEPOSITS: -micro, wallet: micro}, memo=f"deposit for {agent}")
        return self._post(request, opens=(wallet,))

    def escrow_stake(self, agent: str, lease_id: str, micro: int) -> TransferResult:
        _positive(micro, "stake")
        escrow = _agent_account("escrow", agent)
        legs = {_agent_account("wallet", agent): -micro, escrow: micro}
        return self._post(
            make_request(f"stake:{lease_id}", "stake_escrow", legs, lease_id=lease_id), (escrow,)
        )

    def release_stake(self, agent: str, lease_id: str) -> TransferResult:
        """Give the lease's whole stake back to the agent's wallet; refused once it was slashed."""
        return self._unescrow(agent, lease_id, f"wallet:{agent}", "release", "stake_release", "slash")

    def slash_stake(self, agent: str, lease_id: str) -> TransferResult:
        """Take the lease's whole stake for Maxwell; refused once it was released."""
        return self._unescrow(agent, lease_id, SLASHED, "slash", "stake_slash", "release")

    def debit_energy(self, agent: str, lease_id: str, joules: float, micro_per_joule: int) -> TransferResult:
        """Charge round(joules × price) for the energy Maxwell measured for the lease."""
        if not math.isfinite(joules) or joules < 0:
            raise LedgerError("a finite, non-negative energy in joules", repr(joules))
        _positive(micro_per_joule, "price per joule")
        micro = round(joules * micro_per_joule)
        if micro <= 0:
            raise LedgerError("an energy charge of at least 1 micro", f"{micro} for {joules!r} J")
        memo = f"joules={joules!r} micro_per_joule={micro_per_joule}"  # Maxwell's measurement, kept
        legs = {_agent_account("wallet", agent): -micro, ENERGY: micro}
        return self.transfer(f"energy:{lease_id}", "energy_debit", legs, memo=memo, lease_id=lease_id)

    # -- reading ------------------------------------------------------------------------------------

    def balance(self, name: str) -> int:
        """The cached balance (check_ledger proves it equals the sum of the account's entries)."""
        with Session(self.engine) as session:
            balance = session.scalar(select(Account.balance_micro).where(Account.name == name))
        if balance is None:
            raise LedgerError("an open account", f"unknown account {name!r}")
        return balance

    def balances(self) -> dict[str, int]:
        with Session(self.engine) as session:
            rows = session.execute(select(Account.name, Account.balance_micro).order_by(Account.name))
            return {name: balance for name, balance in rows}

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
        self, request: TransferRequest, opens: tuple[str, ...] = (), exclusive: str = ""
    ) -> TransferResult:
        """Post with the agent accounts `opens` ("wallet:a") created in the same transaction."""
        specs = tuple(AccountSpec(name, name.split(":", 1)[0]) for name in opens)
        return post(
            self.engine, replace(request, opens=specs, exclusive_with=(exclusive,) if exclusive else ())
        )

    def _unescrow(
        self, agent: str, lease_id: str, to: str, verb: str, kind: str, rival: str
    ) -> TransferResult:
        escrow = _agent_account("escrow", agent)
        staked = self._staked(escrow, lease_id)
        request = make_request(f"{verb}:{lease_id}", kind, {escrow: -staked, to: staked}, lease_id=lease_id)
        # Checked inside the posting transaction, after escrow is locked: a racing rival is seen.
        return self._post(request, exclusive=f"{rival}:{lease_id}")

    def _staked(self, escrow: str, lease_id: str) -> int:
        with Session(self.engine) as session:
            stake = find_transfer(session, f"stake:{lease_id}")
            legs = dict(legs_of(session, stake.id)) if stake is not None else {}
        if stake is None:
            raise LedgerError(f"a stake escrowed for lease {lease_id!r}", "none")
        if legs.get(escrow, 0) <= 0:
            raise LedgerError(f"lease {lease_id!r}'s stake in {escrow}", f"legs {legs}")
        return legs[escrow]


def _agent_account(kind: str, agent: str) -> str:
    if not agent or ":" in agent:
        raise LedgerError("an agent id without ':'", repr(agent))
    return f"{kind}:{agent}"


def _positive(micro: int, what: str) -> None:
    if isinstance(micro, bool) or not isinstance(micro, int) or micro <= 0:
        raise LedgerError(f"a positive integer {what} in micro-units", repr(micro))
