"""The work probe's wire format (docs/receipt.md, "Work probe").

While a generation lease runs, Maxwell's node asks the resident agent to run a short sequence of
fresh random token ids through the leased model, in the leased precision, as a sequence of its own
(no cache from the lease), and to answer with the fingerprint of its final hidden states at every
position after the first (the first position's state depends on one token only: a table could
answer it). Resident weights answer in about one token's time; a relay's sandbox or a cache of
earlier answers has no weights to answer from, however much CPU and memory it burns.

    Maxwell -> agent   {"probe":"<lease_id>","n":0,"model":"<id>","precision":"fp32","ids":[...],"k":16}\n
    agent -> Maxwell   {"p":"<lease_id>","n":0,"f":"<base64 fingerprint chunk>"}\n
                       {"p":"<lease_id>","n":0,"e":{"v":1,"top":5,"ids":[...],"lp":[...]}}\n   an engine agent
                       {"p":"<lease_id>","n":0,"error":"<why>"}\n         an agent that cannot answer

The fingerprint is `protocol.fingerprint`'s chunk encoding with `k` top values. Neither line ends
the lease; an answer is routed by lease id and probe number.

An engine agent (issue 27: an unmodified serving engine behind `poi agent --engine-cmd`) has no
hidden states to fingerprint. It answers with `e` (version 1): the engine's `top` best log-probs at
the position after the probe's ids, as a 1-token greedy completion of the ids' text (the model's
tokenizer decodes them; the engine re-encodes the text like a lease prompt): `ids` its top ids in
the engine's order (at most `top`, fewer where a piece names no token), `lp` their log-probs.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from dataclasses import dataclass

from .engine import ENGINE_MAX_TOP

PROBE_REQUEST_PREFIX = b'{"probe":"'
PROBE_ANSWER_PREFIX = b'{"p":"'
FIRST_JUDGED = 1  # positions before this one are left out of the fingerprint (see the docstring)
ENGINE_ANSWER_VERSION = 1  # the `e` form's version
MAX_LOGPROB = 1e-3  # a log-prob above this is no log-prob (float noise of an engine's 0.0 allowed)


@dataclass(frozen=True)
class ProbeRequest:
    lease_id: str
    number: int
    model_id: str
    precision: str
    ids: tuple[int, ...]
    fingerprint_k: int

    def line(self) -> bytes:
        body = {
            "probe": self.lease_id,
            "n": self.number,
            "model": self.model_id,
            "precision": self.precision,
            "ids": list(self.ids),
            "k": self.fingerprint_k,
        }
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class ProbeLogprobs:
    """An engine agent's answer (`e`): its `top` best log-probs after the probe's ids. Checked on
    construction: 1 <= len(ids) == len(lp) <= top <= ENGINE_MAX_TOP, distinct ids in [0, 2^32),
    finite log-probs <= MAX_LOGPROB."""

    top: int
    ids: tuple[int, ...]
    lp: tuple[float, ...]
    version: int = ENGINE_ANSWER_VERSION

    def __post_init__(self) -> None:
        if self.version != ENGINE_ANSWER_VERSION:
            raise ValueError(
                f"engine probe answer: expected version {ENGINE_ANSWER_VERSION}, got {self.version}"
            )
        if not 1 <= self.top <= ENGINE_MAX_TOP:
            raise ValueError(f"engine probe answer: expected top in 1-{ENGINE_MAX_TOP}, got {self.top}")
        if not 1 <= len(self.ids) <= self.top or len(self.lp) != len(self.ids):
            raise ValueError(
                f"engine probe answer: expected 1-{self.top} ids and as many log-probs, got "
                f"{len(self.ids)} ids and {len(self.lp)} log-probs"
            )
        if len(set(self.ids)) != len(self.ids) or any(not 0 <= i < 1 << 32 for i in self.ids):
            raise ValueError(f"engine probe answer: expected distinct ids in [0, 2^32), got {list(self.ids)}")
        if not all(math.isfinite(v) and v <= MAX_LOGPROB for v in self.lp):
            raise ValueError(f"engine probe answer: expected finite log-probs <= 0, got {list(self.lp)}")

    def body(self) -> dict[str, object]:
        return {"v": self.version, "top": self.top, "ids": list(self.ids), "lp": list(self.lp)}


@dataclass(frozen=True)
class ProbeAnswer:
    """An agent's answer to probe `number` of a lease: the fingerprint, an engine's log-probs, or
    why it has neither."""

    lease_id: str
    number: int
    fingerprint: bytes = b""
    error: str = ""
    logprobs: ProbeLogprobs | None = None  # an engine agent's answer (`e`) instead of `f`

    def line(self) -> bytes:
        body: dict[str, object] = {"p": self.lease_id, "n": self.number}
        if self.error:
            body["error"] = self.error[:2000]
        elif self.logprobs is not None:
            body["e"] = self.logprobs.body()
        else:
            body["f"] = base64.b64encode(self.fingerprint).decode()
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"


def _expected(form: str, line: bytes) -> ValueError:
    preview = repr(line[:60]) + ("…" if len(line) > 60 else "")
    return ValueError(f"expected {form}, got {preview}")


def parse_probe_request(line: bytes) -> ProbeRequest:
    """A probe line from Maxwell; ValueError saying what was expected otherwise."""
    form = '{"probe":"<lease_id>","n":<int>,"model":"<id>","precision":"<p>","ids":[<int>...],"k":<int>}'
    try:
        obj = json.loads(line)
        request = ProbeRequest(
            lease_id=str(obj["probe"]),
            number=int(obj["n"]),
            model_id=str(obj["model"]),
            precision=str(obj["precision"]),
            ids=tuple(int(i) for i in obj["ids"]),
            fingerprint_k=int(obj["k"]),
        )
    except (ValueError, KeyError, TypeError):
        raise _expected(form, line) from None
    if len(request.ids) <= FIRST_JUDGED or request.fingerprint_k < 1:
        raise _expected(f"{form} with more than {FIRST_JUDGED} ids and k >= 1", line)
    return request


def parse_probe_answer(line: bytes) -> ProbeAnswer:
    """An agent's probe answer line; ValueError saying what was expected otherwise."""
    form = (
        '{"p":"<lease_id>","n":<int>,"f":"<base64>"}, {"p":...,"n":...,"e":{"v":1,"top":<int>,'
        '"ids":[<int>...],"lp":[<float>...]}} or {"p":...,"n":...,"error":"<why>"}'
    )
    try:
        obj = json.loads(line)
        lease_id, number = str(obj["p"]), int(obj["n"])
        if "error" in obj:
            return ProbeAnswer(lease_id, number, error=str(obj["error"])[:2000] or "no reason given")
        if "e" not in obj:
            return ProbeAnswer(lease_id, number, base64.b64decode(str(obj["f"]), validate=True))
        if "f" in obj:
            raise ValueError
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _expected(form, line) from None
    return ProbeAnswer(lease_id, number, logprobs=engine_answer(obj["e"]))


def engine_answer(e: object) -> ProbeLogprobs:
    """The `e` object of an engine agent's answer; ValueError naming expected vs got."""
    form = '{"v":1,"top":<int>,"ids":[<int>...],"lp":[<float>...]}'
    if not isinstance(e, dict) or set(e) != {"v", "top", "ids", "lp"}:
        got = sorted(e) if isinstance(e, dict) else type(e).__name__
        raise ValueError(f'probe answer "e": expected {form}, got {got}')
    ids, lp = e["ids"], e["lp"]
    if not (isinstance(ids, list) and isinstance(lp, list)):
        raise ValueError(f'probe answer "e": expected lists "ids" and "lp", got {type(ids).__name__} and '
                         f"{type(lp).__name__}")  # fmt: skip
    if max(len(ids), len(lp)) > ENGINE_MAX_TOP:
        raise ValueError(f'probe answer "e": expected at most {ENGINE_MAX_TOP} ids and log-probs, got '
                         f"{len(ids)} and {len(lp)}")  # fmt: skip
    numbers = [e["v"], e["top"], *ids]
    if not all(type(i) is int for i in numbers) or not all(type(v) in (int, float) for v in lp):
        raise ValueError(f'probe answer "e": expected integer v, top and ids and numeric lp, got {e}'[:300])
    try:
        return ProbeLogprobs(top=e["top"], ids=tuple(ids), lp=tuple(float(v) for v in lp), version=e["v"])
    except ValueError as exc:
        raise ValueError(f'probe answer "e": {str(exc).removeprefix("engine probe answer: ")}') from None


def refuse_probe(raw: bytes, why: str) -> bytes:
    """An error answer to a probe line, tagged with whatever lease id and number it carries."""
    try:
        obj = json.loads(raw)
        lease_id, number = str(obj.get("probe", ""))[:32], int(obj.get("n", -1))
    except (ValueError, TypeError, AttributeError):
        lease_id, number = "", -1
    return ProbeAnswer(lease_id, number, error=why).line()
