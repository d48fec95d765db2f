"""A resident agent that dies is started again before its next wave, within a limit and after a
backoff; a re-enrolled command replaces the running one; the warm-up lease never asks the paying
job's question (issue 23 item 6, issue 24 item 3). Real processes in real sandboxes; the control
plane is not needed for these decisions (RemoteNode's own bookkeeping)."""

from __future__ import annotations

import sys
import time

import pytest

from maxwell_poi.node import remote as remote_mod
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.node.node import Node
from maxwell_poi.node.remote import RemoteNode
from maxwell_poi.protocol.lease import GenerateJob, Lease

DIES = [sys.executable, "-c", "import sys; sys.stderr.write('boom: no such key\\n'); sys.exit(3)"]
WAITS = [sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"]


def lease(prompt: str = "The paying question") -> Lease:
    return Lease.issue("alice", "gpt2-micro", GenerateJob(prompt=prompt, max_new_tokens=4))


@pytest.fixture()
def remote(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(remote_mod, "RESTART_BACKOFF_S", 0.0)
    warmed: list[Lease] = []
    with Node("n1", NodeKey.generate(), None) as node:
        r = RemoteNode(client=None, node=node, headroom=lambda: 1e6, device_class="cpu:test")  # type: ignore[arg-type]
        monkeypatch.setattr(r, "_warm_up", lambda agent_id, first: warmed.append(first))
        r.warmed = warmed  # type: ignore[attr-defined]
        yield r


def wait_dead(r: RemoteNode, agent_id: str) -> None:
    deadline = time.monotonic() + 20
    while r.node.agents[agent_id].proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def test_a_dead_agent_is_restarted_up_to_the_limit_then_its_leases_expire(remote, caplog):
    assert remote._ensure_agent("alice", DIES, [lease()])  # first start
    for restart in range(remote_mod.RESTART_LIMIT):
        wait_dead(remote, "alice")
        assert remote._ensure_agent("alice", DIES, [lease()]), restart  # found dead: started again
    assert len(remote.restarts["alice"]) == remote_mod.RESTART_LIMIT
    wait_dead(remote, "alice")
    late = lease()
    assert not remote._ensure_agent("alice", DIES, [late])  # past the limit: not started
    assert late.lease_id in remote.skipped  # left to expire: hold and stake back to the agent
    assert "alice" not in remote.node.agents
    assert not remote._ensure_agent("alice", DIES, [lease()])  # and it stays down within the window
    logged = caplog.text
    assert "exited (code 3)" in logged and "boom: no such key" in logged
    assert f"{remote_mod.RESTART_LIMIT} restarts in" in logged


def test_a_restart_waits_out_its_backoff(remote, monkeypatch):
    monkeypatch.setattr(remote_mod, "RESTART_BACKOFF_S", 30.0)
    assert remote._ensure_agent("alice", DIES, [lease()])
    wait_dead(remote, "alice")
    assert remote._ensure_agent("alice", DIES, [lease()])  # the first restart is at once
    wait_dead(remote, "alice")
    held = lease()
    assert not remote._ensure_agent("alice", DIES, [held])  # the second waits 30 s
    assert held.lease_id in remote.skipped


def test_a_re_enrolled_command_replaces_the_running_agent(remote):
    assert remote._ensure_agent("alice", WAITS, [lease()])
    first = remote.node.agents["alice"]
    other = [*WAITS, "--corrected"]
    assert remote._ensure_agent("alice", other, [lease()])
    assert remote.node.agents["alice"] is not first and remote.node.agents["alice"].argv == other
    assert first.proc.poll() is not None  # the old one was stopped
    assert "alice" not in remote.restarts  # a new command is not a crash


def test_the_warm_up_never_asks_the_paying_question(monkeypatch):
    asked: list[list[Lease]] = []
    with Node("n1", NodeKey.generate(), None) as node:
        monkeypatch.setattr(node, "serve", lambda agent_id, leases, *a, **k: asked.append(list(leases)))
        r = RemoteNode(client=None, node=node, headroom=lambda: 1e6, device_class="cpu:test")  # type: ignore[arg-type]
        paying = lease("What is the secret answer?")
        r._warm_up("alice", paying)
    ((warm,),) = asked
    assert isinstance(warm.job, GenerateJob) and isinstance(paying.job, GenerateJob)
    assert warm.job.prompt.startswith(remote_mod.WARM_UP_PROMPT) and warm.job.prompt != paying.job.prompt
    assert (warm.model_id, warm.job.max_new_tokens) == (paying.model_id, paying.job.max_new_tokens)
    assert warm.lease_id != paying.lease_id
