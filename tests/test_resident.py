"""Resident mode: the tagged channel (prover.harness.serve_resident, protocol.stream), Maxwell's
ResidentAgent in a sandbox, the node's signed evidence and `poi node DIR`."""

from __future__ import annotations

import io
import json
import sys
import time

import pytest

from maxwell_poi.node.attest import NodeKey, open_evidence, sign_evidence
from maxwell_poi.node.resident_runs import (
    generate_leases,
    measure_resident_profile,
    serve_wave,
    start_resident,
)
from maxwell_poi.protocol.errors import EvidenceFormatError, UnknownAgentError
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.stream import (
    TaggedReceipt,
    TaggedRefusal,
    TaggedToken,
    parse_resident_line,
    receipt_line,
    refusal_line,
    stream_line,
)
from maxwell_poi.prover.harness import one_at_a_time, serve_resident
from maxwell_poi.prover.stream import current_sink
from maxwell_poi.registry.profiles import ProfileStore

LID = "0123456789abcdef0123456789abcdef"


# --- wire format ----------------------------------------------------------------------------
def test_tagged_lines_round_trip_and_the_receipt_is_sliced_verbatim():
    envelope = b'{"payload":"eyJ9","payloadType":"x","signatures":[{"keyid":"k","sig":"s"}]}'
    assert parse_resident_line(stream_line(3, 17, LID)) == TaggedToken(LID, 3, 17)
    assert parse_resident_line(receipt_line(LID, envelope)) == TaggedReceipt(LID, envelope)
    assert parse_resident_line(refusal_line(LID, "bad lease")) == TaggedRefusal(LID, "bad lease")


@pytest.mark.parametrize(
    "line",
    [b'{"s":[1,2]}\n', b'{"s":[1,x],"l":"%s"}\n' % LID.encode(), b'{"r":"short","e":{}}\n', b"log line\n"],
)
def test_untagged_or_unreadable_lines_are_refused_with_what_was_expected(line):
    with pytest.raises(ValueError, match="expected"):
        parse_resident_line(line)


# --- the agent side: serve_resident ----------------------------------------------------------
def _fake_answer(lease: Lease) -> bytes:
    """A stand-in prover (no model): streams three tokens, returns a fixed 'receipt'."""
    sink = current_sink()
    for pos in range(3):
        sink(pos, 100 + pos)
    return b'{"fake":"%s"}' % lease.lease_id.encode()


def _lease(prompt: str = "hello") -> Lease:
    return Lease.issue("a", "gpt2-micro", GenerateJob(prompt=prompt, max_new_tokens=3))


def test_serve_resident_answers_lease_after_lease_and_refuses_a_bad_line():
    first, second = _lease(), _lease("again")
    stdin = io.BytesIO(first.to_json().encode() + b"\nnot a lease\n\n" + second.to_json().encode() + b"\n")
    stdout = io.BytesIO()
    assert serve_resident(one_at_a_time(_fake_answer), stdin=stdin, stdout=stdout) == 0
    items = [parse_resident_line(line) for line in stdout.getvalue().splitlines(keepends=True)]
    tokens = {
        lid: [i.token for i in items if isinstance(i, TaggedToken) and i.lease_id == lid]
        for lid in (first.lease_id, second.lease_id)
    }
    assert tokens == {first.lease_id: [100, 101, 102], second.lease_id: [100, 101, 102]}
    receipts = [i for i in items if isinstance(i, TaggedReceipt)]
    assert [r.lease_id for r in receipts] == [first.lease_id, second.lease_id]
    assert receipts[0].receipt == b'{"fake":"%s"}' % first.lease_id.encode()
    refusals = [i for i in items if isinstance(i, TaggedRefusal)]
    assert len(refusals) == 1 and "lease" in refusals[0].error


# --- Maxwell's side: a resident agent in a sandbox --------------------------------------------
FAKE_AGENT = """
import sys
from maxwell_poi.prover.harness import one_at_a_time, serve_resident
from maxwell_poi.prover.stream import current_sink
def answer(lease):
    s = current_sink()
    x = 0
    for pos in range(4):
        for i in range(300_000):  # real CPU work in the sandbox between tokens
            x += i
        s(pos, 7 + pos)
    return b'{"fake":1}'
sys.exit(serve_resident(one_at_a_time(answer)))
"""


def _fake_agent(name: str = "fake"):
    return start_resident([sys.executable, "-c", FAKE_AGENT], name)


def test_resident_agent_measures_each_lease_in_its_sandbox(registry):
    with _fake_agent() as agent:
        runs = serve_wave(agent, [_lease(), _lease()], registry)
        time.sleep(0.3)
        (third,) = serve_wave(agent, [_lease()], registry)
        source = agent.sandbox.describe()["source"]
    print(f"sandbox accounting source: {source}")
    for run in runs:
        ev = run.evidence
        assert run.receipt == b'{"fake":1}' and not run.timed_out
        assert ev.stream_tokens == (7, 8, 9, 10) and ev.stream_errors == 0
        assert ev.cpu_s > 0 and ev.wall_s > 0 and ev.regime == "resident"
        assert ev.accounting["source"] == source
    # the first wave's two leases were in flight together; the third came after an idle gap
    assert runs[0].evidence.overlapped == 1 and runs[1].evidence.overlapped == 1
    assert third.evidence.idle_before is not None and third.evidence.idle_before.gap_s >= 0.25
    assert third.evidence.idle_before.cpu_s < 0.05  # the fake agent waits on stdin between leases


def test_proc_fallback_is_used_and_named_when_forced(registry, monkeypatch):
    monkeypatch.setenv("POI_SANDBOX", "proc")
    with _fake_agent("fake-proc") as agent:
        (run,) = serve_wave(agent, [_lease()], registry)
    print("sandbox accounting source: proc (fallback forced)")
    assert run.evidence.accounting["source"] == "proc" and run.evidence.accounting["trust"] == "proc-tree"
    assert run.evidence.stream_tokens == (7, 8, 9, 10)


def test_a_lease_the_agent_never_answers_times_out_and_keeps_its_evidence(registry):
    silent = "import sys, time\nfor line in sys.stdin: time.sleep(30)"
    with start_resident([sys.executable, "-c", silent], "silent") as agent:
        lease = _lease()
        agent.submit(lease, 1 << 16)
        run = agent.collect(lease.lease_id, timeout_s=0.5)
    assert run.timed_out and run.receipt == b"" and "no receipt" in run.evidence.stderr_tail


def test_an_agent_that_exits_ends_its_leases_with_a_reason(registry):
    with start_resident([sys.executable, "-c", "import sys; sys.stdin.readline()"], "quitter") as agent:
        lease = _lease()
        agent.submit(lease, 1 << 16)
        run = agent.collect(lease.lease_id, timeout_s=10)
    assert not run.timed_out and run.receipt == b"" and "exited" in run.evidence.stderr_tail


# --- signed evidence ------------------------------------------------------------------------
def test_signed_evidence_opens_only_for_the_enrolled_node(registry):
    with _fake_agent() as agent:
        (run,) = serve_wave(agent, [lease := _lease()], registry)
        sandbox = agent.sandbox.describe()
    key, other = NodeKey.generate(), NodeKey.generate()
    doc = sign_evidence(run.evidence, lease.lease_id, run.receipt, node_id="node-a", sandbox=sandbox, key=key)
    opened = open_evidence(doc, Keyring({"node-a": key.public_hex}))
    assert opened.evidence == run.evidence and opened.lease_id == lease.lease_id
    assert opened.sandbox["source"] == sandbox["source"] and opened.hardware["device_class"]
    with pytest.raises(EvidenceFormatError, match="does not verify"):
        open_evidence(doc, Keyring({"node-a": other.public_hex}))
    with pytest.raises(UnknownAgentError):
        open_evidence(doc, Keyring({"node-b": key.public_hex}))
    envelope = json.loads(doc)
    envelope["payload"] = envelope["payload"][:-8] + "AAAAAAA="
    with pytest.raises(EvidenceFormatError):
        open_evidence(json.dumps(envelope).encode(), Keyring({"node-a": key.public_hex}))
    with pytest.raises(EvidenceFormatError, match="DSSE"):
        open_evidence(b"[1,2]", Keyring({"node-a": key.public_hex}))


# --- poi node DIR -----------------------------------------------------------------------------
def test_poi_node_serves_a_directory_and_does_not_serve_a_lease_twice(tmp_path):
    from typer.testing import CliRunner

    from maxwell_poi.cli import app

    key = AgentKey.generate()
    key.save(tmp_path / "alice.pem")
    Keyring({"alice": key.public_hex}).save(tmp_path / "keyring.json")
    (tmp_path / "node.json").write_text(
        json.dumps(
            {
                "node_id": "node-test",
                "agents": {
                    "alice": {
                        "command": [
                            sys.executable,
                            "-m",
                            "maxwell_poi",
                            "agent",
                            "--key",
                            "alice.pem",
                            "--resident",
                        ]
                    }
                },
                "concurrency": 2,
            }
        )
    )
    # profile first: L1 and L2 are required, and without a profile an honest lease ends at warning
    ProfileStore().put(measure_resident_profile("gpt2-micro", runs=3, tokens=4, batches=(1, 2)))
    (tmp_path / "leases").mkdir()
    leases = generate_leases("gpt2-micro", 2, 4, agent_id="alice")
    for lease in leases:
        (tmp_path / "leases" / f"{lease.lease_id}.json").write_text(lease.to_json())
    (tmp_path / "leases" / "broken.json").write_text("{")
    result = CliRunner().invoke(app, ["node", str(tmp_path), "--json"])
    summary = json.loads(result.stdout)
    assert sorted(r["lease_id"] for r in summary["served"]) == sorted(lease.lease_id for lease in leases)
    assert any("broken.json" in p for p in summary["refused_files"])
    node_keyring = Keyring({"node-test": (tmp_path / "node.pub").read_text().strip()})
    for lease in leases:
        out = tmp_path / "out" / lease.lease_id
        opened = open_evidence((out / "evidence.dsse.json").read_bytes(), node_keyring)
        assert opened.lease_id == lease.lease_id
        assert json.loads((out / "result.json").read_text())["lease_id"] == lease.lease_id
    verdicts = [(r["verdict"], r["reason"]) for r in summary["served"]]
    # the one allowed exception: the fail-safe for contention the profile never saw (named, a warning)
    unseen = [v for v in verdicts if v[0] == "warning" and "contention the profile never saw" in v[1]]
    assert summary["affirmed"] + len(unseen) == 2, verdicts
    assert result.exit_code == 0
    again = json.loads(CliRunner().invoke(app, ["node", str(tmp_path), "--json"]).stdout)
    assert again["served"] == [] and again["already_done"] == 2


def test_poi_node_refuses_a_bad_directory_with_a_reason(tmp_path):
    from typer.testing import CliRunner

    from maxwell_poi.cli import app

    (tmp_path / "node.json").write_text('{"agents": {"a": {"cmd": "x"}}}')
    result = CliRunner().invoke(app, ["node", str(tmp_path)])
    assert result.exit_code == 2 and "agents.a" in result.stderr


def test_telemetry_is_sampled_per_busy_span_and_reaches_the_leases_still_waiting(registry):
    """GPU telemetry (NVML on a GPU host) runs over each busy span; a simulated source stands in."""
    from simulated import SimulatedSource

    from maxwell_poi.node.resident import ResidentAgent
    from maxwell_poi.node.runs import OFFLINE_ENV
    from maxwell_poi.observer.telemetry import Observer

    observer = Observer([SimulatedSource({"power_w": 300.0})])
    argv = [sys.executable, "-c", FAKE_AGENT]
    with ResidentAgent(argv, name="fake-telemetry", env=OFFLINE_ENV, telemetry=observer) as agent:
        (first,) = serve_wave(agent, [_lease()], registry)
        (second,) = serve_wave(agent, [_lease()], registry)
    for run in (first, second):
        assert "simulated" in run.evidence.telemetry
        assert run.evidence.telemetry["simulated"].totals["energy_j"] > 0
    assert first.evidence.telemetry["simulated"] is not second.evidence.telemetry["simulated"]
