"""Canary leases (issue 23): Maxwell's own requests, shaped as a real request's job and always
audited, catch a cheat the audit lottery let through, and pay an honest agent like any request.
Real parts: a server on loopback, a node long-polling it, real resident agents (the honest one and
a same-pace other-weights cheat that only an audit can see), the official `openai` client for the
real request, the admin route for a canary."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.orm import Session

from maxwell_poi.demo.gateway import GatewayStack, ensure_profile, maxwell_of
from maxwell_poi.gateway.canary import CANARY_REQUESTER
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.service.schema import CompletionRow, LeaseRow, OfferRow

MODEL = "poi-lm"
TOKENS = 16
STAKE = 100_000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    tmp = tmp_path_factory.mktemp("canaries")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        mp.setenv("OMP_NUM_THREADS", "1")  # see test_service_flow: idle OpenMP threads inflate CPU-s
        ensure_profile(MODEL, TOKENS)
        # default tiers: the lottery audits a real request rarely, as in operation; canaries off until
        # a test sends one or switches the rate on
        with GatewayStack(tmp / "work", audit_all=False) as stack:
            stack.honest_agent("alice", MODEL, ask=10)
            # same architecture and pace, other weights: L1/L2 pass it, only an audit can tell; its
            # higher ask keeps real requests with alice, so only canaries reach it
            stack.cheater("trudy", "substitute_model", ["--substitute", "poi-lm-init"], MODEL, ask=50)
            stack.gateway.canaries.rng = random.Random(7)
            yield stack


@pytest.fixture(scope="module")
def real(gw: GatewayStack) -> dict:
    r = gw.client().completions.create(model=MODEL, prompt="The river", max_tokens=TOKENS, temperature=0.5)
    m = maxwell_of(r)
    assert m["verdict"] == "affirming", m.get("reason")
    return m


def _canary(gw: GatewayStack, agent_id: str) -> dict:
    answer = gw.admin.request(
        "POST", "/v1/admin/canaries", {"agent_id": agent_id, "model_id": MODEL}, auth="admin"
    )
    assert answer["sent"], answer
    return answer


def _canary_spent(before: dict[str, int], after: dict[str, int]) -> int:
    """What the canary requester paid between two ledger reads: its wallet's fall, less any top-up
    Maxwell deposited into it meanwhile (a deposit moves money out of external:deposits)."""
    wallet = f"requester:{CANARY_REQUESTER}"
    top_up = before["external:deposits"] - after["external:deposits"]
    return before.get(wallet, 0) + top_up - after[wallet]


def _job(gw: GatewayStack, lease_id: str) -> dict:
    with Session(gw.control.ledger.engine) as session:
        return Lease.from_json(session.get(LeaseRow, lease_id).lease_json).job.model_dump()


def test_a_canary_catches_what_the_lottery_let_through_and_costs_the_cheat_its_stake(gw, real) -> None:
    before = gw.balances()
    canary = _canary(gw, "trudy")
    assert canary["verdict"] == "contraindicated" and canary["stake"] == "slashed", canary
    assert "streaming audit" in canary["reason"] or "L4-audit" in canary["reason"], canary["reason"]
    # its question is a real request's job, so the agent cannot tell it from traffic by its content
    assert canary["question"] == "a real request's job"
    assert _job(gw, canary["lease_id"]) == _job(gw, real["lease_id"])
    after = gw.balances()
    assert after["maxwell:slashed"] - before["maxwell:slashed"] == STAKE
    assert _canary_spent(before, after) == 0  # Maxwell pays nothing for a canary that caught its agent
    assert after[f"requester-escrow:{CANARY_REQUESTER}"] == 0
    with Session(gw.control.ledger.engine) as session:
        row = session.get(CompletionRow, canary["lease_id"])
        assert row.requester_id == CANARY_REQUESTER and row.status == "cut"
        assert session.get(OfferRow, ("trudy", MODEL)) is None  # it serves nothing more until it offers again


def test_an_honest_agent_passes_its_canary_and_is_paid_for_it(gw, real) -> None:
    before = gw.balances()
    canary = _canary(gw, "alice")
    assert canary["verdict"] == "affirming" and canary["stake"] == "released", canary
    after = gw.balances()
    with Session(gw.control.ledger.engine) as session:
        row = session.get(CompletionRow, canary["lease_id"])
        assert row.status == "paid" and row.charge_micro > 0
    energy = after["maxwell:energy"] - before["maxwell:energy"]
    assert (
        after["wallet:alice"] - before["wallet:alice"] == row.charge_micro - energy
    )  # paid, less its energy
    assert _canary_spent(before, after) == row.charge_micro  # Maxwell, as its requester, paid it


def test_canaries_follow_completions_at_the_configured_rate(gw, real) -> None:
    """With the rate at 1, a settled completion draws a canary for its agent, sent on its own."""
    sent_before = len(gw.gateway.canaries.results)
    gw.gateway.canaries.rate = 1.0
    try:
        r = gw.client().completions.create(model=MODEL, prompt="Rain", max_tokens=TOKENS)
        assert maxwell_of(r)["verdict"] == "affirming"
        deadline = time.monotonic() + 300
        while len(gw.gateway.canaries.results) == sent_before and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        gw.gateway.canaries.rate = 0.0
    listed = gw.admin.request("GET", "/v1/admin/canaries", auth="admin")
    assert len(listed) == sent_before + 1, listed
    assert listed[-1]["agent_id"] == "alice" and listed[-1]["verdict"] == "affirming", listed[-1]
    metrics = httpx.get(f"{gw.url}/metrics").text
    assert 'poi_gateway_canaries_total{verdict="affirming"}' in metrics
    assert 'poi_gateway_canaries_total{verdict="contraindicated"}' in metrics


def test_a_canary_to_an_agent_with_no_offer_is_not_sent_and_says_why(gw) -> None:
    answer = gw.admin.request(
        "POST", "/v1/admin/canaries", {"agent_id": "nobody", "model_id": MODEL}, auth="admin"
    )
    assert answer["sent"] is False and answer["verdict"] is None
    assert "no agent offers it" in answer["reason"]
