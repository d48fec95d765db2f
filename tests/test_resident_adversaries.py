"""The resident-mode adversaries really do their cheat, as Maxwell's sandbox sees it: the relay's
sandbox holds no model and does almost no work, the batch copier answers two leases with one
lease's work, and the moonlighter mines between leases from a process outside its tree."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maxwell_poi.node.resident_runs import generate_leases, honest_resident, serve_wave, start_resident
from maxwell_poi.node.sandbox.base import pid_gone
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.protocol.stream import parse_resident_line
from maxwell_poi.prover.stream import streaming_leases_to

MODEL = "gpt2-micro"
TOKENS = 8


def adversary(name: str, key: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", f"maxwell_poi.adversaries.{name}", "--key", str(key), "--resident", *extra]


def new_key(path: Path) -> AgentKey:
    key = AgentKey.generate()
    key.save(path)
    return key


def opened(raw: bytes):
    return open_receipt(raw, 1 << 20)


@contextlib.contextmanager
def relay_worker(tmp_path: Path):
    sock = tmp_path / "worker.sock"
    new_key(tmp_path / "worker.pem")
    argv = [sys.executable, "-m", "maxwell_poi.adversaries.relay_worker"]
    argv += ["--key", str(tmp_path / "worker.pem"), "--listen", str(sock)]
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE)  # a plain process: outside any sandbox
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the relay worker never listened"
            time.sleep(0.05)
        yield sock
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()


def test_relay_passes_the_workers_answers_off_as_its_own_with_an_idle_sandbox(tmp_path, registry):
    relay_key = new_key(tmp_path / "relay.pem")
    warm, warm_honest, *leases = generate_leases(MODEL, 4, TOKENS, agent_id="relay")
    with (
        relay_worker(tmp_path) as sock,
        start_resident(adversary("relay", tmp_path / "relay.pem", "--upstream", str(sock)), "relay") as relay,
        honest_resident(tmp_path, 1) as honest,
    ):
        serve_wave(relay, [warm], registry)  # the worker loads its model: outside the sandbox
        serve_wave(honest, [warm_honest], registry)  # loads its model
        relayed = [serve_wave(relay, [lease], registry)[0] for lease in leases]
        honest_runs = [serve_wave(honest, [lease], registry)[0] for lease in leases]
    for lease, run in zip(leases, relayed, strict=True):
        assert run.receipt and not run.timed_out, run.evidence.stderr_tail
        receipt = opened(run.receipt)
        assert receipt.keyid == relay_key.keyid  # re-signed: the worker's key is nowhere
        assert receipt.claims.lease == lease.lease_id
        assert list(run.evidence.stream_tokens) == receipt.claims.tokens()
    for run in honest_runs:
        assert run.receipt, run.evidence.stderr_tail
    relay_cpu = sum(r.evidence.cpu_s for r in relayed)
    honest_cpu = sum(r.evidence.cpu_s for r in honest_runs)
    assert relay_cpu < 0.3 * honest_cpu, (relay_cpu, honest_cpu)
    relay_mb = max(r.evidence.peak_rss_mb() for r in relayed)
    honest_mb = max(r.evidence.peak_rss_mb() for r in honest_runs)
    assert relay_mb < honest_mb, (relay_mb, honest_mb)


def test_relay_without_a_worker_refuses_the_lease(tmp_path, registry):
    new_key(tmp_path / "relay.pem")
    missing = tmp_path / "nobody.sock"
    (lease,) = generate_leases(MODEL, 1, TOKENS, agent_id="relay")
    argv = adversary("relay", tmp_path / "relay.pem", "--upstream", str(missing))
    with start_resident(argv, "relay") as relay:
        (run,) = serve_wave(relay, [lease], registry, timeout_s=60)
    assert run.receipt == b"" and not run.timed_out
    assert f"no upstream worker at {missing}" in run.evidence.stderr_tail


def test_batch_copier_answers_the_second_lease_with_a_copy_of_the_first(tmp_path, registry):
    new_key(tmp_path / "copier.pem")
    job = GenerateJob(prompt="The steam engine", max_new_tokens=TOKENS, temperature=0.0)
    leases = [Lease.issue("copier", MODEL, job) for _ in range(2)]
    argv = adversary("batch_copier", tmp_path / "copier.pem", "--max-batch", "2")
    with start_resident(argv, "batch-copier") as agent:
        serve_wave(agent, [Lease.issue("copier", MODEL, job)], registry)  # loads the model
        runs = serve_wave(agent, leases, registry)
    claims = []
    for lease, run in zip(leases, runs, strict=True):
        assert run.receipt, run.evidence.stderr_tail
        c = opened(run.receipt).claims
        assert c.lease == lease.lease_id and c.nonce == lease.nonce  # each bound to its own lease
        assert list(run.evidence.stream_tokens) == c.tokens()
        assert run.evidence.co_leases == 1  # the channel looks like a batch of two
        claims.append(c)
    assert claims[0].tokens() == claims[1].tokens()
    assert claims[0].fingerprint_bytes() == claims[1].fingerprint_bytes()
    assert claims[0].layers == claims[1].layers  # one computation, two receipts


def test_moonlighter_mines_between_leases_from_outside_its_tree(tmp_path, registry):
    new_key(tmp_path / "moon.pem")
    first, second = generate_leases(MODEL, 2, TOKENS, agent_id="moon")
    with start_resident(adversary("moonlighter", tmp_path / "moon.pem"), "moonlighter") as agent:
        (run1,) = serve_wave(agent, [first], registry)
        time.sleep(1.0)
        (run2,) = serve_wave(agent, [second], registry)
        members = set(agent.sandbox.pids()) - {agent.proc.pid}
        agent.close()
    said = re.search(r"moonlighter: miners ([\d ]+)", agent.stderr_tail())  # stderr is read to its end
    assert said, agent.stderr_tail()
    miners = {int(pid) for pid in said[1].split()}
    for pid in miners:  # escaped or not, none outlives the agent
        deadline = time.monotonic() + 5
        while not pid_gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pid_gone(pid), f"miner {pid} outlived the agent"
    assert run1.receipt and run2.receipt, run2.evidence.stderr_tail
    ev = run2.evidence
    if ev.accounting["source"] == "proc":
        assert not members & miners  # the escaped miners are not in the tree /proc walks
        pytest.skip("/proc accounting: the escaped miners are invisible to it (the gap the cheat uses)")
    assert miners <= members, (miners, members)  # the cgroup holds them whatever their parentage
    idle = ev.idle_before
    assert idle is not None and idle.cpu_s > 0.5 * idle.gap_s, idle


@pytest.mark.parametrize("batched", [True, False], ids=["batched-prover", "one-lease-prover"])
def test_batch_copier_streams_each_copied_token_after_the_real_one(agent_key, monkeypatch, batched):
    from maxwell_poi.adversaries.batch_copier import BatchCopier

    if not batched:  # a tree without prover.batched: the copier falls back to Prover in turn
        monkeypatch.setitem(sys.modules, "maxwell_poi.prover.batched", None)
    copier = BatchCopier(agent_key)
    assert (copier._batched is not None) == batched
    job = GenerateJob(prompt="Heat", max_new_tokens=4, temperature=0.0)
    leases = [Lease.issue("copier", MODEL, job) for _ in range(3)]
    out = io.BytesIO()
    with streaming_leases_to(out, threading.Lock()):
        receipts = copier.answer_many(leases)
    lines = [parse_resident_line(line) for line in out.getvalue().splitlines()]
    a, b, c = (lease.lease_id for lease in leases)
    copied = [(t.lease_id, t.position) for t in lines if t.lease_id != b]
    assert copied == [(lid, pos) for pos in range(4) for lid in (a, c)]  # c's token right after a's
    claims = [opened(r).claims for r in receipts]
    assert [cl.lease for cl in claims] == [a, b, c]
    assert claims[2].tokens() == claims[0].tokens() and claims[2].layers == claims[0].layers
    assert all(cl.runtime["batch"] == 3 for cl in claims)
