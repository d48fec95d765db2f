"""Engine receipts (receipt v4, issue 27): what an unmodified OpenAI-compatible serving engine can
vouch for, carried in the signed claims as the `engine` object.

An engine (llama.cpp, vLLM, `transformers serve`, ...) returns text and, where it supports it, the
log-probabilities of the chosen token and of the `top` best candidates at every position. It
returns no hidden states, so an engine receipt has no activation fingerprints (`fp`), no layer root
and no trace: its fingerprint kind is one of

- `logprobs`: per position, the chosen token's log-probability and the `top` best (id, log-prob)
  pairs, as the engine reported them;
- `tokens`: the token ids alone (an engine that refuses log-probabilities).

Wire encoding (compact, no numpy needed to read it): `ids` is b64 of the top ids, position-major,
`top` per position, each as u16le / u32le (the output's token width); a slot the engine left empty
(a piece the adapter could not map back to an id) is the width's all-ones value. `lp` is b64 of
`1 + top` values per position (the chosen token's log-prob first), float32 or float16 little-endian
(`vdt`). Everything in the object is a claim; Maxwell's L4 re-executes the model and checks it
(verifier.engine_audit).
"""

from __future__ import annotations

import hashlib
import math
import struct
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .encoding import b64, unb64

ENGINE_MAX_TOP = 20  # OpenAI's limit for top_logprobs; bounds an engine receipt's size
FpKind = Literal["logprobs", "tokens"]
Decoding = Literal["greedy", "sampled"]
Finish = Literal["length", "stop"]
ValueDtype = Literal["f32", "f16"]
_VALUE_FORMAT = {"f32": ("f", 4), "f16": ("e", 2)}


class EngineClaim(BaseModel):
    """The `engine` object of a v4 receipt: which engine answered (a claim) and what it returned."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1, max_length=64, description="the engine, e.g. 'llama.cpp'")
    version: str = Field(default="", max_length=64)
    fp_kind: FpKind
    decoding: Decoding = Field(description="greedy, or sampled at the lease's temperature")
    seed: int | None = Field(default=None, ge=0, lt=1 << 32, description="the seed the engine was sent")
    finish: Finish = Field(description="length: max_new_tokens tokens; stop: the engine ended at eos")
    top: int = Field(default=0, ge=0, le=ENGINE_MAX_TOP, description="top log-probs per position")
    vdt: ValueDtype = "f32"
    ids: str = ""
    lp: str = ""

    def top_ids(self, width: int) -> list[list[int | None]]:
        """Per position, the top ids (None for an empty slot)."""
        raw = unb64(self.ids, "engine.ids")
        if not self.top:
            return []
        if len(raw) % (width * self.top):
            raise ValueError(f"engine.ids: {len(raw)} bytes is not a multiple of {width} x {self.top}")
        empty = (1 << (8 * width)) - 1
        flat = struct.unpack(f"<{len(raw) // width}{'H' if width == 2 else 'I'}", raw)
        rows = [flat[i : i + self.top] for i in range(0, len(flat), self.top)]
        return [[None if v == empty else int(v) for v in row] for row in rows]

    def values(self) -> list[list[float]]:
        """Per position, [chosen log-prob, top_1 log-prob, ..., top_k log-prob] (NaN: empty)."""
        if self.fp_kind != "logprobs":
            return []
        code, size = _VALUE_FORMAT[self.vdt]
        raw = unb64(self.lp, "engine.lp")
        per = 1 + self.top
        if len(raw) % (size * per):
            raise ValueError(f"engine.lp: {len(raw)} bytes is not a multiple of {size} x {per}")
        flat = struct.unpack(f"<{len(raw) // size}{code}", raw)
        return [list(flat[i : i + per]) for i in range(0, len(flat), per)]


def encode_engine_claim(
    *,
    name: str,
    version: str,
    decoding: Decoding,
    finish: Finish,
    width: int,
    seed: int | None = None,
    chosen_lp: list[float] | None = None,
    top: list[list[tuple[int | None, float]]] | None = None,
    top_n: int = 0,
    vdt: ValueDtype = "f32",
) -> EngineClaim:
    """The claim for what an engine returned. `chosen_lp` (one per token) and `top` (per token, up
    to `top_n` (id, log-prob) pairs; None ids are empty slots) make a `logprobs` claim; without
    them it is `tokens`."""
    if chosen_lp is None or top is None:
        return EngineClaim(
            name=name, version=version, fp_kind="tokens", decoding=decoding, seed=seed, finish=finish
        )
    empty = (1 << (8 * width)) - 1
    ids: list[int] = []
    values: list[float] = []
    for lp, row in zip(chosen_lp, top, strict=True):
        row = list(row)[:top_n] + [(None, math.nan)] * max(0, top_n - len(row))
        ids += [empty if i is None else i for i, _ in row]
        values += [lp, *(v for _, v in row)]
    code, _ = _VALUE_FORMAT[vdt]
    fmt = "H" if width == 2 else "I"
    return EngineClaim(
        name=name,
        version=version,
        fp_kind="logprobs",
        decoding=decoding,
        seed=seed,
        finish=finish,
        top=top_n,
        vdt=vdt,
        ids=b64(struct.pack(f"<{len(ids)}{fmt}", *ids)),
        lp=b64(struct.pack(f"<{len(values)}{code}", *values)),
    )


def engine_body_bytes(max_new_tokens: int) -> int:
    """The most bytes of tokens and log-probs an engine receipt may carry for a lease: token ids,
    then ENGINE_MAX_TOP ids and 1 + ENGINE_MAX_TOP float32 values per position (before base64)."""
    return max_new_tokens * (4 + 4 * ENGINE_MAX_TOP + 4 * (1 + ENGINE_MAX_TOP))


def engine_shape_problem(
    engine: EngineClaim, tokens: list[int], max_new_tokens: int, temperature: float, width: int, vocab: int
) -> str | None:
    """L0's shape check of an engine receipt for a generation lease: None, or what was expected
    and what came. The numbers themselves are L4's (verifier.engine_audit)."""
    n = len(tokens)
    if engine.finish == "length" and n != max_new_tokens:
        return f"output tokens: expected {max_new_tokens} (finish 'length'), got {n}"
    if engine.finish == "stop" and n >= max_new_tokens:
        return f"output tokens: expected fewer than {max_new_tokens} (finish 'stop': ended at eos), got {n}"
    if tokens and max(tokens) >= vocab:
        return f"output tokens: expected ids < {vocab}, got {max(tokens)}"
    if temperature == 0 and engine.decoding != "greedy":
        return f"engine decoding: expected 'greedy' for a temperature-0 lease, got {engine.decoding!r}"
    if engine.fp_kind == "tokens":
        if engine.top or engine.ids or engine.lp:
            return "engine fingerprints: expected none for fp_kind 'tokens', got top log-probs"
        return None
    if engine.top < 1:
        return f"engine top: expected 1-{ENGINE_MAX_TOP} log-probs per position for fp_kind 'logprobs', got 0"
    try:
        ids, values = engine.top_ids(width), engine.values()
    except ValueError as exc:
        return f"engine fingerprints: expected readable ids and values, got {exc}"
    if len(ids) != n or len(values) != n:
        return (
            f"engine fingerprints: expected {n} positions of ids and values, got {len(ids)} and {len(values)}"
        )
    if any(i is not None and i >= vocab for row in ids for i in row):
        return f"engine top ids: expected ids < {vocab}"
    return None


ENGINE_FLAGS = ("--engine-cmd", "--engine")  # `poi agent`'s engine adapter options (cli.engine)


def engine_of_command(argv: list[str] | tuple[str, ...]) -> str:
    """Which engine an enrolled agent command serves with: "" for an SDK agent, else
    `cmd:<sha256 prefix of the --engine-cmd value>` (the engine runs as the adapter's child, in
    the agent's sandbox) or `url:<prefix of the --engine URL>` (an engine started elsewhere, whose
    work no sandbox of Maxwell's measures). It is Maxwell's record of the program its node runs,
    not the receipt's claim: L1's profile and the gateway's streaming audit are chosen by it."""
    args = list(argv)
    for i, arg in enumerate(args):
        for flag in ENGINE_FLAGS:
            value = arg.removeprefix(flag + "=") if arg.startswith(flag + "=") else None
            if arg == flag and i + 1 < len(args):
                value = args[i + 1]
            if value is not None:
                kind = "cmd" if flag == "--engine-cmd" else "url"
                return f"{kind}:{hashlib.sha256(value.encode()).hexdigest()[:16]}"
    return ""
