"""Token streaming: an agent announces each token on the channel the moment it is chosen.

Maxwell timestamps every streamed token on its own side of the pipe (L2's per-token timing) and
checks that the tokens it saw stream by are the ones the receipt finally claims (L2's output
digest). A line `{"s":[position,token]}` per token, then the receipt as the last line.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import BinaryIO

TokenSink = Callable[[int, int], None]
_sink: contextvars.ContextVar[TokenSink | None] = contextvars.ContextVar("poi_token_sink", default=None)
PREFIX = b'{"s":['


def current_sink() -> TokenSink | None:
    return _sink.get()


@contextlib.contextmanager
def streaming_to(out: BinaryIO) -> Iterator[None]:
    """While active, every token the prover chooses is written to `out` at once."""

    def emit(position: int, token: int) -> None:
        out.write(b'{"s":[%d,%d]}\n' % (position, token))
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


def parse_stream_line(line: bytes) -> tuple[int, int] | None:
    """(position, token) for a stream line, None for anything else (the receipt)."""
    if not line.startswith(PREFIX):
        return None
    try:
        body = line[len(PREFIX) :].rstrip().removesuffix(b"]}")
        pos, tok = body.split(b",")
        return int(pos), int(tok)
    except ValueError:
        return None
