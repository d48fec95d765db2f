"""The demo's promise, run after run: `poi demo` as `make demo` runs it (the full demo, its zk and
service parts included) in a row, one POI_HOME shared by the runs as a user's would be (the first
run measures the profiles, the later ones judge by them), a neighbour process keeping one core busy
through the runs named by --loaded. Each run's honest and cheating agents, their money at the end of
the service part, and the generation part's verdicts are read from the demo's own JSON.

    python -m bench.service.demo_runs                    # 3 runs, the third loaded; make bench-demo-runs
    python -m bench.service.demo_runs --runs 1 --loaded  # one loaded run

Writes bench/results/operation.json: `honest_richer_than_cheaters_runs` (runs in which every honest
agent ended richer than every cheater), `demo_runs` (each run's figures), `demo_runs_command`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common.results import write_results
from bench.node.contention import neighbours

WRITES = {"operation.json": ["honest_richer_than_cheaters_runs", "demo_runs", "demo_runs_command"]}
POI = [sys.executable, "-m", "maxwell_poi"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def one_run(home: Path, out: Path, loaded: bool, extra: list[str]) -> dict[str, Any]:
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0]
    with neighbours(1 if loaded else 0):
        done = subprocess.run(
            [*POI, "demo", "--json", "--out", str(out), *extra],
            env={**os.environ, "POI_HOME": str(home)},
            capture_output=True,
            text=True,
        )
        load_after = os.getloadavg()[0]
    wall_s = round(time.perf_counter() - t0, 1)
    if done.returncode != 0:
        return {
            "loaded": loaded,
            "ok": False,
            "exit_code": done.returncode,
            "stderr_tail": done.stderr[-2000:],
        }
    data = json.loads(done.stdout)
    service = data["service"]
    agents = service["agents"]
    honest = {a["agent"]: a["final_micro"] for a in agents if a["honest"]}
    cheats = {a["agent"]: a["final_micro"] for a in agents if not a["honest"]}
    s = data["summary"]
    return {
        "loaded": loaded,
        "neighbours": 1 if loaded else 0,
        "ok": True,
        "honest_richer_than_cheaters": service["honest_richer_than_cheaters"],
        "poorest_honest_micro": min(honest.values()) if honest else None,
        "richest_cheater_micro": max(cheats.values()) if cheats else None,
        "richest_cheater": max(cheats, key=cheats.__getitem__) if cheats else None,
        "service_agents": {
            a["agent"]: {k: a[k] for k in ("final_micro", "verdicts", "caught_by")} for a in agents
        },
        "ledger_ok": service["ledger"]["ok"],
        "generation": {
            "honest_affirmed": f"{s['honest_affirmed']}/{s['honest_runs']}",
            "attacks_contraindicated": f"{s['attacks_contraindicated']}/{s['attack_runs']}",
        },
        "gateway": _gateway(data.get("gateway")),
        "load1_before_after": [round(load_before, 2), round(load_after, 2)],
        "wall_s": wall_s,
    }


def _gateway(chat: dict[str, Any] | None) -> dict[str, Any] | None:
    """The demo's chat through the gateway: the honest completion's verdict, the cheater cut or not."""
    if not chat:
        return None
    return {
        "honest_verdict": chat["honest"]["maxwell"].get("verdict"),
        "honest_charged_micro": chat["honest"]["maxwell"].get("charged_micro"),
        "cheater_cut": chat["cheater"]["cut"],
        "cheater_requester_charged_micro": chat["cheater"]["requester_charged_micro"],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument(
        "--loaded",
        type=int,
        nargs="*",
        default=None,
        help="1-based runs with a neighbour (default: the last)",
    )
    ap.add_argument(
        "--demo-args", default="", help="extra `poi demo` arguments (default: none, as `make demo`)"
    )
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    loaded = set(args.loaded if args.loaded is not None else [args.runs])
    if args.loaded == []:  # `--loaded` alone: every run
        loaded = set(range(1, args.runs + 1))
    extra = args.demo_args.split()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="poi-demo-runs-") as tmp:
        home = Path(tmp) / "home"
        for i in range(1, args.runs + 1):
            log(f"run {i}/{args.runs}{' with a neighbour' if i in loaded else ''} ...")
            runs.append(one_run(home, Path(tmp) / f"demo{i}", i in loaded, extra))
            r = runs[-1]
            log(
                f"run {i}: ok {r['ok']}, honest richer than every cheater: "
                f"{r.get('honest_richer_than_cheaters')} (poorest honest {r.get('poorest_honest_micro')}, "
                f"richest cheater {r.get('richest_cheater')} {r.get('richest_cheater_micro')}), "
                f"{r.get('wall_s')} s"
            )
    richer = sum(bool(r.get("honest_richer_than_cheaters")) for r in runs)
    out = {
        "honest_richer_than_cheaters_runs": {
            "richer": richer,
            "runs": len(runs),
            "loaded_runs": sorted(loaded),
        },
        "demo_runs": runs,
        "demo_runs_command": " ".join(["python -m bench.service.demo_runs", *sys.argv[1:]]),
    }
    print(json.dumps(out["honest_richer_than_cheaters_runs"]))
    if not args.no_write:
        write_results("operation.json", out, writes=WRITES)
    return 0 if richer == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
