"""The token-stream wire format, in the two channel modes (docs/receipt.md, "Channel").

One-shot (one lease per process): one line per token on the agent's stdout, the moment it is
chosen, then the receipt as the last line:

    {"s":[position,token]}\n

Resident (lease after lease over the same pipes, several at once): every line names its lease.

    Maxwell -> agent   <lease JSON>\n                                   one lease per line
    agent -> Maxwell   {"s":[position,token],"l":"<lease_id>"}\n        a token of that lease
                       {"c":[index,"<base64>"],"l":"<lease_id>"}\n     a fingerprint chunk, as it is made
                       {"r":"<lease_id>","e":<DSSE envelope>}\n         its receipt (ends the lease)
                       {"x":"<lease_id or empty>","error":"<why>"}\n   a lease the agent refuses
    Maxwell -> agent   {"open":"<lease_id>","keys":[[block,"op"],...]}\n   L3: open these traced tensors
    agent -> Maxwell   {"o":"<lease_id>","t":[...],"leaves":[...]}\n     the opening (protocol.trace)
    Maxwell -> agent   {"probe":"<lease_id>",...}\n    the work probe, and its answer {"p":...}
                                                       (protocol.probe)

Maxwell timestamps each line on its side of the pipe (L1's CPU per token, L2's pace) and compares
the streamed tokens with the receipt's output (L2). The receipt's bytes are sliced out of the
`r` line verbatim, never re-serialised.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass

from .probe import PROBE_ANSWER_PREFIX, ProbeAnswer, parse_probe_answer

PREFIX = b'{"s":['
RECEIPT_PREFIX = b'{"r":"'
REFUSAL_PREFIX = b'{"x":"'
CHUNK_PREFIX = b'{"c":['
OPENING_PREFIX = b'{"o":"'
OPEN_REQUEST_PREFIX = b'{"open":"'
_LEASE_ID = re.compile(rb"^[0-9a-f]{32}$")
_TAGGED_TOKEN = re.compile(rb'^\{"s":\[(\d+),(\d+)\],"l":"([0-9a-f]{32})"\}\s*$')
_TAGGED_CHUNK = re.compile(rb'^\{"c":\[(\d+),"([A-Za-z0-9+/=]*)"\],"l":"([0-9a-f]{32})"\}\s*$')


def stream_line(position: int, token: int, lease_id: str | None = None) -> bytes:
    """The bytes an agent writes for one chosen token (newline included); tagged in resident mode."""
    if lease_id is None:
        return b'{"s":[%d,%d]}\n' % (position, token)
    return b'{"s":[%d,%d],"l":"%s"}\n' % (position, token, lease_id.encode())


def chunk_line(index: int, data: bytes, lease_id: str) -> bytes:
    """A resident agent's fingerprint chunk `index` of one lease, the moment it is committed."""
    return b'{"c":[%d,"%s"],"l":"%s"}\n' % (index, base64.b64encode(data), lease_id.encode())


def receipt_line(lease_id: str, receipt: bytes) -> bytes:
    """A resident agent's receipt for one lease: the envelope's bytes embedded verbatim."""
    return RECEIPT_PREFIX + lease_id.encode() + b'","e":' + receipt.strip() + b"}\n"


def refusal_line(lease_id: str, why: str) -> bytes:
    return json.dumps({"x": lease_id, "error": why}, separators=(",", ":")).encode() + b"\n"


def open_request_line(lease_id: str, keys: list[tuple[int, str]]) -> bytes:
    """Maxwell's L3 challenge to a resident agent: open these traced tensors of that lease."""
    return (
        json.dumps({"open": lease_id, "keys": [[b, op] for b, op in keys]}, separators=(",", ":")).encode()
        + b"\n"
    )


def parse_open_request(line: bytes) -> tuple[str, list[tuple[int, str]]]:
    """(lease id, keys) of a challenge line; ValueError saying what was expected otherwise."""
    try:
        obj = json.loads(line)
        keys = [(int(b), str(op)) for b, op in obj["keys"]]
        lease_id = str(obj["open"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(
            f'expected {{"open":"<lease_id>","keys":[[block,"op"],...]}}, got {_preview(line)}'
        ) from None
    if not _LEASE_ID.match(lease_id.encode()):
        raise ValueError(f"expected a 32-hex lease id, got {lease_id[:40]!r}")
    return lease_id, keys


def parse_stream_line(line: bytes) -> tuple[int, int] | None:
    """(position, token) for a one-shot stream line, None for any other line (the receipt). A line
    that starts like a stream line but does not read as one raises ValueError."""
    if not line.startswith(PREFIX):
        return None
    body = line[len(PREFIX) :].rstrip().removesuffix(b"]}")
    try:
        pos, tok = body.split(b",")
        return int(pos), int(tok)
    except ValueError:
        raise ValueError(f'stream line: expected {{"s":[position,token]}}, got {line[:60]!r}') from None


@dataclass(frozen=True)
class TaggedToken:
    lease_id: str
    position: int
    token: int


@dataclass(frozen=True)
class TaggedChunk:
    lease_id: str
    index: int
    data: bytes


@dataclass(frozen=True)
class TaggedOpening:
    lease_id: str
    line: bytes  # decoded by protocol.trace.opening_from_line (numpy lives there)


@dataclass(frozen=True)
class TaggedReceipt:
    lease_id: str
    receipt: bytes  # the envelope, byte for byte as the agent wrote it


@dataclass(frozen=True)
class TaggedRefusal:
    lease_id: str
    error: str


ResidentLine = TaggedToken | TaggedChunk | TaggedReceipt | TaggedRefusal | TaggedOpening | ProbeAnswer


def parse_resident_line(line: bytes) -> ResidentLine:
    """One line of a resident agent's stdout. Raises ValueError saying what was expected and what
    came for anything that is not one of the three tagged forms."""
    if line.startswith(PREFIX):
        m = _TAGGED_TOKEN.match(line)
        if not m:
            raise ValueError(f'expected {{"s":[position,token],"l":"<lease_id>"}}, got {_preview(line)}')
        return TaggedToken(m[3].decode(), int(m[1]), int(m[2]))
    if line.startswith(CHUNK_PREFIX):
        m = _TAGGED_CHUNK.match(line)
        try:
            data = base64.b64decode(m[2], validate=True) if m else None
        except binascii.Error:
            data = None
        if m is None or data is None:
            raise ValueError(f'expected {{"c":[index,"<base64>"],"l":"<lease_id>"}}, got {_preview(line)}')
        return TaggedChunk(m[3].decode(), int(m[1]), data)
    if line.startswith(RECEIPT_PREFIX):
        head = len(RECEIPT_PREFIX)
        lease_id, sep = line[head : head + 32], line[head + 32 : head + 38]
        body = line[head + 38 :].rstrip()
        if not _LEASE_ID.match(lease_id) or sep != b'","e":' or not body.endswith(b"}"):
            raise ValueError(f'expected {{"r":"<lease_id>","e":<envelope>}}, got {_preview(line)}')
        return TaggedReceipt(lease_id.decode(), body[:-1])
    if line.startswith(OPENING_PREFIX):
        lease_id = line[len(OPENING_PREFIX) : len(OPENING_PREFIX) + 32]
        if _LEASE_ID.match(lease_id):
            return TaggedOpening(lease_id.decode(), line)
    if line.startswith(PROBE_ANSWER_PREFIX):
        return parse_probe_answer(line)
    if line.startswith(REFUSAL_PREFIX):
        try:
            obj = json.loads(line)
            return TaggedRefusal(str(obj["x"]), str(obj.get("error", ""))[:2000])
        except (ValueError, KeyError, TypeError):
            pass
    raise ValueError(
        f"expected a tagged stream, chunk, receipt, refusal or probe answer line, got {_preview(line)}"
    )


def _preview(line: bytes, limit: int = 60) -> str:
    return repr(line[:limit]) + ("…" if len(line) > limit else "")
