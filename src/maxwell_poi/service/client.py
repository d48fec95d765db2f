"""A client for the control plane's API (httpx): admin by token, agents and nodes by signed requests.

Every method returns the decoded JSON body or raises `ServiceRefused` carrying the server's
status and its `{expected, got}` reason.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx

from ..protocol.keys import AgentKey
from .auth import sign_request


class ServiceRefused(Exception):
    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.expected = error.get("expected", "")
        self.got = error.get("got", "")
        super().__init__(f"HTTP {status}: {error.get('message') or body}")


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
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout_s)
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

    # -- Maxwell ------------------------------------------------------------------------------------

    def enroll_agent(self, agent_id: str, public_key: str, command: list[str] | None = None) -> Any:
        body = {"agent_id": agent_id, "public_key": public_key, "command": command or []}
        return self.request("POST", "/v1/admin/agents", body, auth="admin")

    def enroll_node(self, node_id: str, public_key: str) -> Any:
        return self.request(
            "POST", "/v1/admin/nodes", {"node_id": node_id, "public_key": public_key}, auth="admin"
        )

    def deposit(self, agent_id: str, amount_micro: int, key: str) -> Any:
        body = {"agent_id": agent_id, "amount_micro": amount_micro, "key": key}
        return self.request("POST", "/v1/admin/deposits", body, auth="admin")

    def ledger(self) -> Any:
        return self.request("GET", "/v1/admin/ledger", auth="admin")

    def set_policy(self, **policy: float | None) -> Any:
        return self.request("PUT", "/v1/admin/policy", policy, auth="admin")

    def challenges(self, lease_id: str) -> Any:
        return self.request("GET", f"/v1/admin/leases/{lease_id}/challenges", auth="admin")

    # -- agents -------------------------------------------------------------------------------------

    def bid(self, bid: dict[str, Any]) -> Any:
        return self.request("POST", "/v1/bids", bid, auth="signed")

    def leases(self, limit: int = 100, offset: int = 0) -> Any:
        return self.request(
            "GET", "/v1/agent/leases", auth="signed", params={"limit": limit, "offset": offset}
        )

    def lease(self, lease_id: str) -> Any:
        return self.request("GET", f"/v1/agent/leases/{lease_id}", auth="signed")

    def ear(self, lease_id: str) -> Any:
        return self.request("GET", f"/v1/agent/leases/{lease_id}/ear", auth="signed")

    def dispute(self, lease_id: str, statement: str) -> Any:
        return self.request(
            "POST", f"/v1/agent/leases/{lease_id}/dispute", {"statement": statement}, auth="signed"
        )

    def balance(self) -> Any:
        return self.request("GET", "/v1/agent/balance", auth="signed")

    # -- nodes --------------------------------------------------------------------------------------

    def pull(self, headroom_j: float, agents: list[str], max_leases: int = 16, wait_s: float = 0.0) -> Any:
        body = {"headroom_j": headroom_j, "agents": agents, "max_leases": max_leases, "wait_s": wait_s}
        return self.request("POST", "/v1/node/pull", body, auth="signed")

    def opening(self, challenge_id: int, lease_id: str, line: bytes) -> Any:
        body = {"challenge_id": challenge_id, "lease_id": lease_id, "line": line.decode()}
        return self.request("POST", "/v1/node/openings", body, auth="signed")

    def intake(self, lease_id: str, receipt: bytes, evidence: bytes) -> Any:
        body = {"lease_id": lease_id, "receipt": receipt.decode(), "evidence": evidence.decode()}
        return self.request("POST", "/v1/node/intake", body)
