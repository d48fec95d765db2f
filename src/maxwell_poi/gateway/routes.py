"""The gateway's HTTP routes, on the control plane's FastAPI app (`mount_gateway(app, gateway)`).

    requesters (Authorization: Bearer <API key>)
               GET  /v1/models  /v1/models/{id}
               POST /v1/completions  /v1/chat/completions     (OpenAI's shapes; `stream: true` = SSE)
               GET  /v1/maxwell/completions/{lease_id}        the verdict of one of your completions
    Maxwell    POST /v1/admin/requesters  /v1/admin/requesters/{id}/deposits
    agents     POST /v1/agent/offers          (signed) a standing offer to serve a model
    nodes      POST /v1/node/stream/{lease_id} (signed) tokens and chunks as they arrive; answer: cut?

A completion that the running appraisal cuts off ends, when streamed, with an error event
(`{"error": {"message", "type": "maxwell_cut", "code": "lease_cut", "maxwell": {...}}}`, which the
`openai` client raises as `openai.APIError`), and otherwise with a 502 carrying the same body.
"""

import base64
import json
import queue
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field

from ..protocol.lease import Precision
from ..service.api import signed_by
from ..service.auth import check_admin
from ..service.errors import ApiError
from .gateway import Gateway, Started, decode_increment
from .live import ClientEvent
from .openai_wire import ChatRequest, CompletionRequest, Shape, error_body, usage

UNVERIFIED = ("contraindicated", "warning")  # a completion the requester is not charged for
EVENT_WAIT_S = 120.0  # longest wait for the next token before the response gives up


class RequesterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requester_id: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.-]+$")
    deposit_micro: int = Field(default=0, ge=0, le=10**15)


class RequesterDeposit(BaseModel):
    model_config = ConfigDict(extra="forbid")
    amount_micro: int = Field(ge=1, le=10**15)
    key: str = Field(min_length=1, max_length=128, description="idempotency key")


class OfferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model_id: str = Field(min_length=1, max_length=128)
    precision: Precision = "fp32"
    ask_micro_per_token: int = Field(ge=0, le=10**9)
    price_micro_per_j: int = Field(ge=1, le=10**12, description="what the agent pays Maxwell per joule")
    stake_micro: int = Field(default=0, ge=0, le=10**15)


class RelayBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[Annotated[list[float], Field(min_length=4, max_length=4)]] = Field(
        default_factory=list, max_length=4096, description="[position, token, t_s, sandbox_cpu_s] each"
    )
    chunks: list[tuple[int, str]] = Field(
        default_factory=list, max_length=1024, description="[index, base64]"
    )


def mount_gateway(app: FastAPI, gateway: Gateway) -> None:
    control = gateway.control
    registry = app.state.metrics.registry  # the control plane's /metrics
    outcomes = Counter(
        "poi_gateway_completions",
        "gateway completions by outcome (paid, cut, refunded)",
        ["outcome"],
        registry=registry,
    )
    gateway.on_outcome = lambda outcome: outcomes.labels(outcome).inc()
    Gauge("poi_gateway_streaming", "gateway leases streaming now", registry=registry).set_function(
        lambda: len(gateway.live)
    )

    async def admin(authorization: Annotated[str | None, Header()] = None) -> None:
        check_admin(authorization, control.admin_token)

    async def requester(authorization: Annotated[str | None, Header()] = None) -> str:
        return gateway.authenticate(authorization)

    Requester = Annotated[str, Depends(requester)]

    @app.get("/v1/models", tags=["gateway"])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": gateway.models()}

    @app.get("/v1/models/{model_id}", tags=["gateway"])
    def model(model_id: str) -> dict[str, Any]:
        for m in gateway.models():
            if m["id"] == model_id:
                return m
        raise ApiError(404, "a model of GET /v1/models", f"unknown model {model_id[:128]!r}")

    @app.post("/v1/completions", tags=["gateway"])
    async def completions(body: CompletionRequest, requester_id: Requester) -> Any:
        return await _answer(gateway, requester_id, body, chat=False)

    @app.post("/v1/chat/completions", tags=["gateway"])
    async def chat(body: ChatRequest, requester_id: Requester) -> Any:
        return await _answer(gateway, requester_id, body, chat=True)

    @app.get("/v1/maxwell/completions/{lease_id}", tags=["gateway"])
    def verdict(lease_id: str, requester_id: Requester) -> dict[str, Any]:
        gateway.owns(requester_id, lease_id)
        return gateway.attestation(lease_id)

    @app.post("/v1/admin/requesters", tags=["admin"], dependencies=[Depends(admin)], status_code=201)
    def enroll_requester(body: RequesterBody) -> dict[str, Any]:
        return gateway.enroll_requester(body.requester_id, body.deposit_micro)

    @app.post("/v1/admin/requesters/{requester_id}/deposits", tags=["admin"], dependencies=[Depends(admin)])
    def deposit(requester_id: str, body: RequesterDeposit) -> dict[str, Any]:
        return gateway.deposit(requester_id, body.amount_micro, f"{requester_id}:{body.key}")

    @app.post("/v1/agent/offers", tags=["agent"])
    def offer(
        body: OfferBody, agent_id: Annotated[str, Depends(signed_by(control, "agent"))]
    ) -> dict[str, Any]:
        return gateway.offer(
            agent_id,
            body.model_id,
            body.precision,
            body.ask_micro_per_token,
            body.price_micro_per_j,
            body.stake_micro,
        )

    @app.post("/v1/node/stream/{lease_id}", tags=["node"])
    def relay(
        lease_id: str, body: RelayBody, node_id: Annotated[str, Depends(signed_by(control, "node"))]
    ) -> dict[str, Any]:
        gateway.check_node(node_id, lease_id)
        try:
            chunks = [(i, base64.b64decode(data, validate=True)) for i, data in body.chunks]
        except ValueError:  # binascii.Error, or text that is not ASCII at all
            raise ApiError(422, "chunks as [index, base64]", "data that is not base64") from None
        return {"cut": gateway.relay(node_id, lease_id, body.tokens, chunks)}


async def _answer(
    gateway: Gateway, requester_id: str, body: CompletionRequest | ChatRequest, chat: bool
) -> Any:
    started = await anyio.to_thread.run_sync(gateway.start, requester_id, body)
    shape = Shape(chat, started.lease.lease_id, started.lease.model_id)
    if body.stream:
        return StreamingResponse(_sse(gateway, started, shape), media_type="text/event-stream")
    tokens: list[int] = []
    cut = ""
    async for event in _events(started):
        if event.kind == "cut":
            cut = event.reason
            break
        tokens += event.tokens
    maxwell = await _verdict(gateway, started)
    if not cut and maxwell.get("verdict") in UNVERIFIED:
        body = error_body(_unverified(maxwell), "maxwell_unverified", "not_affirmed", maxwell=maxwell)
        return JSONResponse(body, status_code=502)
    if cut:
        return JSONResponse(
            error_body(f"Maxwell cut the agent off: {cut}", "maxwell_cut", "lease_cut", maxwell=maxwell),
            status_code=502,
        )
    text = gateway.registry.decode(started.lease.model_id, tokens)
    return shape.whole(text, usage(started.prompt_tokens, len(tokens)), maxwell)


async def _sse(gateway: Gateway, started: Started, shape: Shape) -> AsyncIterator[bytes]:
    model_id = started.lease.model_id
    sent, tokens = "", []
    yield _data(shape.chunk(""))
    async for event in _events(started):
        if event.kind == "cut":
            maxwell = await _verdict(gateway, started)
            message = f"Maxwell cut the agent off after {len(tokens)} tokens: {event.reason}"
            yield _data(error_body(message, "maxwell_cut", "lease_cut", maxwell=maxwell))
            return
        tokens += event.tokens
        delta = decode_increment(lambda t: gateway.registry.decode(model_id, t), tokens, sent)
        if delta:
            sent += delta
            yield _data(shape.chunk(delta))
    maxwell = await _verdict(gateway, started)
    if maxwell.get("verdict") in UNVERIFIED:  # caught only at intake: the requester must know
        yield _data(error_body(_unverified(maxwell), "maxwell_unverified", "not_affirmed", maxwell=maxwell))
        return
    final = shape.chunk("", "length", usage=usage(started.prompt_tokens, len(tokens)), maxwell=maxwell)
    yield _data(final)
    yield b"data: [DONE]\n\n"


async def _events(started: Started) -> AsyncIterator[ClientEvent]:
    """The lease's token events until all its tokens came or it was cut (or nothing came in time)."""
    live, got = started.live, 0
    want = started.lease.job.max_new_tokens  # type: ignore[union-attr]
    while got < want:
        wait = max(0.1, min(EVENT_WAIT_S, started.lease.deadline - time.time()))
        event = await anyio.to_thread.run_sync(_next, live.events, wait)
        if event is None:
            yield ClientEvent("cut", reason=f"no token from the agent within {wait:.0f} s")
            return
        yield event
        if event.kind == "cut":
            return
        got += len(event.tokens)


def _next(events: queue.Queue[ClientEvent], timeout: float) -> ClientEvent | None:
    try:
        return events.get(timeout=timeout)
    except queue.Empty:
        return None


async def _verdict(gateway: Gateway, started: Started) -> dict[str, Any]:
    await anyio.to_thread.run_sync(gateway.wait_verdict, started.lease.lease_id)
    maxwell = await anyio.to_thread.run_sync(gateway.attestation, started.lease.lease_id)
    maxwell.update(auction=started.auction, ignored=started.ignored, prompt_tokens=started.prompt_tokens)
    return maxwell


def _unverified(maxwell: dict[str, Any]) -> str:
    return f"Maxwell did not affirm this completion ({maxwell['verdict']}): {maxwell.get('reason', '')}"


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
