"""The agent side of the channel, in both modes (docs/receipt.md, "Channel").

- `serve_one`: read one lease on stdin, write one receipt on stdout, exit (one-shot mode).
- `serve_resident`: read lease after lease, one per line, and answer each with tagged stream lines
  and a tagged receipt line, gathering up to `max_batch` waiting leases into one call (resident
  mode; Maxwell's node runs the agent in a sandbox and keeps it loaded).

Maxwell's side (observer.channel, observer.resident) speaks the same protocol; every agent
program in this repo, honest or not, goes through one of these two.
"""

from __future__ import annotations

import json
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from ..protocol.errors import PoiError
from ..protocol.lease import Lease
from ..protocol.probe import PROBE_REQUEST_PREFIX, refuse_probe
from ..protocol.stream import OPEN_REQUEST_PREFIX, parse_open_request, receipt_line, refusal_line
from .stream import bound_to_lease, streaming_leases_to, streaming_to

Prober = Callable[[bytes], bytes]

AnswerOne = Callable[[Lease], bytes]
AnswerMany = Callable[[list[Lease]], list[bytes]]


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def serve_one(answer: AnswerOne, lease_bytes: bytes | None = None) -> int:
    """Read a lease, compute the answer (streaming tokens as they come), write the receipt to
    stdout as the last line. Exit status 0 or 2."""
    raw = sys.stdin.buffer.read() if lease_bytes is None else lease_bytes
    try:
        lease = Lease.from_json(raw)
        with streaming_to(sys.stdout.buffer):
            receipt = answer(lease)
    except PoiError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(receipt)
    sys.stdout.buffer.flush()
    return 0


def one_at_a_time(answer: AnswerOne) -> AnswerMany:
    """A one-lease answer as a batch answer: leases in turn, each streaming under its own id."""

    def many(leases: list[Lease]) -> list[bytes]:
        out = []
        for lease in leases:
            with bound_to_lease(lease.lease_id):
                out.append(answer(lease))
        return out

    return many


def _open_id(raw: bytes) -> str:
    try:
        return parse_open_request(raw)[0]
    except ValueError:
        return ""


def _lease_id_of(raw: bytes) -> str:
    """The lease id of an unreadable lease line if one can be found, for the refusal's tag."""
    try:
        value = json.loads(raw).get("lease_id", "")
        return value if isinstance(value, str) and len(value) == 32 else ""
    except (ValueError, AttributeError):
        return ""


class _Gatherer:
    """Lease lines from stdin (a reader thread), handed out in batches of up to `max_batch`: the
    first waiting line, then whatever else arrives within `gather_s`. Work probes skip the queue:
    `on_probe` gets them the moment they are read (a lease may be generating)."""

    def __init__(
        self, stream: BinaryIO, max_batch: int, gather_s: float, on_probe: Callable[[bytes], None]
    ) -> None:
        self.max_batch, self.gather_s = max(1, max_batch), gather_s
        self.lines: queue.Queue[bytes | None] = queue.Queue()
        self.eof = False
        self.on_probe = on_probe
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: BinaryIO) -> None:
        for line in stream:
            if line.startswith(PROBE_REQUEST_PREFIX):
                self.on_probe(line)
            elif line.strip():
                self.lines.put(line)
        self.lines.put(None)

    def next_batch(self) -> list[bytes]:
        """Up to max_batch lines; empty at end of input."""
        if self.eof:
            return []
        first = self.lines.get()
        if first is None:
            self.eof = True
            return []
        batch = [first]
        until = time.perf_counter() + (self.gather_s if self.max_batch > 1 else 0.0)
        while len(batch) < self.max_batch:
            try:
                line = self.lines.get(timeout=max(0.0, until - time.perf_counter()))
            except queue.Empty:
                break
            if line is None:
                self.eof = True
                break
            batch.append(line)
        return batch


def serve_resident(
    answer: AnswerMany,
    *,
    max_batch: int = 1,
    gather_s: float = 0.02,
    stdin: BinaryIO | None = None,
    stdout: BinaryIO | None = None,
    opener: Callable[[bytes], bytes] | None = None,
    prober: Prober | None = None,
) -> int:
    """Answer leases until stdin closes. A lease that does not parse, or that the prover refuses,
    gets a refusal line; the agent goes on with the next. An L3 challenge line
    (`{"open": ...}`) is answered by `opener` (its opening line), or refused. A work probe
    (`{"probe": ...}`, protocol.probe) is answered by `prober` on a thread of its own, at once,
    while leases go on; without one, with an error line. Exit status 0."""
    out = stdout or sys.stdout.buffer
    lock = threading.Lock()
    probes: queue.Queue[bytes] = queue.Queue()
    gatherer = _Gatherer(stdin or sys.stdin.buffer, max_batch, gather_s, probes.put)

    def write(data: bytes) -> None:
        with lock:
            out.write(data)
            out.flush()

    def answer_probes() -> None:
        while True:
            raw = probes.get()
            write(prober(raw) if prober else refuse_probe(raw, "this agent does not answer work probes"))

    threading.Thread(target=answer_probes, daemon=True).start()

    while batch := gatherer.next_batch():
        leases = []
        for raw in batch:
            if raw.startswith(OPEN_REQUEST_PREFIX):
                write(opener(raw) if opener else refusal_line(_open_id(raw), "this agent keeps no trace"))
                continue
            try:
                leases.append(Lease.from_json(raw.strip()))
            except PoiError as exc:
                write(refusal_line(_lease_id_of(raw), str(exc)))
        if not leases:
            continue
        try:
            with streaming_leases_to(out, lock):
                receipts = answer(leases)
        except PoiError as exc:
            for lease in leases:
                write(refusal_line(lease.lease_id, str(exc)))
            continue
        for lease, receipt in zip(leases, receipts, strict=True):
            write(receipt_line(lease.lease_id, receipt))
    return 0
