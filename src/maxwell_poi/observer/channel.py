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

from ..protocol.lease import Lease
from .evidence import ChannelEvidence

HARD_READ_LIMIT = 256 << 20  # stop draining a flooding agent after this many bytes


@dataclass(frozen=True)
class AgentRun:
    receipt: bytes  # at most `max_bytes` + 1 bytes: enough to show a receipt was too large
    evidence: ChannelEvidence
    timed_out: bool


def _drain(stream, keep: int, sink: dict) -> None:
    h = hashlib.sha256()
    kept = bytearray()
    total = 0
    while total < HARD_READ_LIMIT:
        block = stream.read(1 << 16)
        if not block:
            break
        h.update(block)
        total += len(block)
        if len(kept) < keep:
            kept.extend(block[: keep - len(kept)])
    sink.update(data=bytes(kept), total=total, sha256=h.hexdigest())


def run_agent(
    command: str | list[str],
    lease: Lease,
    *,
    max_bytes: int,
    timeout_s: float | None = None,
    env: dict[str, str] | None = None,
) -> AgentRun:
    """Run one agent process for one lease. `timeout_s` defaults to the time left before the
    lease deadline; an agent that overruns is killed and its partial output kept as evidence."""
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    payload = lease.to_json().encode() + b"\n"
    timeout = timeout_s if timeout_s is not None else max(0.1, lease.deadline - time.time())
    started = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out: dict = {}
    err: dict = {}
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, max_bytes + 1, out), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, 1 << 16, err), daemon=True),
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
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join(timeout=5)
    wall = time.perf_counter() - t0
    evidence = ChannelEvidence(
        started_at=started,
        finished_at=started + wall,
        wall_s=wall,
        cpu_s=rusage.ru_utime + rusage.ru_stime,
        max_rss_kb=rusage.ru_maxrss,
        bytes_in=len(payload),
        bytes_out=out.get("total", 0),
        sha256_in=hashlib.sha256(payload).hexdigest(),
        sha256_out=out.get("sha256", hashlib.sha256(b"").hexdigest()),
        exit_code=proc.returncode,
        stderr_tail=err.get("data", b"")[-2000:].decode("utf-8", "replace"),
    )
    return AgentRun(receipt=out.get("data", b""), evidence=evidence, timed_out=timed_out)


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
