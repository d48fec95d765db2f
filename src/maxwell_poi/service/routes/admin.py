"""Maxwell (Authorization: Bearer <admin token>): enrol agents and nodes, deposit, set the tier
policy, read the ledger, the settings, any agent's leases and an exact-tier lease's challenges."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Response

from ..deps import Admin, Control, Page
from ..wire import (
    AgentView,
    ChallengeView,
    ConfigView,
    Deposit,
    DepositAnswer,
    EnrollAgent,
    EnrollNode,
    LeaseView,
    LedgerReport,
    NodeView,
    PolicyBody,
    PolicyView,
)

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Admin])
CREATED_OR_SAME = {200: {"description": "enrolled before, with the same key: the same answer"}}
RE_ENROLLED = {
    200: {
        "description": "enrolled before, with the same key: re-enrolled (its command replaced when "
        "one is given, a suspension for failed leases cleared)"
    }
}


@router.post("/agents", status_code=201, response_model=AgentView, responses=RE_ENROLLED)
def enroll_agent(body: EnrollAgent, response: Response, control: Control) -> AgentView:
    """Enrol an agent; again with the same key, re-enrol it: its command replaced when one is given
    (a program that could not start, fixed) and its failed-lease count started afresh
    (service.market)."""
    view, created = control.enroll_agent(body)
    response.status_code = 201 if created else 200
    return AgentView.model_validate(view)


@router.post("/nodes", status_code=201, response_model=NodeView, responses=CREATED_OR_SAME)
def enroll_node(body: EnrollNode, response: Response, control: Control) -> NodeView:
    view, created = control.enroll_node(body)
    response.status_code = 201 if created else 200
    return NodeView.model_validate(view)


@router.post("/deposits", response_model=DepositAnswer)
def deposit(body: Deposit, control: Control) -> DepositAnswer:
    return DepositAnswer.model_validate(control.deposit(body))


@router.get("/policy", response_model=PolicyView)
def get_policy(control: Control) -> PolicyView:
    return PolicyView.model_validate(asdict(control.policy))


@router.put("/policy", response_model=PolicyView)
def put_policy(body: PolicyBody, control: Control) -> PolicyView:
    return PolicyView.model_validate(control.set_policy(body))


@router.get("/ledger", response_model=LedgerReport)
def ledger(control: Control) -> LedgerReport:
    return LedgerReport.model_validate(control.ledger_report())


@router.get("/config", response_model=ConfigView)
def config(control: Control) -> ConfigView:
    return ConfigView.model_validate(control.config.describe())


@router.get("/leases", response_model=list[LeaseView])
def all_leases(
    agent_id: Annotated[str, Query(max_length=128)], page: Page, control: Control
) -> list[LeaseView]:
    return control.leases_of(agent_id, page.limit, page.offset)


@router.get("/leases/{lease_id}/challenges", response_model=list[ChallengeView])
def lease_challenges(lease_id: str, control: Control) -> list[ChallengeView]:
    """Every opening asked of an exact-tier lease's agent: kind, keys, deadline, what came back."""
    return [ChallengeView.model_validate(c) for c in control.challenges.of_lease(lease_id)]
