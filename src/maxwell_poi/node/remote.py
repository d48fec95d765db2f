"""A node under a control plane: it pulls leases, runs them in its sandboxes, hands in the evidence.

Pull, not push: the node calls `POST /v1/node/pull` (a signed request) with its headroom and its
hardware class (bids for it are priced with that class's profile, service.market); each
pull clears one auction round for it. Leases come with the enrolled agent's command; the node
starts each agent once (resident, in its own sandbox) and hands it its leases `batch` at a time.
For each lease it posts the agent's answer verbatim with its signed evidence to
`/v1/node/intake` — retried on a network error, which is safe because intake is idempotent. A
lease the node cannot run (no command for its agent) is left alone: it expires on the control
plane, which returns the agent's hold and stake. A newly started agent first answers one warm-up
lease the node made itself (never handed in): its model load is not billed to a paying lease. The
warm-up asks the node's own question, never the paying job's: a caching agent must not hold the paid
answer before the paid lease arrives (issue 24). That question carries fresh random words, so no
requester can pre-place it in a paying lease either, even one who knows WARM_UP_PROMPT.

A resident agent that died (crashed, killed, exited) is started again before its next wave, at most
RESTART_LIMIT times within RESTART_WINDOW_S and after a backoff that doubles with each restart; past
the limit its leases are left to expire (hold and stake back to the agent, nothing paid). Its exit
code and the last lines of its stderr go to the node's log.

L3 questions that come with a pull are answered before its leases are served: the node asks the
resident agent, waiting the question's timeout plus the CPU wait it measures of the agent's sandbox
meanwhile (`CpuWait`, within the question's `cpu_wait_cap_s`), and posts the figure with the line.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel

from ..observer.contention import mark
from ..protocol.lease import EmbedJob, GenerateJob, Lease
from ..protocol.stream import TaggedOpening, refusal_line
from ..service.client import ServiceClient, ServiceRefused
from ..service.wire import IntakeAnswer, OpenChallenge, OpeningAnswer, PullBody
from .attest import hardware_class
from .headroom import measure_headroom
from .node import Node
from .relay import StreamRelay
from .sandbox import Sandbox

log = logging.getLogger(__name__)
INTAKE_TRIES = 5
# the warm-up's question starts with these words and ends with fresh random ones (warm_up_lease)
WARM_UP_PROMPT = "Maxwell node warm-up: the model is loaded before the first paying lease."
WARM_UP_TEXT = "Maxwell node warm-up."
WARM_UP_NONCE_BYTES = 16  # 128 random bits: no requester guesses the warm-up's question
RESTART_LIMIT = 3  # restarts of one agent allowed within RESTART_WINDOW_S
RESTART_WINDOW_S = 600.0
RESTART_BACKOFF_S = 1.0  # before the first restart; doubled for each later one in the window


class Refused(BaseModel):
    """What the control plane refused for good (this node never sends it again): its status and body."""

    lease_id: str
    refused: int
    error: Any


class ChallengeHandled(BaseModel):
    """An L3 challenge this node relayed its agent's answer to, and what the control plane said."""

    lease_id: str
    challenge_id: int
    answer: OpeningAnswer | Refused


Handed = IntakeAnswer | Refused | ChallengeHandled  # what one step handed in, item by item


class CpuWait:
    """How long an agent's sandbox has waited for a CPU since this was made — Maxwell's reading, never
    the agent's: its threads' run-queue delay (observer.contention) per core it kept busy (as L1's
    free pace counts it, observer.evidence), at most the wall time. Kept at its most over the reads,
    since a thread that exits takes its delay with it; None where the kernel gives no schedstat."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.start, self.usage = mark(sandbox.pids()), sandbox.usage()
        self.most: float | None = None

    def read(self) -> float | None:
        end, usage = mark(self.sandbox.pids()), self.sandbox.usage()
        wall = end.host.at - self.start.host.at
        if self.start.wait_s is None or end.wait_s is None or wall <= 0:
            return self.most
        cores = max(1.0, (usage.cpu_ns - self.usage.cpu_ns) / 1e9 / wall)
        now = round(min(wall, max(0.0, end.wait_s - self.start.wait_s) / cores), 6)
        self.most = now if self.most is None else max(self.most, now)
        return self.most


@dataclass
class RemoteNode:
    client: ServiceClient
    node: Node
    batch: int = 4
    poll_s: float = 1.0
    wait_s: float = 0.0  # long poll: the control plane holds an empty pull this long (gateway leases)
    cwd: str | None = None
    agents: list[str] = field(default_factory=list)  # [] = any agent the control plane sends
    headroom: Callable[[], float] = field(default=lambda: measure_headroom().joules)
    on_answer: Callable[[IntakeAnswer | Refused], None] | None = None
    skipped: set[str] = field(default_factory=set)
    # this node's hardware class, as its evidence carries it: the control plane prices its bids by it
    device_class: str = field(default_factory=lambda: hardware_class()["device_class"])
    restarts: dict[str, list[float]] = field(default_factory=dict)  # agent id -> restart times (monotonic)
    down: set[str] = field(default_factory=set)  # agents found dead and not restarted yet

    def step(self) -> list[Handed]:
        """One pull and everything it brought; the intake answers (and the challenges answered)."""
        answer = self.client.send_pull(
            PullBody(
                headroom_j=self.headroom(),
                agents=self.agents,
                max_leases=4 * self.batch,
                wait_s=self.wait_s,
                device_class=self.device_class,  # signed with the body: bids for it priced by its profile
            )
        )
        by_agent: dict[str, list[Lease]] = defaultdict(list)
        commands: dict[str, list[str]] = {}
        stream_to: dict[str, str] = {}
        for item in answer.leases:
            lease = Lease.model_validate(item.lease)
            if lease.lease_id in self.skipped:
                continue
            by_agent[lease.agent_id].append(lease)
            commands[lease.agent_id] = item.command
            if item.stream_to:
                stream_to[lease.lease_id] = item.stream_to
        # questions first: each one's clock runs from when Maxwell asked, and waves of new leases
        # can take longer than it has (a busy host's demo slashed an honest agent that way)
        answers: list[Handed] = [self._answer_challenge(c) for c in answer.challenges]
        for agent_id, leases in by_agent.items():
            if not self._ensure_agent(agent_id, commands[agent_id], leases):
                continue
            for i in range(0, len(leases), self.batch):
                answers.extend(self._serve_wave(agent_id, leases[i : i + self.batch], stream_to))
        return answers

    def _answer_challenge(self, challenge: OpenChallenge) -> ChallengeHandled:
        """Ask the lease's resident agent to open what Maxwell asked for; post its line verbatim (a
        refusal line when it gave none: Maxwell judges either, against the receipt's trace root),
        with the CPU wait its sandbox measured meanwhile (extends the deadline, within Maxwell's cap)."""
        lease_id, agent_id = challenge.lease_id, challenge.agent_id
        keys = list(challenge.keys)
        agent = self.node.agents.get(agent_id)
        cpu_wait_s = None
        if agent is None:  # not resident here (stopped, or this node restarted): no one to ask
            line = refusal_line(lease_id, f"agent {agent_id} is not running on node {self.node.node_id}")
        else:
            waited, cap = CpuWait(agent.sandbox), challenge.cpu_wait_cap_s
            more = (lambda: min(cap, waited.read() or 0.0)) if cap > 0 else None
            got = agent.open(lease_id, keys, timeout_s=max(0.1, challenge.timeout_s), more_s=more)
            cpu_wait_s = waited.read()
            line = got.line if isinstance(got, TaggedOpening) else refusal_line(lease_id, got)
        answer: OpeningAnswer | Refused
        try:
            answer = self.client.opening(challenge.challenge_id, lease_id, line, cpu_wait_s=cpu_wait_s)
        except ServiceRefused as exc:  # late, or already answered: nothing more to do for it
            answer = Refused(lease_id=lease_id, refused=exc.status, error=exc.body)
        return ChallengeHandled(lease_id=lease_id, challenge_id=challenge.challenge_id, answer=answer)

    def _serve_wave(
        self, agent_id: str, wave: list[Lease], stream_to: dict[str, str]
    ) -> list[IntakeAnswer | Refused]:
        """One wave; gateway leases relayed live. An agent the control plane cut off is stopped
        once its wave is handed in (its next lease starts it afresh)."""
        agent = self.node.agent(agent_id)
        relays = {
            lease.lease_id: StreamRelay(
                self.client, stream_to[lease.lease_id], functools.partial(agent.cut, lease.lease_id)
            )
            for lease in wave
            if lease.lease_id in stream_to
        }
        results = self.node.serve(
            agent_id,
            wave,
            watch=lambda lease: relays[lease.lease_id].watch if lease.lease_id in relays else None,
        )
        for relay in relays.values():
            relay.close()
        answers = [self._hand_in(r.lease.lease_id, r.run.receipt, r.signed_evidence) for r in results]
        cut = [lid for lid, relay in relays.items() if relay.cut_reason]
        if cut:
            log.warning("agent %s cut off by the control plane (lease %s): stopping it", agent_id, cut[0])
            self.node.stop_agent(agent_id)
        return answers

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                served = self.step()
            except (httpx.HTTPError, ServiceRefused) as exc:
                log.warning("pull failed (%s); retrying in %.1f s", exc, self.poll_s)
                served = []
            if not served:
                stop.wait(self.poll_s)

    def _ensure_agent(self, agent_id: str, command: list[str], leases: list[Lease]) -> bool:
        running = self.node.agents.get(agent_id)
        if running is not None and running.proc.poll() is None:
            if running.argv == list(command) or not command:
                return True
            log.info("agent %s re-enrolled with another command: restarting it", agent_id)
            self.node.stop_agent(agent_id)
            running = None
        if running is not None:  # it died since its last wave
            code, tail = running.proc.poll(), running.stderr_tail().strip().splitlines()[-5:]
            log.warning("agent %s exited (code %s): %s", agent_id, code, " | ".join(tail) or "no stderr")
            self.node.stop_agent(agent_id)
            self.down.add(agent_id)
        if agent_id in self.down:  # restart it, within limits
            wait = self._restart_wait(agent_id)
            if wait is None or wait > 0:
                why = (
                    f"{RESTART_LIMIT} restarts in {RESTART_WINDOW_S:.0f} s"
                    if wait is None
                    else f"backing off {wait:.1f} s"
                )
                log.error(
                    "agent %s not restarted (%s): its %d lease(s) will expire", agent_id, why, len(leases)
                )
                self.skipped.update(lease.lease_id for lease in leases)
                return False
            self.restarts.setdefault(agent_id, []).append(time.monotonic())
            self.down.discard(agent_id)
        if not command:
            log.warning(
                "no command enrolled for agent %s: its %d lease(s) will expire", agent_id, len(leases)
            )
            self.skipped.update(lease.lease_id for lease in leases)
            return False
        try:
            self.node.start_agent(agent_id, command, cwd=self.cwd)
        except OSError as exc:  # its program cannot start here: its leases expire, the node goes on
            log.error("cannot start agent %s (%s): its %d lease(s) will expire", agent_id, exc, len(leases))
            self.skipped.update(lease.lease_id for lease in leases)
            return False
        self._warm_up(agent_id, leases[0])
        return True

    def _restart_wait(self, agent_id: str) -> float | None:
        """Seconds until the agent may be restarted (0: now); None when it used up its restarts."""
        now = time.monotonic()
        recent = [t for t in self.restarts.get(agent_id, []) if now - t < RESTART_WINDOW_S]
        self.restarts[agent_id] = recent
        if len(recent) >= RESTART_LIMIT:
            return None
        if not recent:
            return 0.0
        return max(0.0, recent[-1] + RESTART_BACKOFF_S * 2 ** (len(recent) - 1) - now)

    def _warm_up(self, agent_id: str, first: Lease) -> None:
        """One unbilled lease of the same model and size first, made here and never handed in: the
        agent loads its model on its first lease, and that load is not the first paying lease's
        work."""
        self.node.serve(agent_id, [warm_up_lease(agent_id, first)])

    def _hand_in(self, lease_id: str, receipt: bytes, evidence: bytes) -> IntakeAnswer | Refused:
        answer: IntakeAnswer | Refused
        for attempt in range(INTAKE_TRIES):
            try:
                answer = self.client.intake(lease_id, receipt, evidence)
                break
            except httpx.HTTPError as exc:  # the control plane restarting: intake is idempotent
                if attempt == INTAKE_TRIES - 1:
                    raise
                log.warning("intake of %s failed (%s); retrying", lease_id, exc)
                time.sleep(0.5 * 2**attempt)
            except ServiceRefused as exc:  # refused for good: never serve or hand this lease in again
                answer = Refused(lease_id=lease_id, refused=exc.status, error=exc.body)
                self.skipped.add(lease_id)
                break
        if self.on_answer:
            self.on_answer(answer)
        return answer


def warm_up_lease(agent_id: str, first: Lease) -> Lease:
    """The warm-up for `first`'s agent: `first`'s model, precision and job size, with a question of
    the node's own, fresh each time (never `first`'s, nor one a requester could have asked)."""
    job = first.job
    if isinstance(job, GenerateJob):
        warm_job: GenerateJob | EmbedJob = job.model_copy(
            update={"prompt": _fresh(WARM_UP_PROMPT, {job.prompt})}
        )
    else:
        warm_job = job.model_copy(update={"texts": [_fresh(WARM_UP_TEXT, set(job.texts))]})
    return Lease.issue(agent_id, first.model_id, warm_job, precision=first.precision, ttl_s=600)


def _fresh(stem: str, paying: set[str]) -> str:
    """`stem` and random words; drawn again in the (2^-128) case it equals a paying input."""
    while True:
        text = f"{stem} {secrets.token_hex(WARM_UP_NONCE_BYTES)}"
        if text not in paying:
            return text
