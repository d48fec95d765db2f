"""The engine adapter through Maxwell's node (issue 27): `poi agent --resident --engine-cmd ...` runs
as a real resident agent in its sandbox, starts the engine as its child, streams the engine's tokens
and signs engine receipts (v4) that L4 judges by re-execution.

- llama.cpp (llama-cpp-python's server, f32 GGUF of poi-lm): honest greedy and sampled leases are
  affirmed by L4; the q8_0 GGUF under an fp32 lease and poi-lm-draft under the poi-lm alias are
  caught;
- `transformers serve` refuses log-probs: token-only receipts; an honest greedy lease passes, the
  draft model's folder served in poi-lm's place is caught.

A missing engine skips these tests with the reason, or fails them under CI=true. One engine agent
per case; leases of 16 tokens.
"""

from __future__ import annotations

import os
import shlex
import stat
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maxwell_poi.node.resident_runs import serve_wave, start_resident
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.protocol.result import LayerName, Status
from maxwell_poi.prover.engine_process import llama_cpp_argv, transformers_serve_argv
from maxwell_poi.registry.models import Registry, model_dir
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.verifier.audit import AuditLayer
from maxwell_poi.verifier.boundary import BoundaryLayer
from maxwell_poi.verifier.integrity import IntegrityLayer
from maxwell_poi.verifier.policy import Verifier
from tests.engines import require_engine

MODEL, AGENT, TOKENS = "poi-lm", "engine-agent", 16


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.mktemp("engine-agent")
    os.chmod(folder, 0o755)  # a confined agent (its own uid) reads the GGUFs and its key copy here
    key = AgentKey.generate()
    key.save(folder / "agent.pem")
    registry = Registry()
    keyring = Keyring({AGENT: key.public_hex})
    verifier = Verifier(
        IntegrityLayer(registry, keyring, remember_settled=False),
        [BoundaryLayer(ProfileStore())],
        [AuditLayer(registry)],
        required=(LayerName.INTEGRITY, LayerName.AUDIT),
    )
    return folder, registry, verifier


@pytest.fixture(scope="module")
def ggufs(world) -> dict[str, Path]:
    from maxwell_poi.registry.gguf_export import export_gguf

    folder = world[0]
    out = {
        "f32": export_gguf(MODEL, folder / "poi-lm-f32.gguf", "f32"),
        "q8_0": export_gguf(MODEL, folder / "poi-lm-q8_0.gguf", "q8_0"),
        "draft": export_gguf("poi-lm-draft", folder / "draft-f32.gguf", "f32"),
    }
    for path in out.values():
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR | stat.S_IRGRP | stat.S_IROTH)
    return out


def leases(*temperatures: float) -> list[Lease]:
    prompts = ["Return the number of items in the", "Open the file and return a"]
    return [
        Lease.issue(AGENT, MODEL, GenerateJob(prompt=prompts[i % 2], max_new_tokens=TOKENS, temperature=t))
        for i, t in enumerate(temperatures)
    ]


def through_agent(world, engine_cmd: list[str], name: str, the_leases: list[Lease]):
    """Serve the leases one at a time by `poi agent --resident --engine-cmd CMD` in a sandbox, then
    appraise each with Maxwell's evidence (L0, L2, L4; L1 and L2's pace need a profile: not here)."""
    folder, registry, verifier = world
    argv = [sys.executable, "-m", "maxwell_poi", "agent", "--key", str(folder / "agent.pem"), "--resident",
            "--engine-cmd", shlex.join(engine_cmd)]  # fmt: skip
    out = []
    with start_resident(argv, name, cwd=str(folder)) as agent:
        for lease in the_leases:
            (run,) = serve_wave(agent, [lease], registry, timeout_s=240)
            assert run.receipt, f"no receipt: {run.evidence.stderr_tail[-1500:]}"
            out.append((run, verifier.appraise(lease, run.receipt, run.evidence)))
        print(f"{name}: sandbox {agent.sandbox.describe().get('confinement', {})}; agent stderr "
              f"{run.evidence.stderr_tail[-300:]!r}")  # fmt: skip
    return out


def test_llama_cpp_honest_leases_through_the_agent_are_affirmed_by_l4(world, ggufs):
    require_engine("llama.cpp")
    runs = through_agent(world, llama_cpp_argv(ggufs["f32"]), "engine-llama", leases(0.0, 0.8))
    for run, result in runs:
        audit = result.layer(LayerName.AUDIT)
        assert audit.status is Status.PASS, audit.reason
        assert "engine receipt (llama.cpp)" in audit.reason and "log-probs within" in audit.reason
        assert result.layer(LayerName.INTEGRITY).status is Status.PASS
        # Maxwell saw the engine's tokens stream one by one, and they are the receipt's
        claimed = open_receipt(run.receipt, 1 << 20).claims.tokens()
        assert list(run.evidence.stream_tokens) == claimed and run.evidence.stream_errors == 0
        boundary = result.layer(LayerName.BOUNDARY)
        assert boundary.status is not Status.FAIL, boundary.reason
    print("llama.cpp honest:", [r.layer(LayerName.AUDIT).reason for _, r in runs])


@pytest.mark.parametrize(("cheat", "why"), [("q8_0", "log-probs"), ("draft", "token choice")])
def test_llama_cpp_cheats_are_caught(world, ggufs, cheat, why):
    require_engine("llama.cpp")
    ((_, result),) = through_agent(world, llama_cpp_argv(ggufs[cheat]), f"engine-{cheat}", leases(0.0))
    audit = result.layer(LayerName.AUDIT)
    assert result.verdict == "contraindicated" and audit.status is Status.FAIL, audit.reason
    assert audit.reason.startswith(why) or "log-probs" in audit.reason, audit.reason
    print(f"llama.cpp {cheat} under an fp32 poi-lm lease:", audit.reason)


def test_transformers_serve_token_only_honest_passes_and_a_substitute_is_caught(world):
    require_engine("transformers serve")
    registry = world[1]
    (honest,) = through_agent(
        world, transformers_serve_argv(model_dir(registry.get(MODEL))), "engine-tf", leases(0.0)
    )
    audit = honest[1].layer(LayerName.AUDIT)
    assert audit.status is Status.PASS, audit.reason
    assert "token-only receipt" in audit.reason and audit.details["engine"]["fp_kind"] == "tokens"
    ((_, cheat),) = through_agent(
        world,
        transformers_serve_argv(model_dir(registry.get("poi-lm-draft"))),
        "engine-tf-draft",
        leases(0.0),
    )
    assert cheat.verdict == "contraindicated", cheat.layer(LayerName.AUDIT).reason
    print("transformers serve:", audit.reason, "|", cheat.layer(LayerName.AUDIT).reason)


def test_clear_errors_for_an_unreachable_or_failing_engine(world):
    from maxwell_poi.cli import app

    folder = world[0]
    key = str(folder / "agent.pem")
    gone = CliRunner().invoke(app, ["agent", "--key", key, "--resident", "--engine", "http://127.0.0.1:9/v1"])
    assert (
        gone.exit_code == 2 and "engine not reachable: tried GET http://127.0.0.1:9/v1/models" in gone.stderr
    )
    crash = f"{sys.executable} -c 'import sys; print(\"no model here\", file=sys.stderr); sys.exit(3)'"
    failed = CliRunner().invoke(app, ["agent", "--key", key, "--resident", "--engine-cmd", crash])
    assert failed.exit_code == 2 and "engine start failed: exited with 3" in failed.stderr
    assert "no model here" in failed.stderr
