"""Floors that follow the threads, with real agents (issue 24, item 7): one profile measured at 1, 2
and N torch threads (N = this host's CPUs), then an honest resident agent at each of those thread
counts is affirmed with L1 passing, its reason naming the runs the floor came from, and a cheat L1
must catch (a sleeper: no work, an honest pace) is caught by L1 at each thread count.

Real parts only: resident agents in measured sandboxes, the node's evidence, the control plane's
inline stack (L0 gating L1 and L2). The host may be busy with other tests: the floors must hold."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from maxwell_poi.node.resident_runs import generate_leases, honest_resident, serve_wave, start_resident
from maxwell_poi.node.thread_profiles import measure_threaded_profile, thread_counts
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.result import LayerName, Status, Verdict
from maxwell_poi.registry.models import Registry
from maxwell_poi.registry.profiles import ProfileStore
from maxwell_poi.verifier.policy import Verifier

MODEL = "gpt2-micro"
TOKENS = 16
THREADS = thread_counts("1,2,N")  # on a 2-core host N is 2: two agents, not three


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    tmp = tmp_path_factory.mktemp("threads")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp))
        mp.delenv("OMP_NUM_THREADS", raising=False)  # the default agent runs at torch's own count
        profile = measure_threaded_profile(MODEL, threads=THREADS, runs=3, tokens=TOKENS, batches=(1,))
        assert sorted(int(t) for t in profile.threads_runs) == sorted({*THREADS, *profile.threads})
        ProfileStore().put(profile)
        yield tmp


def verifier(agent_id: str, key: AgentKey) -> Verifier:
    return Verifier.inline(Registry(), Keyring({agent_id: key.public_hex}), ProfileStore())


@pytest.mark.parametrize("threads", THREADS, ids=[f"{t}-threads" for t in THREADS])
def test_an_honest_agent_is_affirmed_at_every_thread_count(home, registry, threads):
    check = verifier("profiler", AgentKey.ensure(home / "honest.pem"))
    with honest_resident(home, 1, threads) as agent:
        serve_wave(agent, generate_leases(MODEL, 1, 2), registry)  # loads the model
        leases = generate_leases(MODEL, 3, TOKENS, start=threads)
        runs = [serve_wave(agent, [lease], registry)[0] for lease in leases]
    for lease, run in zip(leases, runs, strict=True):
        assert run.receipt, run.evidence.stderr_tail[-500:]
        result = check.appraise(lease, run.receipt, run.evidence)
        l1 = result.layer(LayerName.THERMODYNAMIC)
        assert l1.status is Status.PASS, result.reason
        assert "-thread runs" in l1.reason  # which profile runs the floor came from
        assert l1.details["floor_threads"] in {
            *THREADS,
            *ProfileStore().get(MODEL, run.evidence.profile_key).threads,
        }
        assert result.verdict is Verdict.AFFIRMING, result.reason


@pytest.mark.parametrize("threads", THREADS, ids=[f"{t}-threads" for t in THREADS])
def test_a_sleeper_is_caught_by_l1_at_every_thread_count(home, registry, threads):
    key = AgentKey.ensure(home / "sleeper.pem")
    argv = [sys.executable, "-m", "maxwell_poi.adversaries.sleeper", "--key", str(home / "sleeper.pem")]
    argv += ["--resident", "--threads", str(threads), "--sleep", "1"]
    lease = generate_leases(MODEL, 1, TOKENS, start=threads, agent_id="sleeper")[0]
    with start_resident(argv, "sleeper") as agent:
        serve_wave(agent, generate_leases(MODEL, 1, 2, agent_id="sleeper"), registry)  # its start-up
        (run,) = serve_wave(agent, [lease], registry)
    assert run.receipt, run.evidence.stderr_tail[-500:]
    result = verifier("sleeper", key).appraise(lease, run.receipt, run.evidence)
    assert result.verdict is Verdict.CONTRAINDICATED, result.reason
    assert LayerName.THERMODYNAMIC in result.caught_by, result.reason
