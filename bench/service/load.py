"""Load on the control plane's hot path: POST /v1/node/intake with real node evidence, on loopback.

    make bench-service-load
    python -m bench.service.load --n 400 --concurrency 8 --db sqlite     # a small run

For each database (SQLite: the default file in POI_HOME; PostgreSQL: a fresh schema, dropped after)
a real `poi serve` subprocess is started, a corpus of served-but-not-handed-in leases is built
(bench/service/corpus.py), and C worker threads (one httpx.Client each) hand the corpus in, one
request per lease, bounded by --requests and --max-seconds. Each request's latency is measured at
the client. Then: every lease answered once, accepted, not as a duplicate; as many receipt and
verdict rows as submissions; the ledger's own check ok (GET /v1/admin/ledger).

What one request costs the server: open the DSSE envelope (Ed25519), L0 (receipt signature,
binding to lease/nonce/model/input), L1 (CPU per token against the resident profile) and L2
(timing) on the signed evidence, the audit lottery, and one write transaction (receipt, verdict,
energy settlement, stake release/slash, lease status). Drawn L4 audits are queued to the server's
audit worker thread (they run during the load, in the same process).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from sqlalchemy import create_engine, func, select, text

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results
from bench.service.corpus import (
    MAX_PULL,
    RESULTS,
    Entry,
    Fleet,
    Server,
    build_corpus,
    ensure_profile,
    log,
    poi_home,
)
from bench.service.mixed import Mix
from maxwell_poi.service.schema import ReceiptRow, VerdictRow

WRITES = {
    "service.json": [
        "intake_per_s",
        "intake_p99_ms",
        "intake_p50_ms",
        "intake_requests",
        "intake_concurrency",
        "load_command",
        "load_notes",
        "load_details",
    ]
}  # bench/common/results.py

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
INTAKE = "/v1/node/intake"
JSON = {"content-type": "application/json"}


@dataclass
class Answer:
    lease_id: str
    status: int
    latency_s: float
    body: dict[str, Any] | str
    sent_s: float = 0.0  # since the load started


@dataclass
class LoadRun:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # transport errors: none expected on loopback
    wall_s: float = 0.0

    def measured(self) -> dict[str, Any]:
        lat = np.array([a.latency_s for a in self.answers]) * 1000
        n = len(self.answers)
        return {
            "requests": n,
            "wall_s": round(self.wall_s, 3),
            "intake_per_s": round(n / self.wall_s, 1) if self.wall_s > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if n else None,
            "p90_ms": round(float(np.percentile(lat, 90)), 2) if n else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if n else None,
            "max_ms": round(float(lat.max()), 2) if n else None,
            "transport_errors": len(self.errors),
            # where the tail is: (sent at s, latency ms, audit drawn) of the five slowest requests
            "slowest": [
                (round(a.sent_s, 3), round(a.latency_s * 1000, 1), _drawn(a))
                for a in sorted(self.answers, key=lambda a: -a.latency_s)[:5]
            ],
            "audits_drawn_at_s": [round(a.sent_s, 3) for a in self.answers if _drawn(a)],
        }


def failing_layers(answers: list[Answer]) -> dict[str, int]:
    """Why honest agents' leases were not affirmed, by layer and check ("L1-thermodynamic: work")."""
    out: Counter[str] = Counter()
    for a in answers:
        if isinstance(a.body, dict) and a.body.get("verdict") not in (None, "affirming"):
            for part in str(a.body.get("reason", "")).split("; "):
                out[":".join(part.split(":")[:2]).strip()] += 1
    return dict(out.most_common(8))


def _drawn(a: Answer) -> bool:
    return isinstance(a.body, dict) and bool(a.body.get("audit_drawn"))


def hand_in(url: str, entries: list[Entry], concurrency: int, max_seconds: float) -> LoadRun:
    """C threads, one httpx.Client each, taking the next entry until the corpus or the time is out."""
    run, lock, deadline = LoadRun(), threading.Lock(), time.monotonic() + max_seconds
    start = time.perf_counter()
    bodies = [(e.lease_id, e.body()) for e in entries]  # encoded before the clock starts
    queue: Iterator[tuple[str, bytes]] = iter(bodies)

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while time.monotonic() < deadline:
                with lock:
                    item = next(queue, None)
                if item is None:
                    return
                lease_id, body = item
                t0 = time.perf_counter()
                try:
                    response = client.post(INTAKE, content=body, headers=JSON)
                except httpx.HTTPError as exc:
                    with lock:
                        run.errors.append(f"{lease_id}: {type(exc).__name__}: {exc}")
                    continue
                latency = time.perf_counter() - t0
                try:
                    decoded: dict[str, Any] | str = response.json()
                except ValueError:
                    decoded = response.text[:500]
                with lock:
                    run.answers.append(Answer(lease_id, response.status_code, latency, decoded, t0 - start))

    threads = [threading.Thread(target=worker, name=f"load-{i}") for i in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    run.wall_s = time.perf_counter() - t0
    return run


def verify(server: Server, db_url: str, answers: list[Answer], submitted: set[str]) -> list[str]:
    """Every submitted lease accepted exactly once (answer and database), and the ledger checks."""
    problems = []
    by_lease = Counter(a.lease_id for a in answers)
    twice = [lid for lid, k in by_lease.items() if k != 1]
    if twice:
        problems.append(f"expected one answer per lease, got {len(twice)} leases answered != 1 times")
    missing = submitted - set(by_lease)
    if missing:
        problems.append(f"expected an answer for every submitted lease, {len(missing)} got none")
    refused = [a for a in answers if a.status != 200]
    if refused:
        problems.append(
            f"expected 200 for every submission, got {len(refused)} others, first: {refused[0].body}"
        )
    dup = [a for a in answers if a.status == 200 and a.body.get("duplicate")]  # type: ignore[union-attr]
    if dup:
        problems.append(f"expected no duplicate answers (each lease handed in once), got {len(dup)}")
    engine = create_engine(db_url)
    try:
        with engine.connect() as conn:
            receipts = conn.scalar(select(func.count()).select_from(ReceiptRow))
            verdicts = conn.scalar(select(func.count()).select_from(VerdictRow))
    finally:
        engine.dispose()
    if receipts != len(submitted) or verdicts != len(submitted):
        problems.append(
            f"expected {len(submitted)} receipt and verdict rows, "
            f"got {receipts} receipts, {verdicts} verdicts"
        )
    with server.admin() as admin:
        check = admin.ledger().check
    if not check.ok:
        problems.append(f"expected check_ledger ok, got {check.problems[:5]}")
    return problems


@contextmanager
def database(kind: str, home: Path, pg_url: str) -> Iterator[tuple[str, str]]:
    """(the url `poi serve --db` gets, the SQLAlchemy url to read it back with); a PostgreSQL schema
    is made fresh and dropped afterwards."""
    if kind == "sqlite":
        path = home / "ledger.sqlite"
        yield str(path), f"sqlite:///{path}"
        return
    schema = f"bench_load_{uuid.uuid4().hex[:12]}"
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{pg_url}?options=-csearch_path%3D{schema}"
    try:
        yield url, url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def noop_rate(url: str, concurrency: int, seconds: float = 3.0) -> dict[str, float]:
    """The same server's rate on GET /healthz (no database, no crypto), with the same client threads:
    the baseline each intake rate is read against on this shared, noisy machine."""
    count, lock, deadline = [0], threading.Lock(), time.monotonic() + seconds

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            while time.monotonic() < deadline:
                client.get("/healthz")
                with lock:
                    count[0] += 1

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"healthz_per_s": round(count[0] / (time.perf_counter() - t0), 1)}


def one_database(
    kind: str, home: Path, fleet: Fleet, args: argparse.Namespace, workers: int = 1
) -> dict[str, Any]:
    with database(kind, home, args.pg_url) as (serve_url, read_url):
        server = Server(home, serve_url, workers=workers)
        log(f"{kind}: poi serve ({workers} API process(es)) up in {server.start():.1f} s at {server.url}")
        try:
            corpus = build_corpus(server, fleet, args.n, audit_p=args.audit_p)
            log(f"{kind}: corpus of {len(corpus.entries)} built in {corpus.build_s:.1f} s")
            warm, measured = corpus.entries[: args.warmup], corpus.entries[args.warmup :]
            measured = measured[: args.requests]
            warmup = hand_in(server.url, warm, 1, args.max_seconds)  # first requests load L1's classifier
            log(
                f"{kind}: {len(warm)} warm-up submissions; "
                f"load: {len(measured)} with {args.concurrency} workers"
            )
            baseline = noop_rate(server.url, args.concurrency)
            alone, mixed = (
                (measured[: len(measured) // 2], measured[len(measured) // 2 :])
                if args.mixed
                else (measured, [])
            )
            run = hand_in(server.url, alone, args.concurrency, args.max_seconds)
            stats = run.measured()
            if mixed:  # the rest handed in while agents bid and other nodes pull (bench/service/mixed.py)
                mix = Mix(server, fleet, corpus.stake_micro)
                mix.start()
                both = hand_in(server.url, mixed, args.concurrency, args.max_seconds)
                mix.finish()
                stats["mixed"] = {"intake": both.measured(), **mix.measured(both.wall_s, read_url)}
                run.answers += both.answers
                run.errors += both.errors
                log(
                    f"{kind}: mixed: intake {stats['mixed']['intake']['intake_per_s']}/s, bids "
                    f"{stats['mixed']['bids']['per_s']}/s, pulls {stats['mixed']['pulls']['per_s']}/s"
                )
            stats |= baseline | {
                "api_workers": workers,
                "intake_over_healthz": round(stats["intake_per_s"] / baseline["healthz_per_s"], 4),
            }
            log(
                f"{kind}: {stats['requests']} in {stats['wall_s']} s = {stats['intake_per_s']}/s, "
                f"p50 {stats['p50_ms']} ms, p99 {stats['p99_ms']} ms"
            )
            answers = warmup.answers + run.answers
            submitted = {a.lease_id for a in answers} | {e.split(":")[0] for e in run.errors + warmup.errors}
            problems = verify(server, read_url, answers, submitted)
            problems += stats.get("mixed", {}).get("mix_problems", [])
            verdicts = Counter(a.body.get("verdict") for a in answers if isinstance(a.body, dict))
            drawn = sum(1 for a in answers if isinstance(a.body, dict) and a.body.get("audit_drawn"))
            log(f"{kind}: verdicts {dict(verdicts)}; audits drawn {drawn}; problems {problems or 'none'}")
        finally:
            server.stop()
    return {
        **stats,
        "warmup_requests": len(warm),
        "corpus": corpus.describe(),
        "verdicts": dict(verdicts),
        "not_affirming_because": failing_layers(answers),
        "audits_drawn": drawn,
        "problems": problems,
        "exactly_once_and_ledger_ok": not problems,
    }


def merge(results: dict[str, dict[str, Any]], args: argparse.Namespace, command: str) -> None:
    """Per-database figures go under their database's key; the other database's stay as they were."""
    per_db = {
        "intake_per_s": "intake_per_s",
        "intake_p99_ms": "p99_ms",
        "intake_p50_ms": "p50_ms",
        "intake_requests": "requests",
    }
    update: dict[str, Any] = {key: {db: r[f] for db, r in results.items()} for key, f in per_db.items()}
    update |= {
        "intake_concurrency": args.concurrency,
        "load_command": command,
        "load_notes": NOTES.format(audit_p=args.audit_p, warmup=args.warmup),
        "load_details": results,
    }
    write_results("service.json", update, writes=WRITES, path=args.out, deep=(*per_db, "load_details"))


NOTES = (
    "Hot path per request: DSSE envelope opened (Ed25519), L0 + L1 + L2 on the node's signed evidence, "
    "the audit lottery, and one write transaction (receipt, verdict, energy settlement, stake move, lease "
    "status). Policy (PUT /v1/admin/policy): every lease tier medium (medium_from_value 0), audit "
    "probability ~{audit_p} from the stake; drawn L4 audits are queued and run by the server's audit worker "
    "during the load. Real receipts from honest resident gpt2-micro agents (generate, 4 tokens, batch 4). "
    "Machine: 2 CPU cores; the load generator (threads, one httpx.Client each), the server (one uvicorn "
    "process, or `poi serve --workers N` where the key says so) and PostgreSQL share them, on loopback. "
    "healthz_per_s: the same server's GET /healthz rate with the same client threads, just before "
    "the intake load (the baseline on this shared machine). Latency is measured at the client per request; "
    "{warmup} sequential warm-up submissions before the clock are not counted (they are in the "
    "exactly-once check). One submission per lease."
)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="corpus size per database (leases)")
    parser.add_argument("--requests", type=int, default=10**9, help="at most this many measured requests")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="stop handing in after this long")
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads")
    parser.add_argument("--warmup", type=int, default=20, help="sequential submissions before the clock")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument("--audit-p", type=float, default=0.01, help="target audit probability per lease")
    parser.add_argument("--db", default="sqlite,postgresql", help="comma-separated: sqlite, postgresql")
    parser.add_argument(
        "--pg-workers", type=int, default=2, help="also serve PostgreSQL by this many API processes (1: not)"
    )
    parser.add_argument(
        "--mixed",
        action="store_true",
        help="hand half the corpus in alone, the other half while agents bid and other nodes pull",
    )
    parser.add_argument("--pg-url", default=PG_URL)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file to merge into")
    parser.add_argument("--no-write", action="store_true", help="print, do not merge into service.json")
    args = parser.parse_args()
    command = "python -m bench.service.load " + " ".join(sys.argv[1:])
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="poi-load-") as tmp, poi_home(Path(tmp)) as home:
        ensure_profile()
        with Fleet(home, agents=args.agents, nodes=math.ceil(args.n / MAX_PULL)) as fleet:
            for kind in args.db.split(","):
                results[kind] = one_database(kind, home, fleet, args)
                if kind == "postgresql" and args.pg_workers > 1:
                    several = one_database(kind, home, fleet, args, workers=args.pg_workers)
                    several["rate_over_one_process"] = round(
                        several["intake_per_s"] / results[kind]["intake_per_s"], 3
                    )
                    results[f"{kind}_{args.pg_workers}_workers"] = several
    for kind, r in results.items():
        print(
            f"{kind}: {r['intake_per_s']}/s p50 {r['p50_ms']} ms p99 {r['p99_ms']} ms; "
            f"problems {r['problems']}"
        )
    if not args.no_write:
        merge(results, args, command)
        log(f"merged into {args.out}")
    if any(r["problems"] for r in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
