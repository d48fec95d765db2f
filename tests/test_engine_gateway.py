"""Engine agents through the gateway (issue 27 items 4 and L1), end to end: the official `openai`
client against a real server on loopback, a node long-polling it, and REAL engine agents (`poi agent
--resident --engine-cmd "python -m llama_cpp.server ..."`, llama.cpp's server on a GGUF of poi-lm)
that the node starts in their sandboxes (demo.gateway.GatewayStack: every lease high tier, so
audited and delivered verified).

- L1 is fair to an engine agent: with no profile of its engine command the node judges it by none
  (not the SDK agent's) — L1 is `not_measured` naming its engine's own profile key; once `poi
  profile --resident --engine-cmd` measured that very command, L1 passes;
- an honest greedy completion streams verified token by token (EngineStream: the model's argmax),
  an honest sampled one is held until the whole answer passed at intake (0 unverified either way),
  and the L4 in its verdict is AuditLayer's engine path on the receipt at intake. With its engine
  profile measured it is `affirming` (paid): the node's work probe is answered through the engine (its
  top log-probs after fresh ids, node.probe) and L2 passes it;
- a cheat is caught: the q8_0 GGUF under an fp32 lease (its greedy tokens are the model's, its
  log-probs are not: failed at intake, contraindicated) and poi-lm-draft served under poi-lm's name
  (cut mid-stream by the running greedy check, nothing unverified sent).

A missing engine skips these tests with the reason, or fails them under CI=true.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from collections.abc import Iterator

import openai
import pytest

from maxwell_poi.demo.gateway import GatewayStack, maxwell_of
from maxwell_poi.node.resident_runs import measure_resident_profile
from maxwell_poi.protocol.engine import engine_of_command
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.prover.engine_process import llama_cpp_argv
from maxwell_poi.registry.profiles import ProfileStore
from tests.engines import require_engine

MODEL, TOKENS = "poi-lm", 16
PROMPT = "Open the file and return a"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayStack, dict[str, str]]]:
    require_engine("llama.cpp")
    from maxwell_poi.registry.gguf_export import export_gguf

    tmp = tmp_path_factory.mktemp("engine-gateway")
    os.chmod(tmp, 0o755)  # a confined agent (its own uid) reads the GGUFs here
    commands = {}
    for name, model, kind in (
        ("f32", MODEL, "f32"),
        ("q8_0", MODEL, "q8_0"),
        ("draft", "poi-lm-draft", "f32"),
    ):
        path = export_gguf(model, tmp / f"{name}.gguf", kind)
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
        commands[name] = shlex.join(llama_cpp_argv(path))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        mp.setenv("OMP_NUM_THREADS", "1")
        with GatewayStack(tmp / "work") as gw:
            yield gw, commands


def engine_agent(gw: GatewayStack, name: str, command: str, ask: int) -> list[str]:
    key = AgentKey.generate()
    path = gw.workdir / f"{name}.pem"
    key.save(path)
    argv = [
        sys.executable,
        "-m",
        "maxwell_poi",
        "agent",
        "--key",
        str(path),
        "--resident",
        "--engine-cmd",
        command,
    ]
    gw.add_agent(name, argv, key, model_id=MODEL, ask=ask)
    return argv


def stream(gw: GatewayStack, temperature: float) -> tuple[str, dict, str]:
    """A streamed completion: (the text received, the maxwell object, the error event's message or
    "" when it ended with its last chunk)."""
    text, last, message = "", None, ""
    answer = gw.client().completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=TOKENS, temperature=temperature, stream=True
    )
    try:
        for chunk in answer:
            last = chunk
            text += "".join(c.text for c in chunk.choices)
    except openai.APIError as exc:
        return text, (exc.body or {}).get("maxwell", {}), str(exc)
    return text, maxwell_of(last), message


def layers(m: dict) -> dict[str, dict]:
    return {d["layer"]: d for d in m["layers"]}


PROBE_MATCHED = "work probe answered by the leased model"


def test_an_honest_engine_agent_is_judged_by_its_own_profile_and_its_receipts_l4(stack) -> None:
    """The honest engine agent's completions stream through the gateway with their verdict. L1:
    with no profile of its engine command, `not_measured` naming that profile (a `warning`, not
    paid); once measured, a pass, and with L2's work probe answered through the engine (log-probs
    after fresh ids, judged by Maxwell's fp32 reference) the completion is `affirming` (paid)."""
    gw, commands = stack
    argv = engine_agent(gw, "eve", commands["f32"], ask=10)
    key = f"engine:{engine_of_command(argv)}"
    before = gw.balances()
    text, m, message = stream(gw, 0.0)  # no profile of this engine command here (nor the SDK agent's)
    assert text and "did not affirm this completion (warning)" in message, message
    l1 = layers(m)["L1-thermodynamic"]
    assert l1["status"] == "not_measured" and "an engine agent's own" in l1["reason"], l1
    assert key in l1["reason"] and "--engine-cmd" in l1["reason"], l1
    l4 = layers(m)["L4-audit"]
    assert l4["status"] == "pass" and "at intake, engine receipt (llama.cpp)" in l4["reason"], l4
    assert gw.balances()["requester:alice-app"] == before["requester:alice-app"]  # a warning is not paid
    # Maxwell measures this engine command's profile (`poi profile --resident --engine-cmd`)
    profile = measure_resident_profile(MODEL, runs=2, tokens=TOKENS, batches=(1,), engine_cmd=commands["f32"])
    assert profile.device_class.endswith(f"|{key}")
    ProfileStore().put(profile)
    for temperature in (0.0, 0.8):
        text, m, message = stream(gw, temperature)
        for _ in range(3):  # a sampled answer may end at end-of-sequence after 1-2 tokens: too short to time
            if m["verdict"] != "warning" or "expected at least 3 streamed tok" not in message:
                break
            assert m["completion_status"] == "refunded", m  # not judged: not paid (fail closed)
            text, m, message = stream(gw, temperature)
        assert text and m["verdict"] == "affirming" and m["completion_status"] == "paid", (message, m)
        status = {name: d["status"] for name, d in layers(m).items()}
        assert status == {"L0-integrity": "pass", "L1-thermodynamic": "pass", "L2-boundary": "pass",
                          "L4-audit": "pass"}, m["layers"]  # fmt: skip
        assert PROBE_MATCHED in layers(m)["L2-boundary"]["reason"], layers(m)["L2-boundary"]
        assert m["delivery"] == "verified" and m["unverified_tokens"] == 0, m
        l4 = layers(m)["L4-audit"]["reason"]
        assert "at intake, engine receipt (llama.cpp)" in l4 and "engine agent, streamed" in l4, l4
        if temperature == 0:  # greedy: verified token by token as they streamed
            assert "greedy choice" in l4 and "verified as they arrived" in l4, l4
        else:  # sampled: judged only as a whole (likelihood test), so held until intake
            assert "likelihood z" in l4 and "streamed: 0 of" in l4, l4
        print(f"engine, temperature {temperature}:", repr(text), "|", l4)


def test_engine_cheats_are_caught_through_the_gateway(stack) -> None:
    gw, commands = stack
    # q8_0 weights under the fp32 lease, offering cheaper: the greedy tokens are the model's, so they
    # stream; its log-probs are not, and the receipt's L4 at intake fails it
    engine_agent(gw, "mallory", commands["q8_0"], ask=5)
    before = gw.balances()
    _, m, message = stream(gw, 0.0)
    assert m["verdict"] == "contraindicated", (message, m)
    l4 = layers(m)["L4-audit"]
    assert l4["status"] == "fail" and "log-probs" in l4["reason"], l4
    after = gw.balances()
    assert after["requester:alice-app"] == before["requester:alice-app"]  # not charged
    assert after["maxwell:slashed"] > before["maxwell:slashed"]
    print("q8_0 under fp32:", message[:300])
    # poi-lm-draft served under poi-lm's name, cheaper still: the running greedy check cuts it
    engine_agent(gw, "dan", commands["draft"], ask=2)
    before = gw.balances()
    _, m, message = stream(gw, 0.0)
    assert "cut the agent off" in message, message
    assert "token choice: expected the claimed model's greedy choice" in message, message
    assert m["verdict"] == "contraindicated" and m["unverified_tokens"] == 0, m
    after = gw.balances()
    assert after["requester:alice-app"] == before["requester:alice-app"]
    assert after["maxwell:slashed"] > before["maxwell:slashed"]
    print("draft under poi-lm:", message[:300])


def test_the_enrolled_command_names_the_engine_not_the_receipt() -> None:
    sdk = [sys.executable, "-m", "maxwell_poi", "agent", "--key", "k.pem", "--resident"]
    assert engine_of_command(sdk) == ""
    a = engine_of_command([*sdk, "--engine-cmd", "python -m llama_cpp.server --model a.gguf"])
    b = engine_of_command([*sdk, "--engine-cmd=python -m llama_cpp.server --model b.gguf"])
    url = engine_of_command([*sdk, "--engine", "http://127.0.0.1:8000/v1"])
    assert a.startswith("cmd:") and b.startswith("cmd:") and a != b and url.startswith("url:")
    assert engine_of_command([*sdk, "--engine-cmd", "python -m llama_cpp.server --model a.gguf"]) == a


def test_l1_never_judges_an_engine_agent_by_the_sdk_agents_profile(tmp_path) -> None:
    """Engine-free: the SDK agent's resident profile of the model is on this host; evidence the node
    signed for an engine agent (its enrolled command's engine) is not judged by it: L1 is
    `not_measured`, naming the engine's own key and how to measure it; an `--engine URL` agent's
    reason says no profile can be measured. The SDK agent's evidence is judged by its profile."""
    from maxwell_poi.observer.evidence import LeaseEvidence, resident_profile_key
    from maxwell_poi.observer.host import this_device
    from maxwell_poi.protocol.lease import GenerateJob, Lease
    from maxwell_poi.protocol.result import Status
    from maxwell_poi.registry.models import Registry
    from maxwell_poi.registry.profiles import Profile
    from maxwell_poi.verifier.appraisal import Appraisal
    from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

    store = ProfileStore(tmp_path / "profiles.json")
    peak = {"peak_flops_per_s": 1e11, "peak_flops_per_cpu_s": 1e11}
    store.put(Profile.from_runs(resident_profile_key(), MODEL, TOKENS, intervals=[0.005, 0.006],
                                cpu_per_token=[0.003, 0.0031], busy=[0.6, 0.7], memory=[300.0, 301.0],
                                peak=peak, measured_at=0.0, regime="resident"))  # fmt: skip
    lease = Lease.issue("a", MODEL, GenerateJob(prompt=PROMPT, max_new_tokens=TOKENS))
    times = tuple(0.1 + 0.005 * i for i in range(TOKENS))

    def l1(engine: str):
        ev = LeaseEvidence(started_at=0.0, finished_at=1.0, wall_s=1.0, cpu_s=0.1, max_rss_kb=310 * 1024,
                           bytes_in=0, bytes_out=0, sha256_in="", sha256_out="", exit_code=None,
                           stream_tokens=tuple(range(TOKENS)), stream_t=times,
                           stream_cpu_s=tuple(0.003 * i for i in range(TOKENS)), device_class=this_device(),
                           regime="resident", engine=engine)  # fmt: skip
        return ThermodynamicLayer(Registry(), store).appraise(Appraisal(lease, b"", evidence=ev))

    sdk = [sys.executable, "-m", "maxwell_poi", "agent", "--key", "k.pem", "--resident"]
    engine = engine_of_command([*sdk, "--engine-cmd", "python -m llama_cpp.server --model a.gguf"])
    judged = l1(engine)
    assert judged.status is Status.NOT_MEASURED, judged.reason
    assert f"|resident|engine:{engine}" in judged.reason and "--engine-cmd" in judged.reason, judged.reason
    url = l1(engine_of_command([*sdk, "--engine", "http://127.0.0.1:8000/v1"]))
    assert url.status is Status.NOT_MEASURED and "none can be measured" in url.reason, url.reason
    own = l1("")
    assert own.status is not Status.NOT_MEASURED and "no profile" not in own.reason, own.reason
