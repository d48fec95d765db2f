"""Where one intake request's CPU goes: `poi serve` sampled by py-spy while the load bench hands in a
corpus of real receipts (issue 25, "a hot path measured, then cut").

    python -m bench.service.intake_profile --n 600          # SQLite, 8 workers

py-spy (`pip install py-spy`, a binary: no import) samples every thread of the server at 100 Hz while
the measured hand-in runs, on CPU only. The collapsed stacks are kept whole
(bench/results/intake_profile.stacks.txt, for a flame graph: `flamegraph.pl` or speedscope) and
summarised in bench/results/service.json `intake_profile`: the share of samples in which each
part of the path is on the stack (inclusive) — the settlement, the ledger's postings, SQL executed
and committed, SQLAlchemy, the appraisal (L0-L2), signature checks, JSON and pydantic, the HTTP
stack — and the frames most often on top.
"""

from __future__ import annotations

import argparse
import math
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results
from bench.service.corpus import MAX_PULL, RESULTS, Fleet, Server, build_corpus, ensure_profile, log, poi_home
from bench.service.load import hand_in

STACKS = RESULTS.parent / "intake_profile.stacks.txt"
WRITES = {"service.json": ["intake_profile"]}  # bench/common/results.py
# (part of the path, a substring of a frame that puts a sample in it); a sample counts once per part
PARTS = [
    ("intake route, all of it", "intake (maxwell_poi/service/routes/node.py"),
    ("settlement (service/settlement.py)", "maxwell_poi/service/settlement.py"),
    ("ledger postings (ledger/)", "maxwell_poi/ledger/"),
    ("SQL statements executed (DBAPI: SQLite)", "DefaultDialect.do_execute"),
    ("SQL commits", "DefaultDialect.do_commit"),
    ("SQLAlchemy, all of it (ORM, Core, compile, cache)", "sqlalchemy/"),
    ("appraisal: L0-L2 (verifier/)", "maxwell_poi/verifier/"),
    ("signature checks (securesystemslib)", "securesystemslib/"),
    ("pydantic", "pydantic"),
    ("JSON", "json/"),
    ("event loop in select()", "EpollSelector.select"),
    ("HTTP stack (uvicorn)", "uvicorn/"),
]


def record(pid: int, out: Path) -> subprocess.Popen:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return subprocess.Popen(
        [
            spy,
            "record",
            "--pid",
            str(pid),
            "--rate",
            "100",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def summarise(stacks: Path) -> dict[str, Any]:
    samples = 0
    parts: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    for line in stacks.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        samples += n
        for name, needle in PARTS:
            if needle in stack:
                parts[name] += n
        leaf[stack.split(";")[-1]] += n
    share = {name: round(parts[name] / samples, 3) if samples else None for name, _ in PARTS}
    top = [{"frame": f, "self_share": round(n / samples, 3)} for f, n in leaf.most_common(15)]
    return {"samples": samples, "inclusive_share": share, "top_self_frames": top}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="corpus size (leases)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--audit-p", type=float, default=0.01)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    command = "python -m bench.service.intake_profile " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="poi-intake-profile-") as tmp, poi_home(Path(tmp)) as home:
        ensure_profile()
        fleet = Fleet(home, agents=args.agents, nodes=math.ceil(args.n / MAX_PULL))
        server = Server(home, str(home / "ledger.sqlite"))
        log(f"poi serve up in {server.start():.1f} s at {server.url}")
        try:
            corpus = build_corpus(server, fleet, args.n, audit_p=args.audit_p)
            warm, measured = corpus.entries[:20], corpus.entries[20:]
            hand_in(server.url, warm, 1, args.max_seconds)
            assert server.proc is not None
            raw = Path(tmp) / "stacks.txt"
            spy = record(server.proc.pid, raw)
            run = hand_in(server.url, measured, args.concurrency, args.max_seconds)
            spy.send_signal(signal.SIGINT)
            err = spy.communicate(timeout=60)[1].decode()
            if not raw.exists():
                raise SystemExit(f"py-spy wrote no stacks: {err[-2000:]}")
        finally:
            server.stop()
            fleet.close()
        stats = run.measured()
        STACKS.write_text(raw.read_text())
    profile = {
        "command": command,
        "database": "sqlite",
        "requests": stats["requests"],
        "intake_per_s": stats["intake_per_s"],
        "p99_ms": stats["p99_ms"],
        "concurrency": args.concurrency,
        "stacks_file": str(STACKS.relative_to(RESULTS.parent.parent.parent)),
        **summarise(STACKS),
        "notes": "py-spy 100 Hz on-CPU samples of every thread of poi serve during the measured hand-in; "
        "a part's share counts the samples with one of its frames anywhere on the stack (parts overlap)",
    }
    log(f"{stats['requests']} requests, {profile['samples']} samples: {profile['inclusive_share']}")
    write_results("service.json", {"intake_profile": profile}, writes=WRITES, path=args.out)


if __name__ == "__main__":
    main()
