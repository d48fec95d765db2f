"""The gateway: OpenAI-shaped requests in, verified completions out, on the control plane's market,
ledger and intake.

A request becomes a lease: the agents with a standing offer for the model compete in a sealed-ask
auction (economics.asks); the winner's lease is issued on the most recently seen node with the
agent's energy hold and stake and the requester's payment hold in one transaction, and the node's
long-polling pull picks it up at once. The node relays tokens and fingerprint chunks as they arrive
(`relay`); they go to the requester's response and through the running appraisal (gateway.live).
When the node hands in the receipt, intake asks this gateway for the lease's audit result
(`audited`: decided while it ran), moves the requester's payment in its own transaction (`settle`:
paid only for an affirmed completion) and wakes the response waiting for the verdict (`settled`).
Before any of it, gateway.admission refuses what no node could ever run and picks a free node. A
requester that leaves early (`leave`) stops its lease and pays only for affirmed tokens it was sent:
nothing when the stopped lease comes back without a receipt (settlement.requester_left).

Requesters' money: account `requester:<id>` (a wallet) and `requester-escrow:<id>` for holds.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from ..economics.asks import Ask, award
from ..ledger import LedgerError
from ..ledger.retry import retried
from ..observer.evidence import resident_profile_key
from ..protocol.engine import engine_of_command
from ..protocol.errors import PoiError
from ..protocol.lease import Lease
from ..protocol.receipt import OpenedReceipt, max_receipt_bytes, open_receipt
from ..protocol.result import LayerResult
from ..service.control import ControlPlane
from ..service.errors import ApiError
from ..service.market import Directed, Hold, PulledLease
from ..service.schema import AgentRow, CompletionRow, LeaseRow, NodeRow, OfferRow, VerdictRow
from ..service.settlement import completion_outcome, hold_payment, requester_left, settle_completion
from ..service.states import CompletionState
from ..service.wire import BidBody
from ..verifier.appraisal import Appraisal
from ..verifier.audit import AuditLayer
from ..verifier.engine_audit import stream_tie_gap
from ..verifier.engine_stream import EngineStream, EngineStreamChoice
from ..verifier.lottery import draw_audit
from ..verifier.streaming import streaming_audit
from .admission import (
    BUSY_WAIT_S,
    NodeState,
    Unavailable,
    choose_node,
    fresh_pull,
    node_states,
    refuse_beyond_context,
    refuse_unservable,
)
from .canary import Canaries
from .delivery import Delivery, DeliveryPolicy
from .live import Arrival, LiveLease, RunningChecks
from .openai_wire import ChatRequest, CompletionRequest, job_of
from .requesters import RequesterAccounts, requester_account, requester_escrow
from .timeline import Mark, Timeline
from .verdicts import attestation

# tokens the streaming audit feeds the model at a time: a cheat is cut within this many tokens of
# its first bad one, at ~3.1x one prefill's cost (block 16: 16 tokens, ~2.1x; bench/service/streaming.py)
AUDIT_BLOCK = 8
MAX_LIVE = 256  # leases streaming at once; more are refused (429), not queued in memory


@dataclass(frozen=True)
class Started:
    lease: Lease
    live: LiveLease
    price_micro_per_token: int
    prompt_tokens: int
    auction: str
    ignored: list[str]

    @property
    def delivery(self) -> Delivery:
        return self.live.delivery


class Gateway(RequesterAccounts):
    def __init__(
        self, control: ControlPlane, *, verdict_wait_s: float = 60.0, delivery: DeliveryPolicy | None = None
    ) -> None:
        self.control = control
        self.registry = control.registry
        self.audit = AuditLayer(control.registry)  # the reference model and tolerances for streaming audits
        self.delivery = delivery or DeliveryPolicy.from_env()  # the server's default (gateway.delivery)
        self.verdict_wait_s = verdict_wait_s
        self.live: dict[str, LiveLease] = {}
        self.busy_wait_s = BUSY_WAIT_S  # a request's wait for a busy node's next pull
        self._verdicts: dict[str, threading.Event] = {}
        self._outcomes: dict[str, str] = {}  # settled in a transaction, reported once it committed
        self.on_outcome: Callable[[str], None] | None = None  # metrics: paid / cut / refunded
        self.on_settled: list[Callable[[Lease], None]] = []  # after a completion's verdict (canaries)
        self.canaries = Canaries(self, control.config.canary_rate)
        self._lock = threading.Lock()
        control.intake.hooks.append(self)
        control.market.on_expire.append(self._expired)
        control.live_path = self._stream_path

    # -- agents ---------------------------------------------------------------------------------------

    def offer(self, agent_id: str, model_id: str, precision: str, ask: int, price: int, stake: int) -> dict:
        """An agent's standing offer to serve `model_id` (replaces its previous one for that model)."""
        spec = self._generation_model(model_id)
        if price < self.control.config.reserve_micro_per_j:
            raise ApiError(
                422, f"price_micro_per_j >= the reserve {self.control.config.reserve_micro_per_j}", str(price)
            )
        with self.control.ledger.session() as session, session.begin():
            session.merge(
                OfferRow(
                    agent_id=agent_id,
                    model_id=spec,
                    precision=precision,
                    ask_micro_per_token=ask,
                    price_micro_per_j=price,
                    stake_micro=stake,
                    updated_at=time.time(),
                )
            )
        return {
            "agent_id": agent_id,
            "model_id": model_id,
            "precision": precision,
            "ask_micro_per_token": ask,
            "price_micro_per_j": price,
            "stake_micro": stake,
        }

    def _generation_model(self, model_id: str) -> str:
        try:
            spec = self.registry.get(model_id)
        except (KeyError, PoiError) as exc:
            raise ApiError(404, "a model of GET /v1/models", f"unknown model {model_id!r}: {exc}") from None
        if spec.kind == "embedding":
            raise ApiError(400, "a text-generation model", f"{model_id!r} is an embedding model")
        return model_id

    def models(self) -> list[dict[str, Any]]:
        with Session(self.control.ledger.engine) as session:
            served = {m for (m,) in session.execute(select(OfferRow.model_id).distinct())}
        return [
            {"id": name, "object": "model", "created": 0, "owned_by": "maxwell", "served": name in served}
            for name, spec in sorted(self.registry.specs().items())
            if spec.kind != "embedding"
        ]

    # -- requests ---------------------------------------------------------------------------------------

    def start(
        self,
        requester_id: str,
        request: CompletionRequest | ChatRequest,
        *,
        agent_id: str | None = None,
        audited: bool = False,
    ) -> Started:
        """Auction, lease, holds; the lease is on its way to the node when this returns. A request
        no node could ever serve is refused (4xx) before any of it; one that cannot be served now
        gets a 503 (`Unavailable`: with Retry-After when it will pass). Maxwell's canaries
        (gateway.canary) name the agent (`agent_id`: no auction) and have the lease audited."""
        timeline = Timeline()
        refused, ignored = request.problems()
        if refused:
            raise ApiError(400, "only what the audit can replay", refused)
        model_id = self._generation_model(request.model)
        try:
            prompt = request.text()
        except ValueError as exc:
            raise ApiError(400, "one prompt per request", str(exc)) from None
        prompt_tokens = len(self.registry.encode_prompt(model_id, prompt))
        refuse_beyond_context(self.registry, model_id, request, prompt_tokens)
        if len(self.live) >= MAX_LIVE:
            raise ApiError(429, f"at most {MAX_LIVE} completions streaming at once", f"{len(self.live)}")
        offers = [o for o in self._offers(model_id) if agent_id in (None, o.agent_id)]
        won = award([Ask(o.agent_id, o.ask_micro_per_token) for o in offers])
        if won is None:
            raise ApiError(503, f"an agent serving {model_id!r}", "no agent offers it", code="no_agent")
        offer = next(o for o in offers if o.agent_id == won.agent_id)
        job = job_of(request, prompt)
        refuse_unservable(self.control, model_id, job, offer, prompt_tokens)
        node_id = choose_node(self.nodes, model_id, self.busy_wait_s)
        bid = BidBody(
            bid_id=f"gateway-{uuid.uuid4().hex}",
            model_id=model_id,
            precision=offer.precision,
            job=job,
            price_micro_per_j=offer.price_micro_per_j,
            stake_micro=offer.stake_micro,
        )
        held = won.price_micro_per_token * job.max_new_tokens
        endpoint = "chat" if isinstance(request, ChatRequest) else "completions"

        def hold(session: Session, pulled: PulledLease) -> None:
            lease_id = pulled.lease.lease_id
            row = CompletionRow(
                lease_id=lease_id,
                requester_id=requester_id,
                endpoint=endpoint,
                price_micro_per_token=won.price_micro_per_token,
                hold_micro=held,
                tokens=0,
                reason=won.reason,
                created_at=time.time(),
            )
            accounts = requester_account(requester_id), requester_escrow(requester_id)
            hold_payment(self.control.ledger, session, row, *accounts)
            # registered before commit: the node's pull may come before issue_directed returns
            live.append(self._live(session, pulled, node_id, audited, request.delivery, timeline))
            self._verdicts[lease_id] = threading.Event()
            self.live[lease_id] = live[0]

        live: list[LiveLease] = []
        pulled, why, deferred = self._issue(node_id, won.agent_id, bid, hold, live, held)
        # deferred for the headroom the node read at its last pull (a busy instant, a profile just
        # run): have it pull again now, with a fresh reading, and try once more
        if deferred and fresh_pull(self.control, node_id, self.busy_wait_s):
            bid = bid.model_copy(update={"bid_id": f"gateway-{uuid.uuid4().hex}"})
            pulled, why, _ = self._issue(node_id, won.agent_id, bid, hold, live, held)
        if pulled is None:  # it fits the node idle (checked above), not now: its headroom, or suspended
            raise Unavailable(f"a lease for agent {won.agent_id!r} on node {node_id!r}", why, "not_issued")
        timeline.mark(Mark.ISSUED)
        return Started(pulled.lease, live[0], won.price_micro_per_token, prompt_tokens, won.reason, ignored)

    def _issue(
        self, node_id: str, agent_id: str, bid: BidBody, hold: Hold, live: list[LiveLease], held: int
    ) -> Directed:
        """One issue transaction, run again (with a fresh bid id) when PostgreSQL aborts it to break a
        deadlock (ledger.retry). A failed try forgets the lease it registered."""
        tried = [bid]

        def once() -> Directed:
            try:
                return self.control.market.issue_directed(node_id, agent_id, tried[-1], hold)
            except Exception:
                for entry in live:
                    self.forget(entry.lease.lease_id)
                live.clear()
                tried.append(bid.model_copy(update={"bid_id": f"gateway-{uuid.uuid4().hex}"}))
                raise

        try:
            return retried(once, f"gateway issue for agent {agent_id}")
        except LedgerError as exc:
            raise ApiError(402, f"a requester balance covering {held} micro", exc.got) from None

    def _offers(self, model_id: str) -> list[OfferRow]:
        with Session(self.control.ledger.engine) as session:
            return list(session.scalars(select(OfferRow).where(OfferRow.model_id == model_id)))

    def nodes(self) -> list[NodeState]:
        """Every enrolled node, with its leases in flight and its last relay of a gateway lease."""
        relays: dict[str, float] = {}
        for entry in list(self.live.values()):
            relays[entry.node_id] = max(relays.get(entry.node_id, 0.0), entry.last_relay)
        return node_states(self.control.ledger.engine, relays)

    def _live(
        self,
        session: Session,
        pulled: PulledLease,
        node_id: str,
        audited: bool = False,
        requested: Delivery | None = None,
        timeline: Timeline | None = None,
    ) -> LiveLease:
        """The running appraisal: the audit lottery is drawn here, once, with the tier's probability
        (a canary's lease, and one delivered verified, is always audited); the streaming audit's
        tolerance by the one rule, from the class the node signed into its pull (its measurement of
        the device the agent runs on; empty: not measured, and the rule says so). An agent enrolled
        with an engine command (the program the node runs, not a claim) is an engine agent: its
        tokens go through EngineStream, its receipt's L4 is judged whole at intake, and its running
        checks use its engine's own profile (none measured: no running checks, L1 says so)."""
        lease = pulled.lease
        delivery = self.delivery.for_lease(requested, pulled.tier)
        command = session.scalar(select(AgentRow.command).where(AgentRow.agent_id == lease.agent_id))
        engine = engine_of_command(json.loads(command or "[]"))
        judge = partial(self._judge, lease)  # for any engine receipt (v4), whichever agent sent it
        audit, replay = None, None
        if engine and (audited or delivery is Delivery.VERIFIED or draw_audit(pulled.audit_probability)):
            choice = EngineStreamChoice(*stream_tie_gap(lease.precision))
            audit = EngineStream(lease, self.audit.reference_model(lease.model_id), choice, AUDIT_BLOCK)
        elif audited or delivery is Delivery.VERIFIED or draw_audit(pulled.audit_probability):
            measured = session.scalar(select(NodeRow.device_class).where(NodeRow.node_id == node_id))
            choice = self.audit.tolerance(lease.precision, measured or "", lease.model_id)
            audit = streaming_audit(
                lease, partial(self.audit.reference_model, lease.model_id), choice, block=AUDIT_BLOCK
            )
            if choice.replay is not None:  # the final verdict replays the answer as it was decoded
                replay = partial(self.audit.replayed, lease, choice=choice)
        profile = self.control.profiles.get(lease.model_id, resident_profile_key(engine))
        checks = RunningChecks(profile, self.registry.reference(lease.model_id)) if profile else None
        return LiveLease(lease, audit, checks, node_id, delivery, timeline, replay, judge)

    def _judge(self, lease: Lease, receipt: OpenedReceipt) -> LayerResult:
        """A whole receipt's L4 at intake, by AuditLayer itself (an engine receipt: its engine path)."""
        return self.audit.appraise(Appraisal(lease, b"", receipt=receipt))

    # -- the node's relay -------------------------------------------------------------------------------

    def _stream_path(self, lease_id: str) -> str | None:
        """Where the node relays a gateway lease (control.stream_to, asked as its pull hands it out)."""
        live = self.live.get(lease_id)
        if live is None:
            return None
        live.timeline.mark(Mark.PULLED)
        return f"/v1/node/stream/{lease_id}"

    def check_node(self, node_id: str, lease_id: str) -> None:
        """A relay must come from the lease's node: known in memory while the lease streams (no
        database read per relay), looked up otherwise."""
        live = self.live.get(lease_id)
        if live is not None:
            expected = live.node_id
        else:
            with Session(self.control.ledger.engine) as session:
                row = session.get(LeaseRow, lease_id)
            expected = row.node_id if row is not None else node_id
        if expected != node_id:
            raise ApiError(403, f"a relay from node {expected!r}, the lease's node", f"one from {node_id!r}")

    def relay(
        self, node_id: str, lease_id: str, tokens: list[list[float]], chunks: list[tuple[int, bytes]]
    ) -> str | None:
        live = self.live.get(lease_id)
        if live is None:
            raise ApiError(404, "a gateway lease streaming now", f"lease {lease_id[:64]!r}")
        arrivals = [Arrival(int(p), int(t), float(s), float(c)) for p, t, s, c in tokens]
        return live.receive(arrivals, chunks)

    def leave(self, lease_id: str, delivered: int, why: str) -> None:
        """The requester's side ended after `delivered` tokens were sent to it (it disconnected, or
        the response gave up waiting): an unfinished lease is stopped at the node's next relay, and
        the requester is charged at most for those tokens, and only if they are affirmed (`settle`)."""
        if (live := self.live.get(lease_id)) is not None:
            live.leave(delivered, why)

    # -- intake hooks (service.intake.IntakeHook) ---------------------------------------------------

    def audited(self, lease_id: str, receipt: bytes) -> LayerResult | None:
        live = self.live.get(lease_id)
        if live is None:
            return None
        live.timeline.mark(Mark.RECEIPT)
        live.no_receipt = not receipt.strip()  # intake will settle it as a failed lease (fail_lease)
        try:
            opened = open_receipt(
                receipt, max_receipt_bytes(live.lease, self.registry.reference(live.lease.model_id).hidden)
            )
        except PoiError:
            opened = None
        return live.audit_result(opened)

    def settle(self, session: Session, lease: Lease, verdict: VerdictRow) -> None:
        row = session.get(CompletionRow, lease.lease_id, with_for_update=True)
        if row is None or row.status != CompletionState.STREAMING:
            return
        live = self.live.get(lease.lease_id)
        accounts = requester_account(row.requester_id), requester_escrow(row.requester_id)
        ledger = self.control.ledger
        if live is not None and live.stopped and live.no_receipt:  # stopped for the requester, not failed
            requester_left(ledger, session, row, verdict, lease.agent_id, live.delivered, accounts, live.left)
            self._outcomes[lease.lease_id] = CompletionState.REFUNDED
            return
        # charged only for tokens the requester was sent: all of them, unless it left first
        tokens = (min(live.delivered, len(live.arrivals)) if live.left else len(live.arrivals)) if live else 0
        outcome = completion_outcome(verdict, cut=bool(live and live.cut))
        why = verdict.reason if outcome is not CompletionState.PAID else ""
        if live is not None and live.left and not live.cut:
            sent = f"{live.left}: charged for the {tokens} tokens sent of {live.job.max_new_tokens}"
            why = f"{sent}; {why}" if why else sent
        settle_completion(ledger, session, row, lease.agent_id, outcome, tokens, accounts, why)
        self._outcomes[lease.lease_id] = outcome
        if (
            outcome is CompletionState.CUT
        ):  # cut off: it serves no more gateway requests until it offers again
            session.execute(delete(OfferRow).where(OfferRow.agent_id == lease.agent_id))

    def settled(self, lease_id: str, verdict: VerdictRow) -> None:
        if (entry := self.live.get(lease_id)) is not None:
            entry.timeline.mark(Mark.SETTLED)
            for hook in self.on_settled:
                hook(entry.lease)
        if (event := self._verdicts.get(lease_id)) is not None:
            event.set()
        outcome = self._outcomes.pop(lease_id, None)
        if outcome and self.on_outcome:
            self.on_outcome(outcome)
        self.forget(lease_id)

    def _expired(self, session: Session, lease_row: Any) -> None:
        row = session.get(CompletionRow, lease_row.lease_id, with_for_update=True)
        if row is not None and row.status == CompletionState.STREAMING:
            accounts = requester_account(row.requester_id), requester_escrow(row.requester_id)
            why = "the lease expired unanswered"
            settle_completion(
                self.control.ledger,
                session,
                row,
                lease_row.agent_id,
                CompletionState.REFUNDED,
                0,
                accounts,
                why,
            )
        self.forget(lease_row.lease_id)

    # -- what the requester gets back ---------------------------------------------------------------

    def wait_verdict(self, lease_id: str, timeout_s: float | None = None) -> bool:
        event = self._verdicts.get(lease_id)
        return event.wait(self.verdict_wait_s if timeout_s is None else timeout_s) if event else True

    def attestation(self, lease_id: str) -> dict[str, Any]:
        """The `maxwell` object: verdict, layers and reasons, joules, what was charged, the EAR."""
        return attestation(self.control, lease_id)

    def forget(self, lease_id: str) -> None:
        """Drop the in-memory state of a finished lease (its rows stay)."""
        with self._lock:
            self.live.pop(lease_id, None)
            self._verdicts.pop(lease_id, None)

    def owns(self, requester_id: str, lease_id: str) -> None:
        with Session(self.control.ledger.engine) as session:
            row = session.get(CompletionRow, lease_id)
        if row is None:
            raise ApiError(404, "a completion of this gateway", f"unknown lease {lease_id[:64]!r}")
        if row.requester_id != requester_id:
            raise ApiError(403, "one of your own completions", "another requester's")


__all__ = ["Gateway", "Started"]
