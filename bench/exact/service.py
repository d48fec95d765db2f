"""The exact tier end to end through the control plane (issue 12): real resident agents under a node
on loopback, every lease optimistic, L3 challenges relayed by the node, a dispute for each lease of
the one-wrong-block cheater (its L4 is drawn with p = 1). Counts what passed and what was caught,
and what Maxwell spent: its own L3 check time per challenge (both modes), the openings and their
bytes, and a dispute's wall time (Maxwell's reference prefill, the bisection's round trips through
the node, the culprit block recomputed) against the L4 re-execution that started it.

    python -m bench.exact.service [--rounds 4]     # writes bench/results/exact_service.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common.results import write_results  # noqa: E402
from maxwell_poi.demo.exact import ExactDemo

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "exact_service.json": [
        "what",
        "host",
        "rounds",
        "window_s",
        "ledger_ok",
        "by_agent",
        "bench_s",
        "measured_at",
    ]
}  # the keys of bench/results/exact_service.json this script writes (bench/common/results.py)


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for agent in sorted({r["agent"] for r in rows}):
        mine = [r for r in rows if r["agent"] == agent]
        l3 = [d["cost_s"] for r in mine for d in r["l3"] if d["cost_s"] and r["dispute"] is None]
        disputes = [r for r in mine if r["dispute"] is not None]
        out[agent] = {
            "model": mine[0]["model"],
            "shows": mine[0]["shows"],
            "leases": len(mine),
            "affirmed": sum(r["verdict"] == "affirming" for r in mine),
            "contraindicated": sum(r["verdict"] == "contraindicated" for r in mine),
            "stake": {o: sum(r["stake_outcome"] == o for r in mine) for o in ("released", "slashed")},
            "l3_check_s_median": round(statistics.median(l3), 5) if l3 else None,
            "openings_per_lease": round(statistics.mean(len(r["openings"]) for r in mine), 2),
            "opening_bytes_median": statistics.median(b for r in mine for _k, _s, b in r["openings"]),
            "disputes": len(disputes),
            "blocks_named": sorted({(d["dispute"]["block"], d["dispute"]["op"]) for d in disputes}),
            "reasons": sorted({d["reason"][:160] for r in mine for d in r["l3"]}),
        }
        if disputes:
            ratios = [r["dispute_s"] / r["l4_cost_s"] for r in disputes if r["dispute_s"] and r["l4_cost_s"]]
            walls = [r["dispute_s"] for r in disputes]
            out[agent]["dispute_wall_s_median"] = round(statistics.median(walls), 3)
            out[agent]["l4_s_median"] = round(statistics.median(r["l4_cost_s"] for r in disputes), 3)
            out[agent]["dispute_wall_vs_l4"] = round(statistics.median(ratios), 3) if ratios else None
            # Maxwell's own work in the dispute: its reference prefill, the root checks, one block
            work = [r["dispute_s"] - r["dispute_waited_s"] for r in disputes if r["l4_cost_s"]]
            out[agent]["dispute_maxwell_s_median"] = round(statistics.median(work), 4)
            out[agent]["dispute_maxwell_vs_l4"] = round(
                statistics.median(w / r["l4_cost_s"] for w, r in zip(work, disputes, strict=True)), 3
            )
            out[agent]["waited_for_openings_s_median"] = round(
                statistics.median(r["dispute_waited_s"] for r in disputes), 3
            )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=4, help="leases per agent")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/exact_service.json")
    args = p.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        summary = ExactDemo(Path(tmp), rounds=args.rounds).run()
    result = {
        "what": __doc__.split("\n\n")[0],
        "host": "this project's shared 2-core CPU VM; wall times are this host's",
        "rounds": args.rounds,
        "window_s": summary["window_s"],
        "ledger_ok": summary["ledger_ok"],
        "by_agent": summarise(summary["leases"]),
        "bench_s": round(time.time() - t0, 1),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_results("exact_service.json", result, writes=WRITES, path=args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
