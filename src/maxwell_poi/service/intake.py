"""The hot path: a node hands in a lease's receipt with its signed evidence; the control plane
appraises the cheap layers (L0 + L1 + L2) inline, draws the audit lottery, and settles the lease's
money in the same database transaction as its receipt and verdict.

Exactly once: the receipt row's primary key is the lease id. A second submission of the same
receipt is answered with the first verdict (`duplicate: true`) and moves nothing; a different
receipt for a settled lease is a replay and refused (409). Two racing submissions both appraise,
one commits, the other's insert fails on the key and it answers as the duplicate.

A drawn audit (L4, one prefill) is not run inline: the verdict is stored `final: false`, energy is
settled (the joules were burnt either way), the stake stays escrowed (`pending`), and the lease
goes to the audit workers (service.audits), which finalise it.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, replace
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from ..economics.energy import measured_energy
from ..economics.tiers import Tier
from ..ledger import Ledger
from ..ledger.book import energy_charge
from ..node.attest import SignedEvidence, open_evidence
from ..protocol.errors import EvidenceFormatError, UnknownAgentError
from ..protocol.keys import Keyring
from ..protocol.lease import Lease
from ..protocol.result import AttestationResult, LayerResult, Verdict, verdict_of
from ..verifier.policy import Verifier
from .errors import ApiError
from .schema import LeaseRow, ReceiptRow, VerdictRow
from .wire import IntakeAnswer, IntakeBody

EXACT_TIER = Tier.EXACT.value
STAKE_ON = {Verdict.AFFIRMING: "released", Verdict.CONTRAINDICATED: "slashed", Verdict.WARNING: "held"}


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
    def __init__(self, ledger: Ledger, verifier: Verifier, nodes: Keyring, watts_per_core: float) -> None:
        self.ledger = ledger
        self.verifier = verifier  # L0 (no in-memory replay set) + L1 + L2; audits are queued
        self.nodes = nodes
        self.watts_per_core = watts_per_core
        self.hooks: list[IntakeHook] = []

    def submit(self, body: IntakeBody) -> tuple[IntakeAnswer, AttestationResult | None]:
        """(the answer, the fresh result — None for a duplicate)."""
        sub = self._open(body)
        if sub.seen is not None:
            return _duplicate(sub, sub.seen, sub.seen_verdict), None
        result = self.verifier.appraise(sub.lease, sub.receipt, sub.signed.evidence)
        decided = (h.audited(sub.lease.lease_id, sub.receipt) for h in self.hooks)
        audited = next((a for a in decided if a is not None), None)
        if audited is not None:
            layers = (*result.layers, audited)
            result = replace(result, layers=layers, verdict=verdict_of(list(layers)))
        energy = measured_energy(sub.signed.evidence, self.watts_per_core)
        refused = result.verdict is Verdict.CONTRAINDICATED
        drawn = audited is None and not refused and _draw(sub.row.audit_probability)
        # the exact tier is optimistic: accepted now, final once its L3 challenge (and any drawn L4 and
        # dispute) came through and its challenge window closed (service.exact_audits)
        pending = drawn or (audited is None and not refused and sub.row.tier == EXACT_TIER)
        charge, _ = energy_charge(energy.joules, sub.row.price_micro_per_j)
        verdict = VerdictRow(
            lease_id=sub.lease.lease_id,
            verdict=result.verdict.value,
            final=not pending,
            audit_drawn=drawn,
            layers=json.dumps(result.as_dict()["layers"]),
            reason=result.reason[:4000],
            energy_j=energy.joules,
            energy_memo=energy.memo(),
            charge_micro=min(charge, sub.row.hold_micro),
            stake_outcome="pending" if pending else stake_outcome(result.verdict, sub.row.stake_micro),
            appraised_at=time.time(),
        )
        try:
            with self.ledger.session() as session, session.begin():
                self._settle(session, sub, verdict, energy.joules)
        except IntegrityError:  # a racing submission of this lease committed first
            with Session(self.ledger.engine) as session:
                seen = session.get(ReceiptRow, sub.lease.lease_id)
                if seen is None:
                    raise
                return _duplicate(sub, seen, session.get(VerdictRow, sub.lease.lease_id)), None
        for hook in self.hooks:
            hook.settled(sub.lease.lease_id, verdict)
        return _answer(verdict, duplicate=False), result

    def _open(self, body: IntakeBody) -> Submission:
        receipt, evidence_raw = body.receipt.encode(), body.evidence.encode()
        try:
            signed = open_evidence(evidence_raw, self.nodes)
        except UnknownAgentError as exc:
            raise ApiError(403, "evidence signed by an enrolled node", str(exc)) from None
        except EvidenceFormatError as exc:
            status = 403 if "signature" in exc.expected else 422
            raise ApiError(status, exc.expected, exc.got) from None
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
        with Session(self.ledger.engine) as session:  # one read: the lease and what was taken in for it
            row = session.get(LeaseRow, body.lease_id)
            seen = session.get(ReceiptRow, body.lease_id) if row is not None else None
            seen_verdict = session.get(VerdictRow, body.lease_id) if seen is not None else None
        if row is None:
            raise ApiError(404, "a lease this control plane issued", f"unknown lease {body.lease_id}")
        if row.status == "expired":
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

    def _settle(self, session: Session, sub: Submission, verdict: VerdictRow, joules: float) -> None:
        lease, row = sub.lease, sub.row
        session.add(
            ReceiptRow(
                lease_id=lease.lease_id,
                receipt_sha256=sub.signed.receipt_sha256,
                evidence_sha256=hashlib.sha256(sub.evidence_raw).hexdigest(),
                node_id=sub.signed.node_id,
                receipt=sub.receipt,
                evidence=sub.evidence_raw,
                received_at=time.time(),
            )
        )
        session.flush()  # the lease's receipt key: a duplicate fails here, before any money moves
        self.ledger.settle_energy(
            lease.agent_id, lease.lease_id, joules, row.price_micro_per_j, session=session
        )
        move_stake(self.ledger, session, lease.agent_id, lease.lease_id, verdict.stake_outcome)
        for hook in self.hooks:
            hook.settle(session, lease, verdict)
        session.add(verdict)
        status = "audit_pending" if not verdict.final else "settled"
        session.execute(
            LeaseRow.__table__.update().where(LeaseRow.lease_id == lease.lease_id).values(status=status)
        )


def move_stake(ledger: Ledger, session: Session, agent: str, lease_id: str, outcome: str) -> None:
    if outcome == "released":
        ledger.release_stake(agent, lease_id, session=session)
    elif outcome == "slashed":
        ledger.slash_stake(agent, lease_id, session=session)


def stake_outcome(verdict: Verdict, stake_micro: int) -> str:
    """What a final verdict does to the lease's stake; "none" when nothing was escrowed."""
    return STAKE_ON[verdict] if stake_micro > 0 else "none"


def _duplicate(sub: Submission, seen: ReceiptRow, verdict: VerdictRow | None) -> IntakeAnswer:
    """The same receipt again: the first answer. Another receipt for a taken-in lease: a replay."""
    if seen.receipt_sha256 != sub.signed.receipt_sha256 or verdict is None:
        raise ApiError(
            409,
            f"no second receipt for lease {sub.lease.lease_id} (taken in at {seen.received_at:.3f})",
            "a different receipt: replay refused",
        )
    return _answer(verdict, duplicate=True)


def _draw(probability: float) -> bool:
    """The audit lottery, drawn from the OS CSPRNG after the receipt is in."""
    return secrets.randbelow(1_000_000) < probability * 1_000_000


def _answer(v: VerdictRow, duplicate: bool) -> IntakeAnswer:
    fields = set(IntakeAnswer.model_fields) - {"duplicate"}
    return IntakeAnswer(duplicate=duplicate, **{name: getattr(v, name) for name in fields})


def pending_audits(ledger: Ledger, exact: bool = False) -> list[str]:
    """Leases whose verdict is not final yet: the L4 queue, or (`exact`) the exact tier's."""
    tier = LeaseRow.tier == EXACT_TIER if exact else LeaseRow.tier != EXACT_TIER
    with Session(ledger.engine) as session:
        query = select(LeaseRow.lease_id).where(LeaseRow.status == "audit_pending", tier)
        return list(session.scalars(query.order_by(LeaseRow.issued_at)))
