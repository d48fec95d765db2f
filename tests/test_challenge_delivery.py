"""An L3 question Maxwell never delivered is Maxwell's failure, not the agent's ("never punish
Maxwell's own failures; only evidence of cheating moves a stake"): it ends the challenge as an L3
warning (stake held, as every warning), while silence after delivery still fails and slashes. An
agent's time counts from delivery, and the node's measured CPU wait extends it within a cap.

Real parts: the control plane on SQLite, its ChallengeBoard and exact-tier worker, the node's HTTP
routes (TestClient), a real prover's receipt and kept trace (gpt2-micro) and the real L3 check. The
node is this test: it pulls the question (or not) and posts the agent's opening line (the prover's
own `open_line`) when each case says. The inline layers are stood in for (PassingInline): L3 is what
is tested. Timeouts are 1-2 s; nothing asserts on a duration, only on Maxwell's stored clock values."""

from __future__ import annotations

import itertools
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from made_up_intake import PassingInline
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

import maxwell_poi.service.intake as intake
from maxwell_poi.ledger import Ledger, check_ledger, open_ledger_db
from maxwell_poi.ledger.db import writer
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.node.remote import RemoteNode
from maxwell_poi.node.resident import ResidentAgent
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.stream import open_request_line
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig, ServiceRefused
from maxwell_poi.service.api import create_app
from maxwell_poi.service.challenges import CPU_WAIT_CAP, Asked, ChallengeBoard, Outcome
from maxwell_poi.service.schema import ServiceBase, VerdictRow
from maxwell_poi.service.states import ChallengeKind
from maxwell_poi.service.store import migrate
from maxwell_poi.service.wire import (
    BidBody,
    ChallengeView,
    IntakeBody,
    OpenChallenge,
    OpeningAnswer,
    OpeningBody,
)

TOKEN = "t"
STAKE = 100_000
MODEL = "gpt2-micro"
JOB = {"kind": "generate", "prompt": "the mill by the river", "max_new_tokens": 8}
LEASE = "ab" * 16  # the old database's lease


@dataclass
class Plane:
    cp: ControlPlane
    admin: ServiceClient
    node: ServiceClient  # node n1's signed client: the test plays the node
    node_key: NodeKey
    prover: Prover  # alice's agent, keeping its traces
    bids: Iterator[int]

    def serve(self) -> str:
        """One exact-tier lease of alice's: bid, pulled by n1, run by the prover, handed in. The
        exact worker asks its first question as soon as it is in."""
        bid = {"bid_id": f"b{next(self.bids)}", "model_id": MODEL, "job": JOB, "price_micro_per_j": 100}
        self.cp.market.place_bid("alice", BidBody.model_validate({**bid, "stake_micro": STAKE}))
        (item,) = self.node.pull(headroom_j=1e6, agents=[], max_leases=4).leases
        lease = Lease.model_validate(item.lease)
        assert item.tier == "exact", item
        receipt = self.prover.run(lease)
        now = time.time()
        evidence = LeaseEvidence(
            started_at=now - 1, finished_at=now, wall_s=1.0, cpu_s=0.5, max_rss_kb=1000, bytes_in=10,
            bytes_out=20, sha256_in="0" * 64, sha256_out="1" * 64, exit_code=0, regime="resident",
        )  # fmt: skip
        signed = sign_evidence(evidence, lease.lease_id, receipt, node_id="n1", sandbox={}, key=self.node_key)
        body = IntakeBody(lease_id=lease.lease_id, receipt=receipt.decode(), evidence=signed.decode())
        answer, _ = self.cp.intake.submit(body)
        assert (answer.final, answer.stake_outcome) == (False, "pending"), answer
        return lease.lease_id

    def asked(self, lease_id: str) -> ChallengeView:
        """The lease's question once the worker has asked it (read by the admin: not a delivery)."""
        deadline = time.monotonic() + 60
        while not (views := self.admin.challenges(lease_id)) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(views) == 1, views  # exact_blocks=2: the whole trace in one opening
        return views[0]

    def take(self, lease_id: str) -> OpenChallenge:
        """The node's pull that takes the lease's question (delivers it)."""
        self.asked(lease_id)
        (question,) = [
            c for c in self.node.pull(headroom_j=0.0, agents=[]).challenges if c.lease_id == lease_id
        ]
        return question

    def opening(self, question: OpenChallenge) -> bytes:
        """The agent's answer, from its kept trace."""
        return self.prover.open_line(open_request_line(question.lease_id, list(question.keys)))

    def final(self, lease_id: str) -> tuple[VerdictRow, dict[str, Any]]:
        assert self.cp.exact.drain(60), "the exact-tier lease stayed pending"
        with Session(self.cp.ledger.engine) as session:
            verdict = session.get(VerdictRow, lease_id)
        assert verdict is not None and verdict.final
        (l3,) = [d for d in json.loads(verdict.layers) if d["layer"] == "L3-exact"]
        return verdict, l3

    def slashed(self) -> int:
        return self.cp.ledger.balances().get("maxwell:slashed", 0)


def sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.time()))


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    tmp = tmp_path_factory.mktemp("delivery")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        mp.setattr(intake, "draw_audit", lambda _p: False)  # no L4: the L3 challenge alone
        config = ServiceConfig.from_env(
            db=str(tmp / "cp.sqlite"),
            admin_token=TOKEN,
            reserve_micro_per_j=20,
            audit_backend="thread",
            challenge_window_s=0.0,  # final as soon as the challenge is judged
            opening_timeout_s=1.0,
            exact_blocks=2,  # one question per lease: gpt2-micro has two blocks
        )
        cp = ControlPlane(config)
        mp.setattr(cp.intake, "verifier", PassingInline())
        cp.start()
        node_key, agent_key = NodeKey.generate(), AgentKey.generate()
        with TestClient(create_app(cp)) as tc:
            admin = ServiceClient("http://test", admin_token=TOKEN, http=tc)
            admin.enroll_node("n1", node_key.public_hex)
            admin.enroll_agent("alice", agent_key.public_hex, [sys.executable, "-c", "pass"])
            admin.deposit("alice", 10_000_000, "d-alice")
            policy = admin.request("GET", "/v1/admin/policy", auth="admin")
            admin.set_policy(**{**policy, "exact_from_value": 0.0})  # every gpt2 lease: exact tier
            node = ServiceClient("http://test", key=node_key, principal="node:n1", http=tc)
            prover = Prover(agent_key, cp.registry, trace_dir=tmp / "traces")
            yield Plane(cp, admin, node, node_key, prover, itertools.count())
        cp.close()


@pytest.fixture()
def timeout(plane: Plane, request: pytest.FixtureRequest) -> Iterator[float]:
    plane.cp.exact.opening_timeout_s = getattr(request, "param", 1.0)
    yield plane.cp.exact.opening_timeout_s
    plane.cp.exact.opening_timeout_s = 1.0


def test_a_question_no_node_pulled_is_an_l3_warning_and_moves_no_stake(plane: Plane, timeout: float) -> None:
    slashed = plane.slashed()
    lease_id = plane.serve()  # n1 pulls nothing more: down, or busy with something else
    verdict, l3 = plane.final(lease_id)
    assert (verdict.verdict, verdict.stake_outcome) == ("warning", "held"), verdict.reason
    assert l3["status"] == "warn", l3
    assert "question not delivered to node n1 within 1 s: Maxwell's failure, not evidence" in l3["reason"]
    assert "undelivered_challenge" in l3["details"]
    assert plane.slashed() == slashed  # no slash
    assert plane.cp.ledger.balances()["escrow:alice"] >= STAKE  # the stake still escrowed, not released
    (asked,) = plane.admin.challenges(lease_id)
    assert (asked.status, asked.delivered_at, asked.answered_at) == ("late", None, None)
    assert check_ledger(plane.cp.ledger.engine).ok


def test_a_question_delivered_then_unanswered_fails_and_slashes(plane: Plane, timeout: float) -> None:
    slashed = plane.slashed()
    lease_id = plane.serve()
    question = plane.take(lease_id)  # the node took it ... and the agent says nothing
    assert question.cpu_wait_cap_s == pytest.approx(CPU_WAIT_CAP * timeout)
    verdict, l3 = plane.final(lease_id)
    assert (verdict.verdict, verdict.stake_outcome) == ("contraindicated", "slashed"), verdict.reason
    assert l3["status"] == "fail"
    assert "no opening within 1 s of its delivery to node n1" in l3["reason"], l3["reason"]
    assert plane.slashed() == slashed + STAKE
    (asked,) = plane.admin.challenges(lease_id)
    assert asked.status == "late" and asked.delivered_at is not None
    assert asked.deadline == pytest.approx(asked.delivered_at + timeout)


@pytest.mark.parametrize("timeout", [2.0], indirect=True)
def test_a_question_delivered_late_gets_its_whole_window_from_delivery(plane: Plane, timeout: float) -> None:
    lease_id = plane.serve()
    asked = plane.asked(lease_id)
    sleep_until(asked.asked_at + 0.6 * timeout)  # the node comes late (busy, or the network)
    question = plane.take(lease_id)
    line = plane.opening(question)
    sleep_until(asked.asked_at + timeout + 0.1)  # past the deadline counted from asking
    answered = plane.node.opening(question.challenge_id, lease_id, line)
    assert answered.status == "answered"
    verdict, l3 = plane.final(lease_id)
    assert (verdict.verdict, verdict.stake_outcome) == ("affirming", "released"), verdict.reason
    assert l3["status"] == "pass", l3["reason"]
    (row,) = plane.admin.challenges(lease_id)
    assert row.delivered_at is not None, "the pull came after the first deadline: rerun on a quieter host"
    assert row.asked_at < row.delivered_at < row.asked_at + timeout
    assert row.deadline == pytest.approx(row.delivered_at + timeout)  # from delivery ...
    assert row.deadline < row.asked_at + 2 * timeout  # ... never past twice the timeout from asking
    assert row.asked_at + timeout < row.answered_at <= row.deadline


@pytest.mark.parametrize("timeout", [2.0], indirect=True)
def test_the_nodes_measured_cpu_wait_extends_the_deadline_within_its_cap(
    plane: Plane, timeout: float
) -> None:
    lease_id = plane.serve()
    question = plane.take(lease_id)
    line = plane.opening(question)
    delivered = plane.admin.challenges(lease_id)[0].delivered_at
    assert delivered is not None
    cap = CPU_WAIT_CAP * timeout
    sleep_until(delivered + timeout + 0.2 * cap)  # after the deadline; within the CPU wait measured
    answered = plane.node.opening(question.challenge_id, lease_id, line, cpu_wait_s=0.9 * cap)
    assert answered.status == "answered"
    verdict, l3 = plane.final(lease_id)
    assert (verdict.verdict, verdict.stake_outcome) == ("affirming", "released"), verdict.reason
    (row,) = plane.admin.challenges(lease_id)
    assert row.deadline == pytest.approx(delivered + timeout + 0.9 * cap)  # the deadline it was judged by
    assert delivered + timeout < row.answered_at <= row.deadline


@pytest.mark.parametrize("timeout", [1.0], indirect=True)
def test_a_claimed_cpu_wait_past_the_cap_buys_nothing(plane: Plane, timeout: float) -> None:
    slashed = plane.slashed()
    lease_id = plane.serve()
    question = plane.take(lease_id)
    line = plane.opening(question)
    delivered = plane.admin.challenges(lease_id)[0].delivered_at
    assert delivered is not None
    sleep_until(delivered + timeout + CPU_WAIT_CAP * timeout + 0.3)
    with pytest.raises(ServiceRefused) as late:
        plane.node.opening(question.challenge_id, lease_id, line, cpu_wait_s=100 * timeout)
    assert late.value.status == 409
    verdict, l3 = plane.final(lease_id)
    assert (verdict.verdict, verdict.stake_outcome) == ("contraindicated", "slashed"), verdict.reason
    assert plane.slashed() == slashed + STAKE


# -- the node's measurement ---------------------------------------------------------------------------

# answers an L3 question (with a refusal: only its arrival matters here) `delay` seconds after it
# came; with `hogs`, that many busy children share its sandbox all along, so its threads wait for a CPU
SLOW_AGENT = """
import json, subprocess, sys, time
delay, hogs = float(sys.argv[1]), int(sys.argv[2])
busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(hogs)]
for line in sys.stdin:
    lease_id = json.loads(line)["open"]
    time.sleep(delay)
    sys.stdout.write(json.dumps({"x": lease_id, "error": "here, late"}, separators=(",", ":")) + "\\n")
    sys.stdout.flush()
"""


class Posts:
    """Stands in for the node's client: records what the node posts for each question."""

    def __init__(self) -> None:
        self.posted: list[tuple[bytes, float | None]] = []

    def opening(self, challenge_id: int, lease_id: str, line: bytes, cpu_wait_s: float | None = None) -> Any:
        self.posted.append((line, cpu_wait_s))
        return OpeningAnswer(challenge_id=challenge_id, lease_id=lease_id, status="answered")


@pytest.mark.parametrize("hogs", [0, 2 * len(os.sched_getaffinity(0)) + 1])
def test_the_node_waits_past_the_timeout_only_for_cpu_wait_it_measured(hogs: int) -> None:
    """The node's side (RemoteNode relaying to a real sandboxed agent): an agent whose threads wait
    for a CPU gets its measured wait on top of the timeout, within the question's cap, and the node
    posts the figure with the answer; an agent that merely sleeps gets nothing."""
    question = OpenChallenge(
        challenge_id=1,
        lease_id=uuid.uuid4().hex,
        agent_id="slow",
        keys=[(0, "x")],
        timeout_s=1.0,
        cpu_wait_cap_s=3.0,
    )
    client = Posts()
    with ResidentAgent([sys.executable, "-c", SLOW_AGENT, "1.5", str(hogs)], name=f"slow-{hogs}") as agent:
        node = RemoteNode(client, SimpleNamespace(agents={"slow": agent}, node_id="n"), device_class="cpu:x")  # type: ignore[arg-type]
        node._answer_challenge(question)
    ((line, cpu_wait_s),) = client.posted
    assert cpu_wait_s is not None, "no schedstat here: the node cannot measure CPU wait"
    refused = json.loads(line)["error"]
    if hogs:
        assert refused.endswith("here, late"), refused  # waited for: it was starved
        assert cpu_wait_s > 0
    else:
        assert refused.startswith("no opening within 1 s"), refused


# -- the migration ---------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def old_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A control plane database at cp0006 (before delivered_at) with two challenges in it."""
    if request.param == "sqlite":
        engine = open_ledger_db(tmp_path / "cp.sqlite")
    else:
        url, args = request.getfixturevalue("pg_schema")
        engine = open_ledger_db(url, connect_args=args)
    migrate(engine, "cp0006")
    rows = [
        "INSERT INTO cp_agents (agent_id, public_key, command, enrolled_at) VALUES ('a', 'k', '[]', 1.0)",
        "INSERT INTO cp_nodes (node_id, public_key, enrolled_at, headroom_j, device_class) "
        "VALUES ('n', 'k', 1.0, 0, '')",
        "INSERT INTO cp_bids (id, agent_id, bid_id, request_sha256, model_id, precision, job, "
        "price_micro_per_j, stake_micro, expected_j, status, reason, created_at) "
        "VALUES (1, 'a', 'b', 'x', 'm', 'fp32', '{}', 1, 1, 1.0, 'won', '', 1.0)",
        "INSERT INTO cp_leases (lease_id, agent_id, node_id, bid_pk, lease_json, tier, audit_probability, "
        "tier_reason, price_micro_per_j, hold_micro, stake_micro, status, issued_at, deadline) "
        "VALUES ('" + LEASE + "', 'a', 'n', 1, '{}', 'exact', 0.1, '', 1, 1, 1, 'settled', 1.0, 2.0)",
        # no ids given: PostgreSQL's sequence must hand out the next ones (the board's test asks more)
        "INSERT INTO cp_challenges (lease_id, node_id, kind, keys, status, asked_at, deadline, answered_at) "
        "VALUES ('" + LEASE + "', 'n', 'l3', '[[0, \"x\"]]', 'answered', 10.0, 40.0, 12.0)",
        "INSERT INTO cp_challenges (lease_id, node_id, kind, keys, status, asked_at, deadline, answered_at) "
        "VALUES ('" + LEASE + "', 'n', 'l3', '[[1, \"x\"]]', 'late', 50.0, 80.0, NULL)",
    ]
    with writer(engine).begin() as connection:
        for sql in rows:
            connection.execute(text(sql))
    yield engine
    engine.dispose()


def test_the_migration_reads_old_questions_as_delivered_when_asked(old_database: Engine) -> None:
    """Before cp0007 every question's deadline counted from asking: read back as delivered then, an
    old silence stays a silence (not an undelivered question), and the models match the tables."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    migrate(old_database)
    with writer(old_database).begin() as connection:
        got = connection.execute(text("SELECT asked_at, delivered_at FROM cp_challenges ORDER BY id")).all()
        assert [tuple(r) for r in got] == [(10.0, 10.0), (50.0, 50.0)]
        context = MigrationContext.configure(connection, opts={"version_table": "cp_alembic_version"})
        diff = [d for d in compare_metadata(context, ServiceBase.metadata) if "cp_challenges" in repr(d)]
        assert diff == []
    views = ChallengeBoard(Ledger(old_database)).of_lease(LEASE)
    assert [(v["status"], v["delivered_at"]) for v in views] == [("answered", 10.0), ("late", 50.0)]
    migrate(old_database)  # again: a no-op


def test_the_board_tells_its_endings_apart_on_each_database(old_database: Engine) -> None:
    """`ask` itself, with the delivery stamped by `open_for`'s compare-and-set on SQLite and on
    PostgreSQL: a typed outcome, never a string to match."""
    migrate(old_database)
    board = ChallengeBoard(Ledger(old_database))
    undelivered = board.ask(LEASE, "n", ChallengeKind.L3, [(0, "x")], 0.3)
    assert (undelivered.outcome, undelivered.evidence, undelivered.opening) == (
        Outcome.UNDELIVERED,
        False,
        None,
    )
    got: list[Asked] = []
    asking = threading.Thread(
        target=lambda: got.append(board.ask(LEASE, "n", ChallengeKind.L3, [(0, "x")], 2.0))
    )
    asking.start()
    deadline = time.monotonic() + 30
    while not (questions := board.open_for("n")) and time.monotonic() < deadline:
        time.sleep(0.01)
    (question,) = questions
    assert board.open_for("n")[0]["timeout_s"] <= question["timeout_s"]  # delivered once: its clock runs
    refusal = json.dumps({"x": LEASE, "error": "no kept trace"}, separators=(",", ":"))
    board.answer("n", OpeningBody(challenge_id=question["challenge_id"], lease_id=LEASE, line=refusal))
    asking.join(30)
    (refused,) = got
    assert (refused.outcome, refused.evidence) == (Outcome.NOT_OPENED, True)
    assert refused.reason == "the agent refused: no kept trace"
    views = board.of_lease(LEASE)[-2:]
    assert [(v["status"], v["delivered_at"] is None) for v in views] == [("late", True), ("answered", False)]
