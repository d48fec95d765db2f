"""Whole-system honest error rates (issue 23, item 5): honest leases through a real `poi serve
--local-node` subprocess (control plane + one node running resident agents in measured sandboxes,
batching on), bid by a fleet of honest agents from their own threads with the real signed client,
with a CPU-hogging neighbour process for a third of the leases.

    python -m bench.service.system [--leases 3000]      # make bench-system; --leases 200 for a smoke run

Setup, in a temporary POI_HOME on SQLite (nothing is downloaded: HF_HUB_OFFLINE=1): `poi profile MODEL
--resident` once per model (as an operator would, its defaults), then `poi serve --local-node --batch B`
(bench/service/corpus.Server), every lease at tier medium (L0 + L1 + L2 inline, then the L4 audit
lottery; the stake sets the audit probability, corpus.stake_for). `--bidders` honest agents (`poi agent
--resident --max-batch B`), spread over the models, each keep at most `--window` bids or unsettled leases
open (the control plane's own cap is max_open_bids). Jobs: `--tokens` new tokens, greedy and sampled in
turn, numbered prompts from the registry (no cache hits). The leases are split in blocks of `--block`
by bid order, cycling no neighbour, one busy-looping process (bench/node/contention.neighbours), no
neighbour — a third of them with the hog, spread over the run so the host's drift (other work on a
shared machine) falls on both conditions; at each switch the bidders stop until every lease bid before
it has run (its verdict is in), so each lease ran wholly under one condition. `--max-minutes` stops the
bidding (what ran is reported).

A lease counts when its verdict is final (audit done if drawn). Rejected = verdict contraindicated,
warned = verdict warning; the exact one-sided 95 % Clopper-Pearson upper bound on the reject rate is
bench/common/stats.upper95. The contention each lease saw is the node's own reading, signed into its
evidence and shown in L1/L2's details (observer/contention.py). After the run: each bid won once, each
lease settled once (receipt and verdict rows, ledger transfers per lease and kind), and the ledger's own
check (GET /v1/admin/ledger).

Writes bench/results/operation.json: system_* keys.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select

from bench.common.results import write_results
from bench.common.stats import upper95
from bench.node.contention import neighbours
from bench.service.corpus import RESERVE, Fleet, Server, log, medium_policy, poi_home, stake_for
from maxwell_poi.ledger.schema import Transfer
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.client import ServiceClient, ServiceRefused
from maxwell_poi.service.schema import BidRow, LeaseRow, ReceiptRow, VerdictRow
from maxwell_poi.service.wire import LeaseView

WRITES = {"operation.json": ["system_*"]}
MODELS = ("gpt2-micro", "gpt2-mini")
PRICE = 100  # micro/J bid: above the reserve, so every bid clears at the reserve
HOG = [sys.executable, "-c", "while True: pass"]  # what neighbours(1) runs
CYCLE = ("hog_off", "hog_on", "hog_off")  # blocks of --block leases, in bid order, cycling
FIELDS = ("wait_s", "others_cores", "steal_cores", "cpu_pressure", "load1", "window_s")
NO_LEASE = ("refused", "expired", "cached")  # bid states that end without a lease run for the bid
CAP = 50  # reasons kept verbatim, each list
POLL_S = 1.0  # each bidder reads its bids and leases this often (two signed GETs)


@dataclass
class LocalNodeServer(Server):
    """`poi serve --local-node --batch B`: the control plane with one node beside it, in one process."""

    batch: int = 4

    def argv(self) -> list[str]:
        return [*super().argv(), "--local-node", "--batch", str(self.batch)]


@dataclass
class Lease:
    """One honest lease as its bidder saw it."""

    index: int  # global bid order
    agent_id: str
    model_id: str
    greedy: bool
    bid_id: str
    condition: str  # hog_off or hog_on: the third its bid index falls in
    lease_id: str | None = None
    bid_status: str = "open"
    bid_reason: str = ""
    view: LeaseView | None = None  # the last view read
    ran_at: float | None = None  # monotonic: when its verdict was first seen

    @property
    def final(self) -> bool:
        v = self.view
        return (
            self.bid_status == "won"
            and v is not None
            and v.verdict is not None
            and v.verdict.final
            and v.status != "audit_pending"
        )

    @property
    def resolved(self) -> bool:
        """Run (a verdict in) or never to run (bid refused, expired or answered from the cache)."""
        return self.ran_at is not None or self.bid_status in NO_LEASE


@dataclass
class Run:
    """What the bidders share: the next bid index, the condition it belongs to, and every lease."""

    total: int
    block: int
    window: int
    allowed: int = 0  # indices below this may be bid now
    issued: int = 0
    leases: list[Lease] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def condition(self, index: int) -> str:
        return CYCLE[(index // self.block) % len(CYCLE)]

    def next_switch(self, index: int) -> int:
        """The first index after `index` bid under another condition (or the total)."""
        j = (index // self.block + 1) * self.block
        while j < self.total and self.condition(j) == self.condition(index):
            j += self.block
        return min(j, self.total)

    def take(self) -> int | None:
        """The next global index, or None (wait for the condition to change, or all bid)."""
        with self.lock:
            if self.issued >= min(self.allowed, self.total):
                return None
            self.issued += 1
            return self.issued - 1

    def counts(self) -> dict[str, int]:
        with self.lock:
            rows = list(self.leases)
        verdicts = Counter(x.view.verdict.verdict for x in rows if x.final and x.view and x.view.verdict)
        return {
            "bid": len(rows),
            "ran": sum(1 for x in rows if x.ran_at is not None),
            "final": sum(1 for x in rows if x.final),
            "resolved": sum(1 for x in rows if x.resolved),
            "rejected": verdicts.get("contraindicated", 0),
            "warned": verdicts.get("warning", 0),
        }


class Bidder(threading.Thread):
    """One honest agent bidding from its own thread with its signed client; at most `window` bids or
    unsettled leases open at once."""

    def __init__(
        self, run: Run, client: ServiceClient, agent_id: str, model_id: str, stake: int, tokens: int
    ) -> None:
        super().__init__(name=f"bidder-{agent_id}", daemon=True)
        self.run_, self.client, self.agent_id, self.model_id = run, client, agent_id, model_id
        self.stake, self.tokens = stake, tokens
        self.mine: list[Lease] = []
        self.bid_cursor = 0  # my bids before this index are all resolved (won, refused, expired)
        self.lease_cursor = 0  # my leases (by issue time) before this are all final

    def open_count(self) -> int:
        return sum(1 for x in self.mine if not x.final and x.bid_status not in NO_LEASE)

    def place(self, index: int) -> None:
        greedy = index % 2 == 0
        job: dict[str, Any] = {
            "kind": "generate",
            # a unique prompt: a greedy job asked again is answered from the control plane's cache
            "prompt": f"Request {index}. {PROMPTS[index % len(PROMPTS)]}",
            "max_new_tokens": self.tokens,
        }
        if greedy:
            job["temperature"] = 0.0
        bid_id = f"sys-{index}"
        lease = Lease(index, self.agent_id, self.model_id, greedy, bid_id, self.run_.condition(index))
        body = {
            "bid_id": bid_id,
            "model_id": self.model_id,
            "job": job,
            "price_micro_per_j": PRICE,
            "stake_micro": self.stake,
        }
        for attempt in range(5):
            try:
                self.client.bid(body)  # resending the same bid is harmless (idempotent by bid_id)
                break
            except ServiceRefused as exc:
                if exc.status != 429 or attempt == 4:
                    raise
                time.sleep(1.0)
        self.mine.append(lease)
        with self.run_.lock:
            self.run_.leases.append(lease)

    def poll(self) -> None:
        pending = [x for x in self.mine[self.bid_cursor :] if x.lease_id is None]
        if pending:
            by_id = {x.bid_id: x for x in self.mine}
            for b in self.client.bids(limit=len(self.mine) - self.bid_cursor + 1, offset=self.bid_cursor):
                x = by_id.get(b.bid_id)
                if x is not None:
                    x.bid_status, x.bid_reason, x.lease_id = b.status, b.reason, b.lease_id
            while self.bid_cursor < len(self.mine) and self.mine[self.bid_cursor].bid_status != "open":
                self.bid_cursor += 1
        waiting = {x.lease_id: x for x in self.mine if x.lease_id and x.bid_status == "won" and not x.final}
        if waiting:
            start = max(0, self.lease_cursor - 16)  # leases issued in one round may share issue times
            views = self.client.leases(limit=len(waiting) + 48, offset=start)
            leading = True
            for i, v in enumerate(views):
                x = waiting.get(v.lease_id)
                if x is not None:
                    x.view = v
                    if v.verdict is not None and x.ran_at is None:
                        x.ran_at = time.monotonic()
                if leading and (x is None or x.final) and v.verdict is not None and v.verdict.final:
                    self.lease_cursor = max(self.lease_cursor, start + i + 1)
                else:
                    leading = False

    def run(self) -> None:
        try:
            while not self.run_.stop.is_set():
                while self.open_count() < self.run_.window:
                    index = self.run_.take()
                    if index is None:
                        break
                    self.place(index)
                if self.run_.issued >= self.run_.total and self.open_count() == 0:
                    return
                time.sleep(POLL_S)
                self.poll()
        except Exception as exc:  # reported, and the run stops: a bidder that dies silently skews it
            with self.run_.lock:
                self.run_.errors.append(f"{self.agent_id}: {type(exc).__name__}: {exc}")
            self.run_.stop.set()


def profile_models(models: list[str]) -> dict[str, float]:
    """`poi profile MODEL --resident` once per model, in this POI_HOME; seconds each took."""
    poi = Path(sys.executable).with_name("poi")
    head = [str(poi)] if poi.exists() else [sys.executable, "-m", "maxwell_poi"]
    took = {}
    for model in models:
        t0 = time.monotonic()
        done = subprocess.run(
            [*head, "profile", model, "--resident", "--json"], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"poi profile {model} --resident: exit {done.returncode}: {done.stderr[-2000:]}"
            )
        took[model] = round(time.monotonic() - t0, 1)
        log(f"poi profile {model} --resident: {took[model]} s")
    return took


def contention_of(view: LeaseView | None) -> dict[str, float]:
    """The contention the node signed into the lease's evidence, as L1/L2 show it in their details."""
    if view is None or view.verdict is None:
        return {}
    for layer in view.verdict.layers:
        got = {k[len("contention_") :]: v for k, v in layer.details.items() if k.startswith("contention_")}
        if got:
            return got
    return {}


def batch_of(view: LeaseView | None) -> int | None:
    if view is None or view.verdict is None:
        return None
    for layer in view.verdict.layers:
        if "batch" in layer.details:
            return int(layer.details["batch"])
    return None


def spread(values: list[float]) -> dict[str, float | int] | None:
    if not values:
        return None
    return {
        "min": round(min(values), 6),
        "median": round(statistics.median(values), 6),
        "max": round(max(values), 6),
        "n": len(values),
    }


def seen(rows: list[Lease]) -> dict[str, Any]:
    by_field: dict[str, list[float]] = {}
    for x in rows:
        for k, v in contention_of(x.view).items():
            by_field.setdefault(k, []).append(float(v))
    return {k: spread(by_field.get(k, [])) for k in FIELDS}


def tally(rows: list[Lease]) -> dict[str, Any]:
    final = [x for x in rows if x.final]
    verdicts = Counter(x.view.verdict.verdict for x in final if x.view and x.view.verdict)
    rejected = verdicts.get("contraindicated", 0)
    return {
        "leases": len(final),
        "rejected": rejected,
        "reject_upper95": round(upper95(rejected, len(final)), 6) if final else None,
        "warned": verdicts.get("warning", 0),
        "affirmed": verdicts.get("affirming", 0),
        "audits_drawn": sum(1 for x in final if x.view and x.view.verdict and x.view.verdict.audit_drawn),
        "greedy": sum(1 for x in final if x.greedy),
    }


def listed(rows: list[Lease], verdict: str) -> list[dict[str, Any]]:
    out = []
    for x in rows:
        v = x.view.verdict if x.view else None
        if v is None or v.verdict != verdict:
            continue
        out.append(
            {
                "lease_id": x.lease_id,
                "agent_id": x.agent_id,
                "model_id": x.model_id,
                "condition": x.condition,
                "greedy": x.greedy,
                "audit_drawn": v.audit_drawn,
                "reason": v.reason,
                "layers": {layer.layer: layer.status for layer in v.layers},
                "not_passed": [
                    {"layer": layer.layer, "status": layer.status, "reason": layer.reason}
                    for layer in v.layers
                    if layer.status not in ("pass", "skip")
                ],
                "contention": contention_of(x.view),
            }
        )
    return out[:CAP]


def exactly_once(server: Server, db_path: Path, rows: list[Lease]) -> dict[str, Any]:
    """Each bid won once, each lease settled once, every money transfer once per lease and kind, and
    the ledger's own check."""
    won = [x.lease_id for x in rows if x.lease_id and x.bid_status == "won"]
    ours = set(won)
    engine = create_engine(f"sqlite:///{db_path}")
    try:
        with engine.connect() as conn:
            statuses = Counter(
                s for (s,) in conn.execute(select(LeaseRow.status).where(LeaseRow.lease_id.in_(ours)))
            )
            receipts = conn.scalar(
                select(func.count()).select_from(ReceiptRow).where(ReceiptRow.lease_id.in_(ours))
            )
            verdicts = conn.scalar(
                select(func.count()).select_from(VerdictRow).where(VerdictRow.lease_id.in_(ours))
            )
            bid_leases = Counter(
                lid
                for (lid,) in conn.execute(
                    select(BidRow.lease_id).where(BidRow.status == "won", BidRow.lease_id.is_not(None))
                )
            )
            bid_states = Counter(s for (s,) in conn.execute(select(BidRow.status)))
            per_kind = Counter(
                (lid, kind)
                for lid, kind in conn.execute(
                    select(Transfer.lease_id, Transfer.kind).where(Transfer.lease_id.in_(ours))
                )
            )
    finally:
        engine.dispose()
    with server.admin() as admin:
        check = admin.ledger().check
    repeated = {f"{k}": n for (_, k), n in per_kind.items() if n != 1}
    kinds = Counter(k for (_, k) in per_kind)
    out = {
        "leases": len(ours),
        "bids_won": len(won),
        "bid_states_in_db": dict(bid_states),
        "lease_statuses": dict(statuses),
        "receipt_rows": receipts,
        "verdict_rows": verdicts,
        "leases_won_by_two_bids": sum(1 for n in bid_leases.values() if n > 1),
        "leases_without_a_bid": len(ours - set(bid_leases)),
        "transfers_by_kind": dict(kinds),
        "transfers_repeated_for_one_lease_and_kind": len(repeated),
        "ledger_check_ok": check.ok,
        "ledger_problems": check.problems[:5],
        "ledger_transfers": check.transfers,
    }
    out["ok"] = bool(
        len(won) == len(ours)
        and statuses.get("settled", 0) == len(ours)
        and receipts == verdicts == len(ours)
        and out["leases_won_by_two_bids"] == 0
        and out["leases_without_a_bid"] == 0
        and not repeated
        and check.ok
    )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--leases", type=int, default=3000, help="honest leases (>= 2,995 bound 0 of n at 0.1 %%)"
    )
    ap.add_argument("--bidders", type=int, default=8, help="honest agents, each bidding from its own thread")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated; bidders spread over them")
    ap.add_argument("--batch", type=int, default=4, help="poi serve --batch and poi agent --max-batch")
    ap.add_argument(
        "--block", type=int, default=125, help="leases per block; blocks cycle hog off, on, off (a third on)"
    )
    ap.add_argument("--window", type=int, default=8, help="open bids or unsettled leases per bidder")
    ap.add_argument("--tokens", type=int, default=8, help="new tokens per lease")
    ap.add_argument("--audit-p", type=float, default=0.1, help="target L4 audit probability (sets the stake)")
    ap.add_argument("--max-minutes", type=float, default=60.0, help="stop bidding after this long")
    ap.add_argument(
        "--out", type=Path, default=None, help="results file (default bench/results/operation.json)"
    )
    ap.add_argument(
        "--omp-threads",
        type=int,
        default=1,
        help="OMP_NUM_THREADS for the profile, the server and its agents, as bench.node.contention and "
        "the service tests set it (idle OpenMP threads spin and inflate CPU-s); 0 leaves it unset",
    )
    ap.add_argument("--home", type=Path, default=None, help="POI_HOME to keep (default: a temporary one)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write operation.json")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill stops the server and its agents too
    models = [m for m in args.models.split(",") if m]
    os.environ["HF_HUB_OFFLINE"] = "1"  # every child inherits it: a model or tokenizer not here fails
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    if args.omp_threads:
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)
    t_start = time.monotonic()
    with contextlib.ExitStack() as keep:
        tmp = args.home or Path(keep.enter_context(tempfile.TemporaryDirectory(prefix="poi-system-")))
        home = keep.enter_context(poi_home(tmp))
        profile_s = profile_models(models)
        db = home / "ledger.sqlite"
        server = LocalNodeServer(
            home,
            str(db),
            batch=args.batch,
            # corpus.Server raises these for its bulk corpus; the system runs at poi serve's defaults
            env={
                "POI_SERVE_LEASE_TTL_S": "600",
                "POI_SERVE_MAX_LEASES_PER_PULL": "64",
                "POI_SERVE_MAX_OPEN_BIDS": "256",
            },
        )
        fleet = Fleet(home, agents=args.bidders + 1, nodes=0, batch=args.batch)  # the last: price probe
        log(f"poi serve --local-node --batch {args.batch} up in {server.start():.1f} s at {server.url}")
        hog = contextlib.ExitStack()
        try:
            out = drive(server, fleet, models, args, hog)
        finally:
            hog.close()
            server.stop()
            log_tail = server.log_path().read_text()[-4000:] if server.log_path().exists() else ""
        out["system_profile_s"] = profile_s
        out["system_wall_s"] = round(time.monotonic() - t_start, 1)
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, list)}, indent=1, default=str))
    problems = out["system_exactly_once"].get("ok") is not True or out["system_bidder_errors"]
    if problems:
        print(f"server log tail:\n{log_tail}", file=sys.stderr)
    if not args.no_write:
        write_results("operation.json", out, writes=WRITES, path=args.out)
        log(f"wrote {args.out or 'bench/results/operation.json'}")


def drive(
    server: Server, fleet: Fleet, models: list[str], args: argparse.Namespace, hog: contextlib.ExitStack
) -> dict[str, Any]:
    admin = server.admin()
    policy = admin.set_policy(**medium_policy())
    fleet.enroll(server)
    agents = list(fleet.agent_keys)
    bidders, probe = agents[:-1], agents[-1]
    fleet.fund(server, 10**15)
    probe_client = fleet.agent_client(server, probe)
    stakes, expected = {}, {}
    for model in models:  # a bid below the reserve says what a lease is expected to cost; it never wins
        job = {"kind": "generate", "prompt": PROMPTS[0], "max_new_tokens": args.tokens}
        view = probe_client.bid(
            {
                "bid_id": f"probe-{model}",
                "model_id": model,
                "job": job,
                "price_micro_per_j": 1,
                "stake_micro": 0,
            }
        )
        expected[model] = float(view.expected_j)
        stakes[model] = stake_for(args.audit_p, expected[model])
        log(f"{model}: expected {expected[model]:.4f} J a lease, stake {stakes[model]} (p {args.audit_p})")
    n = args.leases
    run = Run(total=n, block=args.block, window=args.window)
    run.allowed = run.next_switch(0)
    threads = [
        Bidder(
            run,
            fleet.agent_client(server, a),
            a,
            models[i % len(models)],
            stakes[models[i % len(models)]],
            args.tokens,
        )
        for i, a in enumerate(bidders)
    ]
    switches: list[dict[str, Any]] = []
    t0 = time.monotonic()
    deadline = t0 + args.max_minutes * 60
    for t in threads:
        t.start()
    last_print = 0.0
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        c = run.counts()
        now = time.monotonic()
        edge = run.allowed
        if edge < run.total and c["resolved"] >= edge and run.issued >= edge:  # all before it have run
            if run.condition(edge) == "hog_on":
                hog.enter_context(neighbours(1))
            else:
                hog.close()
            switches.append({"after_leases": edge, "to": run.condition(edge), "at_s": round(now - t0, 1)})
            log(f"{run.condition(edge)} from lease {edge}")
            with run.lock:
                run.allowed = run.next_switch(edge)
        if now - last_print >= 10:
            last_print = now
            rate = c["ran"] / (now - t0)
            log(
                f"{c['ran']}/{n} run, {c['final']} final ({rate:.2f}/s), rejected {c['rejected']}, "
                f"warned {c['warned']}, {run.condition(max(0, run.issued - 1))}; bid {c['bid']}"
            )
        if now > deadline and not run.stop.is_set():
            log(f"--max-minutes {args.max_minutes} passed: no more bids")
            with run.lock:
                run.total = run.issued
                run.allowed = run.issued
    hog.close()
    drive_s = time.monotonic() - t0
    rows = sorted(run.leases, key=lambda x: x.index)
    log(f"all {len(rows)} leases resolved in {drive_s:.0f} s; checking exactly-once and the ledger")
    once = exactly_once(server, Path(server.db), rows)
    by_condition = {
        cond: {**tally(sel), "contention": seen(sel)}
        for cond in ("hog_off", "hog_on")
        if (sel := [x for x in rows if x.condition == cond])
    }
    final = [x for x in rows if x.final]
    t = tally(rows)
    batches = Counter(b for x in final if (b := batch_of(x.view)) is not None)
    config = admin.config()
    admin.close()
    return {
        "system_honest_leases": t["leases"],
        "system_honest_rejected": t["rejected"],
        "system_honest_reject_upper95": t["reject_upper95"],
        "system_honest_warned": t["warned"],
        "system_honest_affirmed": t["affirmed"],
        "system_honest_bid": len(rows),
        "system_honest_not_final": {
            "count": len(rows) - len(final),
            "bid_statuses": dict(Counter(x.bid_status for x in rows if not x.final)),
            "lease_statuses": dict(Counter(x.view.status for x in rows if not x.final and x.view)),
            "bid_reasons": sorted({x.bid_reason for x in rows if not x.final and x.bid_reason})[:10],
        },
        "system_by_condition": by_condition,
        "system_by_model": {m: tally([x for x in rows if x.model_id == m]) for m in models},
        "system_contention": seen(final),
        "system_rejections": listed(final, "contraindicated"),
        "system_warnings": listed(final, "warning"),
        "system_audits_drawn": t["audits_drawn"],
        "system_batches_seen": {str(k): v for k, v in sorted(batches.items())},
        "system_models": models,
        "system_batch": args.batch,
        "system_bidders": args.bidders,
        "system_setup": {
            "server": ["poi", "serve", "--local-node", "--batch", str(args.batch), "--reserve", str(RESERVE)],
            "agent": ["poi", "agent", "--resident", "--max-batch", str(args.batch)],
            "profile": ["poi", "profile", "MODEL", "--resident"],
            "db": "sqlite",
            "policy": policy.model_dump(),
            "config": config.model_dump(exclude={"db", "admin_token", "port"}),
            "tokens": args.tokens,
            "jobs": {"temperature_even_bid_index": 0.0, "temperature_odd_bid_index": 0.8},
            "window_per_bidder": args.window,
            "bid_price_micro_per_j": PRICE,
            "stake_micro": stakes,
            "expected_j": expected,
            "target_audit_p": args.audit_p,
            "hog": ["python", "-c", HOG[-1]],
            "block": args.block,
            "cycle": list(CYCLE),
            "switches": switches,
            "agents_by_model": {
                m: sum(1 for i in range(args.bidders) if models[i % len(models)] == m) for m in models
            },
            "host_cpus": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE"),
        },
        "system_exactly_once": once,
        "system_ledger_ok": once["ledger_check_ok"],
        "system_bidder_errors": run.errors[:10],
        "system_drive_s": round(drive_s, 1),
        "system_rate_per_s": round(t["leases"] / drive_s, 3) if drive_s else None,
    }


if __name__ == "__main__":
    main()
