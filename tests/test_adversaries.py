"""Every adversary program in the catalogue, run as its own process through Maxwell's runner,
is contraindicated by the layers meant to catch it; the honest agents run beside them pass.

Claimed model llama-small (big enough that holding its weights shows in memory), cheats run
gpt2-micro / gpt2-mini: the same programs `poi demo` runs against GPT-2-small. L1 and L2 compare
with a reference profile that the demo measures on this machine first.
"""

from __future__ import annotations

import pytest

from maxwell_poi.adversaries import CATALOGUE
from maxwell_poi.demo.generation import Demo, DemoConfig

CPU_ATTACKS = [a for a in CATALOGUE if not a.needs_gpu]


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    cfg = DemoConfig(
        model="llama-small",
        small="gpt2-micro",
        alt="gpt2-mini",
        second_model=None,
        tokens=24,
        out=tmp_path_factory.mktemp("demo"),
        profile_runs=4,
    )
    demo = Demo(cfg)
    return demo.run(), cfg, demo


def test_honest_agents_are_affirmed(demo_rows):
    rows, _, _ = demo_rows
    honest = [r for r in rows if r.attack is None]
    assert len(honest) == 7  # 1 thread, 2 threads, four leases in one batch, MiniLM embeddings
    for row in honest:
        # the one allowed exception: the fail-safe for a lease measured under contention its profile
        # never saw (verifier/conditions.py) answers a warning, naming it, never a false rejection
        unseen = row.verdict == "warning" and "contention the profile never saw" in row.reason
        assert row.verdict == "affirming" or unseen, (row.agent, row.reason)


@pytest.mark.parametrize("attack", CPU_ATTACKS, ids=[a.name for a in CPU_ATTACKS])
def test_attack_is_contraindicated_by_the_right_layers(demo_rows, attack):
    rows, _, _ = demo_rows
    mine = [r for r in rows if r.attack == attack.name]
    # one judged run per job kind it applies to (a batching cheat's batch computes all but its last
    # lease honestly: those are its priming runs, the copy is the judged one)
    assert len(mine) == ("generate" in attack.kinds) + ("embed" in attack.kinds)
    for row in mine:
        if attack.name == "moonlighter" and row.accounting == "proc":
            pytest.skip("the /proc fallback cannot see a child that left the process tree (the named gap)")
        assert row.verdict == "contraindicated", (row.attack, row.reason)
        # embedding leases have no token stream: there only the last listed layer applies
        expected = attack.must_catch if row.model != "minilm-l6-v2" else attack.must_catch[-1:]
        assert set(expected) <= set(row.caught_by), (row.caught_by, row.reason)
        assert attack.reason_has in row.reason


def test_gpu_only_attacks_are_reported_as_skipped_without_a_gpu(demo_rows):
    _, _, demo = demo_rows
    assert set(demo.skipped) == {a.name for a in CATALOGUE if a.needs_gpu}
    assert all("CUDA" in why for why in demo.skipped.values())


def test_demo_writes_its_report_and_evidence(demo_rows):
    rows, cfg, demo = demo_rows
    data = demo.report(rows)
    assert data["summary"]["attack_classes"] == len(CPU_ATTACKS) >= 12
    missed = [r for r in rows if r.attack and r.verdict != "contraindicated"]
    assert not missed, [(r.attack, r.reason) for r in missed]
    assert data["summary"]["attacks_contraindicated"] == data["summary"]["attack_runs"]
    assert (cfg.out / "results.json").exists()
    runs = sorted((cfg.out / "runs").iterdir())
    assert len(runs) == len(rows) + sum(a.needs_priming + a.batch - 1 for a in CPU_ATTACKS)
    assert all((d / "evidence.json").exists() and (d / "result.json").exists() for d in runs)


def test_runner_measures_the_sleeper_as_idle(demo_rows):
    """Maxwell's own evidence shows the sleeper barely used the CPU while it 'decoded'."""
    rows, _, _ = demo_rows
    sleeper = next(r for r in rows if r.attack == "sleeper")
    honest = next(r for r in rows if r.attack is None and r.model == "llama-small")
    s_l1 = sleeper.result["layers"][1]["details"]
    h_l1 = honest.result["layers"][1]["details"]
    assert s_l1["cpu_ms_per_token"] < 0.2 * h_l1["cpu_ms_per_token"]


def test_every_run_names_the_accounting_source_of_its_sandbox(demo_rows):
    rows, _, _ = demo_rows
    sources = {r.accounting for r in rows}
    print(f"sandbox accounting sources used: {sorted(sources)}")
    assert sources and sources <= {"cgroup-v2", "cgroup-v1", "proc"}
    assert {r.batch for r in rows if r.agent == "honest-batch4"} == {4}
