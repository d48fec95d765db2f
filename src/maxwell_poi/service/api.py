"""The control plane's HTTP API (FastAPI; the OpenAPI spec is at /openapi.json, docs at /docs).

    anyone     GET  /healthz  /metrics  /v1/ear-key
    Maxwell    (Authorization: Bearer <admin token>)
               POST /v1/admin/agents  /v1/admin/nodes  /v1/admin/deposits
               GET|PUT /v1/admin/policy   GET /v1/admin/ledger  /v1/admin/leases  /v1/admin/config
    agents     (signed requests, service.auth)
               POST /v1/bids   GET /v1/agent/bids  /v1/agent/leases  /v1/agent/leases/{id}
               GET  /v1/agent/leases/{id}/ear   POST /v1/agent/leases/{id}/dispute   GET /v1/agent/balance
    nodes      POST /v1/node/pull (signed request; carries L3 challenges for its exact-tier leases)
               POST /v1/node/intake (the body carries the node's signed evidence: that is its signature)
               POST /v1/node/openings (signed request: an agent's answer to an L3 challenge, verbatim)
    Maxwell    GET  /v1/admin/leases/{id}/challenges (what was asked of an exact-tier lease, and when)

Every refusal is a 4xx with `{"error": {status, expected, got, message}}`; a 500 is a bug.
"""

import base64
import logging
import time
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..ledger import LedgerError
from ..protocol.errors import PoiError
from .auth import check_admin, verify_request
from .control import ControlPlane
from .dashboard import mount_dashboard
from .errors import ApiError
from .metrics import ServiceMetrics
from .wire import (
    BidBody,
    Deposit,
    DisputeBody,
    EnrollAgent,
    EnrollNode,
    ErrorBody,
    IntakeAnswer,
    IntakeBody,
    LeaseView,
    OpeningBody,
    PolicyBody,
    PullBody,
)

log = logging.getLogger(__name__)


def create_app(control: ControlPlane) -> FastAPI:
    app = FastAPI(
        title="Maxwell Proof of Inference — control plane",
        version="1",
        description=__doc__,
        responses={"4XX": {"model": ErrorBody, "description": "refused: what was expected, and what came"}},
    )
    metrics = ServiceMetrics(control.ledger.balances, control.audits.depth)
    control.audits.on_done = metrics.audited
    app.state.control = control
    app.state.metrics = metrics
    _errors(app)
    _limits(app, control, metrics)

    async def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        check_admin(authorization, control.admin_token)

    Admin = Depends(admin)
    AgentId = Annotated[str, Depends(signed_by(control, "agent"))]
    NodeId = Annotated[str, Depends(signed_by(control, "node"))]

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        with Session(control.ledger.engine) as session:
            session.execute(select(1))
        return {
            "status": "ok",
            "db": control.ledger.engine.dialect.name,
            "audit_queue": control.audits.depth(),
        }

    @app.get("/metrics", tags=["service"], response_class=Response)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/ear-key", tags=["service"])
    def ear_key() -> dict[str, str]:
        """Maxwell's public key for the EAR JWTs, as a JWK (OKP, Ed25519)."""
        x = base64.urlsafe_b64encode(bytes.fromhex(control.ear_key.public_hex)).rstrip(b"=").decode()
        return {"kty": "OKP", "crv": "Ed25519", "x": x, "kid": control.ear_key.keyid, "alg": "EdDSA"}

    # -- Maxwell ------------------------------------------------------------------------------------

    @app.post("/v1/admin/agents", tags=["admin"], dependencies=[Admin], status_code=201)
    def enroll_agent(body: EnrollAgent, response: Response) -> dict[str, Any]:
        view, created = control.enroll_agent(body)
        response.status_code = 201 if created else 200
        return view

    @app.post("/v1/admin/nodes", tags=["admin"], dependencies=[Admin], status_code=201)
    def enroll_node(body: EnrollNode, response: Response) -> dict[str, Any]:
        view, created = control.enroll_node(body)
        response.status_code = 201 if created else 200
        return view

    @app.post("/v1/admin/deposits", tags=["admin"], dependencies=[Admin])
    def deposit(body: Deposit) -> dict[str, Any]:
        return control.deposit(body)

    @app.get("/v1/admin/policy", tags=["admin"], dependencies=[Admin])
    def get_policy() -> dict[str, Any]:
        return asdict(control.policy)

    @app.put("/v1/admin/policy", tags=["admin"], dependencies=[Admin])
    def put_policy(body: PolicyBody) -> dict[str, Any]:
        return control.set_policy(body)

    @app.get("/v1/admin/ledger", tags=["admin"], dependencies=[Admin])
    def ledger() -> dict[str, Any]:
        return control.ledger_report()

    @app.get("/v1/admin/config", tags=["admin"], dependencies=[Admin])
    def config() -> dict[str, Any]:
        return control.config.describe()

    @app.get("/v1/admin/leases", tags=["admin"], dependencies=[Admin])
    def all_leases(
        agent_id: Annotated[str, Query(max_length=128)],
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> list[LeaseView]:
        return control.leases_of(agent_id, limit, offset)

    @app.get("/v1/admin/leases/{lease_id}/challenges", tags=["admin"], dependencies=[Admin])
    def lease_challenges(lease_id: str) -> list[dict[str, Any]]:
        """Every opening asked of an exact-tier lease's agent: kind, keys, deadline, what came back."""
        return control.challenges.of_lease(lease_id)

    # -- agents -------------------------------------------------------------------------------------

    @app.post("/v1/bids", tags=["agent"], status_code=201)
    def bid(body: BidBody, agent_id: AgentId, response: Response) -> dict[str, Any]:
        view, created = control.market.place_bid(agent_id, body)
        response.status_code = 201 if created else 200
        return view

    @app.get("/v1/agent/bids", tags=["agent"])
    def my_bids(
        agent_id: AgentId,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> list[dict[str, Any]]:
        return control.market.bids_of(agent_id, limit, offset)

    @app.get("/v1/agent/leases", tags=["agent"])
    def my_leases(
        agent_id: AgentId,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> list[LeaseView]:
        return control.leases_of(agent_id, limit, offset)

    @app.get("/v1/agent/leases/{lease_id}", tags=["agent"])
    def my_lease(lease_id: str, agent_id: AgentId) -> LeaseView:
        return control.lease_view(*control.own_lease(agent_id, lease_id))

    @app.get("/v1/agent/leases/{lease_id}/ear", tags=["agent"])
    def my_ear(lease_id: str, agent_id: AgentId) -> dict[str, str]:
        """The lease's attestation result as an EAR JWT signed by Maxwell (key: /v1/ear-key)."""
        return {"lease_id": lease_id, "ear": control.ear(agent_id, lease_id)}

    @app.post("/v1/agent/leases/{lease_id}/dispute", tags=["agent"], status_code=201)
    def my_dispute(lease_id: str, body: DisputeBody, agent_id: AgentId, response: Response) -> dict[str, Any]:
        view, created = control.dispute(agent_id, lease_id, body)
        response.status_code = 201 if created else 200
        return view

    @app.get("/v1/agent/balance", tags=["agent"])
    def my_balance(agent_id: AgentId) -> dict[str, Any]:
        return control.balance(agent_id)

    # -- nodes --------------------------------------------------------------------------------------

    @app.post("/v1/node/pull", tags=["node"])
    def pull(body: PullBody, node_id: NodeId) -> dict[str, Any]:
        """One auction round against this node's headroom; its leases, with each agent's command."""
        limit = min(body.max_leases, control.config.max_leases_per_pull)
        body = body.model_copy(update={"max_leases": limit})
        pulled = control.market.pull(node_id, body)
        challenges = control.challenges.open_for(node_id)
        if not pulled and not challenges and body.wait_s > 0:  # long poll: a directed (gateway) lease
            control.market.wait_for_leases(body.wait_s)  # or an L3 challenge wakes it at once
            pulled = control.market.pull(node_id, body)
            challenges = control.challenges.open_for(node_id)
        return {
            "node_id": node_id,
            "leases": [
                {
                    "lease": p.lease.model_dump(mode="json"),
                    "command": p.command,
                    "tier": p.tier,
                    "audit_probability": p.audit_probability,
                    "stream_to": control.stream_to(p.lease.lease_id),
                }
                for p in pulled
            ],
            "challenges": challenges,
        }

    @app.post("/v1/node/openings", tags=["node"])
    def opening(body: OpeningBody, node_id: NodeId) -> dict[str, Any]:
        """The lease's node hands in its agent's answer to an L3 challenge (checked by Maxwell)."""
        return control.challenges.answer(node_id, body)

    @app.post("/v1/node/intake", tags=["node"])
    def intake(body: IntakeBody) -> IntakeAnswer:
        t0 = time.perf_counter()
        try:
            answer, result = control.intake.submit(body)
        except ApiError:
            metrics.intake.labels("refused").inc()
            raise
        if result is not None:
            metrics.appraised(result, answer.final)
            if not answer.final:
                control.queue_audit(answer.lease_id, answer.audit_drawn)
        metrics.intake.labels("duplicate" if answer.duplicate else "accepted").inc()
        metrics.intake_seconds.observe(time.perf_counter() - t0)
        return answer

    mount_dashboard(app, control)
    return app


def signed_by(control: ControlPlane, role: str):  # noqa: ANN201 - a FastAPI dependency
    """A dependency: the id of the enrolled `role` ("agent" or "node") that signed this request."""

    async def dependency(request: Request) -> str:
        body = await request.body()
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        keyrings = {"agent": control.agents, "node": control.nodes}
        got_role, ident = verify_request(
            request.headers, request.method, path, body, keyrings, control.config.request_skew_s
        )
        if got_role != role:
            raise ApiError(403, f"a request signed by an {role}", f"one signed by {got_role} {ident!r}")
        return ident

    return dependency


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = [
            {
                "where": ".".join(str(p) for p in e.get("loc", ())),
                "expected": e.get("msg", ""),
                "got": _short(e.get("input")),
            }
            for e in exc.errors()[:20]
        ]
        first = problems[0] if problems else {"where": "request", "expected": "a valid request", "got": ""}
        error = ApiError(422, f"{first['where']}: {first['expected']}", first["got"], problems=problems)
        return JSONResponse(error.body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ApiError):  # FastAPI wraps errors raised while reading the body
            return JSONResponse(exc.__cause__.body(), status_code=exc.__cause__.status)
        expected = {404: "a route of this API (see /docs)", 405: "a method this route allows"}.get(
            exc.status_code, "a valid request"
        )
        got = f"{request.method} {request.url.path[:200]}"
        return JSONResponse(ApiError(exc.status_code, expected, got).body(), status_code=exc.status_code)

    @app.exception_handler(LedgerError)
    async def ledger_error(_request: Request, exc: LedgerError) -> JSONResponse:
        return JSONResponse(ApiError(409, exc.expected, exc.got).body(), status_code=409)

    @app.exception_handler(PoiError)
    async def poi_error(_request: Request, exc: PoiError) -> JSONResponse:
        expected, got = getattr(exc, "expected", "a valid request"), getattr(exc, "got", str(exc))
        return JSONResponse(ApiError(422, expected, got).body(), status_code=422)


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, whether it declares its length or
    arrives chunked (counted as it is read; the route's read raises the refusal)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            refusal = self.refusal(f"content-length {declared[:20].decode('latin-1')}")
            response = JSONResponse(refusal.body(), status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise self.refusal(f"more than {self.limit} bytes, chunked")
            return message

        await self.app(scope, counted, send)

    def refusal(self, got: str) -> ApiError:
        return ApiError(413, f"a body of at most {self.limit} bytes", got)


def _limits(app: FastAPI, control: ControlPlane, metrics: ServiceMetrics) -> None:
    app.add_middleware(BodyLimit, limit=control.config.max_body_bytes)

    @app.middleware("http")
    async def count(request: Request, call_next):  # noqa: ANN001, ANN202 - Starlette's signature
        response = await call_next(request)
        route = request.scope.get("route")
        metrics.requests.labels(getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


__all__ = ["BodyLimit", "create_app", "signed_by"]
