"""The control plane's own adversaries (service.attacks) against a real control plane, and the same
calls made honestly succeeding — so each defence is shown to refuse the attack and not the owner."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from maxwell_poi.adversaries.service_attacks import (
    bid_flood,
    node_impersonation,
    other_agents_lease,
    replay_after_restart,
)
from maxwell_poi.ledger import check_ledger
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.node.node import Node
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
from maxwell_poi.service.api import create_app

MODEL = "gpt2-micro"


def _bid(i: int, price: int = 100) -> dict:
    job = {"kind": "generate", "prompt": f"a short prompt {i}", "max_new_tokens": 4}
    return {
        "bid_id": f"b{i}",
        "model_id": MODEL,
        "job": job,
        "price_micro_per_j": price,
        "stake_micro": 50_000,
    }


def _plane(db: Path) -> tuple[ControlPlane, TestClient]:
    config = ServiceConfig.from_env(db=str(db), admin_token="t", reserve_micro_per_j=20, max_open_bids=20)
    cp = ControlPlane(config)
    cp.start()
    return cp, TestClient(create_app(cp))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """Alice's two leases served by a real resident agent and taken in; the control plane then
    restarts on the same database."""
    tmp = tmp_path_factory.mktemp("attacks")
    alice, mallory, node_key = AgentKey.generate(), AgentKey.generate(), NodeKey.generate()
    alice.save(tmp / "alice.pem")
    cp, tc = _plane(tmp / "cp.sqlite")
    admin = ServiceClient("http://t", admin_token="t", http=tc)
    admin.enroll_agent(
        "alice",
        alice.public_hex,
        [sys.executable, "-m", "maxwell_poi", "agent", "--key", str(tmp / "alice.pem"), "--resident"],
    )  # noqa: E501
    admin.enroll_agent("mallory", mallory.public_hex)
    admin.enroll_node("n1", node_key.public_hex)
    for agent in ("alice", "mallory"):
        admin.deposit(agent, 5_000_000, f"d-{agent}")
    owner = ServiceClient("http://t", key=alice, principal="agent:alice", http=tc)
    for i in range(2):
        owner.bid(_bid(i))
    node = ServiceClient("http://t", key=node_key, principal="node:n1", http=tc)
    pulled = [item.lease for item in node.pull(1e6, ["alice"]).leases]
    from maxwell_poi.protocol.lease import Lease

    leases = [Lease.model_validate(p) for p in pulled]
    with Node("n1", node_key, None) as n:
        n.start_agent("alice", admin_command(cp, "alice"))
        results = n.serve("alice", leases)
    taken_in = []
    for r in results:
        answer = node.intake(r.lease.lease_id, r.run.receipt, r.signed_evidence)
        assert not answer.duplicate
        taken_in.append(
            {
                "lease_id": r.lease.lease_id,
                "receipt": r.run.receipt.decode(),
                "evidence": r.signed_evidence.decode(),
            }
        )
    cp.close()
    cp, tc = _plane(tmp / "cp.sqlite")  # the restart
    yield {"cp": cp, "tc": tc, "alice": alice, "mallory": mallory, "taken_in": taken_in}
    cp.close()


def admin_command(cp: ControlPlane, agent_id: str) -> list[str]:
    import json

    from sqlalchemy.orm import Session

    from maxwell_poi.service.schema import AgentRow

    with Session(cp.ledger.engine) as session:
        return json.loads(session.get(AgentRow, agent_id).command)


def _transfers(cp: ControlPlane) -> int:
    return check_ledger(cp.ledger.engine).transfers


def test_replay_after_restart_is_answered_as_a_duplicate_and_moves_nothing(served) -> None:
    cp, tc = served["cp"], served["tc"]
    before, balances = _transfers(cp), cp.ledger.balances()
    outcome = replay_after_restart(ServiceClient("http://t", http=tc), served["taken_in"])
    assert outcome.held, outcome.as_dict()
    assert outcome.refused == 2 and outcome.statuses == {"422": 2}  # evidence names the other lease
    assert _transfers(cp) == before and cp.ledger.balances() == balances
    assert check_ledger(cp.ledger.engine).ok


def test_another_agents_lease_is_refused_and_its_owner_is_served(served) -> None:
    tc = served["tc"]
    lease_ids = [item["lease_id"] for item in served["taken_in"]]
    mallory = ServiceClient("http://t", key=served["mallory"], principal="agent:mallory", http=tc)
    outcome = other_agents_lease(mallory, lease_ids)
    assert outcome.held and outcome.refused == 3 * len(lease_ids) and outcome.statuses == {"403": 6}
    owner = ServiceClient("http://t", key=served["alice"], principal="agent:alice", http=tc)
    assert owner.lease(lease_ids[0]).agent_id == "alice"
    assert owner.ear(lease_ids[0]).ear.count(".") == 2  # a compact JWS


def test_node_impersonation_is_refused(served) -> None:
    cp, tc = served["cp"], served["tc"]
    before = _transfers(cp)
    item = served["taken_in"][0]
    outcome = node_impersonation("http://t", "n1", item["lease_id"], item["receipt"].encode(), http=tc)
    assert outcome.held and outcome.refused == 3, outcome.as_dict()
    assert outcome.statuses == {"401": 1, "403": 2}
    assert _transfers(cp) == before


def test_a_bid_flood_is_capped_and_a_better_bid_still_wins(served) -> None:
    tc = served["tc"]
    mallory = ServiceClient("http://t", key=served["mallory"], principal="agent:mallory", http=tc)
    outcome = bid_flood(mallory, MODEL, bids=30)
    assert outcome.statuses["stored"] == 20 and outcome.refused == 10 and outcome.held
    assert "at most 20 open bids" in outcome.reasons[0]
    owner = ServiceClient("http://t", key=served["alice"], principal="agent:alice", http=tc)
    owner.bid(_bid(99, price=500))
    node_key = NodeKey.generate()
    ServiceClient("http://t", admin_token="t", http=tc).enroll_node("n2", node_key.public_hex)
    node = ServiceClient("http://t", key=node_key, principal="node:n2", http=tc)
    # one lease this round: the higher price ranks first, ahead of twenty flood bids at price 1
    won = node.pull(40.0, [], max_leases=1).leases
    assert [item.lease["agent_id"] for item in won] == ["alice"]
