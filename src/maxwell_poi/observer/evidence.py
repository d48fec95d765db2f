"""What Maxwell itself observed of one lease. Evidence, not claims: the agent cannot edit it."""

from __future__ import annotations

import functools
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
from pydantic import TypeAdapter, ValidationError

from .telemetry.trace import Measurement


class DecodeWindow(NamedTuple):
    """From the first to the last streamed token, as Maxwell measured it."""

    wall_s: float  # Maxwell's clock
    cpu_s: float  # the agent process's CPU seconds (kernel accounting, read by Maxwell)
    tokens: int  # tokens decoded inside the window (streamed tokens - 1)
    co_tokens: int = 0  # tokens other leases streamed in the same sandbox inside this window

    @property
    def batch_tokens(self) -> int:
        """Every token the sandbox streamed in the window: this lease's and its batch peers'."""
        return self.tokens + self.co_tokens


class IdleGap(NamedTuple):
    """The sandbox between the previous lease's end and this lease's start, no lease in flight."""

    gap_s: float  # Maxwell's clock
    cpu_s: float  # the sandbox's CPU seconds over the gap (work done between leases)


class WorkProbe(NamedTuple):
    """Maxwell's work probe of this lease (node.probe): a fresh random sequence the agent had to run
    through the leased model while the lease streamed, judged by Maxwell's own recomputation."""

    outcome: str  # matched | mismatched | refused | unanswered | not_sent | uncalibrated (engine agents)
    reason: str
    sent_at_token: int = -2  # the token whose arrival sent it; -1 at the receipt; -2 never sent
    latency_s: float = -1.0  # Maxwell's clock, probe written to answer read; -1 unanswered
    ids: int = 0  # fresh ids in the probe
    close_fraction: float = -1.0  # of the answer's fingerprint values; -1 when not compared
    median_rel_error: float = -1.0
    tolerance: str = ""  # the tolerance set and class pair the rule chose


@dataclass(frozen=True)
class LeaseEvidence:
    """Measured by the runner around the agent's process and its stdin/stdout channel."""

    started_at: float  # Maxwell's clock, unix seconds
    finished_at: float
    wall_s: float
    cpu_s: float  # user + system CPU time of the agent process (rusage of the child)
    max_rss_kb: int  # peak resident memory Maxwell sampled (telemetry, token arrivals); 0 = unseen
    bytes_in: int  # lease bytes Maxwell wrote to the agent
    bytes_out: int  # all bytes the agent wrote back (token stream + receipt)
    sha256_in: str
    sha256_out: str
    exit_code: int | None
    stderr_tail: str = ""
    receipt_bytes: int = 0  # of bytes_out, those that were not token-stream lines
    # streamed tokens as Maxwell saw them arrive: value, arrival (s since start), and the agent
    # process's CPU seconds (kernel accounting, read by Maxwell) at that moment
    stream_tokens: tuple[int, ...] = ()
    stream_t: tuple[float, ...] = ()
    stream_cpu_s: tuple[float, ...] = ()
    stream_errors: int = 0  # stream lines out of order or unreadable
    # resident: fingerprint chunks streamed before the receipt (how many; sha256 of their bytes in order)
    stream_chunks: int = 0
    stream_chunks_sha256: str = ""
    telemetry: dict[str, Measurement] = field(default_factory=dict)  # Observer sources, by name
    device_class: str = ""  # the kind of device Maxwell ran the agent on (selects the profile)
    # how the agent ran: "oneshot" (a process per lease, rusage) or "resident" (a sandbox serving
    # lease after lease); profiles are measured per regime, since what is counted differs
    regime: str = "oneshot"
    accounting: dict[str, str | float] = field(default_factory=dict)  # source, trust, resolution_s
    co_tokens: int = 0  # tokens other leases streamed in the same sandbox inside the decode window
    co_leases: int = 0  # how many other leases those tokens belonged to (the batch, less this one)
    # every token the sandbox streamed in the whole lease window, this lease's and others' (a lease
    # handed over with others waits while they run: its window's CPU is theirs too)
    window_tokens: int = 0
    overlapped: int = 0  # other leases in flight in the same sandbox at some point of this one's window
    idle_before: IdleGap | None = None  # resident: the sandbox's idle gap before this lease
    # how contended the host was over the lease window (observer.contention: wait_s, others_cores,
    # steal_cores, cpu_pressure, load1); a figure the kernel did not give is absent, not zero
    contention: dict[str, float] = field(default_factory=dict)
    probe: WorkProbe | None = None  # the work probe sent during the lease (generation, resident)
    # escape attempts the node saw from this agent's sandbox up to this lease's end (node.sandbox:
    # a process outside its cgroup, session or tree), each with its reason; () = none seen
    sandbox_escapes: tuple[str, ...] = ()
    # resident: the sandbox CPU-seconds that were this lease's alone (node.stream_log: each CPU-second
    # of a busy span goes to the lease whose token or receipt came next); None where not attributed
    own_cpu_s: float | None = None
    # the engine the agent's enrolled command serves with (protocol.engine.engine_of_command: "" for an
    # SDK agent): the node's record of the program it runs, never the receipt's claim. An engine's work
    # per token is the engine's own, so its profile is its own (`profile_key`)
    engine: str = ""

    @property
    def streamed(self) -> bool:
        return bool(self.stream_tokens)

    @property
    def decode_window(self) -> DecodeWindow | None:
        """The decode window, or None when fewer than two tokens streamed (or their CPU readings do
        not pair with their arrival times: evidence no node of Maxwell's writes, seen by fuzzing)."""
        if len(self.stream_t) < 2 or len(self.stream_cpu_s) != len(self.stream_t):
            return None
        cpu = self.stream_cpu_s[-1] - self.stream_cpu_s[0]
        return DecodeWindow(self.stream_t[-1] - self.stream_t[0], cpu, len(self.stream_t) - 1, self.co_tokens)

    @property
    def profile_key(self) -> str:
        """The profile this evidence is compared with: the device class, the regime when it is not
        the one-shot default, and the engine when the agent is an engine adapter."""
        key = self.device_class if self.regime == "oneshot" else f"{self.device_class}|{self.regime}"
        return f"{key}|engine:{self.engine}" if self.engine else key

    @property
    def accounting_resolution_s(self) -> float:
        """How finely the CPU figures were counted (one-shot: the kernel's 10 ms tick)."""
        return float(self.accounting.get("resolution_s", 0.01))

    def free_interval_s(self) -> float | None:
        """The median gap between streamed tokens less the run-queue delay per token: the pace on
        a free core. The sandbox's delay is summed over its threads, so it is divided by the cores
        the window kept busy (at least one). None without a decode window or a measured delay."""
        w, wait = self.decode_window, self.contention.get("wait_s")
        if w is None or wait is None or self.window_tokens <= 0:
            return None
        cores = max(1.0, w.cpu_s / w.wall_s) if w.wall_s > 0 else 1.0
        gap = float(np.median(np.diff(np.asarray(self.stream_t))))
        return max(0.0, gap - wait / self.window_tokens / cores)

    def peak_rss_mb(self) -> float:
        return self.max_rss_kb / 1024

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "telemetry"}
        out["stream_tokens"] = list(self.stream_tokens)
        out["stream_t"] = list(self.stream_t)
        out["stream_cpu_s"] = list(self.stream_cpu_s)
        out["sandbox_escapes"] = list(self.sandbox_escapes)
        out["telemetry"] = {name: m.to_dict() for name, m in self.telemetry.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "evidence") -> LeaseEvidence:
        """The inverse of `as_dict` (an evidence.json file); a ValueError names the bad field,
        what it should be and what came."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object of LeaseEvidence, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{where}: expected LeaseEvidence fields only, got unknown {unknown}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "telemetry":
                continue
            if f.name not in data:
                if f.default is MISSING and f.default_factory is MISSING:
                    raise ValueError(f"{where}: expected field {f.name!r}, missing")
                continue
            hint, adapter = _adapters()[f.name]
            try:
                values[f.name] = adapter.validate_python(data[f.name])
            except ValidationError:
                got = repr(data[f.name])
                raise ValueError(
                    f"{where}: {f.name}: expected {hint}, got {got[:60] + ('…' if len(got) > 60 else '')}"
                ) from None
        telemetry = data.get("telemetry") or {}
        if not isinstance(telemetry, Mapping):
            kind = type(telemetry).__name__
            raise ValueError(f"{where}: telemetry: expected an object of traces, got {kind}")
        try:
            values["telemetry"] = {str(k): Measurement.from_dict(v) for k, v in telemetry.items()}
        except ValueError as exc:
            raise ValueError(f"{where}: telemetry: {exc}") from None
        return cls(**values)


@functools.cache
def _adapters() -> dict[str, tuple[str, TypeAdapter]]:
    """One pydantic validator per field, built once (field name -> (type as text, adapter))."""
    hints = typing.get_type_hints(LeaseEvidence)
    return {
        f.name: (str(hints[f.name]).replace("typing.", ""), TypeAdapter(hints[f.name]))
        for f in fields(LeaseEvidence)
        if f.name != "telemetry"
    }


def profile_conditions(runs: list[LeaseEvidence]) -> dict[str, list[float]]:
    """The contention each honest profile run saw, by field (wait_s as seconds per streamed token);
    a field is kept only when every run measured it."""
    out: dict[str, list[float]] = {}
    for name in ("others_cores", "cpu_pressure", "steal_cores", "wait_s"):
        values = [ev.contention.get(name) for ev in runs]
        if values and all(v is not None for v in values):
            if name == "wait_s":
                values = [v / max(1, ev.window_tokens) for v, ev in zip(values, runs, strict=True)]
            out[name] = [float(v) for v in values]  # type: ignore[arg-type]
    return out


RESIDENT_REGIME = "resident"  # evidence of a resident agent measured as a sandbox over a window


def resident_profile_key(engine: str = "") -> str:
    """The profile store key of this device's resident-agent profiles (`LeaseEvidence.profile_key`'s
    form): the SDK agent's, or (`engine`: protocol.engine.engine_of_command) an engine agent's."""
    from .host import this_device

    key = f"{this_device()}|{RESIDENT_REGIME}"
    return f"{key}|engine:{engine}" if engine else key
