"""`poi demo` through the control plane, as a benchmark: do honest agents end richer than cheaters?

    python -m bench.service.demo            # gpt2-small claimed, every CPU attack; ~20-40 min here
    python -m bench.service.demo --quick    # gpt2-mini claimed, gpt2-micro cheats, fewer tokens

Runs demo_service.ServiceDemo (a real control plane on loopback, a node pulling over HTTP, every
agent the same deposit, bids, price and stake; the medium tier's audit lottery) in a fresh
POI_HOME, so the resident profile L1/L2 judge by is measured in this run. Merges only its keys
(`honest_richer_than_cheaters`, `demo_agents`, `demo_command`) into bench/results/service.json;
the full summary stays in OUT/service/summary.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from rich.console import Console

from bench.common.results import write_results
from maxwell_poi.demo.service import ServiceDemo, ServiceDemoConfig, service_table

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "service.json"
WRITES = {
    "service.json": ["honest_richer_than_cheaters", "demo_agents", "demo_command"]
}  # bench/common/results.py


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="gpt2-mini claimed, gpt2-micro cheats, 16 tokens")
    ap.add_argument("--tokens", type=int, default=None, help="new tokens per lease (default 48, quick 16)")
    ap.add_argument("--leases", type=int, default=3, help="leases each agent bids")
    ap.add_argument("--audit-probability", type=float, default=0.9, help="the medium tier's lottery")
    ap.add_argument("--attack", action="append", default=None, help="only these attacks (repeatable)")
    ap.add_argument("--profile-runs", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None, help="demo folder (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print, do not merge into service.json")
    args = ap.parse_args()
    cfg = ServiceDemoConfig(
        leases=args.leases, audit_probability=args.audit_probability, profile_runs=args.profile_runs
    )
    cfg.attacks = args.attack
    if args.quick:
        cfg.model, cfg.small, cfg.alt, cfg.tokens = "gpt2-mini", "gpt2-micro", "gpt2-micro", 16
    cfg.tokens = args.tokens or cfg.tokens
    command = "python -m bench.service.demo " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["POI_HOME"] = str(Path(tmp) / "home")  # the profile is measured in this run
        cfg.out = args.out or Path(tmp) / "poi-demo"
        summary = ServiceDemo(cfg).run(lambda label, done, total: log(f"{label} ({done}/{total})"))
    Console(stderr=True, width=160).print(service_table(summary))
    log(
        f"honest richer than every cheater: {summary['honest_richer_than_cheaters']}; "
        f"ledger ok: {summary['ledger']['ok']}; skipped: {summary['skipped'] or 'none'}; "
        f"{summary['wall_s']} s"
    )
    update = {
        "honest_richer_than_cheaters": summary["honest_richer_than_cheaters"],
        "demo_agents": summary["agents"],
        "demo_command": command.strip(),
    }
    print(json.dumps(update, indent=2))
    if not args.no_write:
        write_results("service.json", update, writes=WRITES, path=RESULTS)
        log(f"merged into {RESULTS.relative_to(ROOT)}")
    return 0 if summary["ledger"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
