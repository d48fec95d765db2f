"""How fast the CLI answers (issue 22 item 5): wall time of `poi --help`, `poi client --help` and
`poi client balance` against a `poi serve` on loopback, with `python -c pass` measured in the same
run as the interpreter's own floor. Median of RUNS runs each, after one untimed warm-up (the page
cache, not the code, is what a first run measures). The machine's load average and core count are
recorded beside the times, since on a shared machine the wall time is mostly other people's work;
the children's CPU time (user + sys) is recorded too, which load inflates far less.

    .venv/bin/python -m bench.service.cli_speed            # writes bench/results/cli.json

Goal: poi --help and poi client balance ≤ 0.5 s wall on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from bench.common.results import write_results

WRITES = {"cli.json": ["host", "runs", "goal_wall_s", "times", "over_baseline_s", "import_alone"]}
GOAL_S = 0.5
# where `poi client balance`'s time goes: each module imported alone (its dependencies included)
IMPORTS = (
    "maxwell_poi.cli",
    "maxwell_poi.protocol.keys",
    "maxwell_poi.protocol.lease",
    "maxwell_poi.service.wire",
    "maxwell_poi.service.client",
    "httpx",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _timed(argv: list[str], env: dict[str, str], runs: int) -> dict[str, object]:
    """Median wall and CPU seconds of `argv` over `runs` runs; a failing run stops the benchmark."""
    subprocess.run(argv, env=env, capture_output=True, check=True)  # warm-up, untimed
    walls, cpus = [], []
    for _ in range(runs):
        cpu0, t0 = _children_cpu(), time.perf_counter()
        run = subprocess.run(argv, env=env, capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        cpus.append(_children_cpu() - cpu0)
        if run.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {run.returncode}: {run.stderr[-1000:]}")
    return {
        "median_wall_s": round(statistics.median(walls), 3),
        "min_wall_s": round(min(walls), 3),
        "median_cpu_s": round(statistics.median(cpus), 3),
        "walls_s": [round(w, 3) for w in walls],
    }


def _serve(poi: str, env: dict[str, str], port: int, home: Path) -> subprocess.Popen:
    log = open(home / "serve.log", "w")  # noqa: SIM115  (closed with the process)
    proc = subprocess.Popen(
        [poi, "serve", "--port", str(port), "--no-access-log"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180  # the server imports torch: slow on a busy machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (home / "serve.log").read_text()[-2000:]
            raise SystemExit(f"poi serve exited {proc.returncode}: {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("poi serve did not answer /healthz within 180 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/cli.json")
    args = parser.parse_args()
    if args.runs < 5:
        parser.error(f"--runs must be at least 5 for a median, got {args.runs}")
    poi = str(Path(sys.executable).parent / "poi")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        port = _free_port()
        server = f"http://127.0.0.1:{port}"
        env = {**os.environ, "POI_HOME": str(home), "POI_SERVER": server}
        proc = _serve(poi, env, port, home)
        try:
            key = home / "alice.pem"
            alice = ["--agent-id", "alice"]
            for setup in (
                [poi, "keygen", *alice, "--out", str(key)],
                [poi, "client", "enroll-agent", *alice, "--key", str(key), "--json"],
                [poi, "client", "deposit", *alice, "--amount", "1000", "--idempotency-key", "b", "--json"],
            ):
                run = subprocess.run(setup, env=env, capture_output=True, text=True)
                if run.returncode != 0:
                    raise SystemExit(f"{' '.join(setup[1:])} exited {run.returncode}: {run.stderr[-2000:]}")
            commands = {
                "python -c pass": [sys.executable, "-c", "pass"],
                "poi --help": [poi, "--help"],
                "poi client --help": [poi, "client", "--help"],
                "poi client balance": [poi, "client", "balance", *alice, "--key", str(key), "--json"],
            }
            times = {name: _timed(argv, env, args.runs) for name, argv in commands.items()}
            imports = {m: _timed([sys.executable, "-c", f"import {m}"], env, args.runs) for m in IMPORTS}
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    load_after = os.getloadavg()
    result = {
        "host": {
            "cores": os.cpu_count(),
            "loadavg_1_5_15_before": [round(x, 2) for x in load_before],
            "loadavg_1_5_15_after": [round(x, 2) for x in load_after],
        },
        "runs": args.runs,
        "goal_wall_s": GOAL_S,
        "times": times,
        "over_baseline_s": {
            name: round(t["median_wall_s"] - times["python -c pass"]["median_wall_s"], 3)
            for name, t in times.items()
            if name != "python -c pass"
        },
        "import_alone": imports,
    }
    written = write_results("cli.json", result, writes=WRITES, path=args.out)  # stamps command and commit
    print(written.read_text())


if __name__ == "__main__":
    main()
