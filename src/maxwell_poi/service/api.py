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
Every other answer is a model of service.wire (the routes: service.routes.{service,admin,agent,node}).
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..ledger import LedgerError
from ..ledger.retry import retryable
from ..protocol.errors import PoiError
from .control import ControlPlane
from .dashboard import mount_dashboard
from .errors import ApiError
from .metrics import ServiceMetrics
from .routes import admin, agent, node, service
from .wire import ErrorBody

log = logging.getLogger(__name__)


def create_app(control: ControlPlane) -> FastAPI:
    """The app over `control`: one router per role (service.routes), each route's dependencies from
    service.deps, the request and response models from service.wire."""
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
    for router in (service.router, admin.router, agent.router, node.router):
        app.include_router(router)
    mount_dashboard(app, control)
    return app


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

    @app.exception_handler(DBAPIError)
    async def database_busy(_request: Request, exc: DBAPIError) -> JSONResponse:
        if not retryable(exc):  # not contention: a fault of Maxwell's, left to the server's 500
            raise exc
        # a deadlock or serialization failure outlasted its tries (ledger.retry): nothing was stored
        got = f"database contention: {exc.orig}"
        refusal = ApiError(503, "the request again: nothing of it was stored", got)
        return JSONResponse(refusal.body(), status_code=503, headers={"Retry-After": "1"})

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


class RequestCounter:
    """ASGI middleware: count each answered request by route and status (/metrics). Plain ASGI, not
    Starlette's BaseHTTPMiddleware, which relays every response (each SSE chunk of a streamed
    completion) through a task and a memory stream of its own."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = []

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        await self.app(scope, receive, sent)
        if status:  # the router put the matched route in the scope
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, str(status[0])).inc()


def _limits(app: FastAPI, control: ControlPlane, metrics: ServiceMetrics) -> None:
    app.add_middleware(BodyLimit, limit=control.config.max_body_bytes)
    app.add_middleware(RequestCounter, metrics=metrics)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


__all__ = ["BodyLimit", "RequestCounter", "create_app"]
