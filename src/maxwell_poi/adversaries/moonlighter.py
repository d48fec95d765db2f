"""Cheat: moonlighting, work between leases. A resident agent that answers every lease honestly
with the reference `Prover`, but at start forks miners (`--miners`, default one per core) that
leave its process tree (double fork and `setsid`: each grandchild is reparented to init, in a
session of its own, its stdio on /dev/null) and spend the time between leases on SHA-256
proof-of-work. The agent stops the miners (SIGSTOP) the moment a lease line arrives and lets them
go on (SIGCONT) once the last receipt in flight is written, so every lease window, and every
per-lease figure measured in it, is honest. With `--always` they keep mining through leases too.

What catches it: L1's idle-work check. Maxwell reads the sandbox's CPU over each gap in which no
lease was in flight (`LeaseEvidence.idle_before`), and an honest resident agent sits still
there. Under cgroup accounting the kernel charges the escaped grandchildren to the agent's group,
whatever their parentage, so the mining shows. Under the /proc fallback (`proc-tree` trust) they
left the tree before any reading saw them: their CPU is counted nowhere, and this cheat passes.
That gap is the reason the fallback is marked as the weaker trust.

The miners exit with the agent: it kills them when its stdin closes (or on SIGTERM), and each
checks every quarter second that the agent still runs. Closing the sandbox kills them regardless:
they sit in its cgroup and carry its environment marker.

    python -m maxwell_poi.adversaries.moonlighter --key agent.pem --resident [--always] [--miners N]
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import BinaryIO

from ..node.sandbox.base import pid_gone
from ..protocol.keys import AgentKey
from ..protocol.probe import PROBE_REQUEST_PREFIX
from ..protocol.stream import RECEIPT_PREFIX, REFUSAL_PREFIX
from ..prover.harness import one_at_a_time, quiet_libraries, serve_one, serve_resident
from ..prover.sdk import Prover
from ._agent import parser
from .cpu_miner import mine_until

CHECK_S = 0.25  # how often the miner looks whether the agent still runs


def _mine_while_alive(agent_pid: int, label: bytes) -> None:
    while not pid_gone(agent_pid):
        mine_until(time.perf_counter() + CHECK_S, label)


def _detach_stdio() -> None:
    """Let go of the agent's pipes, so Maxwell sees them close when the agent exits."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def spawn_escaped_miner(label: bytes) -> int:
    """Double fork + setsid: a grandchild that mines until the agent is gone, reparented to init.
    Returns its pid."""
    agent = os.getpid()
    r, w = os.pipe()
    child = os.fork()
    if child == 0:  # the intermediate: start a new session, fork the miner, exit at once
        try:
            os.close(r)
            os.setsid()
            miner = os.fork()
            if miner == 0:
                os.close(w)
                _detach_stdio()
                _mine_while_alive(agent, label)
                os._exit(0)
            os.write(w, b"%d" % miner)
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(child, 0)  # reaped: the miner is now an orphan, no longer our descendant
    with os.fdopen(r, "rb") as f:
        return int(f.read())


class Moonlight:
    """The miners, paused while any lease is in flight (unless `always`)."""

    def __init__(self, miners: int, always: bool) -> None:
        self.pids = [spawn_escaped_miner(b"moon%d" % i) for i in range(max(1, miners))]
        self.always = always
        self.in_flight = 0
        self._lock = threading.Lock()

    def _signal(self, sig: int) -> None:
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def lease_arrived(self) -> None:
        with self._lock:
            self.in_flight += 1
            if self.in_flight == 1 and not self.always:
                self._signal(signal.SIGSTOP)

    def lease_ended(self) -> None:
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            if self.in_flight == 0:
                self._signal(signal.SIGCONT)

    def stop(self) -> None:
        self._signal(signal.SIGKILL)


class _WatchedInput:
    """The agent's stdin, telling the miners each lease line the moment it is read."""

    def __init__(self, stream: BinaryIO, moon: Moonlight) -> None:
        self.stream, self.moon = stream, moon

    def __iter__(self) -> Iterator[bytes]:
        for line in self.stream:
            if line.strip() and not line.startswith(PROBE_REQUEST_PREFIX):  # a probe ends with no receipt
                self.moon.lease_arrived()
            yield line


class _WatchedOutput:
    """The agent's stdout: once a receipt or refusal line is flushed, that lease has ended."""

    def __init__(self, stream: BinaryIO, moon: Moonlight) -> None:
        self.stream, self.moon = stream, moon
        self._ended = 0

    def write(self, data: bytes) -> int:
        if data.startswith((RECEIPT_PREFIX, REFUSAL_PREFIX)):
            self._ended += 1
        return self.stream.write(data)

    def flush(self) -> None:
        self.stream.flush()
        while self._ended:
            self._ended -= 1
            self.moon.lease_ended()


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--always", action="store_true", help="keep mining during leases too")
    p.add_argument(
        "--miners", type=int, default=os.cpu_count() or 1, help="escaped mining processes, one per core"
    )
    args = p.parse_args()
    moon = Moonlight(args.miners, args.always)  # before any thread starts: fork stays simple
    atexit.register(moon.stop)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"moonlighter: miners {' '.join(map(str, moon.pids))}", file=sys.stderr, flush=True)
    quiet_libraries()
    prover = Prover(AgentKey.load(args.key), threads=args.threads)
    if not args.resident:
        moon.lease_arrived()  # one-shot: the one lease is in flight for the whole life
        sys.exit(serve_one(prover.run))
    status = serve_resident(
        one_at_a_time(prover.run),
        stdin=_WatchedInput(sys.stdin.buffer, moon),  # type: ignore[arg-type]
        stdout=_WatchedOutput(sys.stdout.buffer, moon),  # type: ignore[arg-type]
        prober=prover.probe_line,
    )
    moon.stop()
    sys.exit(status)


if __name__ == "__main__":
    main()
