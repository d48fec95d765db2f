"""Nodes: pull leases (and L3 challenges), hand in an agent's opening, hand in a lease's evidence.

Pull and openings are signed requests; intake is not: its body carries the node's signed evidence,
and that is its signature.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..control import ControlPlane
from ..deps import Control, NodeId
from ..errors import ApiError
from ..market import PulledLease
from ..wire import (
    IntakeAnswer,
    IntakeBody,
    OpenChallenge,
    OpeningAnswer,
    OpeningBody,
    PullAnswer,
    PullBody,
    PulledLeaseView,
)

router = APIRouter(prefix="/v1/node", tags=["node"])


@router.post("/pull", response_model=PullAnswer)
def pull(body: PullBody, node_id: NodeId, control: Control) -> PullAnswer:
    """One auction round against this node's headroom; its leases, with each agent's command."""
    limit = min(body.max_leases, control.config.max_leases_per_pull)
    body = body.model_copy(update={"max_leases": limit})
    pulled = control.market.pull(node_id, body)
    challenges = control.challenges.open_for(node_id)
    if not pulled and not challenges and body.wait_s > 0:  # long poll: a directed (gateway) lease
        control.market.wait_for_leases(body.wait_s)  # or an L3 challenge wakes it at once
        pulled = control.market.pull(node_id, body)
        challenges = control.challenges.open_for(node_id)
    return PullAnswer(
        node_id=node_id,
        leases=[_pulled(control, p) for p in pulled],
        challenges=[OpenChallenge.model_validate(c) for c in challenges],
    )


def _pulled(control: ControlPlane, p: PulledLease) -> PulledLeaseView:
    return PulledLeaseView(
        lease=p.lease.model_dump(mode="json"),
        command=p.command,
        tier=p.tier,
        audit_probability=p.audit_probability,
        stream_to=control.stream_to(p.lease.lease_id),
    )


@router.post("/openings", response_model=OpeningAnswer)
def opening(body: OpeningBody, node_id: NodeId, control: Control) -> OpeningAnswer:
    """The lease's node hands in its agent's answer to an L3 challenge (checked by Maxwell)."""
    return OpeningAnswer.model_validate(control.challenges.answer(node_id, body))


@router.post("/intake", response_model=IntakeAnswer)
def intake(body: IntakeBody, request: Request, control: Control) -> IntakeAnswer:
    metrics = request.app.state.metrics
    t0 = time.perf_counter()
    try:
        answer, result = control.intake.submit(body)
    except ApiError:
        metrics.intake.labels("refused").inc()
        raise
    if result is not None:  # a pending lease's audit is queued by settlement, whoever calls intake
        metrics.appraised(result, answer.final)
    # a fresh answer without an appraisal is a failed lease (an empty receipt: service.intake)
    outcome = "duplicate" if answer.duplicate else "accepted" if result is not None else "failed"
    metrics.intake.labels(outcome).inc()
    metrics.intake_seconds.observe(time.perf_counter() - t0)
    return answer
