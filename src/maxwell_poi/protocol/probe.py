"""The work probe's wire format (docs/receipt.md, "Work probe").

While a generation lease runs, Maxwell's node asks the resident agent to run a short sequence of
fresh random token ids through the leased model, in the leased precision, as a sequence of its own
(no cache from the lease), and to answer with the fingerprint of its final hidden states at every
position after the first (the first position's state depends on one token only: a table could
answer it). Resident weights answer in about one token's time; a relay's sandbox or a cache of
earlier answers has no weights to answer from, however much CPU and memory it burns.

    Maxwell -> agent   {"probe":"<lease_id>","n":0,"model":"<id>","precision":"fp32","ids":[...],"k":16}\n
    agent -> Maxwell   {"p":"<lease_id>","n":0,"f":"<base64 fingerprint chunk>"}\n
                       {"p":"<lease_id>","n":0,"error":"<why>"}\n         an agent that cannot answer

The fingerprint is `protocol.fingerprint`'s chunk encoding with `k` top values. Neither line ends
the lease; an answer is routed by lease id and probe number.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

PROBE_REQUEST_PREFIX = b'{"probe":"'
PROBE_ANSWER_PREFIX = b'{"p":"'
FIRST_JUDGED = 1  # positions before this one are left out of the fingerprint (see the docstring)


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
class ProbeAnswer:
    """An agent's answer to probe `number` of a lease: the fingerprint, or why it has none."""

    lease_id: str
    number: int
    fingerprint: bytes = b""
    error: str = ""

    def line(self) -> bytes:
        body: dict[str, object] = {"p": self.lease_id, "n": self.number}
        if self.error:
            body["error"] = self.error[:2000]
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
    form = '{"p":"<lease_id>","n":<int>,"f":"<base64>"} or {"p":...,"n":...,"error":"<why>"}'
    try:
        obj = json.loads(line)
        lease_id, number = str(obj["p"]), int(obj["n"])
        if "error" in obj:
            return ProbeAnswer(lease_id, number, error=str(obj["error"])[:2000] or "no reason given")
        return ProbeAnswer(lease_id, number, base64.b64decode(str(obj["f"]), validate=True))
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise _expected(form, line) from None


def refuse_probe(raw: bytes, why: str) -> bytes:
    """An error answer to a probe line, tagged with whatever lease id and number it carries."""
    try:
        obj = json.loads(raw)
        lease_id, number = str(obj.get("probe", ""))[:32], int(obj.get("n", -1))
    except (ValueError, TypeError, AttributeError):
        lease_id, number = "", -1
    return ProbeAnswer(lease_id, number, error=why).line()
