"""Token streaming on the agent's side: while a sink is active, every token the prover chooses is
written at once in the wire format of `protocol.stream`.

Two sinks: `current_sink()` is (position, token) for a prover that serves one lease at a time;
`current_lease_sink()` is (lease_id, position, token) for a batched prover that serves several at
once in one forward pass. In resident mode both write tagged lines (`bound_to_lease`).

Resident mode also streams each fingerprint chunk as the prover commits it (`chunk_sink_for`), so
Maxwell can audit a lease while it runs; one-shot mode streams tokens only.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..protocol.stream import chunk_line, stream_line

TokenSink = Callable[[int, int], None]
LeaseSink = Callable[[str, int, int], None]
ChunkSink = Callable[[int, bytes], None]
LeaseChunkSink = Callable[[str, int, bytes], None]
_sink: contextvars.ContextVar[TokenSink | None] = contextvars.ContextVar("poi_token_sink", default=None)
_lease_sink: contextvars.ContextVar[LeaseSink | None] = contextvars.ContextVar("poi_lease_sink", default=None)
_chunk_sink: contextvars.ContextVar[LeaseChunkSink | None] = contextvars.ContextVar(
    "poi_chunk_sink", default=None
)


def current_sink() -> TokenSink | None:
    return _sink.get()


def current_lease_sink() -> LeaseSink | None:
    return _lease_sink.get()


def chunk_sink_for(lease_id: str) -> ChunkSink | None:
    """Where `lease_id`'s fingerprint chunks go as they are committed (resident mode), or None."""
    sink = _chunk_sink.get()
    if sink is None:
        return None
    return lambda index, data: sink(lease_id, index, data)


@contextlib.contextmanager
def _set(var: contextvars.ContextVar, value: object) -> Iterator[None]:
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def streaming_to(out: BinaryIO) -> contextlib.AbstractContextManager[None]:
    """One-shot mode: untagged lines for the one lease of this process."""

    def emit(position: int, token: int) -> None:
        out.write(stream_line(position, token))
        out.flush()

    return _set(_sink, emit)


def streaming_leases_to(out: BinaryIO, lock: threading.Lock) -> contextlib.AbstractContextManager[None]:
    """Resident mode: tagged lines; `lock` keeps each line whole when receipts are written too."""

    def emit(lease_id: str, position: int, token: int) -> None:
        with lock:
            out.write(stream_line(position, token, lease_id))
            out.flush()

    def emit_chunk(lease_id: str, index: int, data: bytes) -> None:
        with lock:
            out.write(chunk_line(index, data, lease_id))
            out.flush()

    return _both(_set(_lease_sink, emit), _set(_chunk_sink, emit_chunk))


@contextlib.contextmanager
def _both(
    a: contextlib.AbstractContextManager[None], b: contextlib.AbstractContextManager[None]
) -> Iterator[None]:
    with a, b:
        yield


@contextlib.contextmanager
def bound_to_lease(lease_id: str) -> Iterator[None]:
    """Lets a one-lease prover (which calls `current_sink()`) stream tagged lines for `lease_id`."""
    tagged = current_lease_sink()
    if tagged is None:
        yield
        return
    with _set(_sink, lambda position, token: tagged(lease_id, position, token)):
        yield


@contextlib.contextmanager
def rewritten(change: Callable[[int, int], int]) -> Iterator[None]:
    """Stream `change(position, token)` in place of each token (a cheater that streams what it
    will sign rather than what it computed)."""
    sink = current_sink()
    if sink is None:
        yield
        return
    with _set(_sink, lambda position, token: sink(position, change(position, token))):
        yield


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Stop streaming for a while (a cheater that wants to pace its own stream)."""
    with _set(_sink, None), _set(_lease_sink, None), _set(_chunk_sink, None):
        yield
