"""Crash test of the control plane: SIGKILL `poi serve` mid-traffic, restart it, re-send everything, and
prove the money and the verdicts came through exactly once.

    make bench-service-crash
    python -m bench.service.crash --runs 3 --n 40       # a small run

Once: a corpus of served-but-not-handed-in leases (bench/service/corpus.py) in a template POI_HOME,
whose server is then stopped cleanly. Each run works on its own copy of that home (database,
profile, keys): it starts the server, hands the corpus in from four threads while another places
bids, pulls leases and deposits (money moves by holds, escrows, settlements, stake moves and L4
audits), SIGKILLs the server once a random share of the corpus is answered plus a random delay,
restarts it on the same database, re-sends every receipt, bid and deposit (the node's and the
agents' retries, safe because each is idempotent), lets the queued audits finish, and checks:

- the ledger's own check (GET /v1/admin/ledger): balances equal the sum of entries, transfers sum to 0;
- every receipt row has exactly one verdict row and every verdict a receipt (cp_receipts, cp_verdicts);
- no transfer idempotency key twice; one energy hold per lease, one stake escrow per staked lease;
- energy settlements == receipts taken in (plus expired leases), each charging the verdict's amount;
- each staked lease's stake released or slashed at most once, as its verdict says, only when final;
- every corpus receipt answered as accepted (not a duplicate) exactly once across both server lives —
  except one whose answer died with the server, which must then be in the database and be answered
  as a duplicate after the restart.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, func, select

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.common.results import write_results
from bench.service.corpus import (
    MODEL,
    RESULTS,
    Corpus,
    Fleet,
    Server,
    build_corpus,
    ensure_profile,
    log,
    poi_home,
)
from maxwell_poi.ledger import check_ledger
from maxwell_poi.ledger.book import ENERGY
from maxwell_poi.ledger.schema import Account, Entry, Transfer
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.client import ServiceRefused
from maxwell_poi.service.schema import LeaseRow, ReceiptRow, VerdictRow

WRITES = {
    "service.json": [
        "crash_runs",
        "crash_invariant_violations",
        "crash_details",
        "crash_corpus",
        "crash_command",
        "crash_seed",
        "crash_multi_process",
    ]
}  # bench/common/results.py

SENDERS = 4  # threads handing receipts in: up to this many requests in flight when the server dies
STAKE_KINDS = {"released": "stake_release", "slashed": "stake_slash"}

# -- the invariants -----------------------------------------------------------------------------------


def check_database(engine: Engine) -> list[str]:
    """Every invariant the database alone can prove; one line per violation."""
    problems = [f"ledger: {p}" for p in check_ledger(engine).problems]
    with engine.connect() as conn:
        receipts = set(conn.scalars(select(ReceiptRow.lease_id)))
        verdicts = {v.lease_id: v for v in conn.execute(select(VerdictRow))}
        leases = {r.lease_id: r for r in conn.execute(select(LeaseRow))}
        repeated = conn.execute(
            select(Transfer.idempotency_key, func.count())
            .group_by(Transfer.idempotency_key)
            .having(func.count() > 1)
        ).all()
        transfers: dict[str, list[tuple[str, str]]] = defaultdict(list)  # lease -> [(kind, key)]
        for kind, key, lease_id in conn.execute(
            select(Transfer.kind, Transfer.idempotency_key, Transfer.lease_id)
        ):
            if lease_id:
                transfers[lease_id].append((kind, key))
        charged = dict(
            conn.execute(
                select(Transfer.lease_id, Entry.amount_micro)
                .join(Entry, Entry.transfer_id == Transfer.id)
                .join(Account, Account.id == Entry.account_id)
                .where(Transfer.kind == "energy_debit", Account.name == ENERGY)
            ).all()
        )
    problems += [f"receipt {lid} without a verdict row" for lid in sorted(receipts - set(verdicts))]
    problems += [f"verdict {lid} without a receipt row" for lid in sorted(set(verdicts) - receipts)]
    problems += [f"transfer key {key!r} {n} times" for key, n in repeated]
    expired = {lid for lid, r in leases.items() if r.status == "expired"}
    settled = {lid for lid, kinds in transfers.items() if any(k == "energy_debit" for k, _ in kinds)}
    if settled != receipts | expired:
        problems.append(
            f"energy settlements: expected {len(receipts)} receipts + {len(expired)} expired leases, got "
            f"{len(settled)} ({len(settled - receipts - expired)} without a receipt, "
            f"{len(receipts - settled)} receipts unsettled)"
        )
    for lid, row in leases.items():
        problems += _lease_problems(lid, row, transfers.get(lid, []), verdicts.get(lid), lid in receipts)
        if lid in verdicts and charged.get(lid, 0) != verdicts[lid].charge_micro:
            problems.append(
                f"lease {lid}: expected an energy charge of {verdicts[lid].charge_micro} (its verdict), "
                f"got {charged.get(lid, 0)}"
            )
    return problems


def _lease_problems(
    lid: str, row: Any, kinds: list[tuple[str, str]], verdict: Any, received: bool
) -> list[str]:
    count = Counter(k for k, _ in kinds)
    out = []
    if count["energy_hold"] != 1:
        out.append(f"lease {lid}: expected one energy hold, got {count['energy_hold']}")
    if count["stake_escrow"] != (1 if row.stake_micro > 0 else 0):
        out.append(
            f"lease {lid}: expected {int(row.stake_micro > 0)} stake escrow, got {count['stake_escrow']}"
        )
    moved = count["stake_release"] + count["stake_slash"]
    want = STAKE_KINDS.get(verdict.stake_outcome) if verdict is not None else None
    if moved > 1 or (want is None and moved) or (want is not None and count[want] != 1):
        out.append(
            f"lease {lid}: expected its stake {verdict.stake_outcome if verdict else 'escrowed'}, "
            f"got {count['stake_release']} releases, {count['stake_slash']} slashes"
        )
    expect = {"settled", "audit_pending"} if received else {"pulled", "issued", "expired"}
    if row.status not in expect or (verdict is not None and verdict.final != (row.status == "settled")):
        final = verdict.final if verdict is not None else None
        out.append(f"lease {lid}: status {row.status!r} with receipt={received}, verdict final={final}")
    return out


@dataclass
class Attempt:
    life: int
    status: int | None  # None: a transport error (the server died under it)
    body: Any = None


def check_answers(corpus: list[str], attempts: dict[str, list[Attempt]], received: set[str]) -> list[str]:
    """Each corpus lease accepted (not duplicate) exactly once across both lives; an answer lost with
    the server is allowed only if the receipt is in the database and the retry says duplicate."""
    problems = []
    for lid in corpus:
        tries = attempts.get(lid, [])
        ok = [a for a in tries if a.status == 200]
        fresh = [a for a in ok if not a.body.get("duplicate")]
        lost = [a for a in tries if a.status is None and a.life == 1]
        last = tries[-1] if tries else None
        if len(fresh) > 1:
            problems.append(f"lease {lid}: accepted as new {len(fresh)} times")
        if not fresh and not (lost and lid in received and ok):
            problems.append(f"lease {lid}: never accepted as new, and no answer was lost in the crash")
        if last is None or last.life != 2 or last.status != 200:
            problems.append(f"lease {lid}: expected a 200 after the restart, got {last}")
        money = {(a.body.get("energy_j"), a.body.get("charge_micro")) for a in ok}
        if len(money) > 1:
            problems.append(f"lease {lid}: answers disagree on energy and charge: {sorted(money)}")
    return problems


# -- one run ------------------------------------------------------------------------------------------


@dataclass
class Traffic:
    """What the clients sent in one run and what came back, per life of the server."""

    attempts: dict[str, list[Attempt]] = field(default_factory=lambda: defaultdict(list))
    market: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (op, args) to re-send
    market_errors: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def answered(self) -> int:
        with self.lock:
            return sum(1 for tries in self.attempts.values() for a in tries if a.status is not None)


def hand_in(url: str, entries: list[Any], life: int, traffic: Traffic, stop: threading.Event) -> None:
    """The node's intake calls; on a transport error the server is gone: note it and stop."""
    with httpx.Client(base_url=url, timeout=30) as client:
        for e in entries:
            if stop.is_set():
                return
            try:
                r = client.post(
                    "/v1/node/intake", content=e.body(), headers={"content-type": "application/json"}
                )
                attempt = Attempt(life, r.status_code, r.json())
            except httpx.HTTPError:
                attempt = Attempt(life, None)
            with traffic.lock:
                traffic.attempts[e.lease_id].append(attempt)
            if attempt.status is None:
                return


def market(
    server: Server, fleet: Fleet, run: int, stake: int, traffic: Traffic, stop: threading.Event
) -> None:
    """Bids, pulls and deposits while receipts come in: more paths that move money."""
    agents = list(fleet.agent_keys)
    clients = {a: fleet.agent_client(server, a) for a in agents}
    node = fleet.node_client(server, next(iter(fleet.node_keys)))
    admin = server.admin()
    try:
        for k in range(10**6):
            if stop.is_set():
                return
            agent = agents[k % len(agents)]
            bid = {
                "bid_id": f"crash-{run}-{k}",
                "model_id": MODEL,
                "job": {"kind": "generate", "prompt": PROMPTS[k % len(PROMPTS)], "max_new_tokens": 4},
                "price_micro_per_j": 100,
                "stake_micro": stake,
            }
            ops = [("bid", {"agent": agent, "bid": bid})]
            if k % 3 == 2:
                ops.append(("pull", {}))
            if k % 5 == 4:
                ops.append(("deposit", {"agent": agent, "micro": 1000 + k, "key": f"crash-{run}-{k}"}))
            for op, args in ops:
                with traffic.lock:
                    traffic.market.append((op, args))
                try:
                    market_call(op, args, clients, node, admin)
                except httpx.HTTPError:
                    traffic.market_errors += 1
                    return
            time.sleep(0.01)
    finally:
        for c in [*clients.values(), node, admin]:
            c.close()


def market_call(op: str, args: dict[str, Any], clients: dict[str, Any], node: Any, admin: Any) -> None:
    if op == "bid":
        clients[args["agent"]].bid(args["bid"])
    elif op == "pull":
        node.pull(1e6, list(clients), max_leases=1024)
    else:
        admin.deposit(args["agent"], args["micro"], args["key"])


def resend_market(server: Server, fleet: Fleet, traffic: Traffic) -> None:
    """The agents' and Maxwell's retries after the restart: the same bid ids and deposit keys."""
    clients = {a: fleet.agent_client(server, a) for a in fleet.agent_keys}
    node = fleet.node_client(server, next(iter(fleet.node_keys)))
    admin = server.admin()
    try:
        for op, args in traffic.market:
            if op != "pull":
                market_call(op, args, clients, node, admin)
        market_call("pull", {}, clients, node, admin)
    finally:
        for c in [*clients.values(), node, admin]:
            c.close()


def drain_audits(engine: Engine, timeout_s: float) -> int:
    """Wait for the restarted server's audit workers; how many leases are still audit_pending."""
    deadline = time.monotonic() + timeout_s
    while True:
        with engine.connect() as conn:
            pending = conn.scalar(
                select(func.count()).select_from(LeaseRow).where(LeaseRow.status == "audit_pending")
            )
        if not pending or time.monotonic() > deadline:
            return pending or 0
        time.sleep(0.2)


def crash_run(
    run: int,
    template: Path,
    corpus: Corpus,
    workdir: Path,
    rng: random.Random,
    senders: int = SENDERS,
    workers: int = 1,
) -> dict[str, Any]:
    home = workdir / f"run-{run}"
    shutil.copytree(template, home, ignore=shutil.ignore_patterns("server-*.log"))
    entries = list(corpus.entries)
    rng.shuffle(entries)
    with poi_home(home):
        server = Server(home, str(home / "ledger.sqlite"), workers=workers)
        try:
            return {
                "run": run,
                "corpus": len(entries),
                **two_lives(server, corpus, entries, run, rng, senders),
            }
        finally:
            server.kill()  # a run that failed half-way leaves no server behind


def two_lives(
    server: Server, corpus: Corpus, entries: list[Any], run: int, rng: random.Random, senders: int
) -> dict[str, Any]:
    fleet = Fleet(server.home, agents=corpus_agents(corpus))  # the template's keys; no agent runs
    traffic, stop = Traffic(), threading.Event()
    server.start()
    # -- life 1: receipts from `senders` threads, the market from one more; killed at a random point
    shares = [entries[i::senders] for i in range(senders)]
    threads = [threading.Thread(target=hand_in, args=(server.url, h, 1, traffic, stop)) for h in shares]
    threads.append(
        threading.Thread(target=market, args=(server, fleet, run, corpus.stake_micro, traffic, stop))
    )
    target = rng.randint(max(1, len(entries) // 10), max(1, len(entries) * 9 // 10))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    while traffic.answered() < target and any(t.is_alive() for t in threads[:senders]):
        time.sleep(0.002)
    time.sleep(rng.uniform(0.0, 0.05))
    server.kill()
    killed_at, answered_before = time.monotonic() - t0, traffic.answered()
    for t in threads:
        t.join()
    stop.set()
    # -- life 2: the same database; every receipt, bid and deposit again
    server.start()
    pending_at_start = audits_pending_at_start(server)
    hand_in(server.url, entries, 2, traffic, threading.Event())
    resend_market(server, fleet, traffic)
    engine = create_engine(server.db if "://" in server.db else f"sqlite:///{server.db}")
    try:
        still_pending = drain_audits(engine, timeout_s=180)
        with server.admin() as admin:
            api_check = admin.ledger().check
        server.stop()
        with engine.connect() as conn:
            received = set(conn.scalars(select(ReceiptRow.lease_id)))
        violations = check_database(engine)
    finally:
        engine.dispose()
    violations += check_answers([e.lease_id for e in entries], traffic.attempts, received)
    if not api_check.ok:
        violations.append(f"GET /v1/admin/ledger: {api_check.problems[:5]}")
    if still_pending:
        violations.append(f"{still_pending} audits still pending 180 s after the restart")
    lost = [lid for lid, tries in traffic.attempts.items() if any(a.status is None for a in tries)]
    fresh = {lid for lid, tries in traffic.attempts.items() if any(_fresh(a) for a in tries)}
    return {
        "kill_after_s": round(killed_at, 3),
        "answered_before_kill": answered_before,
        "in_flight_at_kill": len(lost),
        "committed_but_unanswered": len(set(lost) - fresh),  # in the database; only the answer died
        "market_ops_life1": len(traffic.market),
        "audits_pending_at_restart": pending_at_start,
        "receipts": len(received),
        "ledger_check_ok": api_check.ok,
        "violations": violations,
    }


def _fresh(a: Attempt) -> bool:
    return a.status == 200 and not a.body.get("duplicate")


def corpus_agents(corpus: Corpus) -> int:
    return len({e.agent_id for e in corpus.entries})


def audits_pending_at_start(server: Server) -> int | None:
    """`poi serve` prints how many audits it re-queued from before; read it from its log."""
    text = server.log_path().read_text()
    start = text.find("{")
    try:
        return json.loads(text[start : text.index("\n}", start) + 2])["audits_pending_from_before"]
    except (ValueError, KeyError):
        return None


def build_template(home: Path, n: int, agents: int, audit_p: float) -> Corpus:
    with poi_home(home):
        ensure_profile()
        server = Server(home, str(home / "ledger.sqlite"))
        server.start()
        try:
            with Fleet(home, agents=agents) as fleet:
                corpus = build_corpus(server, fleet, n, audit_p=audit_p)
        finally:
            server.stop()
    return corpus


def crash_suite(
    workdir: Path,
    runs: int,
    n: int,
    agents: int,
    audit_p: float,
    seed: int,
    senders: int = SENDERS,
    workers: int = 1,
) -> dict[str, Any]:
    template = workdir / "template"
    corpus = build_template(template, n, agents, audit_p)
    log(f"template corpus: {corpus.describe()}")
    rng = random.Random(seed)
    details = []
    for run in range(runs):
        try:
            detail = crash_run(run, template, corpus, workdir, rng, senders, workers)
        except (RuntimeError, ServiceRefused, httpx.HTTPError) as exc:  # a run that could not finish
            detail = {"run": run, "violations": [f"run failed: {type(exc).__name__}: {exc}"]}
        details.append(detail)
        log(
            f"run {run}: killed after {detail.get('kill_after_s')} s, "
            f"{detail.get('answered_before_kill')} answered, {detail.get('in_flight_at_kill')} in flight; "
            f"violations {detail['violations'] or 'none'}"
        )
    return {
        "crash_runs": runs,
        "crash_invariant_violations": sum(len(d["violations"]) for d in details),
        "crash_details": details,
        "crash_corpus": corpus.describe(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--n", type=int, default=120, help="corpus size (leases handed in per run)")
    parser.add_argument("--agents", type=int, default=2)
    parser.add_argument(
        "--audit-p", type=float, default=0.2, help="audit probability: audits cross the crash"
    )
    parser.add_argument("--senders", type=int, default=SENDERS, help="threads handing receipts in")
    parser.add_argument("--seed", type=int, default=None, help="kill points (default: random)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results file to merge into")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="API processes (`poi serve --workers`); >1: crash_multi_process",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    with tempfile.TemporaryDirectory(prefix="poi-crash-") as tmp:
        result = crash_suite(
            Path(tmp), args.runs, args.n, args.agents, args.audit_p, seed, args.senders, args.workers
        )
    result["crash_command"] = "python -m bench.service.crash " + " ".join(sys.argv[1:])
    result["crash_seed"] = seed
    print(json.dumps({k: v for k, v in result.items() if k != "crash_details"}, indent=2))
    if not args.no_write:
        several = {"crash_multi_process": {**result, "api_workers": args.workers}}
        write_results("service.json", several if args.workers > 1 else result, writes=WRITES, path=args.out)
        log(f"merged into {args.out}")
    if result["crash_invariant_violations"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
