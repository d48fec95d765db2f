"""L3 challenges on the wire: Maxwell asks an exact-tier lease's agent to open traced tensors, the
lease's node relays the question to its resident agent and the agent's answer back.

The database is the mailbox (`cp_challenges`): `ask` writes the question and wakes long-polling
pulls, the node finds it in its next pull (`open_for`), asks its resident agent
(`ResidentAgent.open`) and posts the agent's line verbatim (`answer`); `ask` returns it, or why
there is none. Nothing the node relays is trusted: the line is the agent's claim, checked against
the receipt's signed trace root by the verifier (protocol.trace.verify_opening). A late answer is
kept (for the record) but never counts: the question's deadline is Maxwell's clock.

One lease's L3 challenge opens every block (verifier.every_block) and may be several questions here,
one per part of the trace that fits the relay's line; they are asked one after another, each with
its own deadline, and the first that goes unanswered or fails ends the challenge.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
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


class ChallengeBoard:
    def __init__(self, ledger: Ledger, wake_nodes: Callable[[], None] = lambda: None) -> None:
        self.ledger = ledger
        self.wake_nodes = wake_nodes  # a long-polling pull returns at once with the question
        self._answered = threading.Condition()

    def ask(
        self, lease_id: str, node_id: str, kind: ChallengeKind, keys: list[tuple[int, str]], timeout_s: float
    ) -> Opening | str:
        """Ask for these tensors and wait for the answer: the opening, or why there is none."""
        now = time.time()
        row = ChallengeRow(
            lease_id=lease_id,
            node_id=node_id,
            kind=kind,
            keys=json.dumps([[b, op] for b, op in keys]),
            status=ChallengeState.OPEN,
            asked_at=now,
            deadline=now + timeout_s,
        )
        with self.ledger.session() as session, session.begin():
            session.add(row)
            session.flush()
            challenge_id = row.id
        self.wake_nodes()
        answer = self._wait(challenge_id, now + timeout_s)
        if answer is None:
            self._close_late(challenge_id)
            return f"no opening within {timeout_s:.0f} s (challenge {challenge_id})"
        return _opening_of(answer, lease_id)

    def _wait(self, challenge_id: int, deadline: float) -> bytes | None:
        while True:
            with Session(self.ledger.engine) as session:
                row = session.get(ChallengeRow, challenge_id)
            if row is not None and row.status == ChallengeState.ANSWERED:
                return row.answer or b""
            left = deadline - time.time()
            if left <= 0:
                return None
            with self._answered:
                self._answered.wait(min(left, 1.0))  # woken by `answer`; polls for another process's

    def _close_late(self, challenge_id: int) -> None:
        with self.ledger.session() as session, session.begin():
            session.execute(
                update(ChallengeRow)
                .where(ChallengeRow.id == challenge_id, ChallengeRow.status == ChallengeState.OPEN)
                .values(status=ChallengeState.LATE)
            )

    def open_for(self, node_id: str) -> list[dict[str, Any]]:
        """The questions waiting for this node (its pull carries them), with each agent's id."""
        now = time.time()
        with Session(self.ledger.engine) as session:
            rows = session.execute(
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
        return [
            {
                "challenge_id": c.id,
                "lease_id": c.lease_id,
                "agent_id": agent_id,
                "keys": json.loads(c.keys),
                "timeout_s": round(c.deadline - now, 3),
            }
            for c, agent_id in rows
        ]

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
            late = now > row.deadline
            row.status = ChallengeState.LATE if late else ChallengeState.ANSWERED  # the moves from OPEN
            row.answered_at, row.answer = now, body.line.encode()
        with self._answered:
            self._answered.notify_all()
        if late:
            raise ApiError(409, f"an answer before the deadline {row.deadline:.3f}", f"one at {now:.3f}")
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
