"""A corpus of real, not yet handed-in node submissions for the control plane's load and crash benchmarks.

A real `poi serve` subprocess on loopback (not a TestClient), a resident profile of the model
measured first in the same POI_HOME (so L1/L2 appraise instead of skipping), one or more enrolled
nodes and K enrolled agents with deposits. Agents place bids; the node clients pull them in rounds;
real Nodes serve them with honest resident agents (`batch` leases at a time) and sign the evidence.
The (lease id, receipt, evidence) triples are kept WITHOUT handing them in: the load and crash
benchmarks do that. The leases belong to the server's database, so a corpus is built per database.

Used by bench/service/load.py, bench/service/crash.py and tests/test_service_crash.py.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from maxwell_poi.node.attest import NodeKey
from maxwell_poi.node.node import Node
from maxwell_poi.node.resident_runs import measure_resident_profile
from maxwell_poi.node.runs import honest_agent_argv
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.client import ServiceClient

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results" / "service.json"  # load.py and crash.py merge their keys into it
MODEL = "gpt2-micro"
RESERVE = 20  # micro/J: with capacity to spare every round clears at the reserve
MAX_PULL = 1024  # PullBody.max_leases' bound: a node holds at most this many unsubmitted leases
Log = Callable[[str], None]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the control plane as a subprocess --------------------------------------------------------------


@dataclass
class Server:
    """`poi serve` in its own process group, on loopback; SIGKILL-able; restartable on the same db."""

    home: Path
    db: str
    token: str = "bench-admin-token"
    port: int = field(default_factory=free_port)
    env: dict[str, str] = field(default_factory=dict)  # extra POI_SERVE_* settings
    workers: int = 1  # API processes (`poi serve --workers`)
    proc: subprocess.Popen | None = None
    lives: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        poi = ROOT / ".venv" / "bin" / "poi"
        head = [str(poi)] if poi.exists() else [sys.executable, "-m", "maxwell_poi"]
        return [
            *head,
            "serve",
            "--db",
            self.db,
            "--port",
            str(self.port),
            "--admin-token",
            self.token,
            "--reserve",
            str(RESERVE),
            "--no-access-log",  # a log line per request is not part of the hot path being measured
            *(["--workers", str(self.workers)] if self.workers > 1 else []),
        ]

    def start(self, timeout_s: float = 90.0) -> float:
        """Start and wait for /healthz; seconds it took. Refuses with the server's log on failure."""
        env = {
            **os.environ,
            "POI_HOME": str(self.home),
            "HF_HUB_OFFLINE": "1",
            "POI_SERVE_LEASE_TTL_S": "3600",  # a corpus outlives the default 600 s before it is handed in
            "POI_SERVE_MAX_LEASES_PER_PULL": str(MAX_PULL),
            "POI_SERVE_MAX_OPEN_BIDS": "100000",  # the corpus bids in bulk (the cap: test_service_attacks)
            **self.env,
        }
        self.lives += 1
        log_path = self.log_path()
        t0 = time.monotonic()
        with open(log_path, "wb") as fh:
            self.proc = subprocess.Popen(
                self.argv(),
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a SIGKILL of its group hits the server only
            )
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"poi serve exited {self.proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return time.monotonic() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"poi serve: expected /healthz within {timeout_s} s; log: {log_path}")

    def log_path(self) -> Path:
        """This life's stdout and stderr (the settings it printed at start, uvicorn's log)."""
        return self.home / f"server-{self.port}-{self.lives}.log"

    def kill(self) -> None:
        """SIGKILL to the server's whole process group (`poi serve --workers N`'s workers, the audit
        pool): no shutdown handler, no flush, no rollback — the crash under test."""
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: pid is the group's id
            self.proc.wait()

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM: uvicorn's orderly shutdown (the audit workers stop, the engine is disposed)."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()

    def admin(self) -> ServiceClient:
        return ServiceClient(self.url, admin_token=self.token)

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def ensure_profile(model: str = MODEL, say: Log = log) -> None:
    """A resident profile of `model` in $POI_HOME (L1/L2 skip without one); measured once per home."""
    from maxwell_poi.observer.host import this_device
    from maxwell_poi.registry.profiles import ProfileStore

    store = ProfileStore()
    if store.get(model, f"{this_device()}|resident") is not None:
        return
    t0 = time.monotonic()
    store.put(measure_resident_profile(model, runs=2, tokens=8, batches=(1, 2, 4)))
    say(f"resident profile of {model} measured in {time.monotonic() - t0:.1f} s")


# -- the parties --------------------------------------------------------------------------------------


@dataclass
class Fleet:
    """The bench's node(s) and agents: keys under home/bench-keys, one Node per node id, each with its
    honest resident agents started on first use. Reused across servers (SQLite, then PostgreSQL)."""

    home: Path
    agents: int = 2
    nodes: int = 1
    batch: int = 4
    node_keys: dict[str, NodeKey] = field(default_factory=dict)
    agent_keys: dict[str, AgentKey] = field(default_factory=dict)
    running: dict[str, Node] = field(default_factory=dict)

    def __post_init__(self) -> None:
        keys = self.home / "bench-keys"
        keys.mkdir(parents=True, exist_ok=True)
        for i in range(self.nodes):
            self.node_keys[f"bench-node-{i}"] = NodeKey.ensure(keys / f"node-{i}.pem")
        for i in range(self.agents):
            self.agent_keys[f"bench-agent-{i}"] = AgentKey.ensure(keys / f"agent-{i}.pem")

    def command(self, agent_id: str) -> list[str]:
        index = agent_id.rsplit("-", 1)[1]
        pem = self.home / "bench-keys" / f"agent-{index}.pem"
        # the agent decodes the leases it is handed together in one batch, as the profile measured
        return honest_agent_argv(pem, "--resident", "--max-batch", str(self.batch))

    def enroll(self, server: Server) -> None:
        with server.admin() as admin:
            for node_id, key in self.node_keys.items():
                admin.enroll_node(node_id, key.public_hex)
            for agent_id, key in self.agent_keys.items():
                admin.enroll_agent(agent_id, key.public_hex, self.command(agent_id))

    def fund(self, server: Server, micro: int, key: str = "bench-fund") -> None:
        with server.admin() as admin:
            for agent_id in self.agent_keys:
                admin.deposit(agent_id, micro, f"{key}-{agent_id}")

    def agent_client(self, server: Server, agent_id: str) -> ServiceClient:
        return ServiceClient(server.url, key=self.agent_keys[agent_id], principal=f"agent:{agent_id}")

    def node_client(self, server: Server, node_id: str) -> ServiceClient:
        return ServiceClient(server.url, key=self.node_keys[node_id], principal=f"node:{node_id}")

    def node(self, node_id: str) -> Node:
        if node_id not in self.running:
            self.running[node_id] = Node(node_id, self.node_keys[node_id], None)
        return self.running[node_id]

    def serve(self, node_id: str, leases: list[Lease]) -> list[Entry]:
        """Run the leases on the node's resident agents, `batch` at a time; nothing is handed in."""
        node, out = self.node(node_id), []
        by_agent: dict[str, list[Lease]] = {}
        for lease in leases:
            by_agent.setdefault(lease.agent_id, []).append(lease)
        for agent_id, mine in by_agent.items():
            if agent_id not in node.agents:
                node.start_agent(agent_id, self.command(agent_id), cwd=str(self.home))
            for i in range(0, len(mine), self.batch):
                for r in node.serve(agent_id, mine[i : i + self.batch]):
                    out.append(Entry(r.lease.lease_id, agent_id, node_id, r.run.receipt, r.signed_evidence))
        return out

    def close(self) -> None:
        for node in self.running.values():
            node.close()
        self.running.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# -- the corpus ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    lease_id: str
    agent_id: str
    node_id: str
    receipt: bytes
    evidence: bytes

    def body(self) -> bytes:
        """POST /v1/node/intake's body, encoded once (the load generator sends it as is)."""
        return json.dumps(
            {"lease_id": self.lease_id, "receipt": self.receipt.decode(), "evidence": self.evidence.decode()},
            separators=(",", ":"),
        ).encode()


@dataclass
class Corpus:
    entries: list[Entry]
    policy: dict[str, Any]
    stake_micro: int
    expected_j: float
    tiers: dict[str, int]
    audit_probability: dict[str, float]
    build_s: float

    def describe(self) -> dict[str, Any]:
        return {
            "entries": len(self.entries),
            "policy": self.policy,
            "stake_micro": self.stake_micro,
            "expected_j_per_lease": round(self.expected_j, 6),
            "tiers": self.tiers,
            "audit_probability": self.audit_probability,
            "build_s": round(self.build_s, 1),
            "mean_evidence_bytes": round(
                sum(len(e.evidence) for e in self.entries) / max(1, len(self.entries))
            ),
        }


def medium_policy() -> dict[str, float]:
    """Every lease is tier medium (value >= 0; nothing reaches `high`): L0+L1+L2 inline, then the L4
    audit lottery at the deterrence probability, which the stake makes small (stake_for)."""
    return {
        "medium_from_value": 0.0,
        "high_from_value": 1e12,
        "audit_cost_fraction": 1 / 16.6,
        "upgrade_headroom_factor": 2.0,
        "margin": 0.5,
    }


def stake_for(audit_p: float, expected_j: float, price: int = RESERVE, margin: float = 0.5) -> int:
    """The stake that makes the deterrence probability p = (1+margin)·V/(V+S) equal `audit_p`, for a
    lease of value V = price·expected_j (tiers.py, deterrence.py)."""
    value = price * expected_j
    return max(1, math.ceil(value * ((1 + margin) / audit_p - 1)))


def build_corpus(
    server: Server,
    fleet: Fleet,
    n: int,
    *,
    audit_p: float = 0.01,
    round_size: int = 64,
    tokens: int = 4,
    say: Log = log,
) -> Corpus:
    """Enroll, fund, bid `n` leases, pull them in rounds and serve them; keep the evidence un-handed-in."""
    if n > MAX_PULL * fleet.nodes:
        raise ValueError(f"n: expected <= {MAX_PULL} leases per node ({fleet.nodes} nodes), got {n}")
    t0 = time.monotonic()
    admin = server.admin()
    admin.set_policy(**medium_policy())
    fleet.enroll(server)
    agents = list(fleet.agent_keys)
    clients = {a: fleet.agent_client(server, a) for a in agents}
    job = {"kind": "generate", "prompt": PROMPTS[0], "max_new_tokens": tokens}
    # a probe below the reserve says what Maxwell expects a lease to cost; it never wins
    probe = clients[agents[0]].bid(
        {"bid_id": "probe", "model_id": MODEL, "job": job, "price_micro_per_j": 1, "stake_micro": 0}
    )
    expected_j = float(probe.expected_j)
    stake = stake_for(audit_p, expected_j)
    per_lease = math.ceil(expected_j * 3 * RESERVE) + stake  # market.HOLD_FACTOR = 3
    fleet.fund(server, min(10**15, 2 * per_lease * n + 10**9))
    say(f"{server.url}: expected {expected_j:.4f} J a lease; stake {stake} micro for audit p ~ {audit_p}")
    for i in range(n):
        body = {
            "bid_id": f"bench-{i}",
            "model_id": MODEL,
            "job": {**job, "prompt": PROMPTS[i % len(PROMPTS)]},
            "price_micro_per_j": 100,
            "stake_micro": stake,
        }
        clients[agents[i % len(agents)]].bid(body)
    say(f"{n} bids placed; pulling in rounds of {round_size} and serving with batch {fleet.batch}")
    entries: list[Entry] = []
    tiers: dict[str, int] = {}
    probabilities: list[float] = []
    per_node = [min(MAX_PULL, n - i * MAX_PULL) for i in range(math.ceil(n / MAX_PULL))]
    for node_id, want in zip(fleet.node_keys, per_node, strict=False):
        client, seen = fleet.node_client(server, node_id), set()
        while len(seen) < want:
            # pull returns this node's outstanding leases first: ask for those plus one more round
            limit = min(MAX_PULL, len(seen) + round_size, want)
            pulled = client.pull(1e6, agents, max_leases=limit).leases
            fresh = [p for p in pulled if p.lease["lease_id"] not in seen]
            if not fresh:
                raise RuntimeError(f"{node_id}: a pull brought no new lease with {len(seen)} of {want}")
            for p in fresh:
                tiers[p.tier] = tiers.get(p.tier, 0) + 1
                probabilities.append(p.audit_probability)
                seen.add(p.lease["lease_id"])
            entries += fleet.serve(node_id, [Lease.model_validate(p.lease) for p in fresh])
            say(f"{node_id}: {len(seen)}/{want} leases pulled and served")
        client.close()
    for c in clients.values():
        c.close()
    admin.close()
    spread = {
        "min": min(probabilities),
        "max": max(probabilities),
        "mean": sum(probabilities) / len(probabilities),
    }
    return Corpus(entries, medium_policy(), stake, expected_j, tiers, spread, time.monotonic() - t0)


@contextmanager
def poi_home(path: Path) -> Iterator[Path]:
    """Point $POI_HOME at `path` for this process (the profile store, keys) and the servers it starts."""
    before = os.environ.get("POI_HOME")
    os.environ["POI_HOME"] = str(path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        yield path
    finally:
        if before is None:
            os.environ.pop("POI_HOME", None)
        else:
            os.environ["POI_HOME"] = before
