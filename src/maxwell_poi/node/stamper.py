"""Arrival stamps taken where the node's own work cannot delay them.

L2 judges the token stream's pace and bursts from the times Maxwell saw each line arrive. Read by a
thread of the serving process (`poi serve --local-node`: intake, the gateway's running checks, the
probe's judging pass, every agent's reader, one GIL), a line is stamped when that thread next gets
the interpreter, not when the agent wrote it: an honest poi-lm stream beside a busy neighbour showed
13-14 tokens "in a row in a burst" (issue 24's first-hour walkthrough) because the reader read the
tokens that queued while it waited. The stamper is a separate small process (no imports beyond the
standard library's os, struct and time; raised priority where the node may) that only reads the
agent's stdout, stamps each read with CLOCK_MONOTONIC — the clock `time.perf_counter()` reads in
every process on the host — and, given the sandbox's CPU counter file (cgroup v1 `cpuacct.usage`,
v2 `cpu.stat`), reads the sandbox's CPU-nanoseconds at the same moment; it passes both on framed as
(stamp, cpu_ns, length, bytes). The node's reader then gives each line the stamp and CPU reading of
the read that completed it: L1's decode window (wall from stamps, CPU from readings) is then on one
clock however late the node itself reads (read by the node, a late reader saw its first token's CPU
reading after the whole stream: an honest window measured 0.09 cores busy under load). It is
Maxwell's process, outside the agent's sandbox: its CPU is not charged to the agent, and a confined
agent cannot signal it.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import BinaryIO

# stamp (perf_counter seconds), the sandbox's CPU-ns at it (-1: not read), length of the bytes after
HEADER = struct.Struct("<dqI")
NO_CPU = -1
READ_BYTES = 1 << 16
# A root node runs the stamper SCHED_FIFO (priority 1): it wakes ahead of every normal task, the
# agent's and the neighbours'. At nice -10 it still waited up to ~35 ms in the run queue beside a CPU
# hog (16 tokens of an honest poi-lm stream in one read); FIFO kept its run-queue wait under 0.03 ms
# over 864 reads. It only ever blocks on a read or on the node's pipe, so it cannot hold a core
# (and the kernel's RT throttling caps it at 95 % anyway). A node that may not gets nice -10, or
# the default.
NICE = -10

# the stamper's whole program: read, stamp, forward; exits when the agent's stdout closes
STAMPER_SOURCE = f"""
import os, struct, sys, time
try:
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
except OSError:
    try:
        os.setpriority(os.PRIO_PROCESS, 0, {NICE})
    except OSError:
        pass
header = struct.Struct({HEADER.format!r})
counter = None
if len(sys.argv) > 1:
    try:
        counter = os.open(sys.argv[1], os.O_RDONLY)
    except OSError:
        pass

def cpu_ns():
    if counter is None:
        return {NO_CPU}
    try:
        raw = os.pread(counter, 4096, 0)
        at = raw.find(b"usage_usec ")
        if at < 0:
            return int(raw)
        return int(raw[at + 11:].split(None, 1)[0]) * 1000
    except (OSError, ValueError):
        return {NO_CPU}

while True:
    data = os.read(0, {READ_BYTES})
    stamp = time.perf_counter()
    cpu = cpu_ns()
    if not data:
        break
    out = memoryview(header.pack(stamp, cpu, len(data)) + data)
    while out:
        out = out[os.write(1, out):]
"""


def start_stamper(agent_stdout: BinaryIO, cpu_counter: str | None = None) -> subprocess.Popen:
    """Starts the stamper on the read end of the agent's stdout (and, with `cpu_counter`, reading the
    sandbox's CPU counter file at each stamp). The caller then closes its own copy of that end, so
    the agent's output has one reader and its end reaches the node as EOF."""
    return subprocess.Popen(
        [sys.executable, "-I", "-S", "-c", STAMPER_SOURCE, *([cpu_counter] if cpu_counter else [])],
        stdin=agent_stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,  # a signal meant for the node's terminal is not the stamper's
    )


class StampedLines:
    """Lines of the agent's stdout, each with the stamp of the read that completed it.

    `readline(limit)` returns (line, stamp, cpu_ns) like a binary stream's readline(limit): the line
    with its newline, or `limit` bytes of a longer one, or what was left at EOF, with the stamp and
    the sandbox's CPU reading (NO_CPU: none) of the read that completed it; (b"", 0.0, NO_CPU) at
    EOF, where the stamper's output is closed (the reader owns it)."""

    def __init__(self, framed: BinaryIO) -> None:
        self.framed = framed
        self.buffer = bytearray()
        self.stamps: list[tuple[int, float, int]] = []  # (end offset in buffer, stamp, cpu) of each read
        self.eof = False

    def _more(self) -> bool:
        header = self._exactly(HEADER.size)
        if header is None:
            return False
        stamp, cpu, length = HEADER.unpack(header)
        data = self._exactly(length)
        if data is None:
            return False
        self.buffer.extend(data)
        self.stamps.append((len(self.buffer), stamp, cpu))
        return True

    def _exactly(self, n: int) -> bytes | None:
        data = self.framed.read(n)
        return data if data is not None and len(data) == n else None

    def readline(self, limit: int) -> tuple[bytes, float, int]:
        scanned = 0  # no newline before here: a long line's reads are each searched once
        while True:
            end = self.buffer.find(b"\n", scanned, limit)
            scanned = min(len(self.buffer), limit)
            if end >= 0:
                return self._take(end + 1)
            if len(self.buffer) >= limit:
                return self._take(limit)
            if self.eof or not self._more():
                self.eof = True
                self.framed.close()
                return self._take(len(self.buffer)) if self.buffer else (b"", 0.0, NO_CPU)

    def _take(self, n: int) -> tuple[bytes, float, int]:
        """The first n bytes, with the stamp and CPU reading of the read that brought the last of them."""
        stamp, cpu = next((t, c) for end, t, c in self.stamps if end >= n)
        line = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.stamps = [(end - n, t, c) for end, t, c in self.stamps if end > n]
        return line, stamp, cpu


def stop_stamper(proc: subprocess.Popen, timeout_s: float = 2.0) -> None:
    """The stamper exits on its own at the agent's EOF (after forwarding everything before it); this
    makes sure it has. Its output is the reader's to close (StampedLines does, at EOF)."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
