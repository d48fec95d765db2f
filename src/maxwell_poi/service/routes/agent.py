"""Agents (signed requests, service.auth): bid, read their bids, leases, EARs and balance, dispute."""

from __future__ import annotations

from fastapi import APIRouter, Response

from ..deps import AgentId, Control, Page
from ..wire import BalanceView, BidBody, BidView, DisputeBody, DisputeView, EarAnswer, LeaseView

router = APIRouter(tags=["agent"])
SAME = {200: {"description": "sent before, unchanged: the first answer"}}


@router.post("/v1/bids", status_code=201, response_model=BidView, responses=SAME)
def bid(body: BidBody, agent_id: AgentId, response: Response, control: Control) -> BidView:
    view, created = control.market.place_bid(agent_id, body)
    response.status_code = 201 if created else 200
    return BidView.model_validate(view)


@router.get("/v1/agent/bids", response_model=list[BidView])
def my_bids(agent_id: AgentId, page: Page, control: Control) -> list[BidView]:
    return [BidView.model_validate(b) for b in control.market.bids_of(agent_id, page.limit, page.offset)]


@router.get("/v1/agent/leases", response_model=list[LeaseView])
def my_leases(agent_id: AgentId, page: Page, control: Control) -> list[LeaseView]:
    return control.leases_of(agent_id, page.limit, page.offset)


@router.get("/v1/agent/leases/{lease_id}", response_model=LeaseView)
def my_lease(lease_id: str, agent_id: AgentId, control: Control) -> LeaseView:
    return control.lease_view(*control.own_lease(agent_id, lease_id))


@router.get("/v1/agent/leases/{lease_id}/ear", response_model=EarAnswer)
def my_ear(lease_id: str, agent_id: AgentId, control: Control) -> EarAnswer:
    """The lease's attestation result as an EAR JWT signed by Maxwell (key: /v1/ear-key)."""
    return EarAnswer(lease_id=lease_id, ear=control.ear(agent_id, lease_id))


@router.post(
    "/v1/agent/leases/{lease_id}/dispute", status_code=201, response_model=DisputeView, responses=SAME
)
def my_dispute(
    lease_id: str, body: DisputeBody, agent_id: AgentId, response: Response, control: Control
) -> DisputeView:
    view, created = control.dispute(agent_id, lease_id, body)
    response.status_code = 201 if created else 200
    return DisputeView.model_validate(view)


@router.get("/v1/agent/balance", response_model=BalanceView)
def my_balance(agent_id: AgentId, control: Control) -> BalanceView:
    return BalanceView.model_validate(control.balance(agent_id))
