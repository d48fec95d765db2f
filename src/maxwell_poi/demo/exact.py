"""The exact tier on loopback, for `poi demo`: a control plane (SQLite in `workdir`, uvicorn on a free
port) whose policy sends every lease of a traceable model to the exact tier, one node long-polling
it with resident agents in sandboxes, and three agents that bid:

    alice    honest, fp32 GPT-2 (gpt2-mini), keeps traces   -> L3 float mode (Freivalds + tolerance)
    carol    honest, its W8A8 variant (gpt2-mini-w8a8)       -> L3 exact integer mode (zero tolerance)
             (each challenge opens and checks every block of the lease)
    mallory  gpt2-mini with one block's weights changed      -> L4 disagrees; the dispute bisects the
             (5 %), keeps a faithful trace of what it ran       trace and names the block and operation

mallory bids a stake small enough that the deterrence rule audits every one of its leases (p = 1);
alice and carol bid a large stake, so their L4 lottery rarely draws and L3 is what checks them.
Nothing is simulated: real programs, real models, real HTTP, the ledger's money.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..node.attest import NodeKey
from ..node.node import Node
from ..node.remote import RemoteNode
from ..protocol.errors import PoiError
from ..protocol.keys import AgentKey
from ..registry.prompts import PROMPTS
from ..service import ControlPlane, ServiceClient, ServiceConfig
from ..service.api import create_app
from ..service.wire import ChallengeView, LeaseView
from .harness import LoopbackServer, adversary_argv, ensure_profile

FLOAT_MODEL, INT_MODEL = "gpt2-mini", "gpt2-mini-w8a8"
WRONG_BLOCK = 2
TOKENS = 24
DEPOSIT = 50_000_000
PRICE = 100  # micro per joule


@dataclass(frozen=True)
class ExactAgent:
    name: str
    model: str
    mode: str  # what the demo shows with it
    stake_micro: int
    argv: tuple[str, ...] = ()


@dataclass
class ExactDemo:
    workdir: Path
    window_s: float = 2.0
    rounds: int = 1  # leases each agent bids for
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def agents(self, keys: dict[str, Path]) -> list[ExactAgent]:
        traces = self.workdir / "traces"
        honest = [sys.executable, "-m", "maxwell_poi", "agent", "--resident"]
        return [
            ExactAgent("alice", FLOAT_MODEL, "L3 fp32", 5_000_000,
                       (*honest, "--key", str(keys["alice"]), "--trace-dir", str(traces / "alice"))),
            ExactAgent("carol", INT_MODEL, "L3 int8 (W8A8)", 5_000_000,
                       (*honest, "--key", str(keys["carol"]), "--trace-dir", str(traces / "carol"))),
            ExactAgent("mallory", FLOAT_MODEL, f"dispute (block {WRONG_BLOCK} changed)", 1,
                       tuple(adversary_argv("wrong_block", keys["mallory"], "--block", str(WRONG_BLOCK),
                                            "--trace-dir", str(traces / "mallory")))),
        ]  # fmt: skip

    def run(self) -> dict[str, Any]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        for model in (FLOAT_MODEL, INT_MODEL):
            ensure_profile(model, TOKENS)
        config = ServiceConfig(
            db=str((self.workdir / "cp.sqlite").resolve()),
            admin_token=self.token,
            audit_backend="thread",
            challenge_window_s=self.window_s,
            exact_blocks=4,  # every block is opened; gpt2-mini's 4 in one opening
        )
        config.validate()
        control = ControlPlane(config)
        control.start()
        stop = threading.Event()
        try:
            with (
                LoopbackServer(create_app(control)) as url,
                Node("exact-node", NodeKey.generate(), None) as node,
            ):
                admin = ServiceClient(url, admin_token=self.token)
                admin.set_policy(**{**admin.policy().model_dump(), "exact_from_value": 0.0})
                admin.enroll_node(node.node_id, node.key.public_hex)
                node_client = ServiceClient(url, key=node.key, principal=f"node:{node.node_id}")
                remote = RemoteNode(node_client, node, batch=1, poll_s=0.05, wait_s=2.0, headroom=lambda: 1e6)
                thread = threading.Thread(target=remote.run, args=(stop,), daemon=True)
                thread.start()
                rows = self._serve(admin, url, control)
                ledger = admin.ledger()
                stop.set()  # the node stops pulling before the server goes
                thread.join(timeout=30)
        finally:
            stop.set()
            control.close()
        summary = {"url": url, "window_s": self.window_s, "leases": rows, "ledger_ok": ledger.check.ok}
        (self.workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    def _serve(self, admin: ServiceClient, url: str, control: ControlPlane) -> list[dict[str, Any]]:
        keys = {}
        for name in ("alice", "carol", "mallory"):
            keys[name] = self.workdir / f"{name}.pem"
            AgentKey.generate().save(keys[name])
        clients, agents = {}, {}
        for agent in self.agents(keys):
            key = AgentKey.load(keys[agent.name])
            admin.enroll_agent(agent.name, key.public_hex, list(agent.argv))
            admin.deposit(agent.name, DEPOSIT, f"exact-demo-{agent.name}")
            clients[agent.name] = ServiceClient(url, key=key, principal=f"agent:{agent.name}")
            agents[agent.name] = agent
            for i in range(self.rounds):
                prompt = PROMPTS[i % len(PROMPTS)]
                job = {"kind": "generate", "prompt": prompt, "max_new_tokens": TOKENS}
                bid = {"bid_id": f"exact-{agent.name}-{i}", "model_id": agent.model, "job": job,
                       "price_micro_per_j": PRICE, "stake_micro": agent.stake_micro}  # fmt: skip
                clients[agent.name].bid(bid)
        leases = self._wait_for_leases(clients, self.rounds)
        if not control.drain(600):
            raise RuntimeError("exact-tier leases still pending after 600 s")
        return [
            lease_row(agents[name], clients[name].lease(lease_id), admin.challenges(lease_id))
            for name, lease_id in leases
        ]

    @staticmethod
    def _wait_for_leases(
        clients: dict[str, ServiceClient], rounds: int, timeout_s: float = 900
    ) -> list[tuple[str, str]]:
        """Each agent's leases once their receipts are in (the node serves them as it pulls)."""
        deadline, found = time.monotonic() + timeout_s, set()
        while len(found) < rounds * len(clients) and time.monotonic() < deadline:
            for name, client in clients.items():
                found.update((name, v.lease_id) for v in client.leases() if v.verdict is not None)
            time.sleep(0.2)
        if len(found) < rounds * len(clients):
            raise RuntimeError(
                f"{rounds * len(clients) - len(found)} leases got no receipt in {timeout_s:.0f} s"
            )
        return sorted(found)


def lease_row(agent: ExactAgent, view: LeaseView, challenges: list[ChallengeView]) -> dict[str, Any]:
    """What the demo reports of one exact-tier lease."""
    verdict = view.verdict
    if verdict is None:
        raise RuntimeError(f"lease {view.lease_id} has no verdict yet")
    layers = {d.layer: d for d in verdict.layers}
    exact = [d for d in verdict.layers if d.layer == "L3-exact"]
    settled = next((d for d in exact if "dispute" in d.details), None)
    l4 = layers.get("L4-audit")
    return {
        "agent": agent.name,
        "model": agent.model,
        "shows": agent.mode,
        "tier": view.tier,
        "audit_probability": view.audit_probability,
        "verdict": verdict.verdict,
        "reason": verdict.reason,
        "final": verdict.final,
        "stake_outcome": verdict.stake_outcome,
        "stake_micro": view.stake_micro,
        "l3": [{"status": d.status, "reason": d.reason, "cost_s": d.cost_s} for d in exact],
        "dispute_s": settled.cost_s if settled else None,
        "dispute_waited_s": settled.details.get("waited_for_openings_s") if settled else None,
        "l4": l4.status if l4 else "not drawn",
        "l4_cost_s": l4.cost_s if l4 else None,
        "dispute": settled.details["dispute"] if settled else None,
        "openings": [(c.kind, c.status, c.answer_bytes) for c in challenges],
    }


def exact_lines(summary: dict[str, Any]) -> list[str]:
    """What `poi demo` prints of it."""
    head = f"Exact tier (L3) through the control plane ({summary['url']}), window {summary['window_s']} s"
    lines = [f"[bold]{head}[/]"]
    for r in summary["leases"]:
        colour = "green" if r["verdict"] == "affirming" else "red"
        l3 = "; ".join(f"{d['status']}: {d['reason'][:110]}" for d in r["l3"])
        l3 = l3 or f"not reached: {r['reason'][:110]}"  # caught inline (L0-L2) before any challenge
        lines.append(
            f"  {r['agent']:8} {r['model']:15} {r['shows']:24} [{colour}]{r['verdict']}[/], stake "
            f"{r['stake_outcome']}; L4 {r['l4']} (p {r['audit_probability']:.2f}); "
            f"{len(r['openings'])} openings; L3 {l3}"
        )
        if r["dispute"]:
            d = r["dispute"]
            who = "agent wins" if d["agent_wins"] else f"block {d['block']} {d['op']}"
            lines.append(f"           dispute by bisection: {who} after opening block inputs {d['probes']}")
    lines.append(f"  ledger check: {'ok' if summary['ledger_ok'] else 'FAILED'}")
    return lines


def run_exact_demo(workdir: Path) -> dict[str, Any]:
    return ExactDemo(workdir).run()


ZK_MODEL = "gpt2-micro"  # d 64: a width EZKL proves in seconds on a CPU (d 384 takes minutes and 10 GiB)


def run_zk_demo(workdir: Path) -> dict[str, Any]:
    """A high-tier lease whose challenged block half is proven by the agent with EZKL and verified by
    Maxwell, bound to the receipt's trace root (L3-zk). Small width on purpose, and a test-only SRS
    (`ezkl.gen_srs`): production needs a ceremony SRS. Skipped, with the reason, without ezkl."""
    try:
        import ezkl  # noqa: F401  (the `zk` extra)
    except ImportError:
        return {"skipped": "ezkl is not installed (pip install 'maxwell-poi[zk]')"}
    from ..cli.zk import demo_zk_challenge
    from ..protocol.lease import GenerateJob, Lease
    from ..protocol.trace import Trace
    from ..prover.sdk import Prover
    from ..registry.models import Registry

    registry = Registry()
    traces = workdir / "traces"
    prover = Prover(AgentKey.generate(), registry, trace_dir=traces)
    lease = Lease.issue("alice", ZK_MODEL, GenerateJob(prompt=PROMPTS[0], max_new_tokens=12))
    receipt = prover.run(lease)
    trace = Trace.load(traces / f"{lease.lease_id}.npz")
    t0 = time.perf_counter()
    try:
        with _stdout_to_stderr():  # ezkl's calibration prints tables: keep `poi demo --json`'s stdout clean
            result = demo_zk_challenge(registry.load(ZK_MODEL), lease, receipt, trace, kind="mlp")
    except PoiError as exc:  # ezkl's prover deadlock (pyo3-log / GIL): the demo goes on and says so
        return {"model": ZK_MODEL, "status": "not_measured", "reason": str(exc)}
    summary = {
        "model": ZK_MODEL,
        "status": result.status.value,
        "reason": result.reason,
        "wall_s": round(time.perf_counter() - t0, 1),
        "details": {k: v for k, v in result.details.items() if isinstance(v, str | int | float | bool)},
    }
    (workdir / "zk.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at stderr for the block (native code writes there, past sys.stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def zk_lines(summary: dict[str, Any]) -> list[str]:
    if "skipped" in summary:
        return [f"[yellow]L3-zk skipped:[/] {summary['skipped']}"]
    if summary["status"] == "not_measured":
        return [f"[yellow]L3-zk not measured:[/] {summary['reason'][:200]}"]
    colour = "green" if summary["status"] == "pass" else "red"
    d = summary["details"]
    return [
        f"[bold]L3-zk: an EZKL proof of one challenged block half ({summary['model']}, d {d.get('width')}; "
        "a small width on purpose, test-only SRS)[/]",
        f"  [{colour}]{summary['status']}[/]: {summary['reason'][:160]}",
        f"  proved in {d.get('prove_s', 0):.1f} s (peak {d.get('prove_peak_gb', 0):.2f} GiB), "
        f"{d.get('proof_bytes')} proof bytes; {summary['wall_s']} s with Maxwell's one-time setup",
    ]
