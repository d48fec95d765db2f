"""The stamper (node.stamper): a line's arrival is stamped by a process of its own, so a serving
process that is busy when the line comes cannot make tokens look bunched (issue 24's first-hour
walkthrough: 13-14 honest tokens "in a row in a burst" read late by the node's reader thread)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from maxwell_poi.node.stamper import NO_CPU, StampedLines, start_stamper, stop_stamper

# a writer that flushes one line every 20 ms, then a line longer than the reader's limit, then a
# tail with no newline
WRITER = """
import sys, time
for i in range(5):
    sys.stdout.write(f"token {i}\\n"); sys.stdout.flush(); time.sleep(0.02)
sys.stdout.write("x" * 100 + "\\n"); sys.stdout.flush()
sys.stdout.write("tail"); sys.stdout.flush()
"""


def stamped_run(busy_reader: bool) -> list[tuple[bytes, float]]:
    writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=subprocess.PIPE)
    stamper = start_stamper(writer.stdout)
    writer.stdout.close()
    if busy_reader:  # the node's reader is held up until the writer has finished
        writer.wait()
    lines = StampedLines(stamper.stdout)
    out = []
    while True:
        line, t, _cpu = lines.readline(64)
        if not line:
            break
        out.append((line, t))
    stop_stamper(stamper)
    return out


def test_lines_come_whole_and_in_order_with_a_long_one_cut_at_the_limit() -> None:
    got = [line for line, _ in stamped_run(busy_reader=False)]
    assert got[:5] == [f"token {i}\n".encode() for i in range(5)]
    assert got[5:] == [b"x" * 64, b"x" * 36 + b"\n", b"tail"]


def test_a_reader_that_was_late_still_sees_when_each_line_arrived() -> None:
    late = stamped_run(busy_reader=True)
    read_at = time.perf_counter()
    gaps = [b - a for (_, a), (_, b) in zip(late[:4], late[1:5], strict=True)]
    # written 20 ms apart: the stamps keep the gaps (a late reader's own clock would show ~0)
    assert all(g > 0.01 for g in gaps), gaps
    assert all(t < read_at for _, t in late)


def test_the_stamps_are_the_readers_clock() -> None:
    # CLOCK_MONOTONIC in both processes: a stamp lies between the write and the read here
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.readline(); print('go', flush=True)"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    stamper = start_stamper(writer.stdout)
    writer.stdout.close()
    result: list[tuple[bytes, float, int]] = []
    reader = threading.Thread(target=lambda: result.append(StampedLines(stamper.stdout).readline(64)))
    reader.start()
    before = time.perf_counter()
    writer.stdin.write(b"\n")
    writer.stdin.flush()
    reader.join(10)
    after = time.perf_counter()
    assert result and result[0][0] == b"go\n" and result[0][2] == NO_CPU  # no CPU counter given
    assert before <= result[0][1] <= after
    writer.stdin.close()
    writer.wait()
    stop_stamper(stamper)
    stamper.stdout.close()  # read one line, not to EOF: closing is the reader's


@pytest.mark.skipif(os.geteuid() != 0, reason="only a root node may run the stamper SCHED_FIFO")
def test_a_root_node_runs_the_stamper_ahead_of_normal_tasks() -> None:
    # at nice -10 it still waited ~35 ms in the run queue beside a CPU hog (16 tokens in one read)
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    stamper = start_stamper(writer.stdout)
    writer.stdout.close()
    try:
        deadline = time.monotonic() + 10
        while os.sched_getscheduler(stamper.pid) != os.SCHED_FIFO and time.monotonic() < deadline:
            time.sleep(0.01)  # it switches itself once its interpreter is up
        assert os.sched_getscheduler(stamper.pid) == os.SCHED_FIFO
    finally:
        writer.stdin.close()
        writer.wait()
        stop_stamper(stamper)
        stamper.stdout.close()  # never read: closing is the reader's


@pytest.mark.parametrize(
    ("content", "expected"),
    [(b"123456789\n", 123456789), (b"usage_usec 77\nuser_usec 50\nsystem_usec 27\n", 77_000)],
)
def test_the_cpu_reading_comes_from_the_counter_file_v1_or_v2(tmp_path, content, expected) -> None:
    counter = tmp_path / "cpu"
    counter.write_bytes(content)
    writer = subprocess.Popen([sys.executable, "-c", "print('one', flush=True)"], stdout=subprocess.PIPE)
    stamper = start_stamper(writer.stdout, str(counter))
    writer.stdout.close()
    line, _t, cpu = StampedLines(stamper.stdout).readline(64)
    stop_stamper(stamper)
    writer.wait()
    assert (line, cpu) == (b"one\n", expected)


BURNER = """
import sys, time
for i in range(5):
    t = time.process_time()
    while time.process_time() - t < 0.03:
        pass
    sys.stdout.write(f"token {i}\\n"); sys.stdout.flush()
"""


def test_a_late_reader_still_gets_each_lines_cpu_as_it_was_when_the_line_came() -> None:
    """Read by the node after the whole stream, every token's CPU reading would be the same (the
    reading at the end): an honest decode window then looks idle. The stamper's readings are not."""
    from maxwell_poi.node.sandbox import open_sandbox

    sandbox = open_sandbox("stamper-cpu")
    try:
        if sandbox.cpu_counter() is None:
            pytest.skip(f"{sandbox.describe()['source']}: no CPU counter file (the /proc fallback)")
        writer = sandbox.spawn([sys.executable, "-c", BURNER], stdout=subprocess.PIPE)
        stamper = start_stamper(writer.stdout, sandbox.cpu_counter())
        writer.stdout.close()
        writer.wait()  # the reader is held up until the burner is done
        lines = StampedLines(stamper.stdout)
        readings = []
        while (got := lines.readline(64))[0]:
            readings.append(got[2])
        stop_stamper(stamper)
    finally:
        sandbox.close()
    assert len(readings) == 5 and NO_CPU not in readings
    assert all(b > a for a, b in zip(readings, readings[1:], strict=False)), readings  # 30 ms apart
