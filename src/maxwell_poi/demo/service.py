"""`poi demo`, second part: the same honest and cheating agent programs, this time through the
control plane — a real server on loopback (uvicorn, SQLite under poi-demo/service/), a node pulling
leases from it over HTTP, the auction, intake, the audit lottery and the ledger.

Every agent is enrolled with its program's command line and the same deposit, bids the same leases
at the same price with the same stake, and the node runs whatever the control plane sends it. What
each agent won, what was measured, what it paid and whether its stake came back is read back from
the API (the agent's own signed calls, Maxwell's ledger), not from the demo's memory.
"""

from __future__ import annotations

import math
import secrets
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from ..adversaries import CATALOGUE, Attack
from ..node.attest import NodeKey
from ..node.node import Node
from ..node.remote import Handed, RemoteNode
from ..node.runs import honest_agent_argv
from ..protocol.files import write_json_atomic
from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob
from ..registry.models import Registry
from ..registry.prompts import PROMPTS
from ..service import ControlPlane, ServiceClient, ServiceConfig
from ..service.api import create_app
from ..service.market import HOLD_FACTOR
from ..service.wire import LedgerReport
from .generation import Demo, DemoConfig
from .harness import LoopbackServer, has_cuda, python_module

NODE = "demo-node"
THIEF = "mallory"  # the enrolled agent whose key the lease thief signs with (it bids nothing)
HEADROOM_J = 1e9  # the demo is not about heat: every bid fits
HONEST_ARGS = {"honest": (), "honest-2threads": ("--threads", "2"), "honest-batch4": ("--max-batch", "4")}
MAX_STEPS = 8  # node pulls per wave before the demo stops waiting for a lease that does not come
Progress = Callable[[str, int, int], None]


@dataclass
class ServiceDemoConfig:
    model: str = "gpt2-small"  # claimed model of every bid
    small: str = "gpt2-mini"  # what the substitution / draft cheats actually run
    alt: str = "gpt2-small-alt"
    tokens: int = 48
    temperature: float = 0.8
    attacks: list[str] | None = None  # None = every catalogue attack that fits one enrolled agent
    honest: tuple[str, ...] = ("honest", "honest-2threads", "honest-batch4")
    leases: int = 3  # every agent bids this many (a priming cheat: 1 honest, then its cheat)
    price_micro_per_j: int = 1000  # every bid's price; also the reserve, so it is the clearing price
    stake_factor: float = 10.0  # stake = this x a lease's expected energy charge
    audit_probability: float = 0.9  # the medium tier's lottery; the policy's margin is set to reach it
    out: Path = Path("poi-demo")  # the service's files go under out/service/
    profile_runs: int = 4


@dataclass
class AgentPlan:
    agent: str
    attack: Attack | None
    argv: list[str]
    waves: list[int]  # leases handed to the agent at once, wave after wave
    pause_s: float = 0.0  # idle gap before every wave after the first
    greedy: bool = False  # temperature 0 (each lease its own prompt)
    key: AgentKey = field(default_factory=AgentKey.generate)


class ServiceDemo:
    def __init__(self, config: ServiceDemoConfig, registry: Registry | None = None) -> None:
        self.cfg = config
        self.registry = registry or Registry()
        self.dir = config.out / "service"
        self.skipped: dict[str, str] = {}  # catalogue attacks not run here, with the reason
        # the catalogue demo's profiling and relay worker, pointed at this part's folder
        self.demo = Demo(
            DemoConfig(
                model=config.model,
                small=config.small,
                alt=config.alt,
                second_model=None,
                embed_model=None,
                tokens=config.tokens,
                out=self.dir,
                profile_runs=config.profile_runs,
            ),
            self.registry,
        )

    # -- who takes part -----------------------------------------------------------------------------

    def plan(self) -> list[AgentPlan]:
        cfg = self.cfg
        if cfg.leases < 2:
            raise ValueError(
                f"leases: expected >= 2 (a priming cheat answers one lease first), got {cfg.leases}"
            )
        keys = self.dir / "keys"
        plans = []
        self.skipped = {}
        for name in cfg.honest:
            extra = HONEST_ARGS[name]
            batch = int(extra[1]) if "--max-batch" in extra else 1
            p = AgentPlan(name, None, [], _chunks(cfg.leases, batch))
            p.argv = honest_agent_argv(self._save(keys, name, p.key), "--resident", *extra)
            plans.append(p)
        subs = {"small": cfg.small, "alt": cfg.alt, "upstream": str(self.demo.worker_socket)}
        for attack in CATALOGUE:
            if cfg.attacks is not None and attack.name not in cfg.attacks:
                continue
            if attack.needs_gpu and not has_cuda():
                self.skipped[attack.name] = "needs a CUDA GPU; none on this machine"
                continue
            if "generate" not in attack.kinds:
                self.skipped[attack.name] = "the service demo bids generation leases only"
                continue
            plans.append(self._attack_plan(attack, subs, keys))
        return plans

    def _attack_plan(self, attack: Attack, subs: dict[str, str], keys: Path) -> AgentPlan:
        n = self.cfg.leases
        waves = [1, *_chunks(n - 1, attack.batch)] if attack.needs_priming else _chunks(n, attack.batch)
        p = AgentPlan(attack.name, attack, [], waves, attack.pause_s, attack.greedy)
        key_path = self._save(keys, attack.name, p.key)
        if attack.name == "other-agents-lease":
            # one enrolled agent whose program answers in another enrolled agent's name: the node
            # runs the lease's agent's command, so the thief's key goes into that command
            key_path = keys / f"{THIEF}.pem"
        store = (self.dir / "store" / attack.name).resolve()
        args = [a.format(store=store, **subs) for a in attack.args]
        p.argv = python_module(f"maxwell_poi.adversaries.{attack.module}", key_path, "--resident", *args)
        return p

    @staticmethod
    def _save(keys: Path, name: str, key: AgentKey) -> Path:
        path = (keys / f"{name}.pem").resolve()
        key.save(path)
        return path

    def _job(self, plan: AgentPlan, i: int) -> dict[str, Any]:
        # a cheat that reuses an earlier answer is handed the same request again (new lease, new
        # nonce), as in the catalogue demo: a different prompt would make it a trivial L0 catch
        reuse = plan.attack is not None and plan.attack.needs_priming
        prompt = PROMPTS[0] if reuse else PROMPTS[i % len(PROMPTS)]
        temperature = 0.0 if plan.greedy else self.cfg.temperature
        job = GenerateJob(prompt=prompt, max_new_tokens=self.cfg.tokens, temperature=temperature)
        return job.model_dump(mode="json")

    # -- the run ------------------------------------------------------------------------------------

    def run(self, on_progress: Progress | None = None) -> dict[str, Any]:
        t0 = time.perf_counter()
        shutil.rmtree(self.dir, ignore_errors=True)  # a fresh control plane, keys and store each run
        self.dir.mkdir(parents=True)
        self.demo.ensure_profiles(on_progress)
        plans = self.plan()
        thief = AgentKey.generate()
        self._save(self.dir / "keys", THIEF, thief)
        token = secrets.token_urlsafe(24)
        config = ServiceConfig(
            db=str((self.dir / "cp.sqlite").resolve()),
            admin_token=token,
            reserve_micro_per_j=self.cfg.price_micro_per_j,
        )
        config.validate()
        control = ControlPlane(config, registry=self.registry)
        control.start()
        try:
            with (
                LoopbackServer(create_app(control)) as url,
                ServiceClient(url, admin_token=token) as admin,
            ):
                terms = self._terms(control)
                admin.set_policy(**terms["policy"])
                self._enroll(admin, plans, thief, terms)
                answers = self._serve(url, control, plans, terms, on_progress)
                rows = [self._row(url, p, terms) for p in plans]
                ledger = admin.ledger()
        finally:
            control.close()
        write_json_atomic(self.dir / "answers.json", [a.model_dump(mode="json") for a in answers])
        summary = self._summary(url, terms, rows, ledger, time.perf_counter() - t0)
        write_json_atomic(self.dir / "summary.json", summary)
        return summary

    def _terms(self, control: ControlPlane) -> dict[str, Any]:
        """Price, stake, deposit and tier policy, from what the market expects a lease to cost."""
        cfg = self.cfg
        jobs = [GenerateJob(prompt=prompt, max_new_tokens=cfg.tokens) for prompt in PROMPTS]
        expected_j = statistics.fmean(control.market.expected_j(cfg.model, job) for job in jobs)
        value = cfg.price_micro_per_j * expected_j  # micro: a lease's expected energy charge
        stake = max(1, math.ceil(cfg.stake_factor * value))
        # the medium tier's p = (1 + margin) x value / (value + stake) (economics.deterrence)
        k = stake / value
        target = cfg.audit_probability
        margin = (1 + k) * (1.25 if target >= 1 else target) - 1
        policy = {
            "medium_from_value": 0.0,  # every lease needs at least the audit lottery
            "high_from_value": 1e12,
            "audit_cost_fraction": control.policy.audit_cost_fraction,
            "upgrade_headroom_factor": control.policy.upgrade_headroom_factor,
            "margin": min(100.0, max(0.0, margin)),
        }
        # a whole run's holds and stakes at once, with room to spare: no bid fails for want of funds
        deposit = math.ceil(2 * cfg.leases * (HOLD_FACTOR * value + stake))
        return {
            "expected_j": expected_j,
            "price_micro_per_j": cfg.price_micro_per_j,
            "stake_micro": stake,
            "deposit_micro": deposit,
            "policy": policy,
        }

    def _enroll(self, admin: ServiceClient, plans: list[AgentPlan], thief: AgentKey, terms: dict) -> None:
        if any(p.agent == "other-agents-lease" for p in plans):
            admin.enroll_agent(THIEF, thief.public_hex, [])  # enrolled, never bids: its key is stolen
        for p in plans:
            admin.enroll_agent(p.agent, p.key.public_hex, p.argv)
            admin.deposit(p.agent, terms["deposit_micro"], key=f"demo-{p.agent}")

    def _serve(
        self,
        url: str,
        control: ControlPlane,
        plans: list[AgentPlan],
        terms: dict,
        on_progress: Progress | None,
    ) -> list[dict[str, Any]]:
        """Agent after agent: bid a wave, let the node pull and serve it, repeat; then stop the agent
        and let the audits finish before the next one runs (its measurements stay quiet)."""
        node_key = NodeKey.generate()
        total = sum(sum(p.waves) for p in plans)
        answers: list[Handed] = []
        with (
            ServiceClient(url, admin_token=control.admin_token) as admin,
            Node(NODE, node_key, None, self.registry) as node,
            ServiceClient(url, key=node_key, principal=f"node:{NODE}") as node_client,
        ):
            admin.enroll_node(NODE, node_key.public_hex)
            remote = RemoteNode(node_client, node, poll_s=0.0, headroom=lambda: HEADROOM_J)
            for p in plans:
                needs_worker = p.attack is not None and p.attack.needs_worker
                with (
                    ServiceClient(url, key=p.key, principal=f"agent:{p.agent}") as agent,
                    self.demo.relay_worker(needs_worker),
                ):
                    i = 0
                    for w, size in enumerate(p.waves):
                        if on_progress:
                            label = f"service: {p.agent} wave {w + 1}/{len(p.waves)} x{size}"
                            on_progress(label, len(answers), total)
                        if w:
                            time.sleep(p.pause_s)
                        for _ in range(size):
                            agent.bid(self._bid(p, i, terms))
                            i += 1
                        answers.extend(self._pull_wave(remote, p.agent, size))
                    if p.agent in node.agents:
                        node.stop_agent(p.agent)
                control.audits.drain()
        if on_progress:
            on_progress("service: done", total, total)
        return answers

    def _bid(self, p: AgentPlan, i: int, terms: dict) -> dict[str, Any]:
        return {
            "bid_id": f"{p.agent}-{i}",
            "model_id": self.cfg.model,
            "job": self._job(p, i),
            "price_micro_per_j": terms["price_micro_per_j"],
            "stake_micro": terms["stake_micro"],
        }

    @staticmethod
    def _pull_wave(remote: RemoteNode, agent: str, size: int) -> list[Handed]:
        remote.agents, remote.batch = [agent], size
        got: list[Handed] = []
        for _ in range(MAX_STEPS):
            step = remote.step()  # a lease intake refused is skipped by the node from then on
            got.extend(step)
            if not step or len(got) >= size:
                break
        return got

    # -- what the API says happened -----------------------------------------------------------------

    def _row(self, url: str, p: AgentPlan, terms: dict) -> dict[str, Any]:
        with ServiceClient(url, key=p.key, principal=f"agent:{p.agent}") as agent:
            bids = agent.bids(limit=1000)
            leases = agent.leases(limit=1000)
            balance = agent.balance()
        verdicts = [lease.verdict for lease in leases if lease.verdict]
        stake_by = Counter()
        for lease in leases:
            stake_by[lease.verdict.stake_outcome if lease.verdict else "unsettled"] += lease.stake_micro
        caught = sorted({r.layer for v in verdicts for r in v.layers if r.status == "fail"})
        wallet, escrow = balance.wallet_micro, balance.escrow_micro
        return {
            "agent": p.agent,
            "attack": p.attack.name if p.attack else None,
            "honest": p.attack is None,
            "priming_leases": int(p.attack is not None and p.attack.needs_priming),  # answered honestly
            "bids": len(bids),
            "bid_status": dict(Counter(b.status for b in bids)),
            "leases_won": len(leases),
            "tiers": dict(Counter(lease.tier for lease in leases)),
            "audit_probability": round(statistics.fmean(lease.audit_probability for lease in leases), 4)
            if leases
            else 0.0,
            "audits_drawn": sum(v.audit_drawn for v in verdicts),
            "verdicts": dict(Counter(v.verdict for v in verdicts)),
            "no_verdict": len(leases) - len(verdicts),
            "caught_by": caught,
            "reasons": sorted({v.reason[:240] for v in verdicts if v.verdict != "affirming"})[:4],
            "joules_measured": round(sum(v.energy_j for v in verdicts), 3),
            "energy_paid_micro": sum(v.charge_micro for v in verdicts),
            "stake_released_micro": stake_by["released"],
            "stake_slashed_micro": stake_by["slashed"],
            "stake_held_micro": stake_by["held"] + stake_by["pending"] + stake_by["unsettled"],
            "deposit_micro": terms["deposit_micro"],
            "wallet_micro": wallet,
            "escrow_micro": escrow,
            "final_micro": wallet + escrow,
        }

    def _summary(
        self, url: str, terms: dict, rows: list[dict[str, Any]], ledger: LedgerReport, wall_s: float
    ) -> dict[str, Any]:
        honest = [r["final_micro"] for r in rows if r["honest"]]
        cheats = [r["final_micro"] for r in rows if not r["honest"]]
        return {
            "server": url,
            "db": str(self.dir / "cp.sqlite"),
            "model": self.cfg.model,
            "tokens": self.cfg.tokens,
            "leases_per_agent": self.cfg.leases,
            "terms": terms,
            "agents": rows,
            "skipped": self.skipped,
            "honest_richer_than_cheaters": bool(honest and cheats and min(honest) > max(cheats)),
            "ledger": ledger_check(rows, ledger),
            "wall_s": round(wall_s, 1),
        }


def ledger_check(rows: list[dict[str, Any]], ledger: LedgerReport) -> dict[str, Any]:
    """The ledger's own proof (every balance equals its entries, every transfer sums to zero) and
    the demo's: each agent's wallet and escrow as it read them, and every deposited micro is in an
    agent's wallet or escrow, or Maxwell's energy revenue, or Maxwell's slashed stakes."""
    balances, check = ledger.balances, ledger.check
    problems = list(check.problems)
    for r in rows:
        for kind in ("wallet", "escrow"):
            booked = balances.get(f"{kind}:{r['agent']}", 0)
            if booked != r[f"{kind}_micro"]:
                problems.append(
                    f"{kind}:{r['agent']}: the agent read {r[f'{kind}_micro']}, the ledger {booked}"
                )
    revenue, slashed = balances.get("maxwell:energy", 0), balances.get("maxwell:slashed", 0)
    deposited = -balances.get("external:deposits", 0)
    held = sum(v for k, v in balances.items() if k.startswith(("wallet:", "escrow:")))
    if deposited != held + revenue + slashed:
        problems.append(
            f"deposits {deposited} != wallets and escrows {held} + energy {revenue} + slashed {slashed}"
        )
    if revenue != sum(r["energy_paid_micro"] for r in rows):
        problems.append(f"energy revenue {revenue} != the verdicts' charges")
    if slashed != sum(r["stake_slashed_micro"] for r in rows):
        problems.append(f"slashed {slashed} != the stakes of the slashed leases")
    return {
        "ok": not problems,
        "problems": problems,
        "ledger_check_ok": check.ok,
        "deposited_micro": deposited,
        "energy_revenue_micro": revenue,
        "slashed_micro": slashed,
        "transfers": check.transfers,
    }


def service_table(summary: dict[str, Any]) -> Table:
    terms = summary["terms"]
    table = Table(
        title=f"poi demo through the control plane — {summary['db']}",
        caption=(
            f"each agent: deposit {_money(terms['deposit_micro'])}, {summary['leases_per_agent']} bids at "
            f"{terms['price_micro_per_j']} micro/J with stake {_money(terms['stake_micro'])}; money in units"
        ),
    )
    for col in (
        "agent", "bids", "won", "tiers (p)", "verdicts", "audits", "caught by", "J", "paid",
        "stake back", "slashed", "wallet+escrow",
    ):  # fmt: skip
        table.add_column(col, overflow="fold")
    for r in summary["agents"]:
        colour = "green" if r["honest"] else "red"
        verdicts = ", ".join(f"{k[:5]} {v}" for k, v in sorted(r["verdicts"].items()))
        table.add_row(
            f"[{colour}]{r['agent']}[/]",
            str(r["bids"]),
            str(r["leases_won"]),
            ", ".join(f"{t} {n}" for t, n in r["tiers"].items()) + f" ({r['audit_probability']:.2f})",
            verdicts + (f", none {r['no_verdict']}" if r["no_verdict"] else ""),
            str(r["audits_drawn"]),
            ", ".join(layer.split("-")[0] for layer in r["caught_by"]),
            f"{r['joules_measured']:.1f}",
            _money(r["energy_paid_micro"]),
            _money(r["stake_released_micro"]),
            _money(r["stake_slashed_micro"]),
            _money(r["final_micro"]),
        )
    return table


def _money(micro: int) -> str:
    return f"{micro / 1e6:.4f}"


def _chunks(n: int, size: int) -> list[int]:
    size = max(1, size)
    return [min(size, n - i) for i in range(0, n, size)]


__all__ = ["ServiceDemo", "ServiceDemoConfig", "service_table"]
