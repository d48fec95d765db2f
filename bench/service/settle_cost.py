"""What one lease's settlement costs the database path: the general postings against `ledger.settle`.

    python -m bench.service.settle_cost --n 400            # SQLite file, and PostgreSQL when reachable

Both paths settle the same kind of lease in the same run, alternating lease by lease (ABAB…) so that
a neighbour's load falls on both alike: an energy hold and a stake escrowed as issuing the lease does,
then the measured energy charged and the stake released, in one write transaction. The general path
is what intake ran before issue 25 (`Ledger.settle_energy`, then `release_stake`); the fast path is
`Ledger.settle_lease`. Per path: SQL statements per settlement (counted by a SQLAlchemy cursor event:
a property of the code, not of the host), this thread's CPU milliseconds and wall milliseconds
(medians over the leases), and the ratio general / fast in this run. The ledger check runs at the end.
Writes bench/results/service.json `settlement_cost`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.exc import OperationalError

from bench.common.results import write_results
from bench.service.load import PG_URL, database
from maxwell_poi.ledger import Ledger, check_ledger, open_ledger_db

WRITES = {"service.json": ["settlement_cost"]}
HOLD, STAKE, JOULES, PRICE = 50_000, 20_000, 1.234, 1_000


def _general(ledger: Ledger, lease: str) -> None:
    with ledger.session() as session, session.begin():
        ledger.settle_energy("alice", lease, JOULES, PRICE, session=session)
        ledger.release_stake("alice", lease, session=session)


def _fast(ledger: Ledger, lease: str) -> None:
    with ledger.session() as session, session.begin():
        ledger.settle_lease("alice", lease, (HOLD, STAKE), JOULES, PRICE, "release", session=session)


def measure(engine: Engine, n: int) -> dict[str, Any]:
    ledger = Ledger(engine)
    ledger.deposit("alice", (HOLD + STAKE) * (2 * n + 10), "dep:alice")
    statements = [0]

    def count(*_args: Any, **_kwargs: Any) -> None:
        statements[0] += 1

    event.listen(engine, "before_cursor_execute", count)
    paths: dict[str, Callable[[Ledger, str], None]] = {"general": _general, "fast": _fast}
    seen = {p: {"cpu_ms": [], "wall_ms": [], "statements": []} for p in paths}
    for i in range(2 * n):
        name = "general" if i % 2 == 0 else "fast"
        lease = f"L{i}"
        with ledger.session() as session, session.begin():  # issued as issue_lease does
            ledger.hold_energy("alice", lease, HOLD, session=session)
            ledger.escrow_stake("alice", lease, STAKE, session=session)
        before, cpu, wall = statements[0], time.thread_time(), time.perf_counter()
        paths[name](ledger, lease)
        seen[name]["cpu_ms"].append((time.thread_time() - cpu) * 1e3)
        seen[name]["wall_ms"].append((time.perf_counter() - wall) * 1e3)
        seen[name]["statements"].append(statements[0] - before)
    check = check_ledger(engine)
    out: dict[str, Any] = {"leases_per_path": n, "ledger_check_ok": check.ok}
    for name, figures in seen.items():
        out[name] = {
            "statements": statistics.median(figures["statements"]),
            "cpu_ms_p50": round(statistics.median(figures["cpu_ms"]), 3),
            "wall_ms_p50": round(statistics.median(figures["wall_ms"]), 3),
        }
    for figure in ("cpu_ms_p50", "wall_ms_p50", "statements"):
        out[f"general_over_fast_{figure.removesuffix('_p50')}"] = round(
            out["general"][figure] / out["fast"][figure], 2
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400, help="leases settled per path and database")
    args = parser.parse_args()
    results: dict[str, Any] = {"command": f"python -m bench.service.settle_cost --n {args.n}"}
    with tempfile.TemporaryDirectory() as tmp:
        engine = open_ledger_db(str(Path(tmp) / "ledger.sqlite"))
        results["sqlite"] = measure(engine, args.n)
        engine.dispose()
    try:  # a fresh schema of the test database, dropped after (the load bench's helper)
        with database("postgresql", Path(tempfile.gettempdir()), PG_URL) as (url, _):
            engine = open_ledger_db(url)
            try:
                results["postgresql"] = measure(engine, args.n)
            finally:
                engine.dispose()
    except OperationalError as exc:  # no server: named in the results, not a failure of the bench
        results["postgresql"] = {"skipped": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    print(results)
    write_results("service.json", {"settlement_cost": results}, writes=WRITES)


if __name__ == "__main__":
    main()
