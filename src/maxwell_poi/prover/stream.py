"""Token streaming on the agent's side: while a sink is active, every token the prover chooses is
written at once in the wire format of `protocol.stream`.

Two sinks: `current_sink()` is (position, token) for a prover that serves one lease at a time;
`current_lease_sink()` is (lease_id, position, token) for a batched prover that serves several at
once in one forward pass. In resident mode both write tagged lines (`bound_to_lease`).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..protocol.stream import stream_line

TokenSink = Callable[[int, int], None]
LeaseSink = Callable[[str, int, int], None]
_sink: contextvars.ContextVar[TokenSink | None] = contextvars.ContextVar("poi_token_sink", default=None)
_lease_sink: contextvars.ContextVar[LeaseSink | None] = contextvars.ContextVar("poi_lease_sink", default=None)


def current_sink() -> TokenSink | None:
    return _sink.get()


def current_lease_sink() -> LeaseSink | None:
    return _lease_sink.get()


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

    return _set(_lease_sink, emit)


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
def silenced() -> Iterator[None]:
    """Stop streaming for a while (a cheater that wants to pace its own stream)."""
    with _set(_sink, None), _set(_lease_sink, None):
        yield
