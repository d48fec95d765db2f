"""The token-stream wire format: one line per token on the agent's stdout, the moment it is chosen.

    {"s":[position,token]}\n      position 0, 1, 2, ... in order; token = the vocabulary id

then the receipt as the last line. Maxwell timestamps each line on its side of the pipe (L1's
CPU per token, L2's pace) and compares the streamed tokens with the receipt's output (L2).
"""

from __future__ import annotations

PREFIX = b'{"s":['


def stream_line(position: int, token: int) -> bytes:
    """The bytes an agent writes for one chosen token (newline included)."""
    return b'{"s":[%d,%d]}\n' % (position, token)


def parse_stream_line(line: bytes) -> tuple[int, int] | None:
    """(position, token) for a stream line, None for any other line (the receipt). A line that
    starts like a stream line but does not read as one raises ValueError."""
    if not line.startswith(PREFIX):
        return None
    body = line[len(PREFIX) :].rstrip().removesuffix(b"]}")
    try:
        pos, tok = body.split(b",")
        return int(pos), int(tok)
    except ValueError:
        raise ValueError(f'stream line: expected {{"s":[position,token]}}, got {line[:60]!r}') from None
