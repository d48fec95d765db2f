"""Bids in, leases out: agents place sealed bids; each node pull clears one auction round
(economics.auction) against that node's thermal headroom and turns the winners into leases.

A won bid becomes a lease in one transaction with its money: the stake is escrowed and the
largest energy charge the lease can run up (its expected energy × HOLD_FACTOR at the clearing
price) is held from the agent's wallet, so that settlement can never fail for want of funds. A
winner whose wallet cannot cover both is refused (its savepoint rolls back; the round goes on).

Suspension (issue 23): an agent whose last leases all failed bids no more (service.suspension).
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from pydantic import TypeAdapter
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..economics.auction import SealedBid, clear
from ..economics.energy import FALLBACK_CPU_S_PER_TOKEN, expected_energy_j
from ..economics.tiers import TierPolicy
from ..ledger import Ledger
from ..ledger.retry import retried
from ..observer.evidence import RESIDENT_REGIME
from ..observer.host import this_device
from ..protocol.errors import PoiError, UnknownModelError
from ..protocol.lease import GenerateJob, Job, Lease
from ..registry.models import Registry
from ..registry.profiles import ProfileStore
from .config import ServiceConfig
from .errors import ApiError
from .schema import AgentRow, BidRow, LeaseRow, NodeRow
from .settlement import expire_bids, expire_lease, issue_lease, move_bid
from .states import BidState, LeaseState
from .stored_policy import StoredPolicy
from .suspension import SUSPEND_AFTER, suspension
from .wire import BidBody, PullBody

JOB: TypeAdapter = TypeAdapter(Job)
EXPIRY_GRACE_S = 60.0  # after a lease's deadline, before its unspent hold and stake go back
HOLD_FACTOR = 3.0  # an honest lease stays well inside 3x its expected energy (profiles: ±30%)
MICRO = 1_000_000


@dataclass(frozen=True)
class PulledLease:
    lease: Lease
    command: list[str]
    tier: str
    audit_probability: float


Hold = Callable[[Session, PulledLease], None]  # what a directed lease's transaction also does


class Directed(NamedTuple):
    """What `Market.issue_directed` did: the lease, or None and why; `deferred` when the lease's tier
    did not fit the node's last headroom reading (a fresh reading may let it in)."""

    pulled: PulledLease | None
    why: str
    deferred: bool = False


# model families whose blocks L3 can trace, open and check exactly (verifier.exact): GPT-2 (and its
# registered W8A8 variants), Llama, and the trained Llama-style poi-lm
EXACT_FAMILIES = ("gpt2", "llama", "trained", "trained-init")


def exact_capable(registry: Registry, model_id: str) -> bool:
    try:
        return registry.get(model_id).family in EXACT_FAMILIES
    except PoiError:
        return False


class Market:
    def __init__(
        self,
        ledger: Ledger,
        registry: Registry,
        profiles: ProfileStore,
        config: ServiceConfig,
        policy: TierPolicy,
    ) -> None:
        self.ledger, self.registry, self.profiles, self.config = ledger, registry, profiles, config
        self._policy = StoredPolicy(ledger, policy)  # re-read now and then: another process may set it
        # called in the expiry transaction for each lease that expires (the gateway refunds its requester)
        self.on_expire: list[Callable[[Session, LeaseRow], None]] = []
        self._pulled = threading.Condition()  # long-polling pulls wait on it for directed leases

    policy = property(lambda self: self._policy.get(), lambda self, p: self._policy.set(p))

    def expected_j(self, model_id: str, job: object, device_class: str | None = None) -> float:
        return self.priced(model_id, job, device_class)[0]

    def priced(self, model_id: str, job: object, device_class: str | None = None) -> tuple[float, str]:
        """(expected joules of an honest run, what priced them): with the model's profile on
        `device_class` (resident, else one-shot) — the class a node signed into its pull; None (a
        bid as placed, no node yet) prices with this host's. No profile: the fallback estimate."""
        device = this_device() if device_class is None else device_class
        profile = self.profiles.get(model_id, f"{device}|{RESIDENT_REGIME}") or self.profiles.get(
            model_id, device
        )
        joules = expected_energy_j(job, profile, self.config.watts_per_core)  # type: ignore[arg-type]
        if profile is None:
            return joules, (
                f"no profile for {model_id} on {device}: priced with the fallback estimate "
                f"({FALLBACK_CPU_S_PER_TOKEN * 1000:g} CPU-ms/token); run `poi profile {model_id} "
                "--resident` there"
            )
        return joules, f"priced with the profile of {model_id} on {device}"

    def _price_for_node(self, bid: BidRow, device_class: str) -> str:
        """Price an open bid for the node about to clear it, with that node's hardware class; the
        note for its reason. A node that signed no class leaves the bid as placed, and says so."""
        if not device_class:
            return f"the node signed no hardware class into its pull: priced as placed (on {this_device()})"
        bid.expected_j, note = self.priced(bid.model_id, JOB.validate_json(bid.job), device_class)
        return note

    def place_bid(self, agent_id: str, body: BidBody) -> tuple[dict, bool]:
        """(the bid, created). The same bid id with the same body answers the first; a different
        body under a used bid id is refused (409)."""
        try:
            self.registry.reference(body.model_id)
        except UnknownModelError as exc:
            raise ApiError(422, "a registered model_id", str(exc)) from None
        row = self._bid_row(agent_id, body, time.time())
        digest = row.request_sha256
        try:
            with self.ledger.session() as session, session.begin():
                self._refuse_suspended(session, agent_id, body.bid_id)
                self._refuse_flood(session, agent_id, body.bid_id)
                session.add(row)
                session.flush()
                return bid_view(row), True
        except IntegrityError:
            pass
        with self.ledger.session() as session:
            existing = session.scalars(
                select(BidRow).where(BidRow.agent_id == agent_id, BidRow.bid_id == body.bid_id)
            ).one()
            if existing.request_sha256 != digest:
                raise ApiError(
                    409, f"bid {body.bid_id!r} resent unchanged", "a different bid under that bid_id"
                )
            return bid_view(existing), False

    def _refuse_suspended(self, session: Session, agent_id: str, bid_id: str) -> None:
        """No new bid from a suspended agent (a bid it placed before is still answered)."""
        resent = session.scalar(select(BidRow.id).where(BidRow.agent_id == agent_id, BidRow.bid_id == bid_id))
        why = suspension(session, agent_id) if resent is None else None
        if why is not None:
            expected = f"an agent in good standing (fewer than {SUSPEND_AFTER} failed leases in a row)"
            raise ApiError(403, expected, why)

    def reinstate(self, agent_id: str, command: list[str]) -> None:
        """Re-enrolment of an enrolled agent (the same key): its enrolment time moved on — which
        clears a suspension, counted only from leases issued since — and its command replaced by
        the one given (none given: the enrolled one stays)."""
        values: dict[str, object] = {"enrolled_at": time.time()}
        if command:
            values["command"] = json.dumps(command)
        with self.ledger.session() as session, session.begin():
            session.execute(update(AgentRow).where(AgentRow.agent_id == agent_id).values(**values))

    def _refuse_flood(self, session: Session, agent_id: str, bid_id: str) -> None:
        """At most `max_open_bids` open bids per agent (counted inside the write transaction, so
        concurrent bids cannot all slip under the cap); a resent bid is still answered."""
        open_bids = session.scalar(
            select(func.count())
            .select_from(BidRow)
            .where(BidRow.agent_id == agent_id, BidRow.status == BidState.OPEN)
        )
        resent = session.scalar(select(BidRow.id).where(BidRow.agent_id == agent_id, BidRow.bid_id == bid_id))
        if open_bids >= self.config.max_open_bids and resent is None:
            raise ApiError(
                429, f"at most {self.config.max_open_bids} open bids per agent", f"{open_bids} open already"
            )

    def bids_of(self, agent_id: str, limit: int, offset: int) -> list[dict]:
        with Session(self.ledger.engine) as session:
            rows = session.scalars(
                select(BidRow)
                .where(BidRow.agent_id == agent_id)
                .order_by(BidRow.id)
                .offset(offset)
                .limit(limit)
            )
            return [bid_view(r) for r in rows]

    def issue_directed(self, node_id: str, agent_id: str, bid: BidBody, extra: Hold) -> Directed:
        """A lease for one chosen agent on one chosen node, now (the gateway's auction already chose
        them): its bid row, energy hold and stake in one transaction with whatever `extra` adds (the
        requester's hold); or no lease, and why."""
        now = time.time()
        row = self._bid_row(agent_id, bid, now)
        with self.ledger.session() as session, session.begin():
            self.ledger.take_turn(session)  # alone: it locks several agents' accounts (Ledger.take_turn)
            session.add(row)
            session.flush()
            if (suspended := suspension(session, agent_id)) is not None:
                move_bid(row, BidState.REFUSED, suspended)
                return Directed(None, suspended)
            headroom = session.scalar(select(NodeRow.headroom_j).where(NodeRow.node_id == node_id)) or 0.0
            node_class = session.scalar(select(NodeRow.device_class).where(NodeRow.node_id == node_id))
            priced = self._price_for_node(row, node_class or "")
            pulled = self._issue(session, node_id, row, bid.price_micro_per_j, headroom, now)
            row.reason = f"{row.reason}; {priced}"
            deferred = pulled is None and row.status == BidState.OPEN  # else issued, or refused
            if pulled is not None:
                extra(session, pulled)
            elif deferred:  # its requester is told now, so no later
                # round may issue it (a lease with no one waiting for it, its energy billed to the agent)
                move_bid(
                    row,
                    BidState.REFUSED,
                    f"not issued now (a directed bid is never auctioned later): {row.reason}",
                )
            why = row.reason
        if pulled is not None:
            with self._pulled:
                self._pulled.notify_all()
        return Directed(pulled, why, deferred)

    def _bid_row(self, agent_id: str, body: BidBody, now: float) -> BidRow:
        """An open bid as stored: the same row for a signed bid and a gateway's directed one."""
        return BidRow(
            agent_id=agent_id,
            bid_id=body.bid_id,
            request_sha256=hashlib.sha256(body.model_dump_json().encode()).hexdigest(),
            model_id=body.model_id,
            precision=body.precision,
            job=body.job.model_dump_json(),
            price_micro_per_j=body.price_micro_per_j,
            stake_micro=body.stake_micro,
            expected_j=self.expected_j(body.model_id, body.job),
            reason="",
            created_at=now,
        )

    def wake(self) -> None:
        """Long-polling pulls return now (a directed lease, or an L3 challenge for a node)."""
        with self._pulled:
            self._pulled.notify_all()

    def wait_for_leases(self, timeout_s: float) -> None:
        """A long-polling pull waits here until a directed lease is issued (or the timeout)."""
        with self._pulled:
            self._pulled.wait(timeout_s)

    def pull(self, node_id: str, body: PullBody) -> list[PulledLease]:
        """One auction round for `node_id`: its own unsettled pulled leases first (a node that
        restarted gets them again), then new winners within its headroom. One transaction, run again
        if PostgreSQL aborts it to break a deadlock (its holds lock several agents' accounts)."""
        return retried(lambda: self._pull(node_id, body), f"pull by node {node_id}")

    def _pull(self, node_id: str, body: PullBody) -> list[PulledLease]:
        now = time.time()
        with self.ledger.session() as session, session.begin():
            self.ledger.take_turn(session)  # alone: expiries and holds lock several agents' accounts
            session.execute(
                update(NodeRow)
                .where(NodeRow.node_id == node_id)
                .values(last_seen=now, headroom_j=body.headroom_j, device_class=body.device_class)
            )
            self._expire(session, now)
            self._expire_leases(session, now)
            out = self._outstanding(session, node_id, now, body.max_leases)
            room = body.max_leases - len(out)
            if room > 0:
                out.extend(self._round(session, node_id, body, room, now))
        return out

    # -- one round ----------------------------------------------------------------------------------

    def _round(
        self, session: Session, node_id: str, body: PullBody, room: int, now: float
    ) -> list[PulledLease]:
        query = select(BidRow).where(BidRow.status == BidState.OPEN).order_by(BidRow.id)
        if body.agents:
            query = query.where(BidRow.agent_id.in_(body.agents))
        bids = {b.id: b for b in session.scalars(query.limit(10 * room + 100).with_for_update())}
        self._refuse_suspended_bids(session, bids)
        priced = {key: self._price_for_node(b, body.device_class) for key, b in bids.items()}
        draw = 1 + self.policy.audit_cost_fraction  # a winner may need its audit too
        sealed = [
            SealedBid(b.id, b.price_micro_per_j, b.expected_j * draw, b.created_at) for b in bids.values()
        ]
        clearing = clear(sealed, body.headroom_j, self.config.reserve_micro_per_j)
        out: list[PulledLease] = []
        headroom = body.headroom_j
        answered: dict[tuple[str, str, str, str], tuple[BidRow, str]] = {}  # greedy job -> its lease
        for key in clearing.winners:
            bid = bids[key]
            job_key = _greedy_job(bid)
            if (same := answered.get(job_key)) is not None:
                _cache(bid, *same)
                continue
            if len(out) == room:
                bid.reason = f"open: cleared, but node {node_id} took at most {room} leases in this pull"
                continue
            pulled = self._issue(session, node_id, bid, clearing.price_micro_per_j, headroom, now)
            bid.reason = f"{bid.reason}; {priced[key]}"
            if pulled is not None:
                headroom -= bid.expected_j * draw
                out.append(pulled)
                if job_key is not None:
                    answered[job_key] = (bid, pulled.lease.lease_id)
        for key in clearing.losers:  # stays open for a later round or a node with room: say why
            if answered and (same := answered.get(_greedy_job(bids[key]))) is not None:
                _cache(bids[key], *same)
                continue
            need = bids[key].expected_j * draw
            busy = " (its CPU busy)" if body.headroom_j <= 0 else ""
            bids[key].reason = (
                f"open: not cleared in node {node_id}'s round at {now:.0f}: its headroom "
                f"{body.headroom_j:.1f} J{busy} left {clearing.capacity_j - clearing.used_j:.1f} J after "
                f"higher bids, this lease needs {need:.1f} J"
            )
        for key in clearing.below_reserve:
            move_bid(
                bids[key],
                BidState.REFUSED,
                f"expected a price >= the reserve {self.config.reserve_micro_per_j} micro/J, "
                f"got {bids[key].price_micro_per_j}",
            )
        return out

    @staticmethod
    def _refuse_suspended_bids(session: Session, bids: dict[int, BidRow]) -> None:
        """Open bids of suspended agents are refused, not cleared (removed from `bids`)."""
        suspended = {a: suspension(session, a) for a in {b.agent_id for b in bids.values()}}
        for key, bid in list(bids.items()):
            if (why := suspended[bid.agent_id]) is not None:
                move_bid(bid, BidState.REFUSED, why)
                del bids[key]

    def _issue(
        self, session: Session, node_id: str, bid: BidRow, price: int, headroom: float, now: float
    ) -> PulledLease | None:
        choice = self.policy.choose(
            value=price * bid.expected_j / MICRO,
            stake=bid.stake_micro / MICRO,
            lease_energy_j=bid.expected_j,
            headroom_j=headroom,
            price_per_j=price / MICRO,
            exact_ok=exact_capable(self.registry, bid.model_id),
        )
        if choice.deferred:
            bid.reason = choice.reason  # stays open for a cooler node or a later round
            return None
        agent = session.get(AgentRow, bid.agent_id)
        job = JOB.validate_json(bid.job)
        lease = Lease.issue(
            bid.agent_id, bid.model_id, job, precision=bid.precision, ttl_s=self.config.lease_ttl_s, now=now
        )
        hold = max(1, math.ceil(bid.expected_j * HOLD_FACTOR * price))
        issued = issue_lease(
            self.ledger,
            session,
            bid,
            LeaseRow(
                lease_id=lease.lease_id,
                agent_id=bid.agent_id,
                node_id=node_id,
                bid_pk=bid.id,
                lease_json=lease.to_json(),
                tier=choice.tier.value,
                audit_probability=choice.audit_probability,
                tier_reason=choice.reason,
                price_micro_per_j=price,
                hold_micro=hold,
                stake_micro=bid.stake_micro,
                issued_at=lease.issued_at,
                deadline=lease.deadline,
            ),
            f"won at {price} micro/J; {choice.reason}",
        )  # holds the energy and the stake (or refuses the bid when the wallet cannot cover them)
        if not issued:
            return None
        command = json.loads(agent.command) if agent else []
        return PulledLease(lease, command, choice.tier.value, choice.audit_probability)

    def _outstanding(self, session: Session, node_id: str, now: float, limit: int) -> list[PulledLease]:
        rows = session.scalars(
            select(LeaseRow)
            .where(LeaseRow.node_id == node_id, LeaseRow.status == LeaseState.PULLED, LeaseRow.deadline > now)
            .order_by(LeaseRow.issued_at)
            .limit(limit)
        ).all()
        commands = (
            {a.agent_id: json.loads(a.command) for a in session.scalars(select(AgentRow))} if rows else {}
        )
        return [
            PulledLease(
                Lease.from_json(r.lease_json), commands.get(r.agent_id, []), r.tier, r.audit_probability
            )
            for r in rows
        ]

    def _expire_leases(self, session: Session, now: float) -> None:
        """Leases no receipt came back for (the node died with them): past the deadline and a grace,
        the hold and the stake go back to the agent, in this transaction. An agent that answered
        badly is not helped by this — its node hands in the evidence with whatever came back, and
        L0 judges it (nothing at all: a failed lease, service.intake); only a lease that never
        reached intake expires."""
        stale = session.scalars(
            select(LeaseRow)
            .where(LeaseRow.status == LeaseState.PULLED, LeaseRow.deadline < now - EXPIRY_GRACE_S)
            .with_for_update()
        ).all()
        for row in stale:
            expire_lease(self.ledger, session, row)
            for hook in self.on_expire:
                hook(session, row)

    def _expire(self, session: Session, now: float) -> None:
        """Open bids older than a lease's lifetime expire: an agent's stale bid never wins late."""
        expire_bids(session, now - self.config.lease_ttl_s)


def _greedy_job(bid: BidRow) -> tuple[str, str, str, str] | None:
    """What makes two of an agent's bids the same question with the same answer: a greedy
    generation (temperature 0: no seed, so one output) of one model, precision and job. None for
    any other job (a sampled one is seeded from its own lease's nonce, so it has its own answer)."""
    job = JOB.validate_json(bid.job)
    if not isinstance(job, GenerateJob) or job.temperature != 0:
        return None
    return bid.agent_id, bid.model_id, bid.precision, job.model_dump_json()


def _cache(bid: BidRow, first: BidRow, lease_id: str) -> None:
    """`bid` asks what `first` asks, and `first` won a lease in this round: it is answered by that
    lease, priced as a cached answer. Were both issued, they would sit in one batch, where an agent
    could compute one and copy it into the other (the batch copier) and pay for half the work an
    honest agent pays for; cached, neither computes it twice (issue 23)."""
    move_bid(
        bid,
        BidState.CACHED,
        f"cached: the same greedy job as bid {first.bid_id!r}, which won lease {lease_id} in this round; "
        "answered by that lease: no lease, hold, charge or stake of its own",
        lease_id=lease_id,
    )


def bid_view(row: BidRow) -> dict:
    return {
        "bid_id": row.bid_id,
        "agent_id": row.agent_id,
        "model_id": row.model_id,
        "price_micro_per_j": row.price_micro_per_j,
        "stake_micro": row.stake_micro,
        "expected_j": round(row.expected_j, 6),
        "status": row.status,
        "reason": row.reason,
        "lease_id": row.lease_id,
    }
