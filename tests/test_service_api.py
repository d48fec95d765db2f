"""The control plane's HTTP API through a TestClient, without agent processes: who may call what,
the error body of every refusal, idempotent writes, leases with their money held, refusal of forged
evidence, and metrics. The money checks run on SQLite and on PostgreSQL (test_ledger's fixtures)."""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from maxwell_poi.ledger import Ledger, check_ledger, open_ledger_db
from maxwell_poi.node.attest import NodeKey, sign_evidence
from maxwell_poi.observer.evidence import LeaseEvidence
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.service import ControlPlane, ServiceConfig
from maxwell_poi.service.api import create_app
from maxwell_poi.service.auth import sign_request

TOKEN = "admin-secret"
RESERVE = 20
DEPOSIT = 10_000_000
MAX_BODY = 64 * 1024
JSON = "application/json"
JOB = {"kind": "generate", "prompt": "hi there", "max_new_tokens": 4}


@dataclass
class Plane:
    cp: ControlPlane
    tc: TestClient
    keys: dict[str, AgentKey]  # "agent:alice", "agent:bob", "node:n1", "node:n2"

    def admin(self, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> Any:
        headers = {"authorization": f"Bearer {token}"} if token is not None else {}
        return self.tc.request(method, path, json=body, headers=headers)

    def signed(self, who: str, method: str, path: str, body: Any = None, send: bytes | None = None) -> Any:
        """A request signed over `body` by `who`'s own key; `send`: other bytes sent instead."""
        raw = b"" if body is None else json.dumps(body).encode()
        headers = {**sign_request(self.keys[who], who, method, path, raw), "content-type": JSON}
        return self.tc.request(method, path, content=raw if send is None else send, headers=headers)

    def bid(self, principal: str = "agent:alice", **over: Any) -> Any:
        body = {"bid_id": "b1", "model_id": "gpt2-micro", "job": JOB, "price_micro_per_j": 100}
        body.update({"stake_micro": 100_000, **over})
        return self.signed(principal, "POST", "/v1/bids", body)

    def pull(self, node: str = "n1", agents: list[str] | None = None, headroom: float = 1e6) -> Any:
        body = {"headroom_j": headroom, "agents": agents or [], "max_leases": 16}
        return self.signed(f"node:{node}", "POST", "/v1/node/pull", body)

    def ledger(self) -> dict[str, Any]:
        report = self.admin("GET", "/v1/admin/ledger")
        assert report.status_code == 200, report.text
        return report.json()


def _error(response: Any, status: int) -> dict[str, Any]:
    """The refusal's error object, after checking its status and shape."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert {"status", "expected", "got", "message"} <= set(error), error
    assert error["status"] == status
    assert isinstance(error["expected"], str) and error["expected"]
    return error


@pytest.fixture()
def plane(request: pytest.FixtureRequest, tmp_path, monkeypatch) -> Iterator[Plane]:
    """A control plane with alice (funded) and bob enrolled, nodes n1 and n2; its own POI_HOME so
    that its policy file and EAR key are its own. SQLite unless parametrized "postgresql"."""
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    db = str(tmp_path / "cp.sqlite")
    config = ServiceConfig.from_env(
        db=db, admin_token=TOKEN, reserve_micro_per_j=RESERVE, max_body_bytes=MAX_BODY
    )
    ledger = None
    if getattr(request, "param", "sqlite") == "postgresql":
        url, args = request.getfixturevalue("pg_schema")
        ledger = Ledger(open_ledger_db(url, connect_args=args))
    cp = ControlPlane(config, ledger=ledger)
    cp.start()
    keys = {p: AgentKey.generate() for p in ("agent:alice", "agent:bob")}
    keys.update({p: NodeKey.generate() for p in ("node:n1", "node:n2")})
    with TestClient(create_app(cp), raise_server_exceptions=False) as tc:
        p = Plane(cp, tc, keys)
        for principal, key in keys.items():
            role, ident = principal.split(":")
            extra = {"command": []} if role == "agent" else {}
            body = {f"{role}_id": ident, "public_key": key.public_hex, **extra}
            assert p.admin("POST", f"/v1/admin/{role}s", body).status_code == 201
        funds = {"agent_id": "alice", "amount_micro": DEPOSIT, "key": "d"}
        assert p.admin("POST", "/v1/admin/deposits", funds).status_code == 200
        yield p
    cp.close()


BOTH_DATABASES = pytest.mark.parametrize("plane", ["sqlite", "postgresql"], indirect=True)


# -- anyone ---------------------------------------------------------------------------------------
def test_healthz_and_the_ear_key(plane: Plane) -> None:
    health = plane.tc.get("/healthz").json()
    assert health == {
        "status": "ok",
        "db": "sqlite",
        "audit_queue": 0,
        "process": os.getpid(),
        "audit_lead": True,  # the only control plane on its database
    }
    jwk = plane.tc.get("/v1/ear-key").json()
    assert (jwk["kty"], jwk["crv"], jwk["alg"]) == ("OKP", "Ed25519", "EdDSA")
    x = jwk["x"] + "=" * (-len(jwk["x"]) % 4)
    assert base64.urlsafe_b64decode(x).hex() == plane.cp.ear_key.public_hex


ROUTES = """GET /healthz, GET /metrics, GET /v1/ear-key, POST /v1/admin/agents, POST /v1/admin/nodes,
POST /v1/admin/deposits, GET /v1/admin/policy, PUT /v1/admin/policy, GET /v1/admin/ledger,
GET /v1/admin/leases, GET /v1/admin/config, POST /v1/bids, GET /v1/agent/bids, GET /v1/agent/leases,
GET /v1/agent/leases/{lease_id}, GET /v1/agent/leases/{lease_id}/ear, GET /v1/agent/balance,
POST /v1/agent/leases/{lease_id}/dispute, POST /v1/node/pull, POST /v1/node/intake"""


def test_openapi_lists_every_route(plane: Plane) -> None:
    spec = plane.tc.get("/openapi.json").json()
    served = {f"{m.upper()} {path}" for path, ops in spec["paths"].items() for m in ops}
    assert {r.strip() for r in ROUTES.split(",")} <= served
    assert "BidBody" in spec["components"]["schemas"]


def test_unknown_route_and_method_answer_the_error_shape(plane: Plane) -> None:
    _error(plane.tc.get("/v1/nothing-here"), 404)
    _error(plane.tc.delete("/healthz"), 405)


# -- Maxwell --------------------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("POST", "/v1/admin/agents", {"agent_id": "eve", "public_key": "ab" * 32, "command": []}),
    ("POST", "/v1/admin/nodes", {"node_id": "n9", "public_key": "ab" * 32}),
    ("POST", "/v1/admin/deposits", {"agent_id": "alice", "amount_micro": 5, "key": "sneaky"}),
    ("GET", "/v1/admin/policy", None),
    ("PUT", "/v1/admin/policy", {"medium_from_value": 0, "high_from_value": 0, "audit_cost_fraction": 0.1,
                                 "upgrade_headroom_factor": 2, "margin": 0.5}),
    ("GET", "/v1/admin/ledger", None),
    ("GET", "/v1/admin/leases?agent_id=alice", None),
    ("GET", "/v1/admin/config", None),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_admin_routes_refuse_a_missing_or_wrong_token(
    plane: Plane, method: str, path: str, body: Any, token: str | None
) -> None:
    before = plane.ledger()["balances"]
    error = _error(plane.admin(method, path, body, token=token), 401)
    assert "Bearer" in error["expected"]
    assert plane.ledger()["balances"] == before  # the deposit did not happen
    assert "eve" not in plane.cp.agents and "n9" not in plane.cp.nodes


def test_admin_token_details(plane: Plane) -> None:
    # checked before the body is read; Basic auth with the token is not Bearer; never shown back
    _error(plane.admin("POST", "/v1/admin/deposits", {"nonsense": True}, token="wrong"), 401)
    _error(plane.tc.get("/v1/admin/config", headers={"authorization": f"Basic {TOKEN}"}), 401)
    config = plane.admin("GET", "/v1/admin/config")
    assert config.json()["reserve_micro_per_j"] == RESERVE
    assert TOKEN not in config.text


def test_enrollment_is_idempotent_and_a_second_key_conflicts(plane: Plane) -> None:
    key = AgentKey.generate()
    body = {"agent_id": "carol", "public_key": key.public_hex, "command": ["x"]}
    assert plane.admin("POST", "/v1/admin/agents", body).status_code == 201
    again = plane.admin("POST", "/v1/admin/agents", body)
    assert (again.status_code, again.json()) == (200, body)
    other = {**body, "public_key": AgentKey.generate().public_hex}
    _error(plane.admin("POST", "/v1/admin/agents", other), 409)
    assert plane.cp.agents.key_for("carol").keyval["public"] == key.public_hex  # the first key stays
    node = {"node_id": "n1", "public_key": plane.keys["node:n1"].public_hex}
    assert plane.admin("POST", "/v1/admin/nodes", node).status_code == 200
    _error(plane.admin("POST", "/v1/admin/nodes", {**node, "public_key": "cd" * 32}), 409)


@BOTH_DATABASES
def test_deposit_is_idempotent_by_key(plane: Plane) -> None:
    body = {"agent_id": "bob", "amount_micro": 700, "key": "dep-bob"}
    first = plane.admin("POST", "/v1/admin/deposits", body).json()
    second = plane.admin("POST", "/v1/admin/deposits", body).json()
    assert (first["created"], second["created"]) == (True, False)
    assert first["transfer_id"] == second["transfer_id"]
    assert second["wallet_micro"] == 700
    _error(plane.admin("POST", "/v1/admin/deposits", {**body, "amount_micro": 701}), 409)
    _error(plane.admin("POST", "/v1/admin/deposits", {**body, "agent_id": "nobody"}), 404)
    report = plane.ledger()
    assert report["balances"]["wallet:bob"] == 700 and report["check"]["ok"]


def test_policy_refuses_high_below_medium(plane: Plane) -> None:
    policy = plane.admin("GET", "/v1/admin/policy").json()
    bad = {**policy, "medium_from_value": 5.0, "high_from_value": 1.0}
    _error(plane.admin("PUT", "/v1/admin/policy", bad), 422)
    assert plane.admin("GET", "/v1/admin/policy").json() == policy


# -- signed requests ------------------------------------------------------------------------------
def test_a_correctly_signed_request_is_accepted(plane: Plane) -> None:
    r = plane.signed("agent:alice", "GET", "/v1/agent/balance")
    assert (r.status_code, r.json()) == (
        200,
        {"agent_id": "alice", "wallet_micro": DEPOSIT, "escrow_micro": 0},
    )


BALANCE = "/v1/agent/balance"
SIGNED_REFUSALS: dict[str, tuple[Any, str]] = {  # case: (headers(plane) for GET BALANCE, refusal says)
    "unsigned": (lambda p: {}, "x-poi-principal"),
    "unknown agent": (lambda p: _sign(p, "agent:mallory", AgentKey.generate()), "not enrolled"),
    "wrong key": (lambda p: _sign(p, key=p.keys["agent:bob"]), "does not verify"),
    "an hour old": (lambda p: _sign(p, now=time.time() - 3600), "timestamp within"),
    "an hour ahead": (lambda p: _sign(p, now=time.time() + 3600), "timestamp within"),
    "stamp in words": (lambda p: {**_sign(p), "x-poi-timestamp": "yesterday"}, "unix seconds"),
    "stamp nan": (lambda p: {**_sign(p), "x-poi-timestamp": "nan"}, "unix seconds"),
    "stamp inf": (lambda p: {**_sign(p), "x-poi-timestamp": "inf"}, "unix seconds"),
    "signed for another query": (lambda p: _sign(p, path=BALANCE + "?limit=5"), "does not verify"),
    "principal without id": (lambda p: {**_sign(p), "x-poi-principal": "agent:"}, "x-poi-principal"),
}  # fmt: skip


def _sign(p: Plane, who: str = "agent:alice", key: Any = None, now: Any = None, path: str = BALANCE) -> Any:
    return sign_request(key or p.keys[who], who, "GET", path, now=now)


@pytest.mark.parametrize("case", SIGNED_REFUSALS)
def test_signed_request_refusals(plane: Plane, case: str) -> None:
    headers, says = SIGNED_REFUSALS[case]
    error = _error(plane.tc.get(BALANCE, headers=headers(plane)), 401)
    assert says in error["expected"] + error["got"]


def test_body_tampered_after_signing_is_refused_and_nothing_is_bid(plane: Plane) -> None:
    body = {"bid_id": "t1", "model_id": "gpt2-micro", "job": JOB, "price_micro_per_j": 100, "stake_micro": 0}
    tampered = json.dumps({**body, "price_micro_per_j": 1_000_000}).encode()
    _error(plane.signed("agent:alice", "POST", "/v1/bids", body, send=tampered), 401)
    assert plane.signed("agent:alice", "GET", "/v1/agent/bids").json() == []


def test_node_key_on_an_agent_route_and_agent_key_on_a_node_route_are_forbidden(plane: Plane) -> None:
    error = _error(plane.signed("node:n1", "GET", "/v1/agent/balance"), 403)
    assert "signed by an agent" in error["expected"]
    assert plane.bid("node:n1").status_code == 403
    pull = {"headroom_j": 1e6, "agents": [], "max_leases": 1}
    _error(plane.signed("agent:alice", "POST", "/v1/node/pull", pull), 403)


# -- bids -----------------------------------------------------------------------------------------
@BOTH_DATABASES
def test_bid_is_idempotent_by_bid_id(plane: Plane) -> None:
    first, again = plane.bid(), plane.bid()
    assert (first.status_code, again.status_code) == (201, 200), first.text
    assert first.json()["status"] == "open" and first.json()["expected_j"] > 0
    assert again.json() == first.json()
    _error(plane.bid(price_micro_per_j=101), 409)
    # bid ids are the agent's own: bob may use "b1" too
    assert plane.bid("agent:bob").status_code == 201
    assert [b["bid_id"] for b in plane.signed("agent:alice", "GET", "/v1/agent/bids").json()] == ["b1"]


def test_unknown_model_is_refused(plane: Plane) -> None:
    error = _error(plane.bid(model_id="gpt-9000"), 422)
    assert "registered model_id" in error["expected"]


BAD_BIDS = [
    {"price_micro_per_j": 0}, {"price_micro_per_j": "cheap"}, {"stake_micro": -1}, {"stake_micro": 10**16},
    {"bid_id": "has space"}, {"job": {"kind": "generate", "prompt": "", "max_new_tokens": 4}},
    {"job": {"kind": "dance"}}, {"surprise": 1},
]  # fmt: skip


@pytest.mark.parametrize("change", BAD_BIDS)
def test_malformed_bid_is_refused_with_422(plane: Plane, change: dict[str, Any]) -> None:
    error = _error(plane.bid(**change), 422)
    assert error["problems"]


# -- leases and their money -----------------------------------------------------------------------
@BOTH_DATABASES
def test_pull_issues_a_lease_with_its_hold_and_stake_escrowed(plane: Plane) -> None:
    bid = plane.bid().json()
    r = plane.pull(agents=["alice"])
    assert r.status_code == 200, r.text
    (item,) = r.json()["leases"]
    lease = item["lease"]
    assert (lease["agent_id"], lease["model_id"], item["command"]) == ("alice", "gpt2-micro", [])
    assert item["tier"] in ("low", "medium", "high") and 0.0 <= item["audit_probability"] <= 1.0
    view = plane.signed("agent:alice", "GET", f"/v1/agent/leases/{lease['lease_id']}").json()
    assert view["status"] == "pulled"
    assert view["price_micro_per_j"] == RESERVE  # nothing lost on capacity: the reserve
    assert view["stake_micro"] == 100_000
    hold = view["hold_micro"]
    assert abs(hold - math.ceil(bid["expected_j"] * 3 * RESERVE)) <= 1  # 3 x expected energy
    report = plane.ledger()
    assert report["check"]["ok"], report["check"]["problems"]
    balances = report["balances"]
    assert (balances["wallet:alice"], balances["escrow:alice"]) == (DEPOSIT - hold - 100_000, hold + 100_000)
    bids = plane.signed("agent:alice", "GET", "/v1/agent/bids").json()
    assert (bids[0]["status"], bids[0]["lease_id"]) == ("won", lease["lease_id"])
    # the same node pulling again gets its unsettled lease back, and no new money moves
    again = plane.pull(agents=["alice"]).json()["leases"]
    assert [i["lease"]["lease_id"] for i in again] == [lease["lease_id"]]
    assert plane.ledger()["balances"] == report["balances"]


def test_pulls_that_issue_nothing_hold_nothing(plane: Plane) -> None:
    plane.bid()
    assert plane.pull(agents=["alice"], headroom=0.0).json()["leases"] == []  # no room: stays open
    plane.bid(bid_id="cheap", price_micro_per_j=RESERVE - 1)
    plane.admin("POST", "/v1/admin/deposits", {"agent_id": "bob", "amount_micro": 1000, "key": "bob"})
    plane.bid("agent:bob", stake_micro=5000)  # more than bob's wallet
    assert plane.pull(agents=["bob"]).json()["leases"] == []
    assert plane.pull(agents=["alice"], headroom=0.0).json()["leases"] == []
    (bob,) = plane.signed("agent:bob", "GET", "/v1/agent/bids").json()
    assert bob["status"] == "refused" and "wallet cannot cover" in bob["reason"]
    alice = {b["bid_id"]: b for b in plane.signed("agent:alice", "GET", "/v1/agent/bids").json()}
    assert alice["cheap"]["status"] == "refused" and "reserve" in alice["cheap"]["reason"]
    assert alice["b1"]["status"] == "open"
    # an open bid says why it was not cleared: the node's headroom, and what the lease needs
    assert "headroom 0.0 J (its CPU busy)" in alice["b1"]["reason"], alice["b1"]["reason"]
    assert "this lease needs" in alice["b1"]["reason"]
    report = plane.ledger()
    assert (report["balances"]["wallet:alice"], report["balances"]["wallet:bob"]) == (DEPOSIT, 1000)
    assert report["balances"].get("escrow:alice", 0) == 0 and report["check"]["ok"]


def _alice_lease(plane: Plane, bid_id: str = "b1") -> str:
    """A new lease for alice on n1 (a pull also hands back n1's earlier unsettled leases)."""
    assert plane.bid(bid_id=bid_id).status_code == 201
    leases = plane.pull(agents=["alice"]).json()["leases"]
    bids = plane.signed("agent:alice", "GET", "/v1/agent/bids").json()
    (lease_id,) = [b["lease_id"] for b in bids if b["bid_id"] == bid_id]
    assert lease_id in {i["lease"]["lease_id"] for i in leases}
    return lease_id


def test_another_agents_lease_is_forbidden_and_an_unknown_one_not_found(plane: Plane) -> None:
    lease_id = _alice_lease(plane)
    unknown = "0" * 32
    dispute = {"statement": "mine now"}
    for path, method, body in [
        ("/v1/agent/leases/{}", "GET", None),
        ("/v1/agent/leases/{}/ear", "GET", None),
        ("/v1/agent/leases/{}/dispute", "POST", dispute),
    ]:
        _error(plane.signed("agent:bob", method, path.format(lease_id), body), 403)
        _error(plane.signed("agent:alice", method, path.format(unknown), body), 404)
    assert plane.signed("agent:bob", "GET", "/v1/agent/leases").json() == []
    assert [v["lease_id"] for v in plane.admin("GET", "/v1/admin/leases?agent_id=alice").json()] == [lease_id]
    # alice's own lease before any receipt: readable, but no EAR and nothing to dispute yet
    assert plane.signed("agent:alice", "GET", f"/v1/agent/leases/{lease_id}").status_code == 200
    _error(plane.signed("agent:alice", "GET", f"/v1/agent/leases/{lease_id}/ear"), 409)
    _error(plane.signed("agent:alice", "POST", f"/v1/agent/leases/{lease_id}/dispute", dispute), 409)


# -- malformed requests: 4xx, never 500 -----------------------------------------------------------

MALFORMED = [
    ("POST", "/v1/admin/deposits", b'{"agent_id": "alice", "amount_micro": '),
    ("POST", "/v1/admin/deposits", b'{"agent_id": "alice", "amount_micro": "lots", "key": "k"}'),
    ("POST", "/v1/admin/deposits", b'{"agent_id": "alice", "amount_micro": 1e400, "key": "k"}'),
    ("POST", "/v1/admin/deposits", b'{"agent_id": "alice", "amount_micro": 1' + b"0" * 30 + b', "key": "k"}'),
    ("POST", "/v1/admin/deposits", b'["alice", 5, "k"]'),
    ("POST", "/v1/admin/deposits", b"\xff\xfe\x00"),
    ("POST", "/v1/admin/deposits", b""),
    ("POST", "/v1/admin/agents", b'{"agent_id": "a:b", "public_key": "00", "command": "sh"}'),
    ("PUT", "/v1/admin/policy", b'{"medium_from_value": NaN, "high_from_value": Infinity, '
                                b'"audit_cost_fraction": 0.1, "upgrade_headroom_factor": 2, "margin": 0.5}'),
    ("GET", "/v1/admin/leases", b""),
    ("GET", "/v1/admin/leases?agent_id=alice&limit=0", b""),
    ("GET", "/v1/admin/leases?agent_id=alice&limit=abc", b""),
    ("POST", "/v1/node/intake", b'{"lease_id": "not-hex", "receipt": "", "evidence": "x"}'),
    ("POST", "/v1/node/intake", b'{"lease_id": "' + b"a" * 32 + b'", "receipt": 5, "evidence": "x"}'),
    ("POST", "/v1/node/intake", b'{"lease_id": "' + b"a" * 32 + b'", "receipt": "", "evidence": "{}"}'),
    ("POST", "/v1/node/intake", b'{"lease_id": "' + b"a" * 32 + b'", "receipt": "", "evidence": "[1,2]"}'),
    ("POST", "/v1/node/intake", b'{"lease_id": "' + b"a" * 32 + b'", "receipt": "", "evidence": "\\u0000"}'),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "raw"), MALFORMED)
def test_malformed_requests_are_4xx(plane: Plane, method: str, path: str, raw: bytes) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": JSON}
    r = plane.tc.request(method, path, content=raw, headers=headers)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _error(r, r.status_code)


@pytest.mark.parametrize(
    "raw", [b"-1", b'"hot"', b"NaN", b"Infinity", b'1e6, "agents": "alice"', b'1e6, "max_leases": 0']
)
def test_malformed_pull_is_422(plane: Plane, raw: bytes) -> None:
    plane.bid()  # an open bid: a pull that got through would clear a round with this headroom
    raw = b'{"headroom_j": ' + raw + b"}"
    headers = sign_request(plane.keys["node:n1"], "node:n1", "POST", "/v1/node/pull", raw)
    r = plane.tc.post("/v1/node/pull", content=raw, headers={**headers, "content-type": JSON})
    _error(r, 422)


def test_oversize_body_is_413(plane: Plane) -> None:
    headers = {"authorization": f"Bearer {TOKEN}", "content-type": JSON}
    for declared in (str(MAX_BODY + 1), "99999999999999999999", "-5", "12abc"):
        lying = {**headers, "content-length": declared}
        _error(plane.tc.post("/v1/admin/deposits", content=b"{}", headers=lying), 413)
    raw = json.dumps({"lease_id": "a" * 32, "receipt": "x" * (2 * MAX_BODY), "evidence": "y"}).encode()
    _error(plane.tc.post("/v1/node/intake", content=raw, headers={"content-type": JSON}), 413)


def test_chunked_oversize_body_is_413(plane: Plane) -> None:
    """A body sent without a content-length (chunked) must meet the same limit."""
    raw = json.dumps({"lease_id": "a" * 32, "receipt": "x" * (2 * MAX_BODY), "evidence": "y"}).encode()
    chunks = iter([raw[i : i + 4096] for i in range(0, len(raw), 4096)])  # no content-length
    r = plane.tc.post("/v1/node/intake", content=chunks, headers={"content-type": JSON})
    assert r.status_code == 413, (r.status_code, r.text[:300])


# -- intake of forged evidence --------------------------------------------------------------------
def _fake_evidence() -> LeaseEvidence:
    """Made up, not measured: only ever used for evidence that must be refused before appraisal."""
    now = time.time()
    return LeaseEvidence(
        started_at=now - 1, finished_at=now, wall_s=1.0, cpu_s=0.5, max_rss_kb=1000, bytes_in=10,
        bytes_out=20, sha256_in="0" * 64, sha256_out="1" * 64, exit_code=0, regime="resident",
    )  # fmt: skip


def _evidence(lease_id: str, receipt: bytes, node_id: str, key: NodeKey) -> bytes:
    return sign_evidence(_fake_evidence(), lease_id, receipt, node_id=node_id, sandbox={}, key=key)


def _tampered(envelope: bytes) -> bytes:
    """The same signature over a payload changed afterwards (less CPU, a smaller energy charge)."""
    doc = json.loads(envelope)
    statement = json.loads(base64.b64decode(doc["payload"]))
    statement["predicate"]["evidence"]["cpu_s"] = 0.001
    doc["payload"] = base64.b64encode(json.dumps(statement).encode()).decode()
    return json.dumps(doc).encode()


def _intake(plane: Plane, lease_id: str, receipt: bytes, evidence: bytes) -> Any:
    body = {"lease_id": lease_id, "receipt": receipt.decode(), "evidence": evidence.decode()}
    return plane.tc.post("/v1/node/intake", json=body)


@BOTH_DATABASES
def test_forged_evidence_is_refused_and_moves_no_money(plane: Plane) -> None:
    lease_a = _alice_lease(plane, "a")
    lease_b = _alice_lease(plane, "b")
    receipt = b'{"not": "a real receipt"}'
    n1, n2, rogue = plane.keys["node:n1"], plane.keys["node:n2"], NodeKey.generate()
    before, transfers = plane.ledger()["balances"], check_ledger(plane.cp.ledger.engine).transfers
    cases = [
        ("a node that is not enrolled", _evidence(lease_a, receipt, "rogue", rogue), 403),
        ("an enrolled node's name, another key", _evidence(lease_a, receipt, "n1", rogue), 403),
        ("tampered after signing", _tampered(_evidence(lease_a, receipt, "n1", n1)), 403),
        ("another enrolled node than the lease's", _evidence(lease_a, receipt, "n2", n2), 403),
        ("evidence naming another lease", _evidence(lease_b, receipt, "n1", n1), 422),
        ("not a DSSE envelope", b'{"payload": "???"}', 422),
    ]
    for why, evidence, status in cases:
        r = _intake(plane, lease_a, receipt, evidence)
        assert r.status_code == status, (why, r.status_code, r.text)
        _error(r, status)
    # genuine-looking evidence, but for other receipt bytes than those handed in
    r = _intake(plane, lease_a, b"another receipt", _evidence(lease_a, receipt, "n1", n1))
    assert "receipt" in _error(r, 422)["expected"]
    unknown = "f" * 32  # correctly signed by the right node, for a lease never issued
    _error(_intake(plane, unknown, receipt, _evidence(unknown, receipt, "n1", n1)), 404)
    assert plane.ledger()["balances"] == before
    assert check_ledger(plane.cp.ledger.engine).transfers == transfers
    view = plane.signed("agent:alice", "GET", f"/v1/agent/leases/{lease_a}").json()
    assert (view["status"], view["verdict"]) == ("pulled", None)
    assert _samples(plane)[("poi_intake_total", (("outcome", "refused"),))] == 8


# -- metrics --------------------------------------------------------------------------------------
def _samples(plane: Plane) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The /metrics scrape as {(sample name, sorted labels): value}."""
    families = text_string_to_metric_families(plane.tc.get("/metrics").text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def test_metrics_expose_intake_requests_and_ledger_totals(plane: Plane) -> None:
    plane.tc.get("/healthz")
    _intake(plane, "e" * 32, b"r", b"not evidence")
    samples = _samples(plane)
    assert samples[("poi_intake_total", (("outcome", "refused"),))] == 1
    assert samples[("poi_http_requests_total", (("route", "/healthz"), ("status", "200")))] == 1
    assert samples[("poi_http_requests_total", (("route", "/v1/node/intake"), ("status", "422")))] == 1
    assert samples[("poi_ledger_total_micro", (("kind", "wallet"),))] == DEPOSIT
    assert samples[("poi_ledger_total_micro", (("kind", "external"),))] == -DEPOSIT
    assert samples[("poi_audit_queue_depth", ())] == 0
