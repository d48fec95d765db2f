"""bench/service/system.py's bookkeeping, without a server: the thirds gate the bids, a lease counts
once its verdict is final, the contention and batch come from L1/L2's details, and the reject bound is
the exact Clopper-Pearson one. (The whole run, >= 3,000 leases, is `make bench-system`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench.common.stats import upper95
from bench.service.system import Lease as Row
from bench.service.system import LocalNodeServer, Run, batch_of, contention_of, listed, seen, spread, tally
from maxwell_poi.service.wire import LeaseView


def view(verdict: str, *, final: bool = True, status: str = "settled", **details: Any) -> LeaseView:
    layers = [
        {"layer": "L0-integrity", "status": "pass", "reason": "signed"},
        {"layer": "L1-thermodynamic", "status": "pass" if verdict == "affirming" else "fail",
         "reason": "work", "details": details},
    ]  # fmt: skip
    return LeaseView.model_validate(
        {
            "lease_id": "a" * 32, "agent_id": "a", "node_id": "local", "status": status, "tier": "medium",
            "audit_probability": 0.1, "tier_reason": "", "price_micro_per_j": 20, "hold_micro": 1,
            "stake_micro": 1, "lease": {},
            "verdict": {
                "verdict": verdict, "final": final, "audit_drawn": False, "reason": f"{verdict} because",
                "layers": layers, "energy_j": 0.1, "energy_memo": "", "charge_micro": 1,
                "stake_outcome": "released", "appraised_at": 0.0,
            },
        }
    )  # fmt: skip


def row(index: int, verdict: str | None, condition: str = "hog_off", **kw: Any) -> Row:
    x = Row(index, "a", "gpt2-micro", index % 2 == 0, f"sys-{index}", condition, lease_id=f"{index:032x}")
    x.bid_status = "won"
    if verdict is not None:
        x.view = view(verdict, **kw)
        x.ran_at = 1.0
    return x


def test_blocks_cycle_the_hog_and_gate_the_bids() -> None:
    run = Run(total=14, block=2, window=2)
    assert [run.condition(i) for i in range(8)] == ["hog_off"] * 2 + ["hog_on"] * 2 + ["hog_off"] * 4
    assert [run.next_switch(i) for i in (0, 2, 4, 9, 10, 12)] == [2, 4, 8, 10, 14, 14]
    run.allowed = run.next_switch(0)
    assert [run.take() for _ in range(3)] == [0, 1, None]
    run.allowed = run.next_switch(2)
    assert run.take() == 2


def test_final_verdicts_count_once_and_the_bound_is_clopper_pearson() -> None:
    rows = [row(i, "affirming") for i in range(6)]
    rows += [row(6, "contraindicated"), row(7, "warning")]
    rows += [row(8, "affirming", final=False, status="audit_pending"), row(9, None)]
    cached = row(10, None)
    cached.bid_status = "cached"  # answered from the control plane's cache: no lease run
    t = tally([*rows, cached])
    assert (t["leases"], t["rejected"], t["warned"], t["affirmed"]) == (8, 1, 1, 6)
    assert t["reject_upper95"] == pytest.approx(upper95(1, 8), abs=1e-6)
    assert not rows[8].final and rows[8].resolved  # run: its verdict is in, its audit not yet
    assert not rows[9].resolved and cached.resolved
    rejected = listed(rows, "contraindicated")
    assert [r["reason"] for r in rejected] == ["contraindicated because"]
    assert rejected[0]["not_passed"][0]["layer"] == "L1-thermodynamic"


def test_contention_and_batch_come_from_the_layer_details() -> None:
    a = row(0, "affirming", batch=4, contention_wait_s=0.5, contention_cpu_pressure=0.2)
    b = row(1, "affirming", batch=2, contention_wait_s=0.1)
    assert contention_of(a.view) == {"wait_s": 0.5, "cpu_pressure": 0.2}
    assert (batch_of(a.view), batch_of(b.view), batch_of(None)) == (4, 2, None)
    got = seen([a, b])
    assert got["wait_s"] == {"min": 0.1, "median": 0.3, "max": 0.5, "n": 2}
    assert got["others_cores"] is None  # not measured is not zero
    assert spread([]) is None


def test_the_server_runs_a_local_node_with_the_batch(tmp_path: Path) -> None:
    argv = LocalNodeServer(tmp_path, str(tmp_path / "db.sqlite"), batch=4).argv()
    assert "serve" in argv
    assert argv[-3:] == ["--local-node", "--batch", "4"]
