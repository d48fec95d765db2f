"""`poi demo` through the control plane (demo_service.ServiceDemo): a real server on loopback, a node
pulling over HTTP, honest and cheating agents with the same deposit, bids, price and stake.

Small: claimed model gpt2-mini (the smaller-model cheat runs gpt2-micro), 12 tokens, 2 leases per
agent, the medium tier's lottery at p = 1 so that a cheat only L4 sees is seen on every run (the
demo's default lottery is 0.9). The resident profile L1/L2 judge by is measured here first.
"""

from __future__ import annotations

import json

import pytest

from maxwell_poi.demo.service import ServiceDemo, ServiceDemoConfig, service_table
from maxwell_poi.node.resident_runs import measure_resident_profile
from maxwell_poi.registry.profiles import ProfileStore

CHEATS = ["smaller-model", "output-tampering", "forged-signature"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    # batch sizes 1 and 2 only: the batching honest agent is handed its 2 leases at once
    ProfileStore().put(measure_resident_profile("gpt2-mini", runs=3, tokens=12, batches=(1, 2)))
    cfg = ServiceDemoConfig(
        model="gpt2-mini",
        small="gpt2-micro",
        alt="gpt2-micro",
        tokens=12,
        attacks=CHEATS,
        honest=("honest", "honest-batch4"),
        leases=2,
        audit_probability=1.0,
        out=tmp_path_factory.mktemp("demo"),
    )
    service_demo = ServiceDemo(cfg)
    return service_demo.run(), cfg


def _rows(summary):
    return {r["agent"]: r for r in summary["agents"]}


def test_every_agent_bid_won_and_was_judged_through_the_service(demo):
    summary, _ = demo
    rows = _rows(summary)
    assert set(rows) == {"honest", "honest-batch4", *CHEATS}
    for r in rows.values():
        assert r["bids"] == r["leases_won"] == 2, r
        assert r["tiers"] == {"medium": 2} and r["audit_probability"] == 1.0, r
        assert sum(r["verdicts"].values()) == 2 and r["no_verdict"] == 0, r
        assert r["joules_measured"] > 0 and r["energy_paid_micro"] > 0, r
    assert summary["server"].startswith("http://127.0.0.1:")


def test_honest_agents_are_affirmed_and_get_their_stake_back(demo):
    summary, _ = demo
    stake = summary["terms"]["stake_micro"]
    for name in ("honest", "honest-batch4"):
        r = _rows(summary)[name]
        assert r["verdicts"] == {"affirming": 2}, r
        assert r["audits_drawn"] == 2  # p = 1: every affirmed lease was audited too
        assert r["stake_released_micro"] == 2 * stake and r["stake_slashed_micro"] == 0
        assert r["escrow_micro"] == 0
        assert r["final_micro"] == r["deposit_micro"] - r["energy_paid_micro"]


def test_caught_cheaters_are_slashed_by_the_layers_meant_to_catch_them(demo):
    summary, _ = demo
    rows = _rows(summary)
    stake = summary["terms"]["stake_micro"]
    expected = {
        "smaller-model": "L4-audit",
        "output-tampering": "L2-boundary",
        "forged-signature": "L0-integrity",
    }
    for name, layer in expected.items():
        r = rows[name]
        assert r["verdicts"] == {"contraindicated": 2}, r
        # L1 (less work per token) or L2's work probe (the leased weights must answer a fresh
        # question) may see the smaller model first; then no audit is needed
        caught = set(r["caught_by"])
        earlier = {"L1-thermodynamic", "L2-boundary"}
        assert layer in caught or (name == "smaller-model" and caught & earlier), r
        assert r["stake_slashed_micro"] == 2 * stake and r["stake_released_micro"] == 0
        assert r["final_micro"] == r["deposit_micro"] - r["energy_paid_micro"] - 2 * stake


def test_honest_agents_end_richer_than_every_cheater(demo):
    summary, _ = demo
    rows = summary["agents"]
    assert summary["honest_richer_than_cheaters"] is True
    assert min(r["final_micro"] for r in rows if r["honest"]) > max(
        r["final_micro"] for r in rows if not r["honest"]
    )


def test_the_ledger_adds_up_and_the_summary_is_written(demo):
    summary, cfg = demo
    ledger = summary["ledger"]
    assert ledger["ok"] and ledger["ledger_check_ok"], ledger["problems"]
    assert ledger["deposited_micro"] == 5 * summary["terms"]["deposit_micro"]
    assert ledger["slashed_micro"] == 3 * 2 * summary["terms"]["stake_micro"]
    written = json.loads((cfg.out / "service" / "summary.json").read_text())
    assert written["honest_richer_than_cheaters"] is True and len(written["agents"]) == 5
    assert written["skipped"] == {}
    assert service_table(summary).row_count == 5


def test_plan_enrolls_every_cpu_attack_as_one_agent(tmp_path):
    """The whole catalogue fits the service: each cheat is one enrolled agent's command (the lease
    thief's program holds another enrolled agent's key); only GPU cheats wait for a GPU."""
    from maxwell_poi.adversaries import CATALOGUE

    service_demo = ServiceDemo(ServiceDemoConfig(out=tmp_path, leases=3))
    plans = {p.agent: p for p in service_demo.plan()}
    for attack in CATALOGUE:
        assert (attack.name in plans) != (attack.name in service_demo.skipped), attack.name
    assert set(service_demo.skipped) <= {a.name for a in CATALOGUE if a.needs_gpu}
    assert plans["replay-old-receipt"].waves == [1, 1, 1]  # one priming lease first
    assert plans["batch-copier"].waves == [2, 1] and plans["batch-copier"].greedy
    assert plans["honest-batch4"].waves == [3]
    thief = plans["other-agents-lease"].argv
    assert thief[thief.index("--key") + 1].endswith("mallory.pem")
