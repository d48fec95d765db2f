"""The work probe for engine agents (issue 27): the engine adapter answers Maxwell's probe through
its engine (protocol.probe's `e` form: the engine's top log-probs after the probe's fresh ids) and
the node judges it by its float32 reference prefill with the engine's calibrated `logprob_abs`
(node.probe).

- the `e` answer's wire form: bounds and malformed lines give clear errors; the SDK's answer line
  is unchanged byte for byte;
- the node's judge, engine-free (answers computed from Maxwell's own reference): an honest answer
  matches, a perturbed one does not, the wrong form for the enrolled command is `mismatched`, an
  engine with no calibrated tolerance is `uncalibrated` (L2 warns), and a refused probe from an
  engine agent warns where an SDK agent's fails;
- end to end, a real `poi agent --resident --engine-cmd` in the node's sandbox with llama.cpp's
  server: the f32 GGUF of poi-lm answers the probe `matched`; the q8_0 GGUF (a precision downgrade
  under an fp32 lease) is `mismatched` and L2 fails it.

A missing engine skips the end-to-end tests with the reason, or fails them under CI=true.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
import sys
import time

import pytest
import torch

from maxwell_poi.node.probe import ANSWER_WAIT_S, WorkProbes, enrolled_engine
from maxwell_poi.observer.evidence import LeaseEvidence, WorkProbe
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.probe import ProbeAnswer, ProbeLogprobs, parse_probe_answer
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.registry.forward import prefill
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier.boundary import engine_probe_unjudged, work_probe

MODEL, TOKENS = "poi-lm", 16
LLAMA = [sys.executable, "-m", "llama_cpp.server", "--model", "poi-lm-f32.gguf"]
ENGINE_AGENT = ["poi", "agent", "--key", "k.pem", "--resident", "--engine-cmd", shlex.join(LLAMA)]
SDK_AGENT = ["poi", "agent", "--key", "k.pem", "--resident"]


# -- the wire form ---------------------------------------------------------------------------------
def answer_line(e: object, **extra: object) -> bytes:
    return json.dumps({"p": "L1", "n": 3, "e": e, **extra}).encode()


def test_the_engine_answer_round_trips_and_the_sdk_answer_is_unchanged() -> None:
    answer = ProbeAnswer("L1", 3, logprobs=ProbeLogprobs(top=5, ids=(7, 2), lp=(-0.25, -1.5)))
    assert answer.line() == b'{"p":"L1","n":3,"e":{"v":1,"top":5,"ids":[7,2],"lp":[-0.25,-1.5]}}\n'
    assert parse_probe_answer(answer.line()) == answer
    assert ProbeAnswer("L1", 3, b"\x01\x02").line() == b'{"p":"L1","n":3,"f":"AQI="}\n'
    assert ProbeAnswer("L1", 3, error="no").line() == b'{"p":"L1","n":3,"error":"no"}\n'


@pytest.mark.parametrize(
    ("e", "message"),
    [
        ({"v": 2, "top": 5, "ids": [1], "lp": [-1.0]}, "expected version 1, got 2"),
        ({"v": 1, "top": 0, "ids": [1], "lp": [-1.0]}, "expected top in 1-20, got 0"),
        ({"v": 1, "top": 21, "ids": [1], "lp": [-1.0]}, "expected top in 1-20, got 21"),
        ({"v": 1, "top": 5, "ids": [], "lp": []}, "expected 1-5 ids and as many log-probs, got 0 ids"),
        ({"v": 1, "top": 2, "ids": [1, 2, 3], "lp": [-1, -2, -3]}, "expected 1-2 ids"),
        ({"v": 1, "top": 5, "ids": [1, 2], "lp": [-1.0]}, "got 2 ids and 1 log-probs"),
        (
            {"v": 1, "top": 20, "ids": list(range(21)), "lp": [-1.0] * 21},
            "at most 20 ids and log-probs, got 21",
        ),
        ({"v": 1, "top": 5, "ids": [4, 4], "lp": [-1, -2]}, "expected distinct ids in [0, 2^32), got [4, 4]"),
        ({"v": 1, "top": 5, "ids": [-1], "lp": [-1]}, "expected distinct ids in [0, 2^32), got [-1]"),
        ({"v": 1, "top": 5, "ids": [1], "lp": [0.5]}, "expected finite log-probs <= 0, got [0.5]"),
        ({"v": 1, "top": 5, "ids": ["1"], "lp": [-1]}, "expected integer v, top and ids and numeric lp"),
        ({"v": 1, "top": 5, "ids": [True], "lp": [-1]}, "expected integer v, top and ids and numeric lp"),
        ({"v": 1, "top": 5, "ids": 1, "lp": [-1]}, 'expected lists "ids" and "lp", got int and list'),
        ({"v": 1, "top": 5, "ids": [1]}, "got ['ids', 'top', 'v']"),
        ([1, 2], "got list"),
    ],
)
def test_malformed_engine_answers_say_what_was_expected(e: object, message: str) -> None:
    with pytest.raises(ValueError, match=r'probe answer "e": expected') as raised:
        parse_probe_answer(answer_line(e))
    assert message in str(raised.value), str(raised.value)


def test_non_finite_log_probs_and_both_forms_are_refused() -> None:
    with pytest.raises(ValueError, match="expected finite log-probs <= 0, got \\[nan\\]"):
        parse_probe_answer(b'{"p":"L1","n":3,"e":{"v":1,"top":5,"ids":[1],"lp":[NaN]}}')
    with pytest.raises(ValueError, match=r'expected \{"p":"<lease_id>"'):
        parse_probe_answer(answer_line({"v": 1, "top": 5, "ids": [1], "lp": [-1]}, f="AQI="))


# -- the node's judge, engine-free -----------------------------------------------------------------
@pytest.fixture(scope="module")
def probes() -> WorkProbes:
    return WorkProbes(Registry())


def honest_answer(probes: WorkProbes, lease: Lease, ids: tuple[int, ...], top: int = 5) -> ProbeLogprobs:
    """What an honest fp32 engine returns: Maxwell's own reference log-probs after the ids' text."""
    registry = probes.registry
    sequence = registry.encode_prompt(MODEL, registry.decode(MODEL, list(ids)))
    _, logits = prefill(registry.load_in(MODEL, "fp32"), sequence, [0])
    best = torch.topk(torch.log_softmax(logits[0].double(), dim=-1), top)
    return ProbeLogprobs(top, tuple(int(i) for i in best.indices), tuple(float(v) for v in best.values))


def judged(probes: WorkProbes, command: list[str], make=None, fingerprint: bytes = b"") -> WorkProbe:
    """The node's verdict on an answer to a probe drawn for `command`: `make(honest)` its log-probs,
    or a fingerprint."""
    lease = Lease.issue("a", MODEL, GenerateJob(prompt="x", max_new_tokens=TOKENS))
    probe = probes.draw(lease, command)
    assert probe is not None
    probe.sent_at_token, probe.sent_t = 0, time.perf_counter()
    req = probe.request
    if make is None:
        answer = ProbeAnswer(req.lease_id, req.number, fingerprint)
    else:
        answer = ProbeAnswer(req.lease_id, req.number, logprobs=make(honest_answer(probes, lease, req.ids)))
    assert probe.take(answer, probe.sent_t + 0.01)
    return probes.judge(lease, probe, "cpu")


def test_engine_probe_ids_are_fresh_and_re_encode_to_themselves(probes: WorkProbes) -> None:
    lease = Lease.issue("a", MODEL, GenerateJob(prompt="x", max_new_tokens=TOKENS))
    drawn = [probes.draw(lease, ENGINE_AGENT) for _ in range(20)]
    registry = probes.registry
    for probe in drawn:
        assert probe is not None and probe.engine.startswith("cmd:") and probe.engine_name == "llama.cpp"
        ids = list(probe.request.ids)
        assert registry.encode_prompt(MODEL, registry.decode(MODEL, ids))[-len(ids) :] == ids
    assert len({p.request.ids for p in drawn if p}) == 20
    assert enrolled_engine(SDK_AGENT) == ("", "")


def test_the_node_judges_an_engine_answer_by_its_fp32_reference(probes: WorkProbes) -> None:
    honest = judged(probes, ENGINE_AGENT, make=lambda a: a)
    assert honest.outcome == "matched", honest.reason
    assert "llama.cpp fp32 (calibrated)" in honest.reason and "5 top log-probs within" in honest.reason
    # log-probs 1e-3 off (an f16 KV cache, a quantised copy): beyond llama.cpp's calibrated 1e-4
    nudged = judged(
        probes, ENGINE_AGENT, make=lambda a: ProbeLogprobs(a.top, a.ids, tuple(v - 1e-3 for v in a.lp))
    )
    assert nudged.outcome == "mismatched", nudged.reason
    assert (
        "expected the leased model's top-5 log-probs after 8 fresh ids within 0.0001, got 5/5 off"
        in nudged.reason
    )
    # the right values for ids that are not the model's best there
    shifted = judged(
        probes,
        ENGINE_AGENT,
        make=lambda a: ProbeLogprobs(20, (*a.ids[1:], (a.ids[0] + 1) % 4096), (*a.lp[1:], a.lp[0])),
    )
    assert shifted.outcome == "mismatched", shifted.reason


def test_the_wrong_form_for_the_enrolled_command_is_mismatched(probes: WorkProbes) -> None:
    sdk = judged(probes, SDK_AGENT, make=lambda a: a)
    assert sdk.outcome == "mismatched", sdk.reason
    assert (
        "expected a fingerprint (the agent is enrolled without an engine), got an engine's log-probs"
        in sdk.reason
    )
    fingerprint = judged(probes, ENGINE_AGENT, fingerprint=b"\x00" * 64)
    assert fingerprint.outcome == "mismatched", fingerprint.reason
    assert "expected an engine's log-probs (the agent is enrolled with an engine, cmd:" in fingerprint.reason


def test_an_engine_maxwell_has_no_tolerance_for_is_not_affirmed(probes: WorkProbes) -> None:
    url_agent = [*SDK_AGENT, "--engine", "http://127.0.0.1:8000/v1"]
    loose = judged(probes, url_agent, make=lambda a: a)
    assert loose.outcome == "uncalibrated", loose.reason
    assert "not affirmed: no calibrated tolerance for engine 'openai-compatible'" in loose.reason
    ev = LeaseEvidence(0, 0, 0, 0, 0, 0, 0, "", "", 0, probe=loose, engine="url:x")
    assert engine_probe_unjudged(ev) == loose.reason


def test_a_refused_probe_warns_for_an_engine_agent_and_fails_for_an_sdk_agent() -> None:
    refused = WorkProbe("refused", "the agent did not answer the work probe: EngineError: token-only")
    engine = LeaseEvidence(0, 0, 0, 0, 0, 0, 0, "", "", 0, probe=refused, engine="cmd:abc")
    sdk = LeaseEvidence(0, 0, 0, 0, 0, 0, 0, "", "", 0, probe=refused)
    assert engine_probe_unjudged(engine) == refused.reason and engine_probe_unjudged(sdk) == ""
    mismatched = LeaseEvidence(
        0, 0, 0, 0, 0, 0, 0, "", "", 0, probe=WorkProbe("mismatched", "off"), engine="cmd:abc"
    )
    assert engine_probe_unjudged(mismatched) == "" and work_probe(mismatched) is not None


# -- end to end: a real engine agent in the node's sandbox -------------------------------------------
@pytest.fixture(scope="module")
def engine_world(tmp_path_factory: pytest.TempPathFactory):
    from maxwell_poi.registry.gguf_export import export_gguf
    from tests.engines import require_engine

    require_engine("llama.cpp")
    from maxwell_poi.protocol.keys import AgentKey, Keyring
    from maxwell_poi.protocol.result import LayerName
    from maxwell_poi.registry.profiles import ProfileStore
    from maxwell_poi.verifier.audit import AuditLayer
    from maxwell_poi.verifier.boundary import BoundaryLayer
    from maxwell_poi.verifier.integrity import IntegrityLayer
    from maxwell_poi.verifier.policy import Verifier

    folder = tmp_path_factory.mktemp("engine-probe")
    os.chmod(folder, 0o755)  # a confined agent (its own uid) reads the GGUFs and its key here
    key = AgentKey.generate()
    key.save(folder / "agent.pem")
    ggufs = {}
    for kind in ("f32", "q8_0"):
        ggufs[kind] = export_gguf(MODEL, folder / f"poi-lm-{kind}.gguf", kind)
        os.chmod(ggufs[kind], stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    registry = Registry()
    verifier = Verifier(
        IntegrityLayer(registry, Keyring({"engine-agent": key.public_hex}), remember_settled=False),
        [BoundaryLayer(ProfileStore(folder / "profiles.json"))],
        [AuditLayer(registry)],
        required=(LayerName.INTEGRITY, LayerName.AUDIT),
    )
    return folder, registry, verifier, ggufs


def probed_leases(engine_world, kind: str, temperatures: tuple[float, ...]):
    """Leases served by `poi agent --resident --engine-cmd` (llama.cpp on the `kind` GGUF) in the
    node's sandbox with the node's work probes; each appraised with Maxwell's evidence."""
    from maxwell_poi.node.resident_runs import serve_wave, start_resident
    from maxwell_poi.prover.engine_process import llama_cpp_argv

    folder, registry, verifier, ggufs = engine_world
    argv = [sys.executable, "-m", "maxwell_poi", "agent", "--key", str(folder / "agent.pem"), "--resident",
            "--engine-cmd", shlex.join(llama_cpp_argv(ggufs[kind]))]  # fmt: skip
    out = []
    with start_resident(argv, f"engine-probe-{kind}", cwd=str(folder), probes=WorkProbes(registry)) as agent:
        for t in temperatures:
            job = GenerateJob(prompt="Open the file and return a", max_new_tokens=TOKENS, temperature=t)
            lease = Lease.issue("engine-agent", MODEL, job)
            (run,) = serve_wave(agent, [lease], registry, timeout_s=240)
            assert run.receipt, f"no receipt: {run.evidence.stderr_tail[-1500:]}"
            out.append((run, verifier.appraise(lease, run.receipt, run.evidence)))
    return out


def test_an_honest_llama_cpp_agent_answers_the_work_probe_through_its_engine(engine_world) -> None:
    from maxwell_poi.protocol.result import LayerName, Status

    for run, result in probed_leases(engine_world, "f32", (0.0, 0.8)):
        probe = run.evidence.probe
        assert probe is not None and probe.outcome == "matched", (probe, run.evidence.stderr_tail[-800:])
        assert "llama.cpp fp32 (calibrated)" in probe.reason and probe.sent_at_token != -2, probe
        assert run.evidence.engine.startswith("cmd:")
        # the probe's request did not cut the lease short: every token the receipt signs streamed, and
        # L4 affirms them, an early end included (only where the model itself chooses end-of-sequence;
        # a sampled lease may get there before TOKENS)
        claims = open_receipt(run.receipt, 1 << 24).claims
        assert len(run.evidence.stream_tokens) == len(claims.tokens()) > 0
        assert len(claims.tokens()) == TOKENS or claims.engine is not None and claims.engine.finish == "stop"
        assert result.layer(LayerName.AUDIT).status is Status.PASS, result.layer(LayerName.AUDIT).reason
        boundary = result.layer(LayerName.BOUNDARY)  # no profile of this engine here: pace not judged
        assert boundary.status is not Status.FAIL and "no profile for poi-lm" in boundary.reason, boundary
        print("llama.cpp f32 work probe:", probe.reason)


def test_a_q8_0_engine_under_an_fp32_lease_fails_the_work_probe(engine_world) -> None:
    from maxwell_poi.protocol.result import LayerName, Status

    ((run, result),) = probed_leases(engine_world, "q8_0", (0.0,))
    probe = run.evidence.probe
    assert probe is not None and probe.outcome == "mismatched", probe
    assert "expected the leased model's top-5 log-probs after 8 fresh ids within 0.0001" in probe.reason
    boundary = result.layer(LayerName.BOUNDARY)
    assert boundary.status is Status.FAIL and boundary.reason == probe.reason, boundary.reason
    assert result.verdict == "contraindicated"
    print("llama.cpp q8_0 work probe:", probe.reason)


def test_an_engine_probe_is_timed_from_its_receipt_an_sdk_probe_from_sending(probes: WorkProbes) -> None:
    """A one-slot engine answers after the lease it is decoding: 9 s after sending, 1 s after the
    receipt, is in time for an engine agent; for an SDK agent it is 9 s, past ANSWER_WAIT_S."""
    lease = Lease.issue("a", MODEL, GenerateJob(prompt="x", max_new_tokens=TOKENS))
    for command, late in ((ENGINE_AGENT, False), (SDK_AGENT, True)):
        probe = probes.draw(lease, command)
        assert probe is not None
        probe.sent_at_token, probe.sent_t, probe.lease_done_t = 0, 100.0, 108.0
        probe.answered_t = 109.0
        assert probe.clock_start() == (100.0 if late else 108.0)
        assert (probe.answered_t - probe.clock_start() > ANSWER_WAIT_S) is late
    early = probes.draw(lease, ENGINE_AGENT)
    assert early is not None
    early.sent_t, early.lease_done_t, early.answered_t = 100.0, 108.0, 101.0  # an engine with two slots
    assert early.clock_start() == 100.0
