"""A platform's mix for bench/service/load.py (`--mixed`): while the intake workers hand the corpus in
(closed loop, as fast as they are answered), agents post fresh signed bids at a set pace (20 a second
in all) and two more nodes pull at theirs (4 a second each; each pull an auction round that may issue
leases, with their energy holds and stakes), on the same server. Each route's rate and p50/p99 are measured
at the client; exactly once after the run: every bid accepted once (as many bid rows under the run's
prefix as bids accepted), every lease the pulls were handed issued once (no lease id twice
across pulls of one node, as many lease rows for those nodes as distinct leases).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import create_engine, func, select

from bench.service.corpus import MAX_PULL, MODEL, Fleet, Server
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.registry.prompts import PROMPTS
from maxwell_poi.service.client import ServiceClient, ServiceRefused
from maxwell_poi.service.schema import BidRow, LeaseRow

PULL_ROOM = 4  # new leases a mixed node asks for beyond those it already holds


@dataclass
class Route:
    """One route's answers: (latency s, status) each."""

    answers: list[tuple[float, str]] = field(default_factory=list)  # status "ok" or the refusal's code

    def measured(self, wall_s: float) -> dict[str, Any]:
        lat = np.array([a for a, _ in self.answers]) * 1000
        statuses: dict[str, int] = defaultdict(int)
        for _, status in self.answers:
            statuses[status] += 1
        n = len(self.answers)
        return {
            "requests": n,
            "per_s": round(n / wall_s, 1) if wall_s > 0 else 0.0,
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if n else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if n else None,
            "statuses": dict(statuses),
        }


@dataclass
class Mix:
    """Bidders and pullers running beside the intake load until `stop` is set."""

    server: Server
    fleet: Fleet
    stake: int
    bidders: int = 2
    pullers: int = 2
    bids_per_s: float = 20.0  # all bidders together: a platform's new work, paced (open loop)
    pulls_per_s: float = 4.0  # each node: a node polling every 250 ms
    prefix: str = field(default_factory=lambda: f"mixed-{uuid.uuid4().hex[:8]}")
    bids: Route = field(default_factory=Route)
    pulls: Route = field(default_factory=Route)
    leases: dict[str, list[str]] = field(default_factory=dict)  # node -> lease ids in pull order
    stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)

    def nodes(self) -> list[str]:
        return [f"{self.prefix}-node-{i}" for i in range(self.pullers)]

    def start(self) -> None:
        """Enroll the mixed nodes, then start the bidder and puller threads."""
        keys = {node: NodeKey.generate() for node in self.nodes()}
        with self.server.admin() as admin:
            for node, key in keys.items():
                admin.enroll_node(node, key.public_hex)
        agents = list(self.fleet.agent_keys)
        for i in range(self.bidders):
            client = self.fleet.agent_client(self.server, agents[i % len(agents)])
            self._spawn(f"bidder-{i}", lambda c=client, i=i: self._bid(c, i))
        for node, key in keys.items():
            client = ServiceClient(self.server.url, key=key, principal=f"node:{node}")
            self.leases[node] = []
            self._spawn(node, lambda c=client, n=node: self._pull(c, n, agents))

    def finish(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _bid(self, client: ServiceClient, worker: int) -> None:
        job = {"kind": "generate", "max_new_tokens": 4}
        count, every = 0, self.bidders / self.bids_per_s
        with client:
            while not self.stop.wait(every):
                body = {
                    "bid_id": f"{self.prefix}-{worker}-{count}",
                    "model_id": MODEL,
                    "job": {**job, "prompt": PROMPTS[count % len(PROMPTS)]},
                    "price_micro_per_j": 100,
                    "stake_micro": self.stake,
                }
                count += 1
                self._timed(self.bids, lambda b=body: client.bid(b))

    def _pull(self, client: ServiceClient, node: str, agents: list[str]) -> None:
        with client:
            while not self.stop.wait(1 / self.pulls_per_s):
                held = len(self.leases[node])
                limit = min(MAX_PULL, held + PULL_ROOM)
                answer = self._timed(self.pulls, lambda k=limit: client.pull(1e6, agents, max_leases=k))
                if answer is None:
                    continue
                fresh = [p.lease["lease_id"] for p in answer.leases][held:]  # outstanding ones first
                with self._lock:
                    self.leases[node].extend(fresh)
                if limit == MAX_PULL:
                    return  # this node holds all it may: no more rounds for it

    def _timed(self, route: Route, call: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            answer, status = call(), "ok"
        except ServiceRefused as exc:
            answer, status = None, str(exc.status)
        with self._lock:
            route.answers.append((time.perf_counter() - t0, status))
        return answer

    def measured(self, wall_s: float, read_url: str) -> dict[str, Any]:
        """Each route's figures and the exactly-once check of bids and issued leases."""
        problems = []
        accepted = sum(1 for _, status in self.bids.answers if status == "ok")
        issued = [lid for ids in self.leases.values() for lid in ids]
        if len(set(issued)) != len(issued):
            twice = len(issued) - len(set(issued))
            problems.append(f"expected each lease handed to one pull once, got {twice} twice")
        engine = create_engine(read_url)
        try:
            with engine.connect() as conn:
                bid_rows = conn.scalar(
                    select(func.count()).select_from(BidRow).where(BidRow.bid_id.like(f"{self.prefix}-%"))
                )
                lease_rows = conn.scalar(
                    select(func.count()).select_from(LeaseRow).where(LeaseRow.node_id.in_(self.nodes()))
                )
        finally:
            engine.dispose()
        if bid_rows != accepted:
            problems.append(f"expected {accepted} bid rows (bids accepted), got {bid_rows}")
        if lease_rows != len(set(issued)):
            problems.append(f"expected {len(set(issued))} leases on the mixed nodes, got {lease_rows}")
        return {
            "bids": self.bids.measured(wall_s),
            "pulls": self.pulls.measured(wall_s),
            "leases_issued_by_pulls": len(set(issued)),
            "bidders": self.bidders,
            "pullers": self.pullers,
            "mix_problems": problems,
        }
