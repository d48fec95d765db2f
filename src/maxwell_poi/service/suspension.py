"""Suspension (issue 23): an agent whose last `SUSPEND_AFTER` leases, among those issued since it was
(re-)enrolled that came back at all, were all *failed* (no receipt: its program never started or
crashed — service.intake) bids no more: new bids are refused (403), its open bids are refused when
a round would clear them, and the gateway issues it no lease. A failed lease costs the agent
nothing, so without this a program that crashes could take leases for free forever. Counted from
the leases themselves (no table of its own); re-enrolment (the admin route) moves the agent's
enrolment time on, which starts the count afresh.
"""

from __future__ import annotations

import json

from sqlalchemy import select
from sqlalchemy.orm import Session

from .schema import AgentRow, LeaseRow, VerdictRow
from .states import LeaseState

SUSPEND_AFTER = 3  # failed leases in a row, since the agent's enrolment, that stop its bidding
# the leases that say how an agent's program ran: a receipt came back (an expired lease says
# nothing about the agent: its node died with it; a pulled one is still running)
CAME_BACK = (LeaseState.SETTLED, LeaseState.AUDIT_PENDING, LeaseState.FAILED)


def suspension(session: Session, agent_id: str) -> str | None:
    """Why `agent_id` may not bid: its last SUSPEND_AFTER leases that came back, of those issued
    since it was (re-)enrolled, all failed. None when it may."""
    enrolled = session.scalar(select(AgentRow.enrolled_at).where(AgentRow.agent_id == agent_id))
    if enrolled is None:
        return None
    latest = session.execute(
        select(LeaseRow.status, VerdictRow.layers)
        .outerjoin(VerdictRow, VerdictRow.lease_id == LeaseRow.lease_id)
        .where(LeaseRow.agent_id == agent_id, LeaseRow.issued_at > enrolled, LeaseRow.status.in_(CAME_BACK))
        .order_by(LeaseRow.issued_at.desc())
        .limit(SUSPEND_AFTER)
    ).all()
    if len(latest) < SUSPEND_AFTER or any(status != LeaseState.FAILED for status, _ in latest):
        return None
    return (
        f"agent suspended: {SUSPEND_AFTER} failed leases in a row (last: {_failure_cause(latest[0][1])}); "
        "re-enrol or contact Maxwell"
    )


def _failure_cause(layers: str | None) -> str:
    """The cause a failed lease's verdict row keeps (service.intake.failure_result)."""
    try:
        return str(json.loads(layers or "[]")[0]["details"]["cause"])
    except (ValueError, LookupError, TypeError):
        return "no cause recorded"


__all__ = ["CAME_BACK", "SUSPEND_AFTER", "suspension"]
