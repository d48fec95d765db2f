"""Every adversary program in the catalogue, run as its own process through Maxwell's runner,
is contraindicated by the layer meant to catch it; the honest agent runs beside them pass.

Claimed model gpt2-mini, cheats run gpt2-micro (the same programs `poi demo` runs on GPT-2-small).
"""

from __future__ import annotations

import pytest

from maxwell_poi.adversaries import CATALOGUE
from maxwell_poi.demo import Demo, DemoConfig, report


@pytest.fixture(scope="module")
def demo_rows(tmp_path_factory):
    cfg = DemoConfig(
        model="gpt2-mini",
        small="gpt2-micro",
        alt="gpt2-micro",
        second_model=None,
        tokens=24,
        out=tmp_path_factory.mktemp("demo"),
    )
    return Demo(cfg).run(), cfg


def test_honest_agents_are_affirmed(demo_rows):
    rows, _ = demo_rows
    honest = [r for r in rows if r.attack is None]
    assert len(honest) == 4  # 1 thread, 2 threads, batch of 4, MiniLM embeddings
    for row in honest:
        assert row.verdict == "affirming", (row.agent, row.reason)


@pytest.mark.parametrize("attack", CATALOGUE, ids=[a.name for a in CATALOGUE])
def test_attack_is_contraindicated_by_the_right_layer(demo_rows, attack):
    rows, _ = demo_rows
    mine = [r for r in rows if r.attack == attack.name]
    assert len(mine) == len(attack.kinds)  # one run per job kind it applies to
    for row in mine:
        assert row.verdict == "contraindicated", (row.attack, row.reason)
        assert row.caught_by == [attack.caught_by], row.reason
        assert attack.reason_has in row.reason


def test_demo_writes_its_report_and_evidence(demo_rows):
    rows, cfg = demo_rows
    data = report(rows)
    assert data["summary"]["attack_classes"] == len(CATALOGUE) >= 12
    assert data["summary"]["attacks_contraindicated"] == data["summary"]["attack_runs"]
    assert (cfg.out / "results.json").exists()
    runs = sorted((cfg.out / "runs").iterdir())
    assert len(runs) == len(rows) + sum(a.needs_priming for a in CATALOGUE)
    assert all((d / "evidence.json").exists() and (d / "result.json").exists() for d in runs)


def test_runner_measures_the_sleeper_as_idle(demo_rows):
    """Maxwell's own evidence already shows the sleeper barely used the CPU (L1 builds on this)."""
    rows, _ = demo_rows
    sleeper = next(r for r in rows if r.attack == "sleeper")
    honest = next(r for r in rows if r.attack is None and r.model == "gpt2-mini")
    assert sleeper.agent_wall_s >= 1.0
    assert sleeper.agent_cpu_s / sleeper.agent_wall_s < honest.agent_cpu_s / honest.agent_wall_s
