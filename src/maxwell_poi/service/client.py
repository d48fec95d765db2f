"""A client for the control plane's API (httpx): admin by token, agents and nodes by signed requests.

Every method returns the server's answer as the route's response model (service.wire), or raises
`ServiceRefused` carrying the server's status and its `{expected, got}` reason. Request bodies go
out as given (a model, or its fields): the server validates them and says what it expected.
`request` is the raw call (decoded JSON) for routes this client has no method for.
"""

from __future__ import annotations

import json
import socket
from typing import Any, TypeVar
from urllib.parse import urlencode

import httpx
from pydantic import BaseModel, TypeAdapter

from ..protocol.keys import AgentKey
from .auth import sign_request
from .wire import (
    AgentView,
    BalanceView,
    BidBody,
    BidView,
    ChallengeView,
    ConfigView,
    DepositAnswer,
    DisputeView,
    EarAnswer,
    EarKey,
    Health,
    IntakeAnswer,
    LeaseView,
    LedgerReport,
    NodeView,
    OpeningAnswer,
    PolicyView,
    PullAnswer,
    PullBody,
)

M = TypeVar("M", bound=BaseModel)


class ServiceRefused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.expected = error.get("expected", "")
        self.got = error.get("got", "")
        super().__init__(f"HTTP {status}: {error.get('message') or body}")


def _no_delay() -> httpx.HTTPTransport:
    """A transport with Nagle off: httpx writes a POST's headers and body separately, and with Nagle on
    the body waits for the server's (delayed, up to ~40 ms) ACK of the headers — on every pull, relay
    and intake a node posts."""
    return httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])


class ServiceClient:
    def __init__(
        self,
        base_url: str,
        *,
        admin_token: str | None = None,
        key: AgentKey | None = None,
        principal: str | None = None,  # "agent:alice" or "node:n1", with `key`
        timeout_s: float = 30.0,
        http: Any = None,
    ) -> None:
        """`http`: an httpx.Client to use instead (a FastAPI TestClient in tests)."""
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout_s, transport=_no_delay())
        self.admin_token = admin_token
        self.key = key
        self.principal = principal

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- plumbing -----------------------------------------------------------------------------------

    def request(
        self, method: str, path: str, body: Any = None, *, auth: str = "none", params: dict | None = None
    ) -> Any:
        """auth: "none", "admin" (bearer token) or "signed" (this client's key and principal)."""
        raw = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = {"content-type": "application/json"} if body is not None else {}
        if auth == "admin":
            headers["authorization"] = f"Bearer {self.admin_token}"
        elif auth == "signed":
            if self.key is None or self.principal is None:
                raise ValueError("a signed request needs the client's key and principal")
            headers.update(sign_request(self.key, self.principal, method, target, raw))
        response = self.http.request(method, target, content=raw, headers=headers)
        try:
            decoded = response.json()
        except ValueError:
            decoded = response.text
        if response.status_code >= 400:
            raise ServiceRefused(response.status_code, decoded)
        return decoded

    def call(
        self,
        model: type[M],
        method: str,
        path: str,
        body: Any = None,
        *,
        auth: str = "none",
        params: dict | None = None,
    ) -> M:
        """`request`, its answer read as `model`."""
        return model.model_validate(self.request(method, path, body, auth=auth, params=params))

    def call_list(
        self,
        model: type[M],
        method: str,
        path: str,
        *,
        auth: str = "none",
        params: dict | None = None,
    ) -> list[M]:
        return TypeAdapter(list[model]).validate_python(self.request(method, path, auth=auth, params=params))

    # -- anyone -------------------------------------------------------------------------------------

    def health(self) -> Health:
        return self.call(Health, "GET", "/healthz")

    def ear_key(self) -> EarKey:
        return self.call(EarKey, "GET", "/v1/ear-key")

    # -- Maxwell ------------------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key: str, command: list[str] | None = None) -> AgentView:
        body = {"agent_id": agent_id, "public_key": public_key, "command": command or []}
        return self.call(AgentView, "POST", "/v1/admin/agents", body, auth="admin")

    def enroll_node(self, node_id: str, public_key: str) -> NodeView:
        body = {"node_id": node_id, "public_key": public_key}
        return self.call(NodeView, "POST", "/v1/admin/nodes", body, auth="admin")

    def deposit(self, agent_id: str, amount_micro: int, key: str) -> DepositAnswer:
        body = {"agent_id": agent_id, "amount_micro": amount_micro, "key": key}
        return self.call(DepositAnswer, "POST", "/v1/admin/deposits", body, auth="admin")

    def ledger(self) -> LedgerReport:
        return self.call(LedgerReport, "GET", "/v1/admin/ledger", auth="admin")

    def config(self) -> ConfigView:
        return self.call(ConfigView, "GET", "/v1/admin/config", auth="admin")

    def policy(self) -> PolicyView:
        return self.call(PolicyView, "GET", "/v1/admin/policy", auth="admin")

    def set_policy(self, **policy: float | None) -> PolicyView:
        return self.call(PolicyView, "PUT", "/v1/admin/policy", policy, auth="admin")

    def leases_of(self, agent_id: str, limit: int = 100, offset: int = 0) -> list[LeaseView]:
        params = {"agent_id": agent_id, "limit": limit, "offset": offset}
        return self.call_list(LeaseView, "GET", "/v1/admin/leases", auth="admin", params=params)

    def challenges(self, lease_id: str) -> list[ChallengeView]:
        return self.call_list(ChallengeView, "GET", f"/v1/admin/leases/{lease_id}/challenges", auth="admin")

    # -- agents -------------------------------------------------------------------------------------

    def bid(self, bid: BidBody | dict[str, Any]) -> BidView:
        body = bid.model_dump(mode="json") if isinstance(bid, BidBody) else bid
        return self.call(BidView, "POST", "/v1/bids", body, auth="signed")

    def bids(self, limit: int = 100, offset: int = 0) -> list[BidView]:
        params = {"limit": limit, "offset": offset}
        return self.call_list(BidView, "GET", "/v1/agent/bids", auth="signed", params=params)

    def leases(self, limit: int = 100, offset: int = 0) -> list[LeaseView]:
        params = {"limit": limit, "offset": offset}
        return self.call_list(LeaseView, "GET", "/v1/agent/leases", auth="signed", params=params)

    def lease(self, lease_id: str) -> LeaseView:
        return self.call(LeaseView, "GET", f"/v1/agent/leases/{lease_id}", auth="signed")

    def ear(self, lease_id: str) -> EarAnswer:
        return self.call(EarAnswer, "GET", f"/v1/agent/leases/{lease_id}/ear", auth="signed")

    def dispute(self, lease_id: str, statement: str) -> DisputeView:
        path = f"/v1/agent/leases/{lease_id}/dispute"
        return self.call(DisputeView, "POST", path, {"statement": statement}, auth="signed")

    def balance(self) -> BalanceView:
        return self.call(BalanceView, "GET", "/v1/agent/balance", auth="signed")

    # -- nodes --------------------------------------------------------------------------------------

    def pull(
        self, headroom_j: float, agents: list[str], max_leases: int = 16, wait_s: float = 0.0
    ) -> PullAnswer:
        body = PullBody(headroom_j=headroom_j, agents=agents, max_leases=max_leases, wait_s=wait_s)
        return self.send_pull(body)

    def send_pull(self, body: PullBody) -> PullAnswer:
        """A pull with every field of its body (service.wire.PullBody: the one place it is defined)."""
        return self.call(PullAnswer, "POST", "/v1/node/pull", body.model_dump(mode="json"), auth="signed")

    def opening(
        self, challenge_id: int, lease_id: str, line: bytes, cpu_wait_s: float | None = None
    ) -> OpeningAnswer:
        body: dict[str, Any] = {"challenge_id": challenge_id, "lease_id": lease_id, "line": line.decode()}
        if cpu_wait_s is not None:  # the node's measurement (service.wire.OpeningBody)
            body["cpu_wait_s"] = cpu_wait_s
        return self.call(OpeningAnswer, "POST", "/v1/node/openings", body, auth="signed")

    def intake(self, lease_id: str, receipt: bytes, evidence: bytes) -> IntakeAnswer:
        body = {"lease_id": lease_id, "receipt": receipt.decode(), "evidence": evidence.decode()}
        return self.call(IntakeAnswer, "POST", "/v1/node/intake", body)
