"""The one place a lease's state and its money move (design.md §7, after Prefect's orchestration
rules): every state change is one of the moves `service.states` declares — any other raises
`TransitionError` — and every ledger transfer for a lease is posted here, in the transaction of the
state change it belongs to. Callers decide *what* happened (the market cleared a bid, intake
appraised a receipt, an audit worker ran L4, the gateway's requester was served); this module
turns that into rows and money, once:

- `issue_lease`      a won bid becomes a lease: energy hold + stake escrowed (or the bid refused)
- `take_in`          a receipt appraised: energy charged (computed once, by the ledger), the stake
                     moved by the verdict, the lease settled or left pending — and a pending lease's
                     audit queued, whoever called (HTTP route, in-process intake, a test)
- `finalise`         a pending lease's final verdict: the stake released or slashed, lease settled
- `fail_lease`       no receipt at all (the agent never started or crashed): a failed lease — nothing
                     charged, the hold and the stake back, its cause kept as the verdict's reason
- `expire_lease`     no receipt came back: the hold and the stake go back to the agent
- `hold_payment` / `settle_completion`   a gateway requester's payment held, then paid or returned
- `requester_left`   a gateway lease stopped because its requester left, back without a receipt:
                     settled by `fail_lease` as a stopped lease (not a failed one), nothing charged

`tests/test_settlement.py` fails if any other module writes these states or posts such transfers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..economics.tiers import Tier
from ..ledger import Ledger, LedgerError
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
from .schema import BidRow, CompletionRow, LeaseRow, ReceiptRow, VerdictRow
from .states import (
    BID_MOVES,
    COMPLETION_MOVES,
    LEASE_MOVES,
    STAKE_MOVES,
    BidState,
    CompletionState,
    LeaseState,
    StakeOutcome,
    TransitionError,
    check_move,
    sources,
)

EXACT_TIER = Tier.EXACT.value  # as cp_leases.tier stores it
STAKE_ON = {
    Verdict.AFFIRMING: StakeOutcome.RELEASED,
    Verdict.CONTRAINDICATED: StakeOutcome.SLASHED,
    Verdict.WARNING: StakeOutcome.HELD,
}
STAKE_VERB = {StakeOutcome.RELEASED: "release", StakeOutcome.SLASHED: "slash"}  # as the ledger names them
# runs a settlement's writes and commits them; given the accounts they move (locked first, in order)
Runner = Callable[[Callable[[Session], VerdictRow], tuple[str, ...]], VerdictRow]
AuditQueue = Callable[[str, bool], None]  # (lease id, L4 drawn): wake the audit workers
REQUESTER_LEFT = "requester_left"  # a verdict layer's details flag: stopped because its requester left


# -- moves --------------------------------------------------------------------------------------------


def move_lease(session: Session, lease_id: str, target: LeaseState) -> None:
    """Compare-and-set in the caller's transaction: only from a state that declares `target`."""
    done = session.execute(
        update(LeaseRow)
        .where(LeaseRow.lease_id == lease_id, LeaseRow.status.in_(sources(LEASE_MOVES, target)))
        .values(status=target)
    )
    if done.rowcount != 1:
        current = session.scalar(select(LeaseRow.status).where(LeaseRow.lease_id == lease_id))
        check_move(f"lease {lease_id}", LEASE_MOVES, current or "no such lease", target)
        raise TransitionError(f"lease {lease_id}", f"one row moved to {target}", f"{done.rowcount}")


def move_bid(bid: BidRow, target: BidState, reason: str, lease_id: str | None = None) -> None:
    check_move(f"bid {bid.bid_id}", BID_MOVES, bid.status, target)
    bid.status, bid.reason = target, reason
    if lease_id is not None:
        bid.lease_id = lease_id


def expire_bids(session: Session, created_before: float) -> None:
    """Open bids no round cleared within a lease's lifetime expire (an agent's stale bid never wins late)."""
    session.execute(
        update(BidRow)
        .where(BidRow.status.in_(sources(BID_MOVES, BidState.EXPIRED)), BidRow.created_at < created_before)
        .values(status=BidState.EXPIRED, reason="no round cleared it within the lease lifetime")
    )


def stake_outcome(verdict: Verdict, stake_micro: int) -> StakeOutcome:
    """What a final verdict does to the lease's stake; NONE when nothing was escrowed."""
    return STAKE_ON[verdict] if stake_micro > 0 else StakeOutcome.NONE


def _move_stake(ledger: Ledger, session: Session, lease: Lease, outcome: StakeOutcome) -> None:
    if outcome is StakeOutcome.RELEASED:
        ledger.release_stake(lease.agent_id, lease.lease_id, session=session)
    elif outcome is StakeOutcome.SLASHED:
        ledger.slash_stake(lease.agent_id, lease.lease_id, session=session)


# -- a lease's life -----------------------------------------------------------------------------------


def issue_lease(ledger: Ledger, session: Session, bid: BidRow, row: LeaseRow, won: str) -> bool:
    """The won bid's lease, pulled by its node: energy hold and stake escrowed in a savepoint of the
    caller's transaction. False (the bid refused, the round goes on) when the wallet cannot cover both."""
    try:
        with session.begin_nested():
            ledger.hold_lease(row.agent_id, row.lease_id, row.hold_micro, row.stake_micro, session=session)
    except LedgerError as exc:
        why = f"wallet cannot cover the energy hold {row.hold_micro} + stake {row.stake_micro} micro: {exc}"
        move_bid(bid, BidState.REFUSED, why)
        return False
    row.status = LeaseState.PULLED  # the lease's first state: issued to the node that pulled it
    session.add(row)
    move_bid(bid, BidState.WON, won, lease_id=row.lease_id)
    return True


def expire_lease(ledger: Ledger, session: Session, row: LeaseRow) -> None:
    """No receipt came back: nothing charged, the whole hold and the stake back to the agent."""
    move_lease(session, row.lease_id, LeaseState.EXPIRED)
    ledger.settle_energy(row.agent_id, row.lease_id, 0.0, row.price_micro_per_j, session=session)
    if row.stake_micro > 0:
        ledger.release_stake(row.agent_id, row.lease_id, session=session)


@dataclass(frozen=True)
class Appraised:
    """What intake decided about a receipt, for `take_in` to settle."""

    lease: Lease
    row: LeaseRow
    result: AttestationResult
    joules: float
    energy_memo: str
    drawn: bool  # the L4 lottery drew it: queued for the audit workers
    pending: bool  # not final yet (a drawn L4, or the exact tier's challenge and window)


def take_in(
    ledger: Ledger,
    receipt: ReceiptRow,
    appraised: Appraised,
    extra: Callable[[Session, Lease, VerdictRow], None] = lambda _session, _lease, _verdict: None,
    queue: AuditQueue | None = None,
    run: Runner | None = None,
) -> VerdictRow:
    """The receipt, its verdict and its money in one transaction (its own, or a savepoint of the
    group `run` commits: ledger.group_commit); then, once committed, a pending lease's audit queued.
    Raises IntegrityError when a racing submission of the lease committed first (the receipt's key
    is flushed before any money moves)."""
    a = appraised
    lease_id = a.lease.lease_id

    def write(session: Session) -> VerdictRow:
        session.add(receipt)
        session.flush()  # the lease's receipt key: a duplicate fails here
        outcome = StakeOutcome.PENDING if a.pending else stake_outcome(a.result.verdict, a.row.stake_micro)
        energy = ledger.settle_lease(
            a.lease.agent_id,
            lease_id,
            (a.row.hold_micro, a.row.stake_micro),
            a.joules,
            a.row.price_micro_per_j,
            STAKE_VERB.get(outcome, ""),
            session=session,
        )
        verdict = VerdictRow(
            lease_id=lease_id,
            verdict=a.result.verdict,
            final=not a.pending,
            audit_drawn=a.drawn,
            layers=json.dumps([r.as_dict() for r in a.result.layers]),
            reason=a.result.reason[:4000],
            energy_j=a.joules,
            energy_memo=a.energy_memo,
            charge_micro=energy.charge_micro,
            stake_outcome=outcome,
            appraised_at=time.time(),
        )
        extra(session, a.lease, verdict)  # a front door's own money (the gateway's requester)
        session.add(verdict)
        move_lease(session, lease_id, LeaseState.AUDIT_PENDING if a.pending else LeaseState.SETTLED)
        return verdict

    verdict = (run or own_transaction(ledger))(write, ledger.lease_accounts(a.lease.agent_id))
    if a.pending and queue is not None:
        queue(lease_id, a.drawn)
    return verdict


def own_transaction(ledger: Ledger) -> Runner:
    """Run the settlement in a transaction of its own (no group commit)."""

    def run(write: Callable[[Session], VerdictRow], _locks: tuple[str, ...] = ()) -> VerdictRow:
        with ledger.session() as session, session.begin():
            ledger.take_turn(session)  # alone, as every unordered money transaction (Ledger.take_turn)
            return write(session)

    return run


def fail_lease(
    ledger: Ledger,
    receipt: ReceiptRow,
    appraised: Appraised,
    extra: Callable[[Session, Lease, VerdictRow], None] = lambda _session, _lease, _verdict: None,
    run: Runner | None = None,
) -> VerdictRow:
    """A failed lease (`LeaseState.FAILED`): the node handed in an empty receipt with its evidence of
    how the agent ended. Maxwell's own failure or the agent program's, never evidence of cheating:
    like an expired lease nothing is charged (the whole hold back to the wallet) and the stake is
    released, but the receipt and a final verdict row — `warning`, stake `released`, the reason the
    cause — are kept, so the agent can read why. One transaction; raises IntegrityError like
    `take_in` when a racing submission of the lease committed first."""
    a = appraised
    lease_id = a.lease.lease_id

    def write(session: Session) -> VerdictRow:
        session.add(receipt)
        session.flush()  # the lease's receipt key: a duplicate fails here
        ledger.settle_energy(a.lease.agent_id, lease_id, 0.0, a.row.price_micro_per_j, session=session)
        outcome = StakeOutcome.RELEASED if a.row.stake_micro > 0 else StakeOutcome.NONE
        _move_stake(ledger, session, a.lease, outcome)
        verdict = VerdictRow(
            lease_id=lease_id,
            verdict=Verdict.WARNING,
            final=True,
            audit_drawn=False,
            layers=json.dumps([r.as_dict() for r in a.result.layers]),
            reason=a.result.reason[:4000],
            energy_j=a.joules,  # what Maxwell measured; not charged
            energy_memo=f"failed lease: not charged ({a.energy_memo})",
            charge_micro=0,
            stake_outcome=outcome,
            appraised_at=time.time(),
        )
        extra(session, a.lease, verdict)  # the gateway's requester: refunded (not an affirming verdict)
        session.add(verdict)
        # a lease Maxwell stopped because its requester left (`requester_left`) is no failure of the
        # agent's: settled, so that it never counts towards the agent's suspension (service.market)
        move_lease(session, lease_id, LeaseState.SETTLED if was_stopped(verdict) else LeaseState.FAILED)
        return verdict

    return (run or own_transaction(ledger))(write, ledger.lease_accounts(a.lease.agent_id))


def was_stopped(verdict: VerdictRow) -> bool:
    """Whether `requester_left` marked this verdict (a stopped lease, not a failed one)."""
    layers = json.loads(verdict.layers or "[]")
    return any((layer.get("details") or {}).get(REQUESTER_LEFT) for layer in layers)


def finalise(ledger: Ledger, row: LeaseRow, layers: list[LayerResult]) -> Verdict | None:
    """Make a pending lease's verdict final from these layers: verdict, stake released or slashed
    and the lease settled, in one transaction. Idempotent: None when it was already final."""
    lease = Lease.from_json(row.lease_json)
    combined = AttestationResult(lease.lease_id, lease.agent_id, lease.model_id, tuple(layers))
    outcome = stake_outcome(combined.verdict, row.stake_micro)
    with ledger.session() as session, session.begin():
        ledger.take_turn(session)
        current = session.get(VerdictRow, lease.lease_id, with_for_update=True)
        if current is None or current.final:  # finalised by another worker meanwhile
            return None
        check_move(f"stake of lease {lease.lease_id}", STAKE_MOVES, current.stake_outcome, outcome)
        _move_stake(ledger, session, lease, outcome)
        current.verdict, current.final, current.stake_outcome = combined.verdict, True, outcome
        current.layers = json.dumps([r.as_dict() for r in layers])
        current.reason = combined.reason[:4000]
        move_lease(session, lease.lease_id, LeaseState.SETTLED)
    return combined.verdict


def pending_audits(ledger: Ledger, exact: bool = False) -> list[str]:
    """Leases whose verdict is not final yet: the L4 queue, or (`exact`) the exact tier's."""
    tier = LeaseRow.tier == EXACT_TIER if exact else LeaseRow.tier != EXACT_TIER
    with Session(ledger.engine) as session:
        query = select(LeaseRow.lease_id).where(LeaseRow.status == LeaseState.AUDIT_PENDING, tier)
        return list(session.scalars(query.order_by(LeaseRow.issued_at)))


# -- a gateway requester's payment -------------------------------------------------------------------


def hold_payment(ledger: Ledger, session: Session, row: CompletionRow, wallet: str, escrow: str) -> None:
    """A completion starts streaming with the requester's hold moved from `wallet` to `escrow`."""
    if row.hold_micro > 0:
        legs = {wallet: -row.hold_micro, escrow: row.hold_micro}
        ledger.transfer(f"pay-hold:{row.lease_id}", "other", legs, lease_id=row.lease_id, session=session)
    row.status, row.charge_micro = CompletionState.STREAMING, 0
    session.add(row)


def completion_outcome(verdict: VerdictRow | None, cut: bool) -> CompletionState:
    """Paid only for a final, affirming verdict; otherwise cut (stopped mid-stream) or refunded."""
    if verdict is not None and verdict.final and verdict.verdict == Verdict.AFFIRMING:
        return CompletionState.PAID
    return CompletionState.CUT if cut else CompletionState.REFUNDED


def settle_completion(
    ledger: Ledger,
    session: Session,
    row: CompletionRow,
    agent_id: str,
    outcome: CompletionState,
    tokens: int,
    accounts: tuple[str, str],
    why: str = "",
) -> None:
    """The requester's hold: the tokens' price (capped at the hold) to the agent when paid, the rest
    back to the requester's wallet; one transfer, once. `accounts`: (wallet, escrow) of the requester."""
    check_move(f"completion {row.lease_id}", COMPLETION_MOVES, row.status, outcome)
    charge = min(row.price_micro_per_token * tokens, row.hold_micro) if outcome is CompletionState.PAID else 0
    wallet, escrow = accounts
    legs = {escrow: -row.hold_micro, f"wallet:{agent_id}": charge, wallet: row.hold_micro - charge}
    legs = {k: v for k, v in legs.items() if v}
    if legs:
        memo = f"completion price={row.price_micro_per_token} micro/token charge={charge}"
        ledger.transfer(
            f"pay:{row.lease_id}", "other", legs, memo=memo, lease_id=row.lease_id, session=session
        )
    row.status, row.charge_micro, row.tokens = outcome, charge, tokens
    if why:
        row.reason = why[:4000]


def requester_left(
    ledger: Ledger,
    session: Session,
    row: CompletionRow,
    verdict: VerdictRow,
    agent_id: str,
    sent: int,
    accounts: tuple[str, str],
    why: str,
) -> None:
    """A gateway lease Maxwell stopped because its requester left (disconnected, or the gateway gave
    up waiting), come back without a receipt — `fail_lease` is settling it, `verdict` is its row.
    Not cheating and not the agent's failure: the stake released and no energy charged (as for a
    failed lease), and the requester pays nothing — with no receipt no verdict covers the `sent`
    tokens, and the gateway charges only for affirmed ones. The verdict row says why, and carries
    the flag that makes `fail_lease` settle the lease rather than fail it."""
    settle_completion(ledger, session, row, agent_id, CompletionState.REFUNDED, sent, accounts, why)
    old = json.loads(verdict.layers or "[]")
    details = dict(old[0].get("details") or {}) if old else {}
    details.pop("failed_lease", None)
    details.update({REQUESTER_LEFT: True, "sent_tokens": sent})
    reason = (
        f"stopped: {why}. Nothing charged to the requester or the agent, the hold and the stake "
        "returned: a requester leaving is not cheating"
    )
    verdict.layers = json.dumps(
        [LayerResult(LayerName.INTEGRITY, Status.WARN, reason, details=details).as_dict()]
    )
    verdict.reason = reason[:4000]
    verdict.energy_memo = verdict.energy_memo.replace(
        "failed lease: not charged", "stopped lease: not charged", 1
    )
