"""OpenAI's request and response shapes, as far as Maxwell's gateway serves them.

Served: `model`, `prompt` (completions) or `messages` (chat), `max_tokens` (or chat's
`max_completion_tokens`), `temperature`, `top_k` (an extension: `extra_body={"top_k": 40}`),
`stream`, and Maxwell's `delivery` (`extra_body={"delivery": "verified"}`: release no token before
the streaming audit verified it; gateway.delivery). Ignored on purpose and said so in the answer's
`maxwell.ignored`: `seed` (the sampler's seed is Maxwell's, derived from the lease nonce, so the agent
cannot choose its randomness), `user`, `stream_options`, and penalties/`top_p` at their neutral values.
Refused with a 400 that names the field: anything that would change the computation in a way the
audit does not replay (`stop`, `logprobs`, `tools`, `n` > 1, `top_p` < 1, non-zero penalties,
`logit_bias`).

The chat template of the built-in models (they are plain language models, not chat-tuned):

    System: <system message>
    User: <user message>
    Assistant: <assistant message>
    ...
    Assistant:

one line per message in order, the generation continuing after the final `Assistant:`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..protocol.lease import GenerateJob
from .delivery import Delivery

NEUTRAL = {"top_p": 1, "presence_penalty": 0, "frequency_penalty": 0}
IGNORED = ("seed", "user", "stream_options", "service_tier", "metadata", "store")
REFUSED = (
    "stop",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "functions",
    "logit_bias",
    "suffix",
    "echo",
)
DEFAULT_MAX_TOKENS = 32
DEFAULT_TEMPERATURE = 0.8


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=20_000)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields Maxwell does not use: see `problems`
    model: str = Field(min_length=1, max_length=128)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0, le=1_000_000)
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1, description="one completion per request")
    delivery: Delivery | None = Field(
        default=None,
        description="Maxwell's extension: 'verified' releases a token only once the streaming audit "
        "verified the block holding it; 'immediate' as it passes the running checks; unset: the "
        "server's default (by tier: verified for the high tier)",
    )

    def problems(self) -> tuple[str | None, list[str]]:
        """(the first refused field with why, or None; the fields ignored)."""
        extra = self.model_extra or {}
        for name in REFUSED:
            if extra.get(name) not in (None, False, [], {}):
                return f"{name}: not served by Maxwell's gateway (the audit could not replay it)", []
        for name, neutral in NEUTRAL.items():
            if extra.get(name) not in (None, neutral):
                return f"{name}: only {neutral} is served, got {extra[name]!r}", []
        ignored = [n for n in IGNORED if extra.get(n) is not None]
        return None, ignored

    @property
    def new_tokens(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def sampling_temperature(self) -> float:
        return DEFAULT_TEMPERATURE if self.temperature is None else self.temperature


class CompletionRequest(_Request):
    prompt: str | list[str] = Field(min_length=1)

    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        if len(self.prompt) != 1:
            raise ValueError(f"prompt: expected one prompt per request, got {len(self.prompt)}")
        return self.prompt[0]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1, max_length=64)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)

    @property
    def new_tokens(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    def text(self) -> str:
        return chat_prompt(self.messages)


def chat_prompt(messages: list[Message]) -> str:
    """The built-in models' chat template (see the module docstring)."""
    lines = [f"{m.role.capitalize()}: {' '.join(m.content.split())}" for m in messages]
    return "\n".join(lines) + "\nAssistant:"


class Shape:
    """Response bodies and stream chunks for one request, OpenAI's field for field."""

    def __init__(self, chat: bool, lease_id: str, model: str) -> None:
        self.chat = chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{lease_id}"
        self.model = model
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, finish: str | None = None, **extra: Any) -> dict[str, Any]:
        if self.chat:
            delta = {"role": "assistant", "content": text} if text or finish is None else {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice], **extra}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice], **extra}

    def whole(self, text: str, usage: dict[str, int], maxwell: dict[str, Any]) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": text}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}
            body = {**self._head("chat.completion"), "choices": [choice]}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}
            body = {**self._head("text_completion"), "choices": [choice]}
        return {**body, "usage": usage, "maxwell": maxwell}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, kind: str, code: str, **extra: Any) -> dict[str, Any]:
    """OpenAI's error shape (the `openai` client reads `error.message`), plus Maxwell's fields."""
    return {"error": {"message": message, "type": kind, "code": code, "param": None, **extra}}


def job_of(request: CompletionRequest | ChatRequest, prompt: str) -> GenerateJob:
    """The lease's job for a request whose prompt (chat template applied) is `prompt`."""
    return GenerateJob(
        prompt=prompt,
        max_new_tokens=request.new_tokens,
        temperature=request.sampling_temperature,
        top_k=50 if request.top_k is None else request.top_k,
        chunk=16,
    )


def decode_increment(decode: Any, tokens: list[int], sent: str) -> str:
    """The text not yet sent for `tokens` (held back while it ends in an incomplete character)."""
    text = decode(tokens)
    if text.endswith("\ufffd"):
        return ""
    return text[len(sent) :] if text.startswith(sent) else ""
