"""Token streaming on the agent's side: while `streaming_to(stdout)` is active, every token the
prover chooses is written at once in the wire format of `protocol.stream`."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import BinaryIO

from ..protocol.stream import stream_line

TokenSink = Callable[[int, int], None]
_sink: contextvars.ContextVar[TokenSink | None] = contextvars.ContextVar("poi_token_sink", default=None)


def current_sink() -> TokenSink | None:
    return _sink.get()


@contextlib.contextmanager
def streaming_to(out: BinaryIO) -> Iterator[None]:
    """While active, every token the prover chooses is written to `out` at once."""

    def emit(position: int, token: int) -> None:
        out.write(stream_line(position, token))
        out.flush()

    token = _sink.set(emit)
    try:
        yield
    finally:
        _sink.reset(token)


@contextlib.contextmanager
def silenced() -> Iterator[None]:
    """Stop streaming for a while (a cheater that wants to pace its own stream)."""
    token = _sink.set(None)
    try:
        yield
    finally:
        _sink.reset(token)

