"""Maxwell's runner: starts the agent as its own process, hands it the lease over stdin, reads
the receipt from stdout, and measures what crossed the channel and what the process consumed.

Nothing here trusts the agent: the digests, byte counts, timestamps and CPU time are taken by
Maxwell's side of the pipe and by the kernel's accounting of the child process.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass

from ..observer.contention import between, mark
from ..observer.evidence import LeaseEvidence
from ..observer.host import this_device
from ..observer.telemetry import Observer
from ..protocol.engine import engine_of_command
from ..protocol.lease import Lease
from ..protocol.stream import parse_stream_line

HARD_READ_LIMIT = 256 << 20  # stop draining a flooding agent after this many bytes


@dataclass(frozen=True)
class AgentRun:
    receipt: bytes  # at most `max_bytes` + 1 bytes: enough to show a receipt was too large
    evidence: LeaseEvidence
    timed_out: bool


def drain(stream, keep: int, sink: dict) -> None:
    """Keep the last `keep` bytes (the tail is what explains a failure), hash and count everything,
    up to HARD_READ_LIMIT."""
    h = hashlib.sha256()
    kept = bytearray()
    total = 0
    while total < HARD_READ_LIMIT:
        block = stream.read(1 << 16)
        if not block:
            break
        h.update(block)
        total += len(block)
        kept.extend(block)
        if len(kept) > keep:
            del kept[: len(kept) - keep]
    sink.update(data=bytes(kept), total=total, sha256=h.hexdigest())


class _StdoutReader:
    """Reads the agent's stdout line by line: token stream lines are timestamped (and the agent's
    CPU time read) on arrival; everything else is the receipt."""

    def __init__(self, stream, pid: int, t0: float, keep: int) -> None:
        self.stream, self.t0, self.keep = stream, t0, keep
        self.proc = _process(pid)
        self.h = hashlib.sha256()
        self.total = 0
        self.receipt = bytearray()
        self.receipt_total = 0  # all non-stream bytes, also those past `keep`
        self.tokens: list[int] = []
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.rss_mb = 0.0  # peak resident memory seen at token arrivals
        self.errors = 0

    def _cpu_now(self) -> float:
        try:
            t = self.proc.cpu_times()
            self.rss_mb = max(self.rss_mb, self.proc.memory_info().rss / 2**20)
            return t.user + t.system + t.children_user + t.children_system
        except Exception:  # the process may have just exited; the point is lost, not invented
            return float("nan")

    def run(self) -> None:
        while self.total < HARD_READ_LIMIT:
            line = self.stream.readline(self.keep + 1)
            if not line:
                break
            arrived = time.perf_counter() - self.t0
            self.h.update(line)
            self.total += len(line)
            item = None
            if not self.receipt:  # once the receipt has begun, every line belongs to it
                if not line.strip():
                    continue  # a blank line (a library's stray newline) is neither stream nor receipt
                try:
                    item = parse_stream_line(line)
                except ValueError:
                    self.errors += 1  # meant as a stream line but unreadable
                    continue
            if item is None:
                self.receipt_total += len(line)
                if len(self.receipt) <= self.keep:
                    self.receipt.extend(line[: self.keep + 1 - len(self.receipt)])
                continue
            pos, tok = item
            if pos != len(self.tokens):
                self.errors += 1
                continue
            self.tokens.append(tok)
            self.times.append(arrived)
            self.cpu.append(self._cpu_now())


def _sampled_peak_rss_mb(telemetry: dict) -> float:
    m = telemetry.get("process")
    value = m.totals.get("peak_rss_mb", 0.0) if m is not None else 0.0
    return value if value == value else 0.0  # NaN when no sample succeeded


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def run_agent(
    command: str | list[str],
    lease: Lease,
    *,
    max_bytes: int,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
    observer: Observer | None = None,
) -> AgentRun:
    """Run one agent process for one lease. `timeout_s` defaults to the time left before the
    lease deadline; an agent that overruns is killed and its partial output kept as evidence.
    With an `observer`, its telemetry window covers the agent process from start to exit."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    payload = lease.to_json().encode() + b"\n"
    timeout = timeout_s if timeout_s is not None else max(0.1, lease.deadline - time.time())
    started = time.time()
    t0 = time.perf_counter()
    host_in = mark(())  # a one-shot child's run-queue delay leaves with it: the host's side only
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    if observer is not None:
        observer.begin_window(proc.pid)
    out = _StdoutReader(proc.stdout, proc.pid, t0, max_bytes)
    err: dict = {}
    readers = [
        threading.Thread(target=out.run, daemon=True),
        threading.Thread(target=drain, args=(proc.stderr, 1 << 16, err), daemon=True),
    ]
    for r in readers:
        r.start()
    try:
        proc.stdin.write(payload)
        proc.stdin.close()
    except BrokenPipeError:
        pass  # the agent exited without reading; its exit status tells the rest
    timed_out = False
    deadline = time.perf_counter() + timeout
    status, rusage = _wait(proc.pid, deadline)
    if status is None:
        timed_out = True
        proc.kill()
        _, status, rusage = os.wait4(proc.pid, 0)
    telemetry = observer.end_window() if observer is not None else {}
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(timeout=5)
    wall = time.perf_counter() - t0
    cpu_s = rusage.ru_utime + rusage.ru_stime
    evidence = LeaseEvidence(
        started_at=started,
        finished_at=started + wall,
        wall_s=wall,
        cpu_s=cpu_s,
        # not rusage's ru_maxrss: Linux counts the pre-exec copy of *this* process in it
        max_rss_kb=int(1024 * max(out.rss_mb, _sampled_peak_rss_mb(telemetry))),
        bytes_in=len(payload),
        bytes_out=out.total,
        receipt_bytes=out.receipt_total,
        sha256_in=hashlib.sha256(payload).hexdigest(),
        sha256_out=out.h.hexdigest(),
        exit_code=proc.returncode,
        stderr_tail=err.get("data", b"")[-2000:].decode("utf-8", "replace"),
        stream_tokens=tuple(out.tokens),
        stream_t=tuple(round(x, 6) for x in out.times),
        stream_cpu_s=tuple(out.cpu),
        stream_errors=out.errors,
        telemetry=telemetry,
        device_class=this_device(),
        contention=between(host_in, mark(()), cpu_s),
        engine=engine_of_command(argv),
    )
    return AgentRun(receipt=bytes(out.receipt).strip(), evidence=evidence, timed_out=timed_out)


def _wait(pid: int, deadline: float):
    """Poll for the child's exit so its rusage comes from the kernel (os.wait4), with a deadline."""
    delay = 0.005
    while True:
        wpid, status, rusage = os.wait4(pid, os.WNOHANG)
        if wpid == pid:
            return status, rusage
        if time.perf_counter() >= deadline:
            return None, None
        time.sleep(delay)
        delay = min(delay * 2, 0.1)
