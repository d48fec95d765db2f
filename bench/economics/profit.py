"""Expected profit of each economic cheat against honest serving (issue 23), measured through the
real control plane: ControlPlane + its FastAPI app (TestClient) + a RemoteNode + a Node running
each agent program resident in its measured sandbox, at the control plane's default tier policy.

For each class — honest, probabilistic substitution at p = 0.1 / 0.3 / 0.5, audit-aware (rate 0.3),
hidden batch rows, and the batch copier at batch 2 (with its own honest baseline at batch 2) — one
agent is enrolled with the adversary program's command line, deposits, bids `--trials` leases, and
the node pulls, runs and hands them in (`remote.step()`); queued L4 audits are drained. Reported per
class: trials, verdicts (caught = contraindicated, warned), which layers failed, audits drawn, and
the agent's money per lease: the change of `wallet:<agent>` + `escrow:<agent>` over the run divided
by the leases. `expected_profit_vs_honest_micro` = class money per lease - honest money per lease at
the same node batch (positive: the cheat earns more than honest).

What "profit" means on this path: a bid lease never pays the agent (only a gateway requester pays
agents, `service/settlement.settle_completion`). The agent pays the measured energy at the clearing
price (from its hold, and past the hold from its wallet) and loses its stake on a contraindicated
verdict; so money per lease is minus (energy charge + stake slashed), and a cheat's profit against
honest is the energy it avoids paying less the stake it loses. On the gateway path a caught lease
would also lose the requester's payment; that path is not measured here. A warned lease's stake
stays escrowed (counted as the agent's). The private work of hidden rows is worth something to the
agent outside Maxwell's ledger: reported as the private rows' share of the billed energy and the
joules beyond the hold (billed from the agent's wallet).

    python -m bench.economics.profit [--trials 50]      # make bench-profit; --trials 4 for a smoke run

Writes bench/results/operation.json: profit_* keys.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..common.results import stamp, write_results

WRITES = {"operation.json": ["profit_*"]}
MODEL = "gpt2-mini"  # the leased model (4 x 256)
SUBSTITUTE = "gpt2-micro"  # the cheap model the substitution cheats run (2 x 64)
TOKENS = 16  # new tokens per lease (as tests/test_service_flow.py)
STAKE = 100_000  # micro per lease
PRICE = 100  # micro/J bid; every bid fits the headroom, so all clear at the reserve
RESERVE = 20
DEPOSIT = 1_000_000_000
TOKEN = "bench"
EVERY_LEASE_AUDITED = {"medium_from_value": 0.0, "high_from_value": 0.0}  # every lease's value >= 0: high
HEADROOM_J = 1e6  # as the flow fixture: room for every bid (spare headroom lifts low to medium)


@dataclass(frozen=True)
class Class:
    name: str
    module: str | None  # None: the honest `poi agent`
    args: tuple[str, ...] = ()
    batch: int = 1  # leases per wave handed to the agent by the node
    same_prompt_greedy: bool = False  # pairs of bids with one prompt, temperature 0
    coin: tuple[float, int, bool] | None = None  # (rate, seed, draws on the warm-up): which leases cheated
    baseline: str = "honest"
    rows: int = 0  # private rows beside each lease (hidden batch rows)
    policy: dict[str, float] | None = None  # a tier policy for this class only (then the default again)


def classes(rows: list[int]) -> list[Class]:
    sub = ("--substitute", SUBSTITUTE)
    return [
        Class("honest", None),
        *(
            Class(f"probabilistic_substitution_p{p}", "probabilistic_substitution",
                  ("--p", str(p), *sub, "--seed", "0"), coin=(p, 0, True))
            for p in (0.1, 0.3, 0.5)
        ),
        Class("audit_aware_rate0.3", "audit_aware", ("--rate", "0.3", *sub, "--seed", "0"),
              coin=(0.3, 0, False)),
        *(Class(f"hidden_batch_rows_{n}", "hidden_batch_rows", ("--rows", str(n)), rows=n) for n in rows),
        Class("honest_batch2", None, ("--max-batch", "2"), batch=2, same_prompt_greedy=True),
        Class("batch_copier_batch2", "batch_copier", ("--max-batch", "2"), batch=2, same_prompt_greedy=True,
              baseline="honest_batch2"),
        # the same copier with every lease audited (the high tier): how often an audit catches a copy
        Class("batch_copier_batch2_all_audited", "batch_copier", ("--max-batch", "2"), batch=2,
              same_prompt_greedy=True, baseline="honest_batch2", policy=EVERY_LEASE_AUDITED),
    ]  # fmt: skip


def cheated(c: Class, n: int) -> list[bool] | None:
    """Which of the n leases (in the order the agent was handed them) the coin cheats on: the same
    seeded draws the program makes (the probabilistic one also draws for the node's warm-up lease;
    the audit-aware one never cheats on its first lease and draws no coin for it)."""
    if c.coin is None:
        return None
    rate, seed, warm_draw = c.coin
    rng = random.Random(seed)
    if warm_draw:
        rng.random()
    return [rng.random() < rate for _ in range(n)]


def clopper_pearson(k: int, n: int) -> tuple[float | None, float | None]:
    """95 % two-sided bounds on a rate seen k times in n (None for n = 0)."""
    if n == 0:
        return None, None
    from scipy.stats import beta

    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return round(lo, 4), round(hi, 4)


def shown(arg: str) -> str:
    """An agent's command-line word as the results show it: no temporary key path, no venv path."""
    return "python" if arg == sys.executable else "KEY" if arg.endswith(".pem") else arg


def run_class(flow: dict[str, Any], c: Class, trials: int, key_dir: Path) -> dict[str, Any]:
    from maxwell_poi.node.remote import RemoteNode
    from maxwell_poi.protocol.keys import AgentKey
    from maxwell_poi.registry.prompts import PROMPTS
    from maxwell_poi.service import ServiceClient
    from maxwell_poi.service.wire import IntakeAnswer

    cp, admin, tc, node = flow["cp"], flow["admin"], flow["tc"], flow["node"]
    agent_id = c.name.replace("_", "-")
    key = AgentKey.generate()
    key.save(key_dir / f"{agent_id}.pem")
    program = (
        ["-m", "maxwell_poi", "agent"] if c.module is None else ["-m", f"maxwell_poi.adversaries.{c.module}"]
    )
    argv = [sys.executable, *program, "--resident", "--key", str(key_dir / f"{agent_id}.pem"), *c.args]
    admin.enroll_agent(agent_id, key.public_hex, argv)
    admin.deposit(agent_id, DEPOSIT, f"d-{agent_id}")
    agent = ServiceClient("http://test", key=key, principal=f"agent:{agent_id}", http=tc)

    def money() -> int:  # escrow:<agent> is opened with the agent's first lease
        balances = cp.ledger.balances()
        return balances.get(f"wallet:{agent_id}", 0) + balances.get(f"escrow:{agent_id}", 0)

    before = money()
    for i in range(trials):
        if c.same_prompt_greedy:
            pair = i // 2  # each pair its own question (numbered), asked twice: the twin is cached
            job = {"kind": "generate", "prompt": f"Note {pair}. {PROMPTS[pair % len(PROMPTS)]}",
                   "max_new_tokens": TOKENS, "temperature": 0.0}  # fmt: skip
        else:
            job = {"kind": "generate", "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": TOKENS}
        agent.bid({"bid_id": f"{agent_id}-{i}", "model_id": MODEL, "job": job, "price_micro_per_j": PRICE,
                   "stake_micro": STAKE})  # fmt: skip
    remote = RemoteNode(
        flow["node_client"], node, batch=c.batch, agents=[agent_id], headroom=lambda: HEADROOM_J
    )
    if c.policy:
        admin.set_policy(**{**flow["policy"], **c.policy})
    handed: list[IntakeAnswer] = []
    refused: list[str] = []
    t0 = time.perf_counter()
    deadline = time.monotonic() + 60 + 20 * trials
    while time.monotonic() < deadline:
        step = remote.step()
        for a in step:
            (handed if isinstance(a, IntakeAnswer) else refused).append(a)  # type: ignore[arg-type]
        if not step:
            bids = agent.bids(limit=1000)
            issued = sum(b.status == "won" for b in bids)
            if not any(b.status == "open" for b in bids) and len(handed) + len(refused) >= issued:
                break  # every bid answered: by a lease handed in, or cached (its twin's lease)
            time.sleep(0.2)
    serve_s = time.perf_counter() - t0
    if c.policy:
        admin.set_policy(**flow["policy"])
    bid_status = Counter(b.status for b in agent.bids(limit=1000))
    drained = cp.audits.drain(600)
    node.stop_agent(agent_id)
    after = money()
    views = [agent.lease(a.lease_id) for a in handed]
    verdicts = Counter(v.verdict.verdict if v.verdict else "none" for v in views)
    failed_layers: Counter[str] = Counter()
    for v in views:
        if v.verdict and v.verdict.verdict == "contraindicated":
            failed_layers.update({d.layer for d in v.verdict.layers if d.status == "fail"})
    truth = cheated(c, len(handed))
    pairs = list(zip(handed, views, strict=True))
    bad = [v.verdict is not None and v.verdict.verdict == "contraindicated" for v in views]
    out: dict[str, Any] = {
        "agent_command": [shown(a) for a in argv],
        "node_batch": c.batch,
        "jobs": "pairs of a numbered prompt, greedy" if c.same_prompt_greedy else "sampled (temperature 0.8)",
        "trials": len(handed),
        "bids": sum(bid_status.values()),
        "bid_status": dict(bid_status),
        "refused_by_control_plane": len(refused),
        "caught": verdicts.get("contraindicated", 0),
        "warned": verdicts.get("warning", 0),
        "affirmed": verdicts.get("affirming", 0),
        "not_final": sum(1 for v in views if v.verdict is not None and not v.verdict.final),
        "caught_by_layer": dict(failed_layers),
        "audits_drawn": sum(1 for v in views if v.verdict and v.verdict.audit_drawn),
        "tiers": dict(Counter(v.tier for v in views)),
        "audit_probability_mean": statistics.fmean(v.audit_probability for v in views) if views else None,
        "clearing_price_micro_per_j": sorted({v.price_micro_per_j for v in views}),
        "energy_j_mean": statistics.fmean(a.energy_j for a in handed) if handed else None,
        "charge_micro_mean": statistics.fmean(a.charge_micro for a in handed) if handed else None,
        "hold_micro_mean": statistics.fmean(v.hold_micro for v in views) if views else None,
        "charged_the_whole_hold": sum(1 for a, v in pairs if a.charge_micro >= v.hold_micro),
        "unbilled_micro_beyond_hold": sum(
            max(0, round(a.energy_j * v.price_micro_per_j) - a.charge_micro) for a, v in pairs
        ),
        "stake_micro": STAKE,
        "money_micro_total": after - before,
        "money_micro_per_lease": (after - before) / len(handed) if handed else None,
        "baseline": c.baseline,
        "audits_drained": drained,
        "serve_s": round(serve_s, 1),
    }  # fmt: skip
    if truth is not None:
        cheats = sum(truth)
        out["cheated_leases"] = cheats
        out["cheated_leases_how_known"] = (
            "the program's seeded coin replayed in the order the node handed the leases"
        )
        caught = sum(b for b, t in zip(bad, truth, strict=True) if t)
        wrong = sum(b for b, t in zip(bad, truth, strict=True) if not t)
        out["caught_of_cheated"] = f"{caught}/{cheats}"
        out["caught_of_cheated_lower95"] = clopper_pearson(caught, cheats)[0]
        out["rejected_of_its_honest_leases"] = f"{wrong}/{len(truth) - cheats}"
        said = [v.verdict.verdict if v.verdict else "none" for v in views]
        out["verdicts_of_cheated"] = dict(Counter(x for x, t in zip(said, truth, strict=True) if t))
        out["verdicts_of_its_honest_leases"] = dict(
            Counter(x for x, t in zip(said, truth, strict=True) if not t)
        )
        out["rejected_of_its_honest_leases_upper95"] = clopper_pearson(wrong, len(truth) - cheats)[1]
    elif c.module is None:
        out["rejected_upper95"] = clopper_pearson(out["caught"], out["trials"])[1]
    else:
        out["caught_lower95"] = clopper_pearson(out["caught"], out["trials"])[0]
    if c.rows:
        out["private_tokens_per_lease"] = c.rows * TOKENS  # rows x the lease's new tokens
    if c.module == "batch_copier":
        out.update(copies(cp, views, bad))
    if c.policy:
        out["policy"] = c.policy
    out["run"] = {k: stamp()[k] for k in ("commit", "time")}
    return out


def copies(cp: Any, views: list[Any], bad: list[bool]) -> dict[str, Any]:
    """Which of the copier's leases carry a copied answer, known from the receipts themselves, and
    how many copies were audited and caught. (A copy whose prompt happens to have the same greedy
    answer as its source's is right, and no audit can catch it.)"""
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from maxwell_poi.protocol.receipt import open_receipt
    from maxwell_poi.service.schema import ReceiptRow

    ids = [v.lease_id for v in views]
    with Session(cp.ledger.engine) as session:
        rows = {
            r.lease_id: r.receipt
            for r in session.scalars(select(ReceiptRow).where(ReceiptRow.lease_id.in_(ids)))
        }
    # the copier re-signs its source's claims, the nonce-bound layer root included: a root that an
    # earlier lease already carried is a copy (an honest root is bound to its own lease's nonce)
    root = {lid: open_receipt(rows[lid], 1 << 24).claims.layers for lid in ids if lid in rows}
    copied = [
        lid in root and root[lid] in {root.get(other) for other in ids[:j]} for j, lid in enumerate(ids)
    ]
    audited = [bool(v.verdict and v.verdict.audit_drawn) for v in views]
    n = sum(copied)
    audited_copies = sum(a for a, c in zip(audited, copied, strict=True) if c)
    caught_copies = sum(b for b, c in zip(bad, copied, strict=True) if c)
    caught_audited = sum(b for b, a, c in zip(bad, audited, copied, strict=True) if c and a)
    return {
        "copied_leases": n,
        "copied_leases_how_known": (
            "a receipt's nonce-bound layer root equals an earlier lease's (the copier re-signs its source's)"
        ),
        "copies_audited": audited_copies,
        "caught_of_copied": f"{caught_copies}/{n}",
        "caught_of_audited_copies": f"{caught_audited}/{audited_copies}",
        "caught_of_audited_copies_lower95": clopper_pearson(caught_audited, audited_copies)[0],
        "rejected_of_its_other_leases": sum(b for b, c in zip(bad, copied, strict=True) if not c),
    }


def with_audits(r: dict[str, Any], base: dict[str, Any], audited: dict[str, Any] | None) -> dict[str, Any]:
    """The copier's profit in expectation under the lottery, where its run drew too few audits to
    show it: the energy it saves against honest, less the stake it loses when an audit falls on a
    copy (audit probability x share of leases copied x how often an audit of a copy catches it,
    measured on its all-audited run; 1 when that run is absent — said so)."""
    k, n = audited["caught_of_audited_copies"].split("/") if audited else ("1", "1")
    caught_when_audited = int(k) / int(n) if int(n) else 1.0
    saved = base["charge_micro_mean"] - r["charge_micro_mean"]
    share = r["copied_leases"] / r["trials"]
    loss = r["audit_probability_mean"] * share * caught_when_audited * STAKE
    return {
        "expected_profit_with_lottery_micro": round(saved - loss, 2),
        "expected_profit_with_lottery_terms": {
            "energy_saved_micro_per_lease": round(saved, 2),
            "audit_probability_mean": r["audit_probability_mean"],
            "copied_share": round(share, 4),
            "caught_when_audited": round(caught_when_audited, 4),
            "caught_when_audited_from": "batch_copier_batch2_all_audited"
            if audited
            else "assumed 1 (no run)",
            "stake_micro": STAKE,
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=150, help="leases per class (>= 50 for the results)")
    ap.add_argument("--rows", type=int, nargs="+", default=[4, 64], help="private rows (hidden batch rows)")
    ap.add_argument("--profile-runs", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None, help="class names to run (default all)")
    ap.add_argument("--no-write", action="store_true", help="print, do not write operation.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="poi-profit-") as tmp_s:
        tmp = Path(tmp_s)
        os.environ["POI_HOME"] = str(tmp / "home")
        os.environ["OMP_NUM_THREADS"] = (
            "1"  # see tests/test_service_flow.py: idle OpenMP threads inflate CPU-s
        )
        from fastapi.testclient import TestClient

        from maxwell_poi.ledger import check_ledger
        from maxwell_poi.node.attest import NodeKey
        from maxwell_poi.node.node import Node
        from maxwell_poi.node.resident_runs import measure_resident_profile
        from maxwell_poi.registry.profiles import ProfileStore
        from maxwell_poi.service import ControlPlane, ServiceClient, ServiceConfig
        from maxwell_poi.service.api import create_app

        t0 = time.perf_counter()
        ProfileStore().put(
            measure_resident_profile(MODEL, runs=args.profile_runs, tokens=TOKENS, batches=(1, 2))
        )
        profile_s = time.perf_counter() - t0
        config = ServiceConfig.from_env(
            db=str(tmp / "cp.sqlite"), admin_token=TOKEN, reserve_micro_per_j=RESERVE
        )
        cp = ControlPlane(config)
        cp.start()
        node_key = NodeKey.generate()
        results: dict[str, dict[str, Any]] = {}
        try:
            with TestClient(create_app(cp)) as tc, Node("n1", node_key, None) as node:
                admin = ServiceClient("http://test", admin_token=TOKEN, http=tc)
                admin.enroll_node("n1", node_key.public_hex)
                node_client = ServiceClient("http://test", key=node_key, principal="node:n1", http=tc)
                flow = {"cp": cp, "admin": admin, "tc": tc, "node": node, "node_client": node_client}
                flow["policy"] = asdict(cp.policy)
                for c in classes(args.rows):
                    if args.only and c.name not in args.only:
                        continue
                    print(f"profit: {c.name} ...", file=sys.stderr, flush=True)
                    results[c.name] = run_class(flow, c, args.trials, tmp)
                    r = results[c.name]
                    said = (
                        f"profit: {c.name}: {r['trials']} leases, caught {r['caught']}, "
                        f"warned {r['warned']}, {r['money_micro_per_lease']:.1f} micro/lease "
                        f"({r['serve_s']} s)"
                    )
                    print(said, file=sys.stderr, flush=True)
            ledger_ok = check_ledger(cp.ledger.engine).ok
            policy = asdict(cp.policy)
        finally:
            cp.close()
    for r in results.values():
        base = results.get(r["baseline"])
        r["expected_profit_vs_honest_micro"] = (
            r["money_micro_per_lease"] - base["money_micro_per_lease"]
            if base and r["money_micro_per_lease"] is not None and base["money_micro_per_lease"] is not None
            else None
        )
        if "copied_leases" in r and base and r["trials"] and "policy" not in r:
            r.update(with_audits(r, base, results.get("batch_copier_batch2_all_audited")))
        if "private_tokens_per_lease" in r and base and r["charge_micro_mean"] is not None:
            extra = r["charge_micro_mean"] - base["charge_micro_mean"]
            r["extra_charge_micro_per_private_token"] = round(extra / r["private_tokens_per_lease"], 4)
    out = {
        "profit_what": (
            "money per lease of each cheat class vs honest, through the real control plane (bid leases: "
            "auction, tier policy, node sandbox, intake L0-L2, queued L4 lottery, ledger), one resident "
            f"agent per class serving {MODEL} (substitute {SUBSTITUTE}), {TOKENS} new tokens per lease"
        ),
        "profit_path": "bid leases (POST /v1/agent/bids, node pull, intake); gateway path not measured",
        "profit_meaning": (
            "money_micro_per_lease = change of wallet:<agent> + escrow:<agent> over the run / leases. "
            "A bid lease never pays the agent: it pays the measured energy at the clearing price (from "
            "the hold of 3 x expected joules, then from the wallet) and loses its stake when "
            "contraindicated (a warned lease's stake stays escrowed). "
            "expected_profit_vs_honest_micro = class money per lease - "
            "its baseline's (honest at the same node batch); positive = the cheat earns more than "
            "honest. On the gateway path a caught lease would also lose the requester's payment "
            "(not measured)."
        ),
        "profit_policy": policy,
        "profit_setup": {
            "model": MODEL,
            "substitute": SUBSTITUTE,
            "tokens": TOKENS,
            "stake_micro": STAKE,
            "bid_price_micro_per_j": PRICE,
            "reserve_micro_per_j": RESERVE,
            "headroom_j": HEADROOM_J,
            "watts_per_core": config.watts_per_core,
            "profile_runs": args.profile_runs,
            "profile_batches": [1, 2],
            "trials_per_class": args.trials,
            "hidden_rows": args.rows,
            "omp_threads": 1,
        },  # fmt: skip
        "profit_classes": results,
        "profit_ledger_ok": ledger_ok,
        "profit_wall_s": round(time.perf_counter() - t_start, 1),
        "profit_profile_s": round(profile_s, 1),
    }
    if args.no_write:
        import json

        print(json.dumps(out, indent=1))
        return
    # --only reruns some classes: the others keep their last measured rows (each row says its run)
    write_results("operation.json", out, writes=WRITES, deep=("profit_classes",))
    for name, r in results.items():
        print(
            f"{name:36s} trials {r['trials']:3d} caught {r['caught']:3d} warned {r['warned']:3d} "
            f"money/lease {r['money_micro_per_lease']:10.1f} vs honest {r['expected_profit_vs_honest_micro']}"
        )


if __name__ == "__main__":
    main()
