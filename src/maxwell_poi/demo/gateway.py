"""A whole gateway on loopback, for `poi demo`, the gateway tests and bench/service/gateway.py: a control
plane (SQLite in `workdir`) with the gateway mounted, served by uvicorn on a free port; one node
long-polling it with resident agents in sandboxes; a requester with an API key; and the real
`openai` client pointed at it. Nothing here is simulated: the agents are real programs running a
real model, the money is the ledger's.
"""

from __future__ import annotations

import secrets
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import openai

from ..economics.tiers import TierPolicy
from ..gateway import Gateway, mount_gateway
from ..gateway.responses import OfferView, RequesterKey
from ..node.attest import NodeKey
from ..node.node import Node
from ..node.remote import RemoteNode
from ..node.runs import honest_agent_argv
from ..protocol.keys import AgentKey
from ..service import ControlPlane, ServiceClient, ServiceConfig
from ..service.api import create_app
from .harness import LoopbackServer, adversary_argv, ensure_profile

REQUESTER_DEPOSIT = 10_000_000


@dataclass
class GatewayStack:
    workdir: Path
    audit_all: bool = True  # tier policy: every lease audited (streamed); False keeps the default tiers
    wait_s: float = 2.0
    canary_rate: float = 0.0  # off: a test or the demo sends canaries itself (a drawn one moves balances)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))

    def __enter__(self) -> GatewayStack:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = ServiceConfig(
            db=str((self.workdir / "cp.sqlite").resolve()),
            admin_token=self.token,
            canary_rate=self.canary_rate,
        )
        config.validate()
        self.control = ControlPlane(config)
        self.control.start()
        self.gateway = Gateway(self.control)
        app = create_app(self.control)
        mount_gateway(app, self.gateway)
        self.server = LoopbackServer(app)
        self.url = self.server.__enter__()
        self.admin = ServiceClient(self.url, admin_token=self.token)
        if self.audit_all:
            policy = {**asdict(TierPolicy()), "medium_from_value": 0.0, "high_from_value": 0.0}
            self.admin.set_policy(**policy)
        node_key = NodeKey.generate()
        self.admin.enroll_node("gw-node", node_key.public_hex)
        self.node = Node("gw-node", node_key, None)
        node_client = ServiceClient(self.url, key=node_key, principal="node:gw-node")
        self.remote = RemoteNode(
            node_client, self.node, batch=2, poll_s=0.05, wait_s=self.wait_s, headroom=lambda: 1e6
        )
        self._stop = threading.Event()
        self._node_thread = threading.Thread(target=self.remote.run, args=(self._stop,), daemon=True)
        self._node_thread.start()
        answer = self.admin.call(
            RequesterKey,
            "POST",
            "/v1/admin/requesters",
            {"requester_id": "alice-app", "deposit_micro": REQUESTER_DEPOSIT},
            auth="admin",
        )
        self.api_key = answer.api_key
        return self

    def add_agent(
        self, name: str, argv: list[str], key: AgentKey, *, model_id: str, ask: int, stake: int = 100_000
    ) -> None:
        """Enroll `name` with its program, fund it, and post its standing offer for `model_id`."""
        self.admin.enroll_agent(name, key.public_hex, argv)
        self.admin.deposit(name, 50_000_000, f"fund-{name}")
        with ServiceClient(self.url, key=key, principal=f"agent:{name}") as agent:
            body = {
                "model_id": model_id,
                "ask_micro_per_token": ask,
                "price_micro_per_j": 20,
                "stake_micro": stake,
            }
            agent.call(OfferView, "POST", "/v1/agent/offers", body, auth="signed")

    def honest_agent(self, name: str, model_id: str, ask: int) -> None:
        key = AgentKey.generate()
        path = self.workdir / f"{name}.pem"
        key.save(path)
        self.add_agent(name, honest_agent_argv(path, "--resident"), key, model_id=model_id, ask=ask)

    def cheater(self, name: str, module: str, args: list[str], model_id: str, ask: int) -> None:
        key = AgentKey.generate()
        path = self.workdir / f"{name}.pem"
        key.save(path)
        self.add_agent(name, adversary_argv(module, path, *args), key, model_id=model_id, ask=ask)

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        """The official client, unchanged; no retries (a retried request would be a second lease)."""
        return openai.OpenAI(
            base_url=f"{self.url}/v1", api_key=api_key or self.api_key, max_retries=0, timeout=180
        )

    def balances(self) -> dict[str, int]:
        report = self.admin.ledger()
        if not report.check.ok:
            raise AssertionError(f"ledger check failed: {report.check.problems}")
        return report.balances

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._node_thread.join(timeout=30)
        self.node.close()
        self.server.__exit__(None, None, None)
        self.admin.close()
        self.control.close()


def maxwell_of(response: Any) -> dict[str, Any]:
    """The `maxwell` object the gateway attaches (the openai client keeps unknown fields as extras)."""
    extra = getattr(response, "model_extra", None) or {}
    return extra.get("maxwell") or {}


DEMO_MODEL, DEMO_DRAFT, DEMO_TOKENS = "poi-lm", "poi-lm-draft", 32
DEMO_CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the history of the river?"},
]


def run_gateway_demo(workdir: Path) -> dict[str, Any]:
    """`poi demo`'s ending: a verified chat completion through the openai client, then a cheater
    (a small draft model decoding, the leased model only prefilling) cut off mid-stream."""
    ensure_profile(DEMO_MODEL, DEMO_TOKENS)
    with GatewayStack(workdir) as gw:
        gw.honest_agent("alice", DEMO_MODEL, ask=10)
        client = gw.client()
        chat = client.chat.completions.create(model=DEMO_MODEL, messages=DEMO_CHAT, max_tokens=DEMO_TOKENS)
        honest = {"text": chat.choices[0].message.content, "maxwell": maxwell_of(chat)}
        gw.cheater("mallory", "cheap_draft", ["--draft", DEMO_DRAFT], DEMO_MODEL, ask=5)
        before = gw.balances()
        received, cut = [], {}
        try:
            stream = client.chat.completions.create(
                model=DEMO_MODEL, messages=DEMO_CHAT, max_tokens=DEMO_TOKENS, stream=True
            )
            for piece in stream:
                if piece.choices and piece.choices[0].delta.content:
                    received.append(piece.choices[0].delta.content)
        except openai.APIError as exc:
            cut = {"message": str(exc), "maxwell": (exc.body or {}).get("maxwell", {})}
        after = gw.balances()
    summary = {
        "url": gw.url,
        "honest": honest,
        "cheater": {
            "agent": "mallory",
            "attack": "cheap-draft",
            "cut": bool(cut),
            "text_received": "".join(received),
            **cut,
            "requester_charged_micro": before["requester:alice-app"] - after["requester:alice-app"],
            "stake_slashed_micro": after["maxwell:slashed"] - before["maxwell:slashed"],
        },
    }
    return summary


def gateway_lines(summary: dict[str, Any]) -> list[str]:
    """What `poi demo` prints of it."""
    h, c = summary["honest"], summary["cheater"]
    m = h["maxwell"]
    lines = [
        f"[bold]OpenAI client → Maxwell gateway ({summary['url']}/v1), {DEMO_MODEL}[/]",
        f"  assistant: {h['text']!r}",
        f"  maxwell: [{'green' if m.get('verdict') == 'affirming' else 'red'}]{m.get('verdict')}[/] — "
        + "; ".join(f"{d['layer']} {d['status']}" for d in m.get("layers", []))
        + f"; {m.get('energy_j', 0):.3f} J; charged {m.get('charged_micro')} micro; "
        + f"EAR {str(m.get('ear', ''))[:24]}…",
    ]
    if c["cut"]:
        lines.append(
            f"  cheater {c['agent']} ({c['attack']}): [red]cut off mid-stream[/] after "
            f"{c['maxwell'].get('cut_after_tokens')} tokens — {c['message'][:160]}"
        )
        lines.append(
            f"  requester charged {c['requester_charged_micro']} micro; "
            f"stake slashed {c['stake_slashed_micro']} micro"
        )
    else:
        lines.append(f"  [red]cheater {c['agent']} was NOT cut off mid-stream[/]")
    return lines
