"""Canary leases: Maxwell's own requests, indistinguishable from a requester's, always audited.

The audit lottery draws few leases (a medium-tier lease is audited with the deterrence probability,
often well under 1 %), so an agent that cheats on a fraction of its leases, or only where it guesses
no audit is coming, is caught rarely and loses money only in expectation. A canary raises the
certain part: after a completion settles, with probability `canary_rate` (`POI_SERVE_CANARY_RATE`),
Maxwell asks the agent that served it a question of its own — a recent real request's job for the
same model (prompt, max_tokens, temperature, top_k), so the agent cannot tell it from traffic by
its content, else one of the registry's prompts — as requester `maxwell-canary`, and has that lease
audited as it streams (the claimed model replays every token and fingerprint chunk: the answer
Maxwell knows is the one it recomputes). The agent is paid its ask for an honest canary like for any
request, and loses its stake and its offers when the canary catches it. Maxwell funds the canary
requester from deposits (`deposit:canary:…` in the ledger): the canaries' price is visible there.

What it does not hide: an agent that remembers every prompt it served recognises a repeat of its
own; questions drawn from other agents' traffic weaken that, fresh generated prompts would end it
(not done). A canary is paid at the agent's own ask (no auction), which it learns only after the fact.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ..protocol.lease import GenerateJob, Lease
from ..registry.prompts import PROMPTS
from ..service.errors import ApiError
from ..service.schema import CompletionRow, LeaseRow, OfferRow, RequesterRow, VerdictRow
from .openai_wire import CompletionRequest

if TYPE_CHECKING:
    from .gateway import Gateway

log = logging.getLogger(__name__)

CANARY_REQUESTER = "maxwell-canary"
RECENT = 200  # real completions a canary's question is drawn from
TOP_UP_LEASES = 100  # the canary requester's wallet is topped up to cover this many canaries at once
KEPT = 256  # canary results kept in memory for the admin route and the tests


@dataclass(frozen=True)
class CanaryResult:
    agent_id: str
    model_id: str
    sent: bool
    lease_id: str | None = None
    verdict: str | None = None  # affirming / warning / contraindicated; None when not sent
    stake: str | None = None  # what the verdict did to the agent's stake
    reason: str = ""
    question: str = ""  # where its job came from: "a real request's job" or "a registry prompt"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Canaries:
    """Sends canaries for one gateway: after settled completions at `rate`, or one now (`send`)."""

    def __init__(self, gateway: Gateway, rate: float, *, rng: random.Random | None = None) -> None:
        self.gateway, self.rate = gateway, rate
        self.rng = rng or random.SystemRandom()
        self.mine: set[str] = set()  # canary lease ids: a canary's own verdict draws no canary
        self.results: deque[CanaryResult] = deque(maxlen=KEPT)
        self.on_result: Callable[[CanaryResult], None] | None = None  # metrics
        self._lock = threading.Lock()
        gateway.on_settled.append(self._after)

    def _after(self, lease: Lease) -> None:
        """A completion settled: draw whether its agent gets a canary (off the caller's thread,
        which is intake's)."""
        if lease.lease_id in self.mine:  # a canary's own verdict draws no canary; forget it now
            self.mine.discard(lease.lease_id)
            return
        if not self.rate or self.rng.random() >= self.rate:
            return
        threading.Thread(
            target=self.send, args=(lease.agent_id, lease.model_id), name="canary", daemon=True
        ).start()

    def send(self, agent_id: str, model_id: str) -> CanaryResult:
        """One canary to `agent_id` for `model_id`, run to its verdict."""
        job, question = self._question(model_id)
        request = CompletionRequest(
            model=model_id,
            prompt=job.prompt,
            max_tokens=job.max_new_tokens,
            temperature=job.temperature,
            top_k=job.top_k,
        )
        try:
            self._fund(job.max_new_tokens)
            started = self.gateway.start(CANARY_REQUESTER, request, agent_id=agent_id, audited=True)
        except ApiError as exc:  # no offer from it any more, no node free now, …: not sent, said why
            return self._record(CanaryResult(agent_id, model_id, False, reason=exc.got, question=question))
        lease_id = started.lease.lease_id
        self.mine.add(lease_id)
        self.gateway.wait_verdict(lease_id, self.gateway.verdict_wait_s + job.max_new_tokens)
        with Session(self.gateway.control.ledger.engine) as session:
            verdict = session.get(VerdictRow, lease_id)
        if verdict is None:
            why = "no verdict yet"
            result = CanaryResult(agent_id, model_id, True, lease_id, reason=why, question=question)
        else:
            result = CanaryResult(
                agent_id,
                model_id,
                True,
                lease_id,
                verdict.verdict,
                verdict.stake_outcome,
                verdict.reason,
                question,
            )
        log.info("canary for %s on %s: %s", agent_id, model_id, result.verdict)
        return self._record(result)

    def _record(self, result: CanaryResult) -> CanaryResult:
        self.results.append(result)
        if self.on_result:
            self.on_result(result)
        return result

    def _question(self, model_id: str) -> tuple[GenerateJob, str]:
        """A recent real request's job for `model_id` (a requester's, not a canary's), else a
        registry prompt at the gateway's defaults."""
        with Session(self.gateway.control.ledger.engine) as session:
            rows = session.scalars(
                select(LeaseRow.lease_json)
                .join(CompletionRow, CompletionRow.lease_id == LeaseRow.lease_id)
                .where(CompletionRow.requester_id != CANARY_REQUESTER)
                .order_by(CompletionRow.created_at.desc())
                .limit(RECENT)
            ).all()
        jobs = [lease.job for lease in map(Lease.from_json, rows) if lease.model_id == model_id]
        real = [job for job in jobs if isinstance(job, GenerateJob)]
        if real:
            return self.rng.choice(real), "a real request's job"
        default = CompletionRequest(model=model_id, prompt=self.rng.choice(PROMPTS))
        job = GenerateJob(
            prompt=default.text(), max_new_tokens=default.new_tokens, temperature=default.sampling_temperature
        )
        return job, "a registry prompt"

    def _fund(self, tokens: int) -> None:
        """The canary requester exists and its wallet covers the largest hold a canary can need."""
        gateway = self.gateway
        with self._lock:
            with Session(gateway.control.ledger.engine) as session:
                enrolled = session.get(RequesterRow, CANARY_REQUESTER) is not None
            if not enrolled:
                with contextlib.suppress(ApiError):  # enrolled meanwhile (another process): fine
                    gateway.enroll_requester(CANARY_REQUESTER, 0)
            with Session(gateway.control.ledger.engine) as session:
                asks = session.scalars(select(OfferRow.ask_micro_per_token)).all()
            need = max(asks, default=0) * tokens * TOP_UP_LEASES
            have = gateway.balance(CANARY_REQUESTER)["wallet_micro"]
            if have < need // TOP_UP_LEASES:
                gateway.deposit(CANARY_REQUESTER, need, f"canary:{int(time.time())}:{uuid.uuid4().hex[:8]}")
