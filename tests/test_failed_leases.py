"""Failed leases (issue 23): an agent that never started or crashed before its receipt is a failed
lease — unpaid, not slashed, its cause (exit code, stderr) in the verdict — and three in a row
suspend its bidding until it is re-enrolled. Real parts: the HTTP app (TestClient), the control
plane, and a real node running real agent programs that fail."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text
from sqlalchemy.orm import Session

from maxwell_poi.ledger import check_ledger, open_ledger_db
from maxwell_poi.ledger.db import writer
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.node.node import Node
from maxwell_poi.node.remote import RemoteNode
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig, ServiceRefused
from maxwell_poi.service.api import create_app
from maxwell_poi.service.intake import STDERR_CHARS, STDERR_LINES
from maxwell_poi.service.schema import LeaseRow
from maxwell_poi.service.states import LeaseState
from maxwell_poi.service.store import migrate
from maxwell_poi.service.wire import (
    BidBody,
    Deposit,
    EnrollAgent,
    EnrollNode,
    IntakeAnswer,
    IntakeBody,
    PullBody,
)

TOKEN = "t"
STAKE = 100_000
DEPOSIT = 10_000_000
# never starts: what `poi agent --key missing.pem` does, in a line
NO_KEY = [sys.executable, "-c", "import sys; sys.stderr.write('no such key: alice.pem\\n'); sys.exit(2)"]
# starts, refuses the node's warm-up lease, then streams three tokens of its first paying lease and
# dies without a receipt
STREAMS_THEN_CRASHES = [
    sys.executable,
    "-c",
    """
import json, sys
n = 0
while line := sys.stdin.readline():
    lease_id = json.loads(line)["lease_id"]
    n += 1
    if n == 1:
        print('{"x":"%s","error":"no warm-up here"}' % lease_id, flush=True)
        continue
    for i in range(3):
        print('{"s":[%d,%d],"l":"%s"}' % (i, 100 + i, lease_id), flush=True)
    sys.stderr.write("loading weights\\nRuntimeError: CUDA out of memory\\n")
    sys.exit(3)
""",
]


@dataclass
class Flow:
    cp: ControlPlane
    admin: ServiceClient
    agents: dict[str, ServiceClient]
    keys: dict[str, AgentKey]
    remote: RemoteNode

    def bid(self, agent: str, bid_id: str) -> object:
        job = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}
        body = {"bid_id": bid_id, "model_id": "gpt2-micro", "job": job, "price_micro_per_j": 100}
        return self.agents[agent].bid({**body, "stake_micro": STAKE})

    def balances(self) -> dict[str, int]:
        report = self.admin.ledger()
        assert report.check.ok, report.check.problems
        assert check_ledger(self.cp.ledger.engine).ok
        return report.balances

    def step(self) -> list[IntakeAnswer]:
        answers = self.remote.step()
        assert all(isinstance(a, IntakeAnswer) for a in answers), answers  # none refused
        return answers  # type: ignore[return-value]


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    tmp = tmp_path_factory.mktemp("failed")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        config = ServiceConfig.from_env(db=str(tmp / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=20)
        cp = ControlPlane(config)
        cp.start()
        node_key = NodeKey.generate()
        keys = {"alice": AgentKey.generate(), "bob": AgentKey.generate()}
        with TestClient(create_app(cp)) as tc, Node("n1", node_key, None) as node:
            admin = ServiceClient("http://test", admin_token=TOKEN, http=tc)
            admin.enroll_node("n1", node_key.public_hex)
            for name, argv in (("alice", NO_KEY), ("bob", STREAMS_THEN_CRASHES)):
                admin.enroll_agent(name, keys[name].public_hex, argv)
                admin.deposit(name, DEPOSIT, f"d-{name}")
            agents = {
                name: ServiceClient("http://test", key=key, principal=f"agent:{name}", http=tc)
                for name, key in keys.items()
            }
            node_client = ServiceClient("http://test", key=node_key, principal="node:n1", http=tc)
            remote = RemoteNode(node_client, node, batch=2, headroom=lambda: 1e6)
            yield Flow(cp, admin, agents, keys, remote)
        cp.close()


@dataclass
class Failed:
    answers: list[IntakeAnswer]
    before: dict[str, int]
    after: dict[str, int]


@pytest.fixture(scope="module")
def first_failure(flow: Flow) -> Failed:
    """alice's agent exits at once (no key): its one lease, pulled, run and handed in by the node."""
    flow.bid("alice", "a1")
    before = flow.balances()
    answers = flow.step()
    return Failed(answers, before, flow.balances())


def test_an_agent_that_never_started_is_a_failed_lease_naming_its_exit(
    flow: Flow, first_failure: Failed
) -> None:
    (answer,) = first_failure.answers
    assert (answer.verdict, answer.final, answer.stake_outcome) == ("warning", True, "released")
    assert answer.charge_micro == 0 and not answer.duplicate
    view = flow.agents["alice"].lease(answer.lease_id)
    assert view.status == "failed"
    assert view.verdict is not None and view.verdict.stake_outcome == "released"
    reason = view.verdict.reason
    assert "exit code 2" in reason and "no such key: alice.pem" in reason, reason
    assert "not cheating" in reason


def test_a_failed_lease_moves_no_money(flow: Flow, first_failure: Failed) -> None:
    before, after = first_failure.before, first_failure.after
    for account in ("wallet:alice", "escrow:alice", "maxwell:energy", "maxwell:slashed"):
        assert after.get(account, 0) == before.get(account, 0), account
    assert after["wallet:alice"] == DEPOSIT and after.get("escrow:alice", 0) == 0
    assert after.get("maxwell:slashed", 0) == 0


def test_three_failures_in_a_row_suspend_and_re_enrolment_clears_it(
    flow: Flow, first_failure: Failed
) -> None:
    flow.bid("alice", "a2")  # the second and third failures, one wave
    flow.bid("alice", "a3")
    answers = flow.step()
    assert [a.stake_outcome for a in answers] == ["released", "released"]
    balances = flow.balances()
    assert (balances["wallet:alice"], balances.get("maxwell:slashed", 0)) == (DEPOSIT, 0)

    with pytest.raises(ServiceRefused) as refused:
        flow.bid("alice", "a4")
    assert refused.value.status == 403
    message = str(refused.value)
    assert "agent suspended: 3 failed leases in a row" in message, message
    assert "(last: exit code 2: " in message and "no such key: alice.pem" in message, message
    assert "re-enrol or contact Maxwell" in message

    # a bid that was open before the suspension is refused when a round would clear it, not leased
    with flow.cp.ledger.session() as session, session.begin():
        stale = BidBody.model_validate(
            {
                "bid_id": "a-stale",
                "model_id": "gpt2-micro",
                "job": {"kind": "generate", "prompt": "x", "max_new_tokens": 4},
                "price_micro_per_j": 100,
                "stake_micro": STAKE,
            }
        )
        session.add(flow.cp.market._bid_row("alice", stale, time.time()))  # placed before it was suspended
    assert flow.step() == []
    (bid,) = [b for b in flow.agents["alice"].bids() if b.bid_id == "a-stale"]
    assert bid.status == "refused" and "agent suspended" in bid.reason, bid

    fixed = [*NO_KEY[:2], "import sys; sys.exit(0)"]  # re-enrolled, with a command that starts
    flow.admin.enroll_agent("alice", flow.keys["alice"].public_hex, fixed)
    assert flow.bid("alice", "a5").status == "open"
    with Session(flow.cp.ledger.engine) as session:
        failed = session.query(LeaseRow).filter_by(agent_id="alice", status=LeaseState.FAILED).count()
    assert failed == 3  # the history stays; only the count starts afresh


def test_an_agent_that_crashed_after_streaming_is_failed_not_slashed(flow: Flow) -> None:
    flow.bid("bob", "b1")
    before = flow.balances()
    (answer,) = flow.step()
    view = flow.agents["bob"].lease(answer.lease_id)
    assert view.status == "failed" and view.verdict is not None
    reason = view.verdict.reason
    # the exit status, unless the node sealed its evidence before the dying process was reaped
    assert "exit code 3" in reason or "no exit code seen" in reason, reason
    assert "CUDA out of memory" in reason and "streamed 3 token" in reason, reason
    assert (view.verdict.stake_outcome, view.verdict.charge_micro) == ("released", 0)
    after = flow.balances()
    assert after["wallet:bob"] == before["wallet:bob"] == DEPOSIT
    assert after.get("escrow:bob", 0) == 0 and after.get("maxwell:slashed", 0) == 0


# -- in process: the cause read from evidence, duplicates, and a non-empty receipt still judged -------


@pytest.fixture()
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ControlPlane, NodeKey]]:
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    config = ServiceConfig.from_env(db=str(tmp_path / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=20)
    cp = ControlPlane(config)
    cp.start()
    node_key = NodeKey.generate()
    cp.enroll_node(EnrollNode(node_id="n1", public_key=node_key.public_hex))
    cp.enroll_agent(EnrollAgent(agent_id="alice", public_key=AgentKey.generate().public_hex, command=[]))
    cp.deposit(Deposit(agent_id="alice", amount_micro=DEPOSIT, key="d"))
    yield cp, node_key
    cp.close()


def _lease(cp: ControlPlane, bid_id: str) -> str:
    job = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}
    body = {"bid_id": bid_id, "model_id": "gpt2-micro", "job": job, "price_micro_per_j": 100}
    cp.market.place_bid("alice", BidBody.model_validate({**body, "stake_micro": STAKE}))
    (pulled,) = cp.market.pull("n1", PullBody(headroom_j=1e6, agents=[], max_leases=4))
    return pulled.lease.lease_id


def _submit(
    cp: ControlPlane, key: NodeKey, lease_id: str, receipt: bytes, **evidence: object
) -> IntakeAnswer:
    now = time.time()
    made_up = LeaseEvidence(
        started_at=now - 1, finished_at=now, wall_s=1.0, cpu_s=0.5, max_rss_kb=1000, bytes_in=10,
        bytes_out=len(receipt), sha256_in="0" * 64, sha256_out="1" * 64, regime="resident",
        **evidence,  # type: ignore[arg-type]
    )  # fmt: skip
    signed = sign_evidence(made_up, lease_id, receipt, node_id="n1", sandbox={}, key=key)
    body = IntakeBody(lease_id=lease_id, receipt=receipt.decode(), evidence=signed.decode())
    return cp.intake.submit(body)[0]


def test_a_live_agent_with_no_receipt_and_a_long_stderr(plane: tuple[ControlPlane, NodeKey]) -> None:
    cp, key = plane
    lease_id = _lease(cp, "b1")
    stderr = "\n".join(f"line {i}: " + "x" * 200 for i in range(12))
    answer = _submit(cp, key, lease_id, b"  \n", exit_code=None, stderr_tail=stderr)
    assert (answer.verdict, answer.stake_outcome, answer.charge_micro) == ("warning", "released", 0)
    assert "no exit code seen (still running" in answer.reason and "no receipt before" in answer.reason
    assert "line 11" in answer.reason and "line 6:" not in answer.reason  # the last 5 lines at most
    verdict = cp.lease_view(*cp.own_lease("alice", lease_id)).verdict
    assert verdict is not None
    cause = verdict.layers[0].details["cause"]
    tail = cause.split("before the deadline: ", 1)[1]  # the stderr it quotes
    assert tail.count(" | ") <= STDERR_LINES - 1 and len(tail) <= STDERR_CHARS, cause
    again = _submit(cp, key, lease_id, b"  \n", exit_code=None, stderr_tail=stderr)  # other evidence bytes
    assert again.duplicate and again.reason == answer.reason
    assert cp.ledger.balances()["wallet:alice"] == DEPOSIT


def test_a_non_empty_receipt_that_fails_l0_is_still_slashed(plane: tuple[ControlPlane, NodeKey]) -> None:
    cp, key = plane
    lease_id = _lease(cp, "b1")
    answer = _submit(cp, key, lease_id, b'{"not": "a receipt"}', exit_code=2, stderr_tail="boom")
    assert (answer.verdict, answer.stake_outcome) == ("contraindicated", "slashed"), answer.reason
    with Session(cp.ledger.engine) as session:
        assert session.get(LeaseRow, lease_id).status == LeaseState.SETTLED
    assert cp.ledger.balances()["maxwell:slashed"] == STAKE


def test_the_failed_state_migrates_onto_a_database_with_leases(tmp_path: Path) -> None:
    """cp0005 rebuilds cp_leases (SQLite cannot alter a CHECK) under rows that refer to it."""
    engine = open_ledger_db(tmp_path / "cp.sqlite")
    migrate(engine, "cp0004")
    rows = [
        "INSERT INTO cp_agents VALUES ('a', 'k', '[]', 1.0)",
        "INSERT INTO cp_nodes (node_id, public_key, enrolled_at, headroom_j, device_class) "
        "VALUES ('n', 'k', 1.0, 0, '')",
        "INSERT INTO cp_bids (id, agent_id, bid_id, request_sha256, model_id, precision, job, "
        "price_micro_per_j, stake_micro, expected_j, status, reason, created_at) "
        "VALUES (1, 'a', 'b', 'x', 'm', 'fp32', '{}', 1, 1, 1.0, 'won', '', 1.0)",
        "INSERT INTO cp_leases VALUES "
        "('L1', 'a', 'n', 1, '{}', 'low', 0.1, '', 1, 1, 1, 'settled', 1.0, 2.0)",
        "INSERT INTO cp_receipts VALUES ('L1', 'x', 'y', 'n', x'00', x'00', 1.0)",
    ]
    with writer(engine).begin() as connection:
        for sql in rows:
            connection.execute(text(sql))
    migrate(engine)
    with writer(engine).begin() as connection:
        connection.execute(text("UPDATE cp_leases SET status = 'failed'"))
        assert connection.execute(text("PRAGMA foreign_key_check")).all() == []
        indexes = connection.execute(text("SELECT name FROM sqlite_master WHERE tbl_name = 'cp_leases'"))
        assert {"ix_cp_leases_agent_id", "ix_cp_leases_node_id", "ix_cp_leases_status"} <= set(
            indexes.scalars()
        )
    with pytest.raises(Exception, match="FOREIGN KEY"), writer(engine).begin() as connection:
        connection.execute(text("INSERT INTO cp_receipts VALUES ('L9', 'x', 'y', 'n', x'00', x'00', 1.0)"))
    with pytest.raises(Exception, match="CHECK"), writer(engine).begin() as connection:
        connection.execute(text("UPDATE cp_leases SET status = 'bogus'"))
    engine.dispose()


def test_poi_client_lease_prints_the_cause(
    flow: Flow, first_failure: Failed, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    import maxwell_poi.cli.service as cli_service
    from maxwell_poi.cli import app as cli

    monkeypatch.setattr(cli_service, "_agent", lambda _server, _key, _agent_id: flow.agents["alice"])
    (answer,) = first_failure.answers
    argv = ["client", "lease", "--agent-id", "alice", "--key", "-", answer.lease_id]
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] == "failed"  # the server's JSON on stdout
    said = " ".join(result.stderr.split())  # the cause on stderr (rich wraps it to the terminal)
    assert f"lease {answer.lease_id} failed:" in said and "exit code 2" in said, said
