"""A resident agent: one long-lived agent process tree in its own sandbox, answering lease after
lease over the same pipes, several at once (docs/receipt.md, "Resident mode").

Maxwell's side of the channel. Per lease it measures, with its own clock and the sandbox's kernel
accounting (observer.sandbox): the lease window (lease line written to receipt line read), the
sandbox's CPU-nanoseconds and memory at that window's ends and at each token's arrival, the
tokens other leases streamed inside this lease's decode window (batching: L1 judges the sandbox's
work against the work of every lease it served there), and the sandbox's CPU while no lease was in
flight before this one (work done between leases). Nothing the agent writes is trusted: its lines
are only routed by the lease id they carry, and a line naming no lease in flight is an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..observer.contention import Mark, between, mark
from ..observer.evidence import RESIDENT_REGIME, IdleGap, LeaseEvidence
from ..observer.host import this_device
from ..observer.telemetry import Measurement, Observer, gpu_observer
from ..protocol.engine import engine_of_command
from ..protocol.lease import Lease
from ..protocol.probe import ProbeAnswer
from ..protocol.stream import (
    TaggedChunk,
    TaggedOpening,
    TaggedReceipt,
    TaggedRefusal,
    TaggedToken,
    open_request_line,
    parse_resident_line,
)
from .channel import AgentRun, drain
from .probe import PendingProbe, WorkProbes
from .sandbox import Sandbox, Usage, open_sandbox
from .stamper import NO_CPU, StampedLines, start_stamper, stop_stamper
from .stream_log import StreamLog

# cgroup counters are in nanoseconds, but the kernel folds a running task's time into them only at
# scheduler ticks and switches (steps of ~0.006 ms on a quiet host here, ~2 ms under load): judge
# by at least this
EFFECTIVE_TICK_S = 0.004
EXIT_GRACE_S = 0.5  # how long a lease with no receipt waits for a dying agent's exit status
MAX_LINE_BYTES = 64 << 20  # a resident agent's longest line; a receipt line past it is cut and fails
# sees each token and chunk as it arrives: (the line, seconds since the lease was handed over, the
# sandbox's CPU-seconds then); chunks carry (0, 0): only tokens are timed
StreamWatch = Callable[[TaggedToken | TaggedChunk, float, float], None]
MoreTime = Callable[[], float]  # how much longer than its timeout an L3 opening may take, now


@dataclass
class _LeaseState:
    """What Maxwell saw of one lease in flight (filled by the reader thread)."""

    lease: Lease
    max_bytes: int
    payload: bytes
    started_at: float
    t_in: float
    usage_in: Usage
    idle: IdleGap | None
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # perf_counter at arrival
    cpu: list[float] = field(default_factory=list)  # sandbox CPU seconds at arrival
    peak_memory: int = 0
    errors: int = 0
    bytes_out: int = 0
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    receipt: bytes = b""
    receipt_total: int = 0
    refusal: str = ""
    t_out: float | None = None
    usage_out: Usage | None = None
    overlap: set[str] = field(default_factory=set)  # other leases in flight during this one
    telemetry: dict[str, Measurement] = field(default_factory=dict)  # GPU telemetry of its busy span
    done: threading.Event = field(default_factory=threading.Event)
    chunks: int = 0
    chunk_digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    watch: StreamWatch | None = None
    mark_in: Mark | None = None  # the host and the sandbox's run-queue delay when the lease went in
    contention: dict[str, float] = field(default_factory=dict)
    probe: PendingProbe | None = None  # Maxwell's work probe of this lease (node.probe)
    own_cpu_s: float | None = None  # the sandbox CPU attributed to this lease alone (node.stream_log)


class ResidentAgent:
    """Starts `argv` once in a sandbox and serves leases to it until closed.

    `submit(lease, max_bytes)` writes the lease line and returns at once; `collect(lease_id)` waits
    for that lease's receipt (or its deadline) and returns the run with its evidence. Several leases
    may be in flight at once; the agent decides how to batch them. With `probes`, each generation
    lease gets a work probe while it streams (node.probe), judged in `collect`.
    """

    def __init__(
        self,
        argv: list[str],
        *,
        name: str,
        env: dict[str, str] | None = None,
        sandbox: Sandbox | None = None,
        cwd: str | None = None,
        telemetry: Observer | None = None,
        probes: WorkProbes | None = None,
    ) -> None:
        self.argv = list(argv)
        self.probes = probes
        self._probe_out: queue.Queue[tuple[_LeaseState | None, int]] = queue.Queue()
        self.sandbox = sandbox or open_sandbox(name)
        try:
            self.proc = self.sandbox.spawn(
                self.argv,
                env={**os.environ, **(env or {})},
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=cwd,
            )
            # the stamper (node.stamper) reads its stdout: no work of this process delays a stamp
            self._stamper = start_stamper(self.proc.stdout, self.sandbox.cpu_counter())
            self.proc.stdout.close()
        except BaseException:
            self.sandbox.close()  # the agent never ran (or confining it failed): release its cgroup
            raise
        self.telemetry = telemetry if telemetry is not None else gpu_observer()
        self._span: list[str] = []  # leases of the open busy span (telemetry window); [] when none
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._leases: dict[str, _LeaseState] = {}
        self._log = StreamLog()  # every token's arrival, and each lease's own share of the CPU
        # idle accounting starts when the first lease ends: start-up (imports, loading) is not idling
        self._idle_since: tuple[float, Usage] | None = None
        self.unrouted = 0  # lines naming no lease in flight, or unreadable with none in flight
        self._openings: dict[str, list] = {}  # lease id -> [event, answer line or refusal]
        self._stderr: dict = {}
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=drain, args=(self.proc.stderr, 1 << 16, self._stderr), daemon=True),
            threading.Thread(target=self._send_probes, daemon=True),
        ]
        for t in self._threads:
            t.start()

    # --- Maxwell -> agent -------------------------------------------------------------------
    def submit(self, lease: Lease, max_bytes: int, watch: StreamWatch | None = None) -> None:
        """`watch` (optional) is called from the reader thread with each token and fingerprint chunk
        of this lease as it arrives, after Maxwell has recorded it: keep it quick (queue and return)."""
        payload = lease.to_json().encode() + b"\n"
        with self._lock:
            if lease.lease_id in self._leases:
                raise ValueError(f"lease {lease.lease_id} is already in flight on this agent")
            now, usage = time.perf_counter(), self.sandbox.usage()
            self._log.begin(usage.cpu_ns)
            idle = None
            if not self._in_flight():
                self._begin_span()
                if self._idle_since is not None:
                    t_idle, u_idle = self._idle_since
                    idle = IdleGap(gap_s=now - t_idle, cpu_s=(usage.cpu_ns - u_idle.cpu_ns) / 1e9)
            state = _LeaseState(
                lease,
                max_bytes,
                payload,
                time.time(),
                now,
                usage,
                idle,
                peak_memory=usage.memory_bytes,
                watch=watch,
                mark_in=mark(self.sandbox.pids()),
                probe=self.probes.draw(lease, self.argv) if self.probes else None,
            )
            for other in self._leases.values():
                if not other.done.is_set():
                    other.overlap.add(lease.lease_id)
                    state.overlap.add(other.lease.lease_id)
            self._leases[lease.lease_id] = state
            self._span.append(lease.lease_id)
        try:
            with self._write_lock:
                self.proc.stdin.write(payload)
                self.proc.stdin.flush()
        except (BrokenPipeError, ValueError):
            self._finish(lease.lease_id, refusal="the agent's stdin is closed (the agent exited)")

    def _in_flight(self) -> int:
        return sum(1 for s in self._leases.values() if not s.done.is_set())

    # --- agent -> Maxwell -------------------------------------------------------------------
    def _read(self) -> None:
        lines = StampedLines(self._stamper.stdout)
        while True:
            line, arrived, cpu_ns = lines.readline(MAX_LINE_BYTES)
            if not line:
                break
            if not line.strip():
                continue
            try:
                item = parse_resident_line(line)
            except ValueError:
                self._unreadable(line)
                continue
            if isinstance(item, ProbeAnswer):
                self._probe_answered(item, arrived)
                continue
            if self._answers_opening(item):
                continue
            with self._lock:
                state = self._leases.get(item.lease_id)
                if state is None or state.done.is_set():
                    self.unrouted += 1
                    continue
                state.bytes_out += len(line)
                state.digest.update(line)
            if isinstance(item, TaggedToken):
                self._token(state, item, arrived, cpu_ns)
            elif isinstance(item, TaggedChunk):
                self._chunk(state, item)
            elif isinstance(item, TaggedReceipt):
                state.receipt_total = len(item.receipt)
                state.receipt = item.receipt[: state.max_bytes + 1]
                self._finish(item.lease_id)
            elif isinstance(item, TaggedRefusal):
                self._finish(item.lease_id, refusal=item.error or "refused without a reason")
        with self._lock:
            pending = [lid for lid, s in self._leases.items() if not s.done.is_set()]
        for lid in pending:  # the agent exited: every lease still open ends here, unanswered
            self._finish(lid, refusal=f"the agent exited (status {self.proc.poll()}) before answering")

    def _answers_opening(self, item: object) -> bool:
        """An opening, or a refusal, for a challenge Maxwell is waiting on (after its lease ended)."""
        if not isinstance(item, TaggedOpening | TaggedRefusal):
            return False
        with self._lock:
            waiting = self._openings.get(item.lease_id)
            if waiting is None or (isinstance(item, TaggedRefusal) and item.lease_id in self._leases):
                return False
            waiting[1] = item
        waiting[0].set()
        return True

    def open(
        self, lease_id: str, keys: list[tuple[int, str]], timeout_s: float, more_s: MoreTime | None = None
    ) -> TaggedOpening | str:
        """L3: ask the agent to open these traced tensors of an answered lease: its opening line, or why
        none (a refusal; none within `timeout_s` + `more_s()`, read every 0.25 s: a late one is refused)."""
        waiting = [threading.Event(), None]
        t0, extra = time.perf_counter(), 0.0
        with self._lock:
            self._openings[lease_id] = waiting
        try:
            with self._write_lock:
                self.proc.stdin.write(open_request_line(lease_id, keys))
                self.proc.stdin.flush()
            while (left := t0 + timeout_s + extra - time.perf_counter()) > 0:
                if waiting[0].wait(min(left, 0.25) if more_s else left):
                    break
                extra = more_s() if more_s else 0.0
            else:
                return f"no opening within {timeout_s + extra:.0f} s"
        except (BrokenPipeError, ValueError):
            return "the agent's stdin is closed (the agent exited)"
        finally:
            with self._lock:
                self._openings.pop(lease_id, None)
        answer = waiting[1]
        return answer if isinstance(answer, TaggedOpening) else f"the agent refused: {answer.error}"

    # --- the work probe (node.probe) -------------------------------------------------------------
    def _send_probes(self) -> None:
        """Writes probe lines off the reader thread (a write to a full pipe must not stop Maxwell
        reading the agent's stdout); the probe's clock starts as its line is written."""
        while True:
            state, _at = self._probe_out.get()
            if state is None:
                return
            probe = state.probe
            assert probe is not None
            try:
                # the clock starts before the write: the agent may answer before write() returns here
                # (this thread descheduled on a busy host), and a latency is never negative
                probe.sent_t = time.perf_counter()
                with self._write_lock:
                    self.proc.stdin.write(probe.request.line())
                    self.proc.stdin.flush()
            except (BrokenPipeError, ValueError, OSError):
                probe.sent_at_token, probe.sent_t = -2, None  # the agent's stdin is closed: never went out
            probe.went_out.set()

    def _probe_answered(self, answer: ProbeAnswer, arrived: float) -> None:
        with self._lock:
            state = self._leases.get(answer.lease_id)
            taken = state is not None and state.probe is not None and state.probe.take(answer, arrived)
            if not taken:
                self.unrouted += 1

    def _unreadable(self, line: bytes) -> None:
        """An unreadable line cannot be routed: every lease in flight counts a stream error (the
        agent garbled its own channel), or none is and it counts as unrouted."""
        with self._lock:
            open_ = [s for s in self._leases.values() if not s.done.is_set()]
            for s in open_:
                s.errors += 1
            if not open_:
                self.unrouted += 1

    def _token(self, state: _LeaseState, item: TaggedToken, arrived: float, cpu_ns: int) -> None:
        """`cpu_ns`: the sandbox's CPU when the stamper read the token (NO_CPU: not read there)."""
        if item.position != len(state.tokens):
            state.errors += 1
            return
        usage = self.sandbox.usage()
        cpu = cpu_ns if cpu_ns != NO_CPU else usage.cpu_ns  # the stamp's moment, where the stamper read it
        with self._lock:
            state.tokens.append(item.token)
            state.times.append(arrived)
            state.cpu.append(cpu / 1e9)
            state.peak_memory = max(state.peak_memory, usage.memory_bytes)
            self._log.token(item.lease_id, arrived, cpu)
        if state.watch is not None:
            state.watch(item, arrived - state.t_in, cpu / 1e9)
        probe = state.probe
        if probe is not None and probe.sent_at_token == -2 and item.position >= probe.send_at_token:
            probe.sent_at_token = item.position
            self._probe_out.put((state, item.position))

    def _chunk(self, state: _LeaseState, item: TaggedChunk) -> None:
        with self._lock:
            if item.index != state.chunks:
                state.errors += 1
                return
            state.chunks += 1
            state.chunk_digest.update(item.data)
        if state.watch is not None:
            state.watch(item, 0.0, 0.0)

    def cut(self, lease_id: str, reason: str) -> None:
        """End a lease now, unanswered (Maxwell's streaming audit found it cheating): what it streams
        after this is not routed, and its evidence says why it ended."""
        self._finish(lease_id, refusal=f"cut off by Maxwell: {reason}")

    def _finish(self, lease_id: str, refusal: str = "") -> None:
        now, usage = time.perf_counter(), self.sandbox.usage()
        mark_out = mark(self.sandbox.pids())
        with self._lock:
            state = self._leases.get(lease_id)
            if state is None or state.done.is_set():
                return
            state.t_out, state.usage_out, state.refusal = now, usage, refusal
            last = self._in_flight() == 1  # this one is the last: the busy span ends
            state.own_cpu_s = self._log.finish(lease_id, usage.cpu_ns, last=last)
            if state.probe is not None:
                state.probe.lease_done_t = now  # an engine's probe answer is timed from here (node.probe)
            if not refusal and state.probe is not None and state.probe.sent_at_token == -2:
                state.probe.sent_at_token = -1  # no token reached it: probe at the receipt
                self._probe_out.put((state, -1))
            if state.mark_in is not None:
                cpu_s = (usage.cpu_ns - state.usage_in.cpu_ns) / 1e9
                state.contention = between(state.mark_in, mark_out, cpu_s)
            state.peak_memory = max(state.peak_memory, usage.memory_bytes)
            if last:
                self._end_span()
                self._idle_since = (now, usage)
            state.done.set()

    def _begin_span(self) -> None:
        if self.telemetry is not None:
            self.telemetry.begin_window(self.proc.pid)

    def _end_span(self) -> None:
        """GPU telemetry is sampled per busy span (first lease in to last receipt out), not per
        lease: leases of the span still waiting to be collected get it; one collected earlier,
        while others were in flight, carries none (a named gap of the prototype)."""
        span, self._span = self._span, []
        if self.telemetry is None or not span:
            return
        measured = self.telemetry.end_window()
        for lid in span:
            if lid in self._leases:
                self._leases[lid].telemetry = measured

    # --- results ----------------------------------------------------------------------------
    def collect(self, lease_id: str, timeout_s: float | None = None) -> AgentRun:
        """Wait for the lease's receipt until `timeout_s` (default: the lease's deadline); a lease
        that runs out of time is closed as timed out (a late receipt is then unrouted)."""
        with self._lock:
            state = self._leases[lease_id]
        timeout = timeout_s if timeout_s is not None else max(0.1, state.lease.deadline - time.time())
        timed_out = not state.done.wait(timeout)
        if timed_out:
            self._finish(lease_id, refusal=f"no receipt within {timeout:.1f} s")
        if not state.receipt.strip():
            # no receipt: if the agent is dying, wait a moment for its exit status and its last
            # stderr lines, so the evidence names a failed lease's cause instead of racing its reaping
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=EXIT_GRACE_S)
            if self.proc.poll() is not None:
                self._threads[1].join(timeout=EXIT_GRACE_S)
        judged = None
        if (
            self.probes is not None
            and state.probe is not None
            and state.receipt.strip()
            and not state.refusal
        ):
            self.probes.wait(state.probe)  # while the lease is still routable: a late answer lands
            judged = self.probes.judge(state.lease, state.probe, this_device())
        with self._lock:
            self._leases.pop(lease_id)
            evidence = replace(self._evidence(state), probe=judged)
            self._log.forget_before(min((s.t_in for s in self._leases.values()), default=time.perf_counter()))
        return AgentRun(receipt=state.receipt.strip(), evidence=evidence, timed_out=timed_out)

    def _co_served(self, state: _LeaseState) -> tuple[int, int]:
        """(tokens, leases) other leases streamed inside this lease's decode window."""
        if len(state.times) < 2:
            return 0, 0
        window = self._log.between(state.times[0], state.times[-1])
        others = [lid for lid in window if lid != state.lease.lease_id]
        return len(others), len(set(others))

    def _evidence(self, s: _LeaseState) -> LeaseEvidence:
        assert s.t_out is not None and s.usage_out is not None
        co_tokens, co_leases = self._co_served(s)
        desc = self.sandbox.describe()
        return LeaseEvidence(
            started_at=s.started_at,
            finished_at=s.started_at + (s.t_out - s.t_in),
            wall_s=s.t_out - s.t_in,
            cpu_s=(s.usage_out.cpu_ns - s.usage_in.cpu_ns) / 1e9,
            max_rss_kb=s.peak_memory // 1024,
            bytes_in=len(s.payload),
            bytes_out=s.bytes_out,
            receipt_bytes=s.receipt_total,
            sha256_in=hashlib.sha256(s.payload).hexdigest(),
            sha256_out=s.digest.hexdigest(),
            exit_code=self.proc.poll(),
            stderr_tail=(s.refusal + "\n" if s.refusal else "") + self.stderr_tail(),
            stream_tokens=tuple(s.tokens),
            stream_t=tuple(round(t - s.t_in, 6) for t in s.times),
            stream_cpu_s=tuple(s.cpu),
            stream_errors=s.errors,
            stream_chunks=s.chunks,
            stream_chunks_sha256=s.chunk_digest.hexdigest() if s.chunks else "",
            telemetry=s.telemetry,
            device_class=this_device(),
            regime=RESIDENT_REGIME,
            accounting={
                "source": str(desc["source"]),
                "trust": str(desc["trust"]),
                "resolution_s": max(desc["resolution_ns"] / 1e9, EFFECTIVE_TICK_S),
            },
            co_tokens=co_tokens,
            co_leases=co_leases,
            window_tokens=len(self._log.between(s.t_in, s.t_out)),
            own_cpu_s=s.own_cpu_s,
            overlapped=len(s.overlap),
            idle_before=s.idle,
            contention=s.contention,
            sandbox_escapes=tuple(e.reason for e in self.sandbox.check_escapes()),
            engine=engine_of_command(self.argv),  # the program this node runs: selects the profile
        )

    def stderr_tail(self) -> str:
        return self._stderr.get("data", b"")[-2000:].decode("utf-8", "replace")

    def close(self, grace_s: float = 5.0) -> None:
        """Close the agent's stdin (a resident agent exits when its input ends), then stop
        whatever is left in the sandbox, children outside the process tree included."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace_s)
        self._probe_out.put((None, 0))  # ends the probe sender
        with self._lock:
            self._end_span()  # a span left open by leases that never answered
        self.sandbox.close()
        for t in self._threads:
            t.join(timeout=2)
        stop_stamper(self._stamper)

    def __enter__(self) -> ResidentAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
