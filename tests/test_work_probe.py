"""The work probe (issue 24): Maxwell asks a resident agent, while a lease streams, for the
fingerprint of a fresh random sequence under the leased weights. Honest agents answer it; padding
(CPU burnt, memory held) does not: a relay with no weights refuses, a cache forges, and L2 fails
both. The probe's pass never enters the lease's commitments."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from maxwell_poi.adversaries.padded_cache import store_answer
from maxwell_poi.node.probe import PendingProbe, WorkProbes
from maxwell_poi.node.resident_runs import serve_wave, start_resident
from maxwell_poi.node.runs import honest_agent_argv
from maxwell_poi.observer.evidence import LeaseEvidence, WorkProbe
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.probe import ProbeAnswer, ProbeRequest, parse_probe_answer, parse_probe_request
from maxwell_poi.protocol.stream import parse_resident_line
from maxwell_poi.prover.harness import one_at_a_time, serve_resident
from maxwell_poi.prover.probe import probe_answerer, probe_fingerprint
from maxwell_poi.prover.recorder import ActivationRecorder
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.verifier.boundary import work_probe

MODEL = "gpt2-micro"


def _lease(prompt: str = "The probe", tokens: int = 12, temperature: float = 0.0) -> Lease:
    return Lease.issue("a", MODEL, GenerateJob(prompt=prompt, max_new_tokens=tokens, temperature=temperature))


def _request(lease: Lease, ids=(5, 900, 77, 3021, 12, 29000, 8, 4242)) -> ProbeRequest:
    return ProbeRequest(lease.lease_id, 1, lease.model_id, lease.precision, tuple(ids), 32)


def test_probe_lines_round_trip_and_bad_lines_say_what_was_expected():
    req = _request(_lease())
    assert parse_probe_request(req.line()) == req
    answer = ProbeAnswer(req.lease_id, 1, b"\x01\x02")
    assert parse_probe_answer(answer.line()) == answer
    assert parse_resident_line(answer.line()) == answer  # the node's reader routes it
    refused = ProbeAnswer(req.lease_id, 1, error="no weights")
    assert parse_probe_answer(refused.line()).error == "no weights"
    for bad in (b'{"probe":"x"}\n', b'{"probe":"x","n":1,"model":"m","precision":"fp32","ids":[1],"k":8}'):
        with pytest.raises(ValueError, match="expected"):
            parse_probe_request(bad)
    with pytest.raises(ValueError, match="expected"):
        parse_probe_answer(b'{"p":"x","n":1,"f":"not base64!"}')


def test_the_harness_answers_a_probe_while_a_lease_is_still_running():
    """A probe must not wait for the lease in progress: the lease's answer blocks until the probe's
    answer has been written."""
    lease = _lease()
    req = _request(lease)
    probe_written = threading.Event()

    def slow_answer(_lease: Lease) -> bytes:
        assert probe_written.wait(10), "the probe waited for the lease"
        return b'{"fake":1}'

    def prober(raw: bytes) -> bytes:
        probe_written.set()
        return ProbeAnswer(parse_probe_request(raw).lease_id, 1, b"ok").line()

    stdin = io.BytesIO(lease.to_json().encode() + b"\n" + req.line())
    stdout = io.BytesIO()
    serve_resident(one_at_a_time(slow_answer), stdin=stdin, stdout=stdout, prober=prober)
    lines = [parse_resident_line(x) for x in stdout.getvalue().splitlines(keepends=True)]
    assert ProbeAnswer(lease.lease_id, 1, b"ok") in lines


def test_an_agent_without_weights_answers_that_it_cannot():
    req = _request(_lease())
    stdout = io.BytesIO()
    serve_resident(one_at_a_time(lambda _l: b"{}"), stdin=io.BytesIO(req.line()), stdout=stdout)
    deadline = time.monotonic() + 5
    while not stdout.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    answer = parse_probe_answer(stdout.getvalue())
    assert answer.number == 1 and "does not answer work probes" in answer.error


@pytest.fixture(scope="module")
def prover(registry):
    return Prover(AgentKey.generate(), registry)


def test_the_probe_never_enters_the_lease_commitments(prover):
    """A probe run through the module while a recorder is active (the lease generating on another
    thread) records nothing."""
    model = prover.model_for(_lease())
    with ActivationRecorder(model) as recorder:
        done = threading.Event()

        def probe_elsewhere() -> None:
            probe_fingerprint(model, list(_request(_lease()).ids), 32)
            done.set()

        threading.Thread(target=probe_elsewhere).start()
        assert done.wait(30)
        assert recorder.pending == 0
        probe_fingerprint(model, [1, 2, 3], 8)  # and on this thread too
        assert recorder.pending == 0


def _judge(registry, lease: Lease, answer_line: bytes) -> WorkProbe:
    probes = WorkProbes(registry)
    pending = PendingProbe(_request(lease), send_at_token=0, sent_at_token=0, sent_t=time.perf_counter())
    assert pending.take(parse_probe_answer(answer_line), time.perf_counter())
    return probes.judge(lease, pending, this_device())


def test_maxwell_matches_an_honest_answer_and_rejects_another_models(registry, prover):
    lease = _lease()
    honest = probe_answerer(prover.model_for)(_request(lease).line())
    assert _judge(registry, lease, honest).outcome == "matched"
    substitute = probe_answerer(lambda _l: prover.model_for(Lease.issue("a", "gpt2-mini", lease.job)))
    judged = _judge(registry, lease, substitute(_request(lease).line()))
    assert judged.outcome == "mismatched" and "work probe" in judged.reason
    refused = ProbeAnswer(lease.lease_id, 1, error="nothing here").line()
    assert _judge(registry, lease, refused).outcome == "refused"


def test_l2_fails_every_outcome_but_matched():
    ev = LeaseEvidence(0, 0, 0, 0, 0, 0, 0, "", "", 0)
    assert work_probe(ev) is None  # not probed: nothing to fail
    for outcome, failing in [
        ("matched", False),
        ("not_sent", False),
        ("refused", True),
        ("mismatched", True),
    ]:
        found = work_probe(LeaseEvidence(0, 0, 0, 0, 0, 0, 0, "", "", 0, probe=WorkProbe(outcome, "why")))
        assert (found is not None) == failing, outcome


# --- through Maxwell's resident runner, real agent programs in sandboxes ----------------------------
@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("probe-keys")
    for name in ("honest", "cache", "relay", "worker"):
        AgentKey.ensure(d / f"{name}.pem")
    return d


def _serve(argv: list[str], name: str, registry, leases: list[Lease]):
    probes = WorkProbes(registry)
    with start_resident(argv, name, probes=probes) as agent:
        return [serve_wave(agent, [lease], registry)[0] for lease in leases]


def test_an_honest_resident_agent_answers_every_probe(registry, keys):
    leases = [_lease(f"Honest lease {i}", tokens=8 + i, temperature=0.7) for i in range(4)]
    runs = _serve(honest_agent_argv(keys / "honest.pem", "--resident"), "honest", registry, leases)
    for run in runs:
        assert run.receipt and run.evidence.probe is not None
        assert run.evidence.probe.outcome == "matched", run.evidence.probe.reason
        assert run.evidence.probe.close_fraction == pytest.approx(1.0)
    on_the_wire = json.loads(json.dumps(runs[0].evidence.as_dict()))  # as the node signs and sends it
    assert LeaseEvidence.from_dict(on_the_wire).probe == runs[0].evidence.probe


def test_a_padded_cache_streams_the_right_answer_but_fails_the_probe(registry, keys, prover, tmp_path):
    leases = [_lease("A cached prompt", tokens=8) for _ in range(2)]
    store_answer(tmp_path / "store", leases[0], prover.claims(leases[0]))
    argv = [sys.executable, "-m", "maxwell_poi.adversaries.padded_cache", "--key", str(keys / "cache.pem")]
    argv += ["--resident", "--store", str(tmp_path / "store"), "--pace-ms", "5", "--pad-cores", "1"]
    for run in _serve(argv, "cache", registry, leases):
        assert run.receipt, run.evidence.stderr_tail
        assert run.evidence.stream_tokens == tuple(prover.claims(leases[0]).tokens())  # the right answer
        assert run.evidence.probe is not None and run.evidence.probe.outcome == "mismatched"


def test_a_padded_relay_burns_the_cpu_but_cannot_answer_the_probe(registry, keys, tmp_path):
    sock = tmp_path / "worker.sock"
    worker = [sys.executable, "-m", "maxwell_poi.adversaries.relay_worker", "--key", str(keys / "worker.pem")]
    proc = subprocess.Popen(
        [*worker, "--listen", str(sock)], stderr=subprocess.DEVNULL
    )  # outside any sandbox
    try:
        deadline = time.monotonic() + 60
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the relay worker never listened"
            time.sleep(0.05)
        argv = [sys.executable, "-m", "maxwell_poi.adversaries.relay", "--key", str(keys / "relay.pem")]
        argv += ["--resident", "--upstream", str(sock), "--pad-cores", "1", "--hold-mb", "64"]
        (run,) = _serve(argv, "relay", registry, [_lease("A relayed prompt", tokens=8)])
    finally:
        proc.kill()
        proc.wait()
    assert run.receipt, run.evidence.stderr_tail
    assert run.evidence.peak_rss_mb() > 64  # the padding is held in the sandbox
    assert run.evidence.probe is not None and run.evidence.probe.outcome == "refused"
    assert "does not answer work probes" in run.evidence.probe.reason
