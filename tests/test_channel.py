"""How Maxwell's runner reads an agent's stdout: stream lines, then the receipt (observer.channel)."""

from __future__ import annotations

import io
import os

from maxwell_poi.node.channel import _StdoutReader
from maxwell_poi.protocol.stream import parse_stream_line, stream_line


def read(data: bytes, keep: int = 1 << 16) -> _StdoutReader:
    reader = _StdoutReader(io.BytesIO(data), os.getpid(), 0.0, keep)
    reader.run()
    return reader


def test_stream_then_receipt():
    r = read(stream_line(0, 7) + stream_line(1, 9) + b'{"payload":"x"}\n')
    assert r.tokens == [7, 9] and len(r.times) == 2 and r.errors == 0
    assert bytes(r.receipt).strip() == b'{"payload":"x"}'
    assert r.total == len(stream_line(0, 7) + stream_line(1, 9)) + 16  # every byte is counted


def test_blank_lines_before_the_receipt_are_neither_stream_nor_receipt():
    r = read(b"\n" + stream_line(0, 7) + b"  \n" + stream_line(1, 9) + b'{"payload":"x"}\n')
    assert r.tokens == [7, 9] and r.errors == 0
    assert bytes(r.receipt).strip() == b'{"payload":"x"}' and r.receipt_total == 16


def test_unreadable_and_out_of_order_stream_lines_are_stream_errors():
    r = read(stream_line(0, 7) + b'{"s":[1,x]}\n' + stream_line(5, 9) + stream_line(1, 8) + b"{}\n")
    assert r.tokens == [7, 8] and r.errors == 2
    assert bytes(r.receipt).strip() == b"{}"


def test_stream_lines_after_the_receipt_started_are_receipt_bytes():
    r = read(b'{"payload"\n' + stream_line(0, 7))
    assert r.tokens == [] and r.receipt_total == 11 + len(stream_line(0, 7))


def test_stream_line_round_trip():
    assert stream_line(3, 30521) == b'{"s":[3,30521]}\n'
    assert parse_stream_line(stream_line(3, 30521)) == (3, 30521)
    assert parse_stream_line(b'{"payloadType": 1}') is None


def test_stderr_keeps_the_tail_of_a_long_diagnostic():
    from maxwell_poi.node.channel import drain

    sink: dict = {}
    drain(io.BytesIO(b"x" * 200_000 + b"the real error\n"), 1 << 16, sink)
    assert sink["data"].endswith(b"the real error\n") and len(sink["data"]) == 1 << 16
    assert sink["total"] == 200_015
