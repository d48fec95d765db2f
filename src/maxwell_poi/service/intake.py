"""The hot path: a node hands in a lease's receipt with its signed evidence; the control plane
appraises the cheap layers (L0 + L1 + L2) inline, draws the audit lottery, and hands the outcome to
service.settlement, which settles the lease's money in the same database transaction as its
receipt and verdict (and queues a pending lease's audit, whoever called intake).

Exactly once: the receipt row's primary key is the lease id. A second submission of the same
receipt is answered with the first verdict (`duplicate: true`) and moves nothing; a different
receipt for a settled lease is a replay and refused (409). Two racing submissions both appraise,
one commits, the other's insert fails on the key and it answers as the duplicate.

A drawn audit (L4, one prefill) is not run inline: the verdict is stored `final: false`, energy is
settled (the joules were burnt either way), the stake stays escrowed (`pending`), and the lease
goes to the audit workers (service.audits), which finalise it.

An empty receipt is not appraised (issue 23: fail closed, and never punish Maxwell's own failures).
The node hands one in, with its signed evidence, when the agent never started (a bad `--key`, a
missing program: it exits at once) or crashed before writing its receipt. That is a *failed lease*
(`LeaseState.FAILED`, service.settlement.fail_lease): nothing charged, the stake released, nothing
paid, and a verdict row whose reason names the cause from Maxwell's evidence — the exit code (or
"no exit code seen (still running, …)" when the agent had not exited when the evidence was sealed)
and the last lines of its stderr. Never slashed: an empty receipt claims no work, so there is nothing to catch
lying; it cannot dodge an audit profitably either, since it earns nothing and three in a row suspend
the agent (service.market). Whatever it streamed first does not change this. A non-empty receipt
that fails L0 is judged as before: contraindicated, slashed.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..economics.energy import measured_energy
from ..ledger import Ledger
from ..node.attest import SignedEvidence, open_evidence
from ..observer.evidence import LeaseEvidence
from ..protocol.errors import EvidenceFormatError, EvidenceSignatureError, UnknownAgentError
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerName, LayerResult, Status, Verdict
from ..verifier.lottery import draw_audit
from ..verifier.policy import Verifier
from .errors import ApiError
from .schema import LeaseRow, ReceiptRow, VerdictRow
from .settlement import EXACT_TIER, Appraised, AuditQueue, Runner, fail_lease, pending_audits, take_in
from .states import LeaseState, TransitionError
from .wire import IntakeAnswer, IntakeBody

# a refusal's HTTP status by the error's type (the most specific class listed first wins)
REFUSALS: tuple[tuple[type[Exception], int], ...] = (
    (UnknownAgentError, 403),  # evidence from a node that is not enrolled
    (EvidenceSignatureError, 403),  # evidence that does not verify: not the node's word
    (EvidenceFormatError, 422),  # evidence that cannot be read
    (TransitionError, 409),  # the lease is no longer in a state that takes a receipt
)


STDERR_LINES = 5  # of a failed agent's stderr, the last lines its verdict quotes
STDERR_CHARS = 500


def refusal_status(exc: Exception) -> int:
    return next(status for kind, status in REFUSALS if isinstance(exc, kind))


def failure_cause(evidence: LeaseEvidence) -> str:
    """How an agent that handed back no receipt ended, as Maxwell saw it: "exit code 2: <the last
    lines of its stderr>" (or "no exit code seen (still running, …)" when it had not exited)."""
    how = (
        # None: the process had not exited (or not been reaped yet) when the node sealed the evidence
        "no exit code seen (still running, or exiting as the lease ended): no receipt before the deadline"
        if evidence.exit_code is None
        else f"exit code {evidence.exit_code}"
    )
    lines = [line.strip() for line in evidence.stderr_tail.splitlines() if line.strip()]
    tail = " | ".join(lines[-STDERR_LINES:])
    if len(tail) > STDERR_CHARS:
        tail = "…" + tail[-(STDERR_CHARS - 1) :]
    return f"{how}: {tail}" if tail else f"{how}, nothing on stderr"


def failure_result(lease: Lease, evidence: LeaseEvidence) -> AttestationResult:
    """The one layer a failed lease's verdict row keeps: a warning (not a pass, not a failure),
    its reason the cause, its details what the cause was read from."""
    cause = failure_cause(evidence)
    streamed = f"; it streamed {len(evidence.stream_tokens)} token(s) first" if evidence.streamed else ""
    reason = (
        f"failed lease: the agent handed back no receipt ({cause}){streamed}. Nothing charged, the "
        "hold and the stake returned: a failure, not cheating. 3 failed leases in a row suspend the "
        "agent until it is re-enrolled"
    )
    details = {
        "failed_lease": True,
        "cause": cause,
        "exit_code": evidence.exit_code,
        "streamed_tokens": len(evidence.stream_tokens),
    }
    layer = LayerResult(LayerName.INTEGRITY, Status.WARN, reason, details=details)
    return AttestationResult(lease.lease_id, lease.agent_id, lease.model_id, (layer,))


@dataclass(frozen=True)
class Submission:
    lease: Lease
    row: LeaseRow
    receipt: bytes
    evidence_raw: bytes
    signed: SignedEvidence
    seen: ReceiptRow | None  # a receipt already taken in for this lease, read with the lease
    seen_verdict: VerdictRow | None


class IntakeHook(Protocol):
    """What a front door built on the control plane (the gateway) adds to intake."""

    def audited(self, lease_id: str, receipt: bytes) -> LayerResult | None:
        """The lease's audit result if it was decided while the lease ran (streaming appraisal, or
        "not drawn"); None leaves the lease to intake's own lottery."""

    def settle(self, session: Session, lease: Lease, verdict: VerdictRow) -> None:
        """Money of its own, moved in intake's transaction (the requester's payment)."""

    def settled(self, lease_id: str, verdict: VerdictRow) -> None:
        """Called after the transaction committed (wakes whoever waits for the verdict)."""


class Intake:
    def __init__(
        self,
        ledger: Ledger,
        verifier: Verifier,
        nodes: Keyring,
        watts_per_core: float,
        queue: AuditQueue | None = None,
    ) -> None:
        self.ledger = ledger
        self.verifier = verifier  # L0 (no in-memory replay set) + L1 + L2; audits are queued
        self.nodes = nodes
        self.watts_per_core = watts_per_core
        self.queue = queue  # the control plane's audit workers: settlement wakes them for a pending lease
        self.hooks: list[IntakeHook] = []
        self.run: Runner | None = None  # settlements' transactions: a group commit's, or their own

    def submit(self, body: IntakeBody) -> tuple[IntakeAnswer, AttestationResult | None]:
        """(the answer, the fresh result — None for a duplicate)."""
        sub = self._open(body)
        if sub.seen is not None:
            return _duplicate(sub, sub.seen, sub.seen_verdict), None
        decided = (h.audited(sub.lease.lease_id, sub.receipt) for h in self.hooks)
        audited = next((a for a in decided if a is not None), None)
        cut = audited is not None and audited.status is Status.FAIL  # Maxwell's audit cut it mid-stream
        if not sub.receipt.strip() and not cut:
            # the agent never started or crashed: a failed lease, not a verdict. A lease Maxwell cut
            # off for cheating has no receipt either, and is judged: its audit failure slashes it
            return self._failed(sub), None
        result = self.verifier.appraise(sub.lease, sub.receipt, sub.signed.evidence)
        if audited is not None:
            result = replace(result, layers=(*result.layers, audited))
        energy = measured_energy(sub.signed.evidence, self.watts_per_core)
        refused = result.verdict is Verdict.CONTRAINDICATED
        drawn = audited is None and not refused and draw_audit(sub.row.audit_probability)
        # the exact tier is optimistic: accepted now, final once its L3 challenge (and any drawn L4 and
        # dispute) came through and its challenge window closed (service.exact_audits)
        pending = drawn or (audited is None and not refused and sub.row.tier == EXACT_TIER)
        appraised = Appraised(sub.lease, sub.row, result, energy.joules, energy.memo(), drawn, pending)
        receipt = self._receipt_row(sub)
        answer = self._settle(
            sub, lambda: take_in(self.ledger, receipt, appraised, self._extra, self.queue, self.run)
        )
        return answer, (result if not answer.duplicate else None)

    def _failed(self, sub: Submission) -> IntakeAnswer:
        """An empty receipt: a failed lease, settled by `fail_lease` (nothing charged or slashed)."""
        evidence = sub.signed.evidence
        energy = measured_energy(evidence, self.watts_per_core)
        result = failure_result(sub.lease, evidence)
        appraised = Appraised(sub.lease, sub.row, result, energy.joules, energy.memo(), False, False)
        receipt = self._receipt_row(sub)
        return self._settle(sub, lambda: fail_lease(self.ledger, receipt, appraised, self._extra, self.run))

    def _settle(self, sub: Submission, settle: Callable[[], VerdictRow]) -> IntakeAnswer:
        """Run settlement; answer as the duplicate when a racing submission committed first."""
        try:
            verdict = settle()
        except IntegrityError:  # a racing submission of this lease committed first
            with Session(self.ledger.engine) as session:
                seen = session.get(ReceiptRow, sub.lease.lease_id)
                if seen is None:
                    raise
                return _duplicate(sub, seen, session.get(VerdictRow, sub.lease.lease_id))
        except TransitionError as exc:  # expired while it was appraised
            raise ApiError(refusal_status(exc), exc.expected, exc.got) from None
        for hook in self.hooks:
            hook.settled(sub.lease.lease_id, verdict)
        return _answer(verdict, duplicate=False)

    def _extra(self, session: Session, lease: Lease, verdict: VerdictRow) -> None:
        for hook in self.hooks:
            hook.settle(session, lease, verdict)

    def _open(self, body: IntakeBody) -> Submission:
        receipt, evidence_raw = body.receipt.encode(), body.evidence.encode()
        try:
            signed = open_evidence(evidence_raw, self.nodes)
        except UnknownAgentError as exc:
            raise ApiError(refusal_status(exc), "evidence signed by an enrolled node", str(exc)) from None
        except EvidenceFormatError as exc:
            raise ApiError(refusal_status(exc), exc.expected, exc.got) from None
        if signed.lease_id != body.lease_id:
            raise ApiError(
                422, f"evidence for lease {body.lease_id}", f"evidence for lease {signed.lease_id}"
            )
        digest = hashlib.sha256(receipt).hexdigest()
        if digest != signed.receipt_sha256:
            raise ApiError(
                422,
                f"the receipt the node's evidence names (sha256 {signed.receipt_sha256[:16]}…)",
                digest[:16],
            )
        with Session(self.ledger.engine) as session:  # one query: the lease and what was taken in for it
            found = session.execute(
                select(LeaseRow, ReceiptRow, VerdictRow)
                .outerjoin(ReceiptRow, ReceiptRow.lease_id == LeaseRow.lease_id)
                .outerjoin(VerdictRow, VerdictRow.lease_id == LeaseRow.lease_id)
                .where(LeaseRow.lease_id == body.lease_id)
            ).first()
        row, seen, seen_verdict = found if found is not None else (None, None, None)
        seen_verdict = seen_verdict if seen is not None else None  # a verdict counts with its receipt
        if row is None:
            raise ApiError(404, "a lease this control plane issued", f"unknown lease {body.lease_id}")
        if row.status == LeaseState.EXPIRED:
            raise ApiError(
                409, f"a receipt before lease {row.lease_id} expired", "a receipt after its expiry"
            )
        if row.node_id != signed.node_id:
            raise ApiError(
                403,
                f"evidence from node {row.node_id!r}, the lease's node",
                f"evidence from {signed.node_id!r}",
            )
        return Submission(
            Lease.from_json(row.lease_json), row, receipt, evidence_raw, signed, seen, seen_verdict
        )

    @staticmethod
    def _receipt_row(sub: Submission) -> ReceiptRow:
        return ReceiptRow(
            lease_id=sub.lease.lease_id,
            receipt_sha256=sub.signed.receipt_sha256,
            evidence_sha256=hashlib.sha256(sub.evidence_raw).hexdigest(),
            node_id=sub.signed.node_id,
            receipt=sub.receipt,
            evidence=sub.evidence_raw,
            received_at=time.time(),
        )


def _duplicate(sub: Submission, seen: ReceiptRow, verdict: VerdictRow | None) -> IntakeAnswer:
    """The same receipt again: the first answer. Another receipt for a taken-in lease: a replay."""
    if seen.receipt_sha256 != sub.signed.receipt_sha256 or verdict is None:
        raise ApiError(
            409,
            f"no second receipt for lease {sub.lease.lease_id} (taken in at {seen.received_at:.3f})",
            "a different receipt: replay refused",
        )
    return _answer(verdict, duplicate=True)


def _answer(v: VerdictRow, duplicate: bool) -> IntakeAnswer:
    fields = set(IntakeAnswer.model_fields) - {"duplicate"}
    return IntakeAnswer(duplicate=duplicate, **{name: getattr(v, name) for name in fields})


__all__ = ["EXACT_TIER", "Intake", "IntakeHook", "pending_audits", "refusal_status"]
