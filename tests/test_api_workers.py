"""Several API processes on one database (issue 25): one holds the audit lead and audits leases the
others took in; enrolments and the policy set through one reach the others; the lead passes on when
its holder goes. First with two control planes in this process (each is what one worker builds),
on SQLite and PostgreSQL; then `poi serve --workers 2` for real on PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from made_up_intake import PassingInline, made_up_intake, one_lease
from sqlalchemy.orm import Session

import maxwell_poi.service.intake as intake
from maxwell_poi.ledger import Ledger, check_ledger, open_ledger_db
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
from maxwell_poi.service.schema import LeaseRow, VerdictRow
from maxwell_poi.service.wire import BidBody, Deposit, EnrollAgent, EnrollNode, PullBody

ROOT = Path(__file__).resolve().parents[1]


def _until(check: Callable[[], bool], timeout_s: float = 30.0) -> bool:
    """Poll `check` until true or the timeout (a condition, not a timing, is asserted)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


@pytest.fixture(params=["sqlite", "postgresql"])
def pair(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch) -> Iterator[list[ControlPlane]]:
    """Two control planes on one database, started in order: the first takes the audit lead."""
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    config = ServiceConfig.from_env(
        db=str(tmp_path / "cp.sqlite"), admin_token="t", reserve_micro_per_j=20, audit_backend="thread"
    )
    opened: list[ControlPlane] = []
    for _ in range(2):
        ledger = None
        if request.param == "postgresql":
            url, args = request.getfixturevalue("pg_schema")
            ledger = Ledger(open_ledger_db(url, connect_args=args))
        plane = ControlPlane(config, ledger=ledger)
        plane.start()
        opened.append(plane)
    yield opened
    for plane in opened:
        plane.close()


def test_one_plane_leads_and_audits_the_lease_another_took_in(
    pair: list[ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    leader, other = pair
    assert (leader.lead.leading, other.lead.leading) == (True, False)
    node_key, carol = NodeKey.generate(), AgentKey.generate()
    leader.enroll_agent(EnrollAgent(agent_id="carol", public_key=carol.public_hex, command=[]))
    # enrolled through the leader, known to the other on first use (its keyring reads the row)
    other.deposit(Deposit(agent_id="carol", amount_micro=1_000, key="d-carol"))
    lease_id = one_lease(other, node_key).lease.lease_id  # issued by the process that does not lead
    monkeypatch.setattr(other.intake, "verifier", PassingInline())
    monkeypatch.setattr(intake, "draw_audit", lambda _p: True)
    answer, _ = other.intake.submit(made_up_intake(lease_id, node_key))
    assert (answer.final, answer.audit_drawn) == (False, True)
    assert other.audits.depth() == 0  # the process that took it in queued nothing: it does not lead
    assert leader.audits.drain(60), "the leader never found the lease another process took in"
    with Session(leader.ledger.engine) as session:
        verdict = session.get(VerdictRow, lease_id)
        status = session.get(LeaseRow, lease_id).status
    assert verdict.final and status == "settled"
    assert verdict.verdict == "contraindicated"  # the leader's L0 refused the made-up receipt
    assert check_ledger(leader.ledger.engine).ok


def test_a_policy_set_through_one_plane_applies_in_the_other(pair: list[ControlPlane]) -> None:
    first, second = pair
    from maxwell_poi.service.wire import PolicyBody

    body = PolicyBody(
        medium_from_value=0, high_from_value=0, audit_cost_fraction=0.2, upgrade_headroom_factor=2, margin=0.5
    )
    first.set_policy(body)
    assert _until(lambda: second.policy.audit_cost_fraction == 0.2, 10)


def test_the_audit_lead_passes_on_when_its_holder_closes(pair: list[ControlPlane]) -> None:
    leader, other = pair
    assert other.audits._threads == []  # a follower runs no audit worker
    leader.close()
    assert _until(lambda: other.lead.leading, 30), "the follower never took the lead"
    assert _until(lambda: len(other.audits._threads) > 0, 10)


# -- for real: `poi serve --workers 2` on PostgreSQL -------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def served(pg_schema: tuple[str, dict[str, str]], tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    url, args = pg_schema
    schema_url = f"{url}?options={args['options'].replace('=', '%3D')}"
    port = _free_port()
    env = {**os.environ, "POI_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "maxwell_poi", "serve", "--db", schema_url, "--port", str(port)]
    argv += ["--workers", "2", "--admin-token", "tok", "--audit-backend", "thread", "--no-access-log"]
    log = tmp_path / "serve.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # both processes answer once both have started (fresh connections land on either)
        seen: set[int] = set()

        def both_up() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                seen.add(httpx.get(base + "/healthz", timeout=5).json()["process"])
            assert proc.poll() is None, log.read_text()[-3000:]
            return len(seen) == 2

        assert _until(both_up, 180), (
            f"expected 2 API processes answering, saw {seen}: {log.read_text()[-2000:]}"
        )
        yield base, proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)


def test_poi_serve_with_two_workers_serves_one_database(served: tuple[str, subprocess.Popen]) -> None:
    served, parent = served
    node_key, alice = NodeKey.generate(), AgentKey.generate()

    def fresh(**kw) -> ServiceClient:  # a new connection per call: requests spread over the processes
        return ServiceClient(served, **kw)

    with fresh(admin_token="tok") as admin:
        admin.enroll_node("n1", node_key.public_hex)
        admin.enroll_agent("alice", alice.public_hex, [])
    for i in range(6):  # each lands on whichever process accepts it; every one knows alice by now
        with fresh(admin_token="tok") as admin:
            admin.deposit("alice", 1_000_000, key=f"d{i}")
    leads = {}
    for _ in range(20):
        health = httpx.get(served + "/healthz", timeout=5).json()
        leads[health["process"]] = health["audit_lead"]
    assert sorted(leads.values()) == [False, True], leads  # two processes, one of them audits
    with fresh(key=alice, principal="agent:alice") as agent:
        bid = {"bid_id": "b1", "model_id": "gpt2-micro", "job": {"kind": "generate", "prompt": "hi",
               "max_new_tokens": 4}, "price_micro_per_j": 100, "stake_micro": 1_000}  # fmt: skip
        agent.bid(bid)
    with fresh(key=node_key, principal="node:n1") as node:
        (pulled,) = node.pull(1e6, [], max_leases=4).leases
        lease_id = Lease.model_validate(pulled.lease).lease_id
        body = made_up_intake(lease_id, node_key)
        receipt, signed = body.receipt.encode(), body.evidence.encode()
        answer = node.intake(lease_id, receipt, signed)
        again = node.intake(lease_id, receipt, signed)  # a retry, perhaps to the other process
    assert answer.verdict == "contraindicated" and answer.final  # L0 refuses a receipt nobody signed
    assert again.duplicate and again.charge_micro == answer.charge_micro
    with fresh(admin_token="tok") as admin:
        report = admin.ledger()
    assert report.check.ok and report.balances["wallet:alice"] == 6_000_000 - 1_000 - answer.charge_micro
    gateway = httpx.post(served + "/v1/chat/completions", json={}, timeout=10)
    assert gateway.status_code == 503 and "--workers 1" in gateway.json()["error"]["expected"]
    # uvicorn's supervisor killed outright: its workers stop too (PR_SET_PDEATHSIG), none serves on
    os.kill(parent.pid, 9)
    parent.wait()

    def stopped(pid: int) -> bool:  # gone, or a zombie its new parent has not reaped yet
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True

    workers = list(leads)  # the pids /healthz named
    assert _until(lambda: all(stopped(p) for p in workers), 60), f"API workers {workers} served on"


def test_control_planes_on_other_schemas_of_one_postgresql_database_each_lead(
    pg_schemas: Callable[[], tuple[str, dict[str, str]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The audit lead is per schema: a staging control plane beside production does not take it."""
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    config = ServiceConfig.from_env(admin_token="t", audit_backend="thread")
    planes = []
    try:
        for _ in range(2):
            url, args = pg_schemas()
            plane = ControlPlane(config, ledger=Ledger(open_ledger_db(url, connect_args=args)))
            plane.start()
            planes.append(plane)
        assert [p.lead.leading for p in planes] == [True, True]
    finally:
        for plane in planes:
            plane.close()


def test_concurrent_intake_through_two_planes_loses_nothing_and_never_fails(
    pair: list[ControlPlane], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Group commits of two processes settle leases of the same agents at once: every settlement
    commits exactly once (a deadlock between their transactions is retried, never a 500)."""
    node_key = NodeKey.generate()
    first, second = pair
    first.enroll_node(EnrollNode(node_id="n1", public_key=node_key.public_hex))
    agents = [f"agent{i}" for i in range(6)]
    for agent in agents:
        first.enroll_agent(EnrollAgent(agent_id=agent, public_key=AgentKey.generate().public_hex, command=[]))
        first.deposit(Deposit(agent_id=agent, amount_micro=100_000_000, key=f"d-{agent}"))
    job = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}
    for i in range(48):
        bid = {"bid_id": f"b{i}", "model_id": "gpt2-micro", "job": job, "price_micro_per_j": 100}
        first.market.place_bid(agents[i % len(agents)], BidBody.model_validate({**bid, "stake_micro": 1_000}))
    pulled = first.market.pull("n1", PullBody(headroom_j=1e9, agents=[], max_leases=64))
    assert len(pulled) == 48
    for plane in pair:
        monkeypatch.setattr(plane.intake, "verifier", PassingInline())
    monkeypatch.setattr(intake, "draw_audit", lambda _p: False)
    bodies = [made_up_intake(p.lease.lease_id, node_key) for p in pulled]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda ib: pair[hash(ib[1].lease_id) % 2].intake.submit(ib[1])[0], enumerate(bodies))
        )
    assert [a.duplicate for a in answers] == [False] * 48
    assert all(a.final and a.stake_outcome == "released" for a in answers)
    report = check_ledger(first.ledger.engine)
    assert report.ok, report.problems
