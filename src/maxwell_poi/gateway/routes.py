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

A requester that disconnects (seen as the stream's cancellation, or by a task waiting on the
connection while a non-streamed answer is computed) stops its lease: `Gateway.leave` with the
tokens sent so far.

Every completion's `maxwell` object (the last chunk, the error event, or the whole body) says how
its tokens were delivered (`delivery`) and how many reached the requester before the streaming
audit verified them (`unverified_tokens`, counted as each chunk is written: gateway.delivery).
"""

import base64
import json
import queue
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from prometheus_client import Counter, Gauge
from pydantic import BaseModel, ConfigDict, Field
from starlette.types import Receive, Scope, Send

from ..protocol.lease import Precision
from ..service.deps import Admin, AgentId, NodeId
from ..service.errors import ApiError
from .delivery import SentCount
from .gateway import Gateway, Started
from .live import ClientEvent, EventKind
from .openai_wire import ChatRequest, CompletionRequest, Shape, decode_increment, error_body, usage
from .responses import (
    SSE,
    CanaryBody,
    CanaryView,
    ChatCompletion,
    MaxwellView,
    ModelCard,
    ModelList,
    OfferView,
    RelayAnswer,
    RequesterBalance,
    RequesterKey,
    TextCompletion,
)
from .timeline import Mark

UNVERIFIED = ("contraindicated", "warning")  # a completion the requester is not charged for
EVENT_WAIT_S = 120.0  # longest wait for the next token before the response gives up
GONE_POLL_S = 0.5  # while no token comes, how often a non-streamed answer looks for a disconnect
CLIENT_GONE = 499  # nginx's "client closed request": logged, never read (no one is there)


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


async def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]


async def requester(gateway: GatewayDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The requester id of `Authorization: Bearer <API key>` (401 otherwise)."""
    return gateway.authenticate(authorization)


Requester = Annotated[str, Depends(requester)]
JSON_OR_SSE = {200: {"content": SSE, "description": "the completion (JSON), or its SSE stream"}}

# requesters (API key), OpenAI's routes and Maxwell's verdict of a completion
requesters = APIRouter(tags=["gateway"])


@requesters.get("/v1/models", response_model=ModelList)
def models(gateway: GatewayDep) -> ModelList:
    return ModelList(data=[ModelCard.model_validate(m) for m in gateway.models()])


@requesters.get("/v1/models/{model_id}", response_model=ModelCard)
def model(model_id: str, gateway: GatewayDep) -> ModelCard:
    for m in gateway.models():
        if m["id"] == model_id:
            return ModelCard.model_validate(m)
    raise ApiError(404, "a model of GET /v1/models", f"unknown model {model_id[:128]!r}")


@requesters.post(
    "/v1/completions", response_model=TextCompletion, response_model_exclude_unset=True, responses=JSON_OR_SSE
)
async def completions(
    body: CompletionRequest, requester_id: Requester, gateway: GatewayDep, request: Request
) -> Any:
    return await _answer(gateway, requester_id, body, request, chat=False)


@requesters.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    response_model_exclude_unset=True,
    responses=JSON_OR_SSE,
)
async def chat(body: ChatRequest, requester_id: Requester, gateway: GatewayDep, request: Request) -> Any:
    return await _answer(gateway, requester_id, body, request, chat=True)


@requesters.get(
    "/v1/maxwell/completions/{lease_id}", response_model=MaxwellView, response_model_exclude_unset=True
)
def verdict(lease_id: str, requester_id: Requester, gateway: GatewayDep) -> MaxwellView:
    gateway.owns(requester_id, lease_id)
    return MaxwellView.model_validate(gateway.attestation(lease_id))


# Maxwell (admin token): requesters and their money
admin = APIRouter(prefix="/v1/admin/requesters", tags=["admin"], dependencies=[Admin])


@admin.post("", status_code=201, response_model=RequesterKey)
def enroll_requester(body: RequesterBody, gateway: GatewayDep) -> RequesterKey:
    return RequesterKey.model_validate(gateway.enroll_requester(body.requester_id, body.deposit_micro))


@admin.post("/{requester_id}/deposits", response_model=RequesterBalance)
def deposit(requester_id: str, body: RequesterDeposit, gateway: GatewayDep) -> RequesterBalance:
    answer = gateway.deposit(requester_id, body.amount_micro, f"{requester_id}:{body.key}")
    return RequesterBalance.model_validate(answer)


canaries = APIRouter(prefix="/v1/admin/canaries", tags=["admin"], dependencies=[Admin])


@canaries.post("", response_model=CanaryView)
def send_canary(body: CanaryBody, gateway: GatewayDep) -> CanaryView:
    """A canary to one agent now, run to its verdict (gateway.canary; the rate-drawn ones run alone)."""
    return CanaryView.model_validate(gateway.canaries.send(body.agent_id, body.model_id).as_dict())


@canaries.get("", response_model=list[CanaryView])
def recent_canaries(gateway: GatewayDep) -> list[CanaryView]:
    """The canaries sent since this process started (at most the last 256), oldest first."""
    return [CanaryView.model_validate(r.as_dict()) for r in list(gateway.canaries.results)]


# agents (signed): standing offers
agents = APIRouter(tags=["agent"])


@agents.post("/v1/agent/offers", response_model=OfferView)
def offer(body: OfferBody, agent_id: AgentId, gateway: GatewayDep) -> OfferView:
    made = gateway.offer(
        agent_id,
        body.model_id,
        body.precision,
        body.ask_micro_per_token,
        body.price_micro_per_j,
        body.stake_micro,
    )
    return OfferView.model_validate(made)


# nodes (signed): the stream relay of a gateway lease
nodes = APIRouter(tags=["node"])


@nodes.post("/v1/node/stream/{lease_id}", response_model=RelayAnswer)
def relay(lease_id: str, body: RelayBody, node_id: NodeId, gateway: GatewayDep) -> RelayAnswer:
    gateway.check_node(node_id, lease_id)
    try:
        chunks = [(i, base64.b64decode(data, validate=True)) for i, data in body.chunks]
    except ValueError:  # binascii.Error, or text that is not ASCII at all
        raise ApiError(422, "chunks as [index, base64]", "data that is not base64") from None
    return RelayAnswer(cut=gateway.relay(node_id, lease_id, body.tokens, chunks))


def gateway_paths() -> list[tuple[str, list[str]]]:
    """(path, methods) of every gateway route (a server that cannot stream answers them with a refusal)."""
    return [
        (route.path, sorted(route.methods))
        for router in (requesters, admin, canaries, agents, nodes)
        for route in router.routes
        if isinstance(route, APIRoute)
    ]


def mount_gateway(app: FastAPI, gateway: Gateway) -> None:
    """The gateway's routers and its metrics, on the control plane's app (`create_app`)."""
    app.state.gateway = gateway
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
    sent = Counter(
        "poi_gateway_canaries",
        "canary leases by verdict (not_sent: none could be issued)",
        ["verdict"],
        registry=registry,
    )
    gateway.canaries.on_result = lambda r: sent.labels(r.verdict or "not_sent").inc()
    for router in (requesters, admin, canaries, agents, nodes):
        app.include_router(router)


@dataclass
class Progress:
    """How far one SSE response got: tokens received, tokens whose text was sent (and of those, the
    unverified), and whether it ended with its last chunk."""

    tokens: int = 0
    sent: SentCount = field(default_factory=SentCount)
    ended: bool = False

    @property
    def delivered(self) -> int:
        return self.sent.delivered


class LeaseStream(StreamingResponse):
    """The SSE of one lease. However the response ends short of its last chunk — the client
    disconnected, which cancels the response (Starlette, ASGI spec < 2.4 as uvicorn speaks it), or
    the send failed — the lease is stopped then, with the tokens sent so far: here, once, rather
    than in the generator (which may never have started, or be collected only later)."""

    def __init__(self, gateway: Gateway, started: Started, shape: Shape) -> None:
        self.gateway, self.lease_id, self.progress = gateway, started.lease.lease_id, Progress()
        self.events = _sse(gateway, started, shape, self.progress)
        super().__init__(self.events, media_type="text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            p = self.progress
            if not p.ended:  # sync and quick: this may run inside a cancellation
                why = f"the requester disconnected after {p.delivered} of {p.tokens} tokens were sent"
                self.gateway.leave(self.lease_id, p.delivered, why)
            await self.events.aclose()


async def _answer(
    gateway: Gateway, requester_id: str, body: CompletionRequest | ChatRequest, request: Request, chat: bool
) -> Any:
    try:
        started = await anyio.to_thread.run_sync(gateway.start, requester_id, body)
    except ApiError as exc:
        if "retry_after_s" not in exc.extra:
            raise
        headers = {"Retry-After": str(exc.extra["retry_after_s"])}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)
    shape = Shape(chat, started.lease.lease_id, started.lease.model_id)
    if body.stream:
        return LeaseStream(gateway, started, shape)
    # nothing else notices a disconnect while the answer is computed: a task waits on the
    # connection, as StreamingResponse does for a stream
    gone = anyio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(watch)
        try:
            return await _whole(gateway, started, shape, gone.is_set)
        finally:
            tasks.cancel_scope.cancel()


async def _whole(gateway: Gateway, started: Started, shape: Shape, gone: Callable[[], bool]) -> Any:
    """A non-streamed answer: the whole text, once the verdict is in."""
    tokens: list[int] = []
    cut = ""
    lease_id = started.lease.lease_id
    async for event in _events(started, gone):
        if event.kind == EventKind.GONE:  # nothing was sent: the body goes out whole, at the end
            gateway.leave(
                lease_id, 0, f"the requester disconnected after 0 of {len(tokens)} tokens were sent"
            )
            return JSONResponse(
                error_body(event.reason, "maxwell_gone", "client_gone"), status_code=CLIENT_GONE
            )
        if event.kind == EventKind.CUT:
            cut = event.reason
            if not started.live.cut:  # the gateway gave up waiting, not a finding: stop the lease
                gateway.leave(lease_id, 0, f"the gateway stopped waiting: {cut}")
            break
        tokens += event.tokens
    maxwell = await _verdict(gateway, started, SentCount())  # an error body sends no token
    if not cut and maxwell.get("verdict") in UNVERIFIED:
        body = error_body(_unverified(maxwell), "maxwell_unverified", "not_affirmed", maxwell=maxwell)
        return JSONResponse(body, status_code=502)
    if cut:
        return JSONResponse(
            error_body(f"Maxwell cut the agent off: {cut}", "maxwell_cut", "lease_cut", maxwell=maxwell),
            status_code=502,
        )
    sent = SentCount()
    sent.sent(len(tokens), started.live.verified)  # the whole text goes out now, after the verdict
    maxwell.update(delivered_tokens=sent.delivered, unverified_tokens=sent.unverified)
    text = gateway.registry.decode(started.lease.model_id, tokens)
    return shape.whole(text, usage(started.prompt_tokens, len(tokens)), maxwell)


async def _sse(
    gateway: Gateway, started: Started, shape: Shape, progress: Progress
) -> AsyncGenerator[bytes, None]:
    """The stream; `progress.sent` counts the tokens whose text went out (a `yield` returns once the
    server sent the chunk) and how many of them the streaming audit had not verified when their
    chunk was written; `LeaseStream` stops the lease if it ends short."""
    model_id, lease_id = started.lease.model_id, started.lease.lease_id
    sent, tokens = "", []
    yield _data(shape.chunk(""))
    async for event in _events(started):
        if event.kind == EventKind.CUT:
            if not started.live.cut:  # the gateway gave up waiting, not a finding: stop the lease
                gateway.leave(lease_id, progress.delivered, f"the gateway stopped waiting: {event.reason}")
            maxwell = await _verdict(gateway, started, progress.sent)
            relayed = started.live.cut_after if started.live.cut else len(tokens)
            message = (
                f"Maxwell cut the agent off after {relayed} tokens from it ({len(tokens)} sent to you): "
                f"{event.reason}"
            )
            progress.ended = True
            yield _data(error_body(message, "maxwell_cut", "lease_cut", maxwell=maxwell))
            return
        tokens += event.tokens
        progress.tokens = len(tokens)
        delta = decode_increment(lambda t: gateway.registry.decode(model_id, t), tokens, sent)
        if delta:
            sent += delta
            verified = started.live.verified  # before the write: what the requester gets is judged now
            yield _data(shape.chunk(delta))
            progress.sent.sent(len(tokens), verified)
    maxwell = await _verdict(
        gateway, started, progress.sent
    )  # settled by now: a client leaving changes nothing
    progress.ended = True
    if maxwell.get("verdict") in UNVERIFIED:  # caught only at intake: the requester must know
        yield _data(error_body(_unverified(maxwell), "maxwell_unverified", "not_affirmed", maxwell=maxwell))
        return
    finish = "length" if len(tokens) >= started.live.job.max_new_tokens else "stop"  # an engine's eos
    final = shape.chunk("", finish, usage=usage(started.prompt_tokens, len(tokens)), maxwell=maxwell)
    yield _data(final)
    yield b"data: [DONE]\n\n"


async def _events(started: Started, gone: Callable[[], bool] | None = None) -> AsyncIterator[ClientEvent]:
    """The lease's token events until all its tokens came or it was cut (or nothing came in time).
    With `gone` (a non-streamed answer), looked at after each token and at least every
    GONE_POLL_S while none comes: a `gone` event when the requester left."""
    live, got = started.live, 0
    step = EVENT_WAIT_S if gone is None else GONE_POLL_S
    while got < live.want:  # fewer than the lease's tokens once intake saw an engine stop early
        wait = max(0.1, min(EVENT_WAIT_S, started.lease.deadline - time.time()))
        give_up = time.monotonic() + wait
        event = None
        while event is None and time.monotonic() < give_up:
            timeout = max(0.01, min(step, give_up - time.monotonic()))
            event = await anyio.to_thread.run_sync(_next, live.events, timeout)
            if gone is not None and gone():
                yield ClientEvent(EventKind.GONE, reason=f"the requester disconnected after {got} tokens")
                return
        if event is None:
            yield ClientEvent(EventKind.CUT, reason=f"no token from the agent within {wait:.0f} s")
            return
        yield event
        if event.kind == EventKind.CUT:
            return
        got += len(event.tokens)


def _next(events: queue.Queue[ClientEvent], timeout: float) -> ClientEvent | None:
    try:
        return events.get(timeout=timeout)
    except queue.Empty:
        return None


async def _verdict(gateway: Gateway, started: Started, sent: SentCount) -> dict[str, Any]:
    await anyio.to_thread.run_sync(gateway.wait_verdict, started.lease.lease_id)
    maxwell = await anyio.to_thread.run_sync(gateway.attestation, started.lease.lease_id)
    maxwell.update(auction=started.auction, ignored=started.ignored, prompt_tokens=started.prompt_tokens)
    maxwell.update(
        delivery=started.delivery.value, delivered_tokens=sent.delivered, unverified_tokens=sent.unverified
    )
    started.live.timeline.mark(Mark.ANSWERED)
    maxwell["timing_ms"] = started.live.timeline.stages_ms()
    return maxwell


def _unverified(maxwell: dict[str, Any]) -> str:
    return f"Maxwell did not affirm this completion ({maxwell['verdict']}): {maxwell.get('reason', '')}"


def _data(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
