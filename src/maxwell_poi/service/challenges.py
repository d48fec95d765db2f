"""L3 challenges on the wire: Maxwell asks an exact-tier lease's agent to open traced tensors, the
lease's node relays the question to its resident agent and the agent's answer back.

The database is the mailbox (`cp_challenges`): `ask` writes the question and wakes long-polling
pulls, the node finds it in its next pull (`open_for`, which stamps `delivered_at` the first time a
pull takes it), asks its resident agent (`ResidentAgent.open`, its wait measured by
node.remote.CpuWait) and posts the agent's line verbatim (`answer`); `ask` returns what came of it
(`Asked`). Nothing the node relays is trusted: the line is the agent's claim, checked against the
receipt's signed trace root by the verifier (protocol.trace.verify_opening). A late answer is kept
(for the record) but never counts: the question's deadline is Maxwell's clock.

Whose clock runs when ("never punish Maxwell's own failures"):

- **Not delivered.** Until a pull of the lease's node takes the question, the agent cannot have
  seen it: a question no pull took within `timeout_s` of asking is `UNDELIVERED` — Maxwell's
  failure (node down or busy, network), no evidence about the agent. Delivered means a pull's
  answer carried it: one lost on its way back to the node still counts as delivered.
- **From delivery.** The agent's `timeout_s` counts from delivery: a question taken late (at most
  `timeout_s` after asking, else it is undelivered) has its deadline moved to `delivered_at +
  timeout_s` — so never later than twice the timeout from asking.
- **CPU wait.** The node measures how long the agent's sandbox waited for a CPU while it answered
  (run-queue delay, observer.contention; the agent's threads per busy core, at most the wall time)
  and posts it beside the line (`OpeningBody.cpu_wait_s`): an answer is in time when it comes
  before the deadline plus that wait, capped at `CPU_WAIT_CAP` × `timeout_s` — the cap also bounds
  what an agent can buy by starving itself with its own threads. Silence after delivery is judged
  once that capped extension has passed too (`UNANSWERED`).

One lease's L3 challenge opens every block (verifier.every_block) and may be several questions here,
one per part of the trace that fits the relay's line; they are asked one after another, each with
its own deadline, and the first that goes unanswered or fails ends the challenge.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from ..ledger import Ledger
from ..protocol.stream import TaggedOpening, TaggedRefusal, parse_resident_line
from ..protocol.trace import Opening, opening_from_line
from .errors import ApiError
from .schema import ChallengeRow, LeaseRow
from .states import ChallengeKind, ChallengeState
from .wire import OpeningBody

CPU_WAIT_CAP = 0.5  # the measured CPU wait extends a deadline by at most this fraction of the timeout


class Outcome(StrEnum):
    """How a question ended. Only UNDELIVERED says nothing about the agent."""

    OPENED = "opened"  # an opening came in time (still to be checked against the trace root)
    NOT_OPENED = "not_opened"  # an answer in time that is no opening: a refusal, garbage, another lease's
    UNANSWERED = "unanswered"  # taken by the node, no answer before its deadline: the agent's silence
    UNDELIVERED = "undelivered"  # no pull of the node took it before its deadline: Maxwell's failure


@dataclass(frozen=True)
class Asked:
    """What came of one question: its outcome, why (for the verdict), and the opening if one came."""

    challenge_id: int
    outcome: Outcome
    reason: str
    opening: Opening | None = None

    @property
    def evidence(self) -> bool:
        """Whether this outcome may judge the agent (an undelivered question may not)."""
        return self.outcome is not Outcome.UNDELIVERED


class ChallengeBoard:
    def __init__(self, ledger: Ledger, wake_nodes: Callable[[], None] = lambda: None) -> None:
        self.ledger = ledger
        self.wake_nodes = wake_nodes  # a long-polling pull returns at once with the question
        self._answered = threading.Condition()

    def ask(
        self, lease_id: str, node_id: str, kind: ChallengeKind, keys: list[tuple[int, str]], timeout_s: float
    ) -> Asked:
        """Ask for these tensors and wait for what comes of it (`Asked`)."""
        now = time.time()
        row = ChallengeRow(
            lease_id=lease_id,
            node_id=node_id,
            kind=kind,
            keys=json.dumps([[b, op] for b, op in keys]),
            status=ChallengeState.OPEN,
            asked_at=now,
            delivered_at=None,
            deadline=now + timeout_s,
        )
        with self.ledger.session() as session, session.begin():
            session.add(row)
            session.flush()
            challenge_id = row.id
        self.wake_nodes()
        ended = self._wait(challenge_id, timeout_s)
        if ended.status == ChallengeState.ANSWERED:
            got = _opening_of(ended.answer or b"", lease_id)
            if isinstance(got, str):
                return Asked(challenge_id, Outcome.NOT_OPENED, got)
            return Asked(challenge_id, Outcome.OPENED, "opened in time", got)
        if ended.delivered_at is None:
            why = (
                f"question not delivered to node {node_id} within {timeout_s:.3g} s: Maxwell's failure, "
                f"not evidence (challenge {challenge_id})"
            )
            return Asked(challenge_id, Outcome.UNDELIVERED, why)
        why = f"no opening within {timeout_s:.3g} s of its delivery to node {node_id} (nor in the "
        why += f"{CPU_WAIT_CAP * timeout_s:.3g} s its CPU wait may add; challenge {challenge_id})"
        return Asked(challenge_id, Outcome.UNANSWERED, why)

    def _wait(self, challenge_id: int, timeout_s: float) -> ChallengeRow:
        """The question's row once it is answered, or closed without an answer: undelivered at its
        deadline, or delivered and silent past its deadline and the most CPU wait could extend it."""
        while True:
            with Session(self.ledger.engine) as session:
                row = session.get(ChallengeRow, challenge_id)
            if row is None:  # rows are never deleted: say so rather than wait forever
                raise LookupError(f"challenge {challenge_id}: expected its row, got none")
            if row.status != ChallengeState.OPEN:
                return row  # answered, or an answer came after even an extended deadline (`answer`)
            delivered = row.delivered_at is not None
            left = row.deadline + (CPU_WAIT_CAP * timeout_s if delivered else 0.0) - time.time()
            if left <= 0:
                self._close_late(challenge_id, delivered)  # no-op when delivered or answered meanwhile
                continue
            with self._answered:
                self._answered.wait(min(left, 1.0))  # woken by `answer`; polls for another process's

    def _close_late(self, challenge_id: int, delivered: bool) -> None:
        """OPEN -> LATE, only if still as seen (delivered or not): a pull that takes the question in
        the same instant either delivers it first (and the agent gets its time) or finds it closed."""
        taken = ChallengeRow.delivered_at.is_not(None) if delivered else ChallengeRow.delivered_at.is_(None)
        with self.ledger.session() as session, session.begin():
            session.execute(
                update(ChallengeRow)
                .where(ChallengeRow.id == challenge_id, ChallengeRow.status == ChallengeState.OPEN, taken)
                .values(status=ChallengeState.LATE)
            )

    def open_for(self, node_id: str) -> list[dict[str, Any]]:
        """The questions waiting for this node (its pull carries them), with each agent's id. The
        first pull that takes a question stamps its delivery and restarts its clock from there."""
        now = time.time()
        rows = self._waiting(node_id, now)
        fresh = [c.id for c, _agent in rows if c.delivered_at is None]
        if fresh:
            with self.ledger.session() as session, session.begin():
                session.execute(
                    update(ChallengeRow)
                    .where(
                        ChallengeRow.id.in_(fresh),
                        ChallengeRow.status == ChallengeState.OPEN,
                        ChallengeRow.delivered_at.is_(None),  # the first delivery only
                        ChallengeRow.deadline > now,
                    )
                    # still undelivered, so deadline - asked_at is the timeout it was asked with
                    .values(delivered_at=now, deadline=now + (ChallengeRow.deadline - ChallengeRow.asked_at))
                )
            rows = self._waiting(node_id, now)
        out = []
        for c, agent_id in rows:
            timeout = c.deadline - (c.delivered_at if c.delivered_at is not None else c.asked_at)
            out.append(
                {
                    "challenge_id": c.id,
                    "lease_id": c.lease_id,
                    "agent_id": agent_id,
                    "keys": json.loads(c.keys),
                    "timeout_s": round(c.deadline - now, 3),
                    "cpu_wait_cap_s": round(CPU_WAIT_CAP * timeout, 3),
                }
            )
        return out

    def _waiting(self, node_id: str, now: float) -> list[Any]:
        with Session(self.ledger.engine) as session:
            return list(
                session.execute(
                    select(ChallengeRow, LeaseRow.agent_id)
                    .join(LeaseRow, LeaseRow.lease_id == ChallengeRow.lease_id)
                    .where(
                        ChallengeRow.node_id == node_id,
                        ChallengeRow.status == ChallengeState.OPEN,
                        ChallengeRow.deadline > now,
                    )
                    .order_by(ChallengeRow.id)
                    .limit(64)
                ).all()
            )

    def answer(self, node_id: str, body: OpeningBody) -> dict[str, Any]:
        """A node hands in its agent's line. Only the lease's node may; once per question."""
        now = time.time()
        with self.ledger.session() as session, session.begin():
            row = session.get(ChallengeRow, body.challenge_id, with_for_update=True)
            if row is None or row.lease_id != body.lease_id:
                got = "no such challenge" if row is None else f"a challenge of lease {row.lease_id}"
                raise ApiError(404, f"challenge {body.challenge_id} of lease {body.lease_id}", got)
            if row.node_id != node_id:
                raise ApiError(403, f"an answer from node {row.node_id!r}, the lease's", f"from {node_id!r}")
            if row.status != ChallengeState.OPEN:
                raise ApiError(409, "an answer to an open challenge", f"a challenge already {row.status}")
            # in time up to the deadline plus the CPU wait the node measured, within the cap
            timeout = row.deadline - (row.delivered_at if row.delivered_at is not None else row.asked_at)
            allowed = row.deadline + min(body.cpu_wait_s or 0.0, CPU_WAIT_CAP * timeout)
            late = now > allowed
            row.status = ChallengeState.LATE if late else ChallengeState.ANSWERED  # the moves from OPEN
            row.answered_at, row.answer = now, body.line.encode()
            if not late and now > row.deadline:
                row.deadline = allowed  # kept: the deadline this answer was judged by
        with self._answered:
            self._answered.notify_all()
        if late:
            cpu = f" + {allowed - row.deadline:.3f} s of CPU wait" if allowed > row.deadline else ""
            raise ApiError(409, f"an answer before the deadline {row.deadline:.3f}{cpu}", f"one at {now:.3f}")
        return {
            "challenge_id": body.challenge_id,
            "lease_id": body.lease_id,
            "status": ChallengeState.ANSWERED,
        }

    def of_lease(self, lease_id: str) -> list[dict[str, Any]]:
        with Session(self.ledger.engine) as session:
            rows = session.scalars(
                select(ChallengeRow).where(ChallengeRow.lease_id == lease_id).order_by(ChallengeRow.id)
            ).all()
        return [
            {
                "challenge_id": r.id,
                "kind": r.kind,
                "keys": json.loads(r.keys),
                "status": r.status,
                "asked_at": r.asked_at,
                "delivered_at": r.delivered_at,
                "deadline": r.deadline,
                "answered_at": r.answered_at,
                "answer_bytes": len(r.answer or b""),
            }
            for r in rows
        ]


def _opening_of(line: bytes, lease_id: str) -> Opening | str:
    """The agent's line as an opening, or why it is none (a refusal, garbage, another lease's)."""
    if not line:
        return "the agent gave no answer"
    try:
        parsed = parse_resident_line(line.rstrip(b"\n"))
    except ValueError as exc:
        return f"the agent's answer is not an opening: {exc}"
    if isinstance(parsed, TaggedRefusal):
        return f"the agent refused: {parsed.error}"
    if not isinstance(parsed, TaggedOpening) or parsed.lease_id != lease_id:
        return f"expected an opening of lease {lease_id}, got {type(parsed).__name__}"
    try:
        return opening_from_line(parsed.line)
    except ValueError as exc:
        return f"the agent's opening is unreadable: {exc}"
