"""What one auction round issues (issue 23). Identical greedy jobs are never batched together: an
agent's bid that asks exactly what another of its bids won in the same round is answered by that
lease — a cached bid, no lease, hold, charge or stake of its own — so a batch copier never holds two
leases whose copy would be the right answer, and an honest agent never pays twice for one answer. A
directed (gateway) bid that cannot be issued now is refused, never left open. Real parts: the HTTP
app (TestClient), the control plane, the ledger; the node's pull is a real signed request (no agent
runs: what is issued is the question here)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from maxwell_poi.ledger import check_ledger, open_ledger_db
from maxwell_poi.ledger.db import writer
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
from maxwell_poi.service.api import create_app
from maxwell_poi.service.store import migrate
from maxwell_poi.service.wire import BidBody, BidView

TOKEN = "t"
STAKE = 50_000
DEPOSIT = 10_000_000
PROMPT = "The steam engine"


def _job(prompt: str = PROMPT, temperature: float = 0.0) -> dict[str, object]:
    return {"kind": "generate", "prompt": prompt, "max_new_tokens": 8, "temperature": temperature}


@pytest.fixture
def plane(tmp_path: Path) -> Iterator[tuple[ControlPlane, dict[str, ServiceClient], ServiceClient]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp_path / "home"))
        config = ServiceConfig.from_env(
            db=str(tmp_path / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=20
        )
        cp = ControlPlane(config)
        cp.start()
        node_key = NodeKey.generate()
        with TestClient(create_app(cp)) as tc:
            admin = ServiceClient("http://test", admin_token=TOKEN, http=tc)
            admin.enroll_node("n1", node_key.public_hex)
            agents = {}
            for name in ("alice", "bob"):
                key = AgentKey.generate()
                admin.enroll_agent(name, key.public_hex, ["true"])
                admin.deposit(name, DEPOSIT, f"d-{name}")
                agents[name] = ServiceClient("http://test", key=key, principal=f"agent:{name}", http=tc)
            node = ServiceClient("http://test", key=node_key, principal="node:n1", http=tc)
            yield cp, agents, node
        cp.close()


def _bid(agent: ServiceClient, bid_id: str, job: dict[str, object]) -> BidView:
    body = {"bid_id": bid_id, "model_id": "gpt2-micro", "job": job, "price_micro_per_j": 100}
    return agent.bid({**body, "stake_micro": STAKE})


def test_an_identical_greedy_bid_in_the_same_round_is_answered_by_its_twins_lease(plane) -> None:
    cp, agents, node = plane
    alice, bob = agents["alice"], agents["bob"]
    _bid(alice, "a1", _job())
    _bid(alice, "a2", _job())  # the same greedy question again: one answer
    _bid(alice, "a3", _job(temperature=0.8))  # sampled: seeded by its own lease's nonce, its own answer
    _bid(alice, "a4", _job("Rivers carve"))  # another question
    _bid(bob, "b1", _job())  # another agent's identical job: its own lease (it pays for its own)
    before = cp.ledger.balances()
    pulled = node.pull(headroom_j=1e6, agents=[], max_leases=16)
    issued = {(lease.lease["agent_id"], lease.lease["job"]["prompt"], lease.lease["job"]["temperature"])
              for lease in pulled.leases}  # fmt: skip
    assert len(pulled.leases) == 4, issued
    bids = {b.bid_id: b for b in alice.bids()}
    assert [bids[b].status for b in ("a1", "a2", "a3", "a4")] == ["won", "cached", "won", "won"]
    assert bids["a2"].lease_id == bids["a1"].lease_id is not None
    assert "the same greedy job as bid 'a1'" in bids["a2"].reason and "no lease, hold" in bids["a2"].reason
    assert bob.bids()[0].status == "won" and bob.bids()[0].lease_id != bids["a1"].lease_id
    # the cached bid moved no money: alice's escrow holds three leases' holds and stakes, not four
    leases = {lease.lease_id: lease for lease in alice.leases()}
    assert set(leases) == {bids[b].lease_id for b in ("a1", "a3", "a4")}
    after = cp.ledger.balances()
    escrowed = after["escrow:alice"] - before.get("escrow:alice", 0)
    assert escrowed == sum(lease.hold_micro + lease.stake_micro for lease in leases.values())
    assert after["wallet:alice"] == before["wallet:alice"] - escrowed
    assert check_ledger(cp.ledger.engine).ok


def test_a_greedy_twin_in_a_later_round_gets_its_own_lease(plane) -> None:
    """Caching is per round (the batch the node is handed): a twin bid after its lease was issued
    is a question asked again, answered afresh."""
    _, agents, node = plane
    alice = agents["alice"]
    _bid(alice, "a1", _job())
    first = node.pull(headroom_j=1e6, agents=[], max_leases=16)
    _bid(alice, "a2", _job())
    second = node.pull(headroom_j=1e6, agents=[], max_leases=16)
    assert [lease.lease["lease_id"] for lease in first.leases] != []
    new = [
        lease
        for lease in second.leases
        if lease.lease["lease_id"] not in {x.lease["lease_id"] for x in first.leases}
    ]
    assert len(new) == 1
    assert {b.bid_id: b.status for b in alice.bids()} == {"a1": "won", "a2": "won"}


def test_the_twin_does_not_take_a_place_in_the_pull(plane) -> None:
    """A pull of at most 2 leases: the cached twin takes none of them."""
    _, agents, node = plane
    alice = agents["alice"]
    _bid(alice, "a1", _job())
    _bid(alice, "a2", _job())
    _bid(alice, "a3", _job("Rivers carve"))
    pulled = node.pull(headroom_j=1e6, agents=[], max_leases=2)
    assert len(pulled.leases) == 2
    assert {b.bid_id: b.status for b in alice.bids()} == {"a1": "won", "a2": "cached", "a3": "won"}


def test_the_cached_state_migrates_onto_a_database_with_bids(tmp_path: Path) -> None:
    """cp0006 rebuilds cp_bids (SQLite cannot alter a CHECK) under the leases that refer to it."""
    engine = open_ledger_db(tmp_path / "cp.sqlite")
    migrate(engine, "cp0005")
    rows = [
        "INSERT INTO cp_agents VALUES ('a', 'k', '[]', 1.0)",
        "INSERT INTO cp_nodes (node_id, public_key, enrolled_at, headroom_j, device_class) "
        "VALUES ('n', 'k', 1.0, 0, '')",
        "INSERT INTO cp_bids (id, agent_id, bid_id, request_sha256, model_id, precision, job, "
        "price_micro_per_j, stake_micro, expected_j, status, reason, lease_id, created_at) "
        "VALUES (1, 'a', 'b', 'x', 'm', 'fp32', '{}', 1, 1, 1.0, 'won', '', 'L1', 1.0)",
        "INSERT INTO cp_leases VALUES "
        "('L1', 'a', 'n', 1, '{}', 'low', 0.1, '', 1, 1, 1, 'settled', 1.0, 2.0)",
    ]
    with writer(engine).begin() as connection:
        for sql in rows:
            connection.execute(text(sql))
    migrate(engine)
    with writer(engine).begin() as connection:
        connection.execute(
            text(
                "INSERT INTO cp_bids (id, agent_id, bid_id, request_sha256, model_id, precision, job, "
                "price_micro_per_j, stake_micro, expected_j, status, reason, lease_id, created_at) "
                "VALUES (2, 'a', 'b2', 'x', 'm', 'fp32', '{}', 1, 1, 1.0, 'cached', '', 'L1', 1.0)"
            )
        )
        assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
        indexes = connection.execute(text("SELECT name FROM sqlite_master WHERE tbl_name = 'cp_bids'"))
        assert {"ix_cp_bids_agent_id", "ix_cp_bids_status"} <= set(indexes.scalars())
    with pytest.raises(Exception, match="FOREIGN KEY"), writer(engine).begin() as connection:
        connection.execute(text("UPDATE cp_leases SET bid_pk = 99"))
    with pytest.raises(Exception, match="CHECK"), writer(engine).begin() as connection:
        connection.execute(text("UPDATE cp_bids SET status = 'bogus'"))
    engine.dispose()


def test_a_directed_bid_that_could_not_be_issued_now_is_refused_not_left_open(plane) -> None:
    """The gateway's directed bid, deferred for the node's headroom, is answered 503 at once; were
    it left open, a later round would issue it as a lease no requester waits for (found by the
    first-hour walk-through: alice did the work and paid its energy, nobody paid her)."""
    cp, agents, node = plane
    node.pull(headroom_j=0.0, agents=[], max_leases=1)  # the node's last reading: no headroom
    body = BidBody(
        bid_id="gateway-1",
        model_id="gpt2-micro",
        job=_job("Rivers carve"),
        price_micro_per_j=100,
        stake_micro=STAKE,
    )
    pulled, why, _ = cp.market.issue_directed("n1", "alice", body, lambda session, lease: None)
    assert pulled is None and "deferred" in why, why
    (bid,) = agents["alice"].bids()
    assert bid.status == "refused" and "never auctioned later" in bid.reason, bid.reason
    again = node.pull(headroom_j=1e6, agents=[], max_leases=16)
    assert again.leases == [] and agents["alice"].leases() == []
