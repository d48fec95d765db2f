"""Verdicts that hold on a loaded host (issue 23): a profile measured on the host as it is, then
honest leases served while two CPU-hogging neighbours keep both cores busy. Maxwell's evidence
carries the contention it measured; the honest agent is affirmed, and a relay (no work of its own)
and a fast fabricator (tokens faster than any model) are still caught under the same load.

Real parts only: resident agents in measured sandboxes, the node's evidence, the inline verifier
(L0 gating L1 and L2) the control plane runs at intake."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from maxwell_poi.node.resident_runs import (
    generate_leases,
    honest_resident,
    measure_resident_profile,
    serve_wave,
    start_resident,
)
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.result import LayerName, Status, Verdict
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.verifier.policy import Verifier

MODEL = "gpt2-micro"
TOKENS = 16
HONEST_LEASES = 6


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("contention")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp))
        mp.setenv("OMP_NUM_THREADS", "1")  # the agents: one torch thread (no idle spinning)
        ProfileStore().put(measure_resident_profile(MODEL, runs=4, tokens=TOKENS, batches=(1,)))
        yield tmp


@pytest.fixture()
def neighbours() -> Iterator[list[subprocess.Popen]]:
    """Two processes that burn a core each for as long as the test runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    yield hogs
    for h in hogs:
        h.kill()
        h.wait()


def verifier(agent_id: str, key: AgentKey) -> Verifier:
    return Verifier.inline(Registry(), Keyring({agent_id: key.public_hex}), ProfileStore())


def test_honest_leases_under_a_neighbour_on_every_core_are_affirmed(home, neighbours, registry):
    key = AgentKey.ensure(home / "honest.pem")
    check = verifier("profiler", key)
    with honest_resident(home, 1) as agent:
        serve_wave(agent, generate_leases(MODEL, 1, 2), registry)  # loads the model
        leases = generate_leases(MODEL, HONEST_LEASES, TOKENS, start=3)
        runs = [serve_wave(agent, [lease], registry)[0] for lease in leases]
    for lease, run in zip(leases, runs, strict=True):
        ev = run.evidence
        # Maxwell measured the neighbours: others kept cores busy, and the sandbox waited for a CPU
        assert ev.contention.get("others_cores", 1.0) > 0.5, ev.contention
        assert "wait_s" in ev.contention and "window_s" in ev.contention
        result = check.appraise(lease, run.receipt, ev)
        assert result.verdict is not Verdict.CONTRAINDICATED, result.reason
        for name in (LayerName.THERMODYNAMIC, LayerName.BOUNDARY):
            assert result.layer(name).status is Status.PASS, result.reason
        assert result.verdict is Verdict.AFFIRMING, result.reason


@pytest.mark.parametrize(
    ("program", "extra", "caught_by"),
    [
        # invented tokens at once: too fast and too little work, whatever the load
        ("fast_fabricator", (), {LayerName.THERMODYNAMIC, LayerName.BOUNDARY}),
        # invented tokens at an honest pace while sleeping: the sandbox did no work
        ("sleeper", ("--sleep", "1"), {LayerName.THERMODYNAMIC}),
    ],
)
def test_a_cheat_is_still_caught_under_the_same_load(home, neighbours, registry, program, extra, caught_by):
    key = AgentKey.generate()
    key.save(home / f"{program}.pem")
    argv = [sys.executable, "-m", f"maxwell_poi.adversaries.{program}", "--key", str(home / f"{program}.pem")]
    argv += ["--resident", *extra]
    lease = generate_leases(MODEL, 1, TOKENS, start=5, agent_id=program)[0]
    with start_resident(argv, program) as agent:
        serve_wave(agent, generate_leases(MODEL, 1, 2, agent_id=program), registry)
        (run,) = serve_wave(agent, [lease], registry)
    assert run.receipt, run.evidence.stderr_tail[-500:]
    result = verifier(program, key).appraise(lease, run.receipt, run.evidence)
    assert result.verdict is Verdict.CONTRAINDICATED, result.reason
    assert caught_by & set(result.caught_by), result.reason
    # the neighbours ran throughout (a cheat's lease window can be a millisecond: too short for
    # /proc/stat's ticks, and PSI may not have moved in it)
    assert all(h.poll() is None for h in neighbours)
    assert "window_s" in run.evidence.contention
