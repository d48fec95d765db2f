"""The gateway's response bodies (pydantic: the OpenAPI spec documents them): OpenAI's shapes field
for field (openai_wire.Shape builds them), plus the `maxwell` object that says what was verified.

The routes answer with `response_model_exclude_unset`: a field the gateway did not fill (a pending
lease has no `layers`, no `ear`) is left out, as before, rather than sent as null.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    id: str
    object: str = "model"
    created: int
    owned_by: str
    served: bool = Field(description="an agent offers it and a node pulled recently")


class ModelList(BaseModel):
    object: str = "list"
    data: list[ModelCard]


class LayerBrief(BaseModel):
    layer: str
    status: str
    reason: str


class ToleranceView(BaseModel):
    """The tolerance set the completion's audit used, chosen from the class pair the node measured."""

    set: str = Field(description="same-class (near-exact) or cross-class")
    class_pair: str = Field(description="'<prover class> -> <verifier class>'; 'unknown' = not measured")
    reason: str


class MaxwellView(BaseModel):
    """What Maxwell verified of one completion: the verdict, each layer, joules, charge and the EAR."""

    lease_id: str
    completion_status: str | None = None
    price_micro_per_token: int | None = None
    charged_micro: int | None = None
    auction: str | None = None
    verdict: str = Field(description="pending, affirming, warning or contraindicated")
    final: bool | None = None
    reason: str | None = None
    layers: list[LayerBrief] | None = None
    cut_after_tokens: int | None = None
    energy_j: float | None = None
    stake: str | None = None
    ear: str | None = Field(default=None, description="an EAR JWT (key: GET /v1/ear-key), once final")
    ignored: list[str] | None = Field(default=None, description="request fields the gateway ignored")
    prompt_tokens: int | None = None
    tolerance: ToleranceView | None = Field(default=None, description="when the audit ran: its tolerance set")
    delivery: str | None = Field(
        default=None, description="verified (no token before its block was verified) or immediate"
    )
    delivered_tokens: int | None = Field(
        default=None, description="tokens whose text reached the requester; only in a completion's response"
    )
    unverified_tokens: int | None = Field(
        default=None,
        description="tokens whose text reached the requester before the streaming audit verified them "
        "(all of them when the lease was not audited); only in a completion's response",
    )
    timing_ms: dict[str, float] | None = Field(
        default=None,
        description="milliseconds per stage as the gateway saw them (gateway.timeline): issue, to_node, "
        "first_token, tokens, receipt, settle, answer, total; only in a completion's response",
    )


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None


class TextCompletion(BaseModel):
    id: str
    object: str = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    maxwell: MaxwellView


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: Any = None
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: str = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    maxwell: MaxwellView


class RequesterKey(BaseModel):
    requester_id: str
    api_key: str = Field(description="shown once: only its SHA-256 is kept")
    wallet_micro: int
    held_micro: int


class RequesterBalance(BaseModel):
    wallet_micro: int
    held_micro: int


class OfferView(BaseModel):
    agent_id: str
    model_id: str
    precision: str
    ask_micro_per_token: int
    price_micro_per_j: int
    stake_micro: int


class CanaryBody(BaseModel):
    agent_id: str = Field(min_length=1, max_length=128)
    model_id: str = Field(min_length=1, max_length=128)


class CanaryView(BaseModel):
    """A canary lease (gateway.canary): Maxwell's own request, audited, and what it found."""

    agent_id: str
    model_id: str
    sent: bool = Field(description="false: no lease could be issued now (reason says why)")
    lease_id: str | None
    verdict: str | None = Field(description="affirming, warning or contraindicated; null when not sent")
    stake: str | None = Field(description="what the verdict did to the agent's stake")
    reason: str
    question: str = Field(description="where its job came from: a real request's job, or a registry prompt")


class RelayAnswer(BaseModel):
    cut: str | None = Field(description="why Maxwell cut the lease off (stop the agent), or null: go on")


# the streaming answer of both completion routes (`stream: true`)
SSE = {
    "text/event-stream": {
        "schema": {"type": "string"},
        "example": 'data: {"id": "cmpl-…", "choices": [...]}\n\ndata: [DONE]\n\n',
    }
}

__all__ = [
    "SSE",
    "CanaryBody",
    "CanaryView",
    "ChatCompletion",
    "MaxwellView",
    "ModelCard",
    "ModelList",
    "OfferView",
    "RelayAnswer",
    "RequesterBalance",
    "RequesterKey",
    "TextCompletion",
    "ToleranceView",
]
