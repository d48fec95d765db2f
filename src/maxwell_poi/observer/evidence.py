"""What Maxwell itself observed of one lease. Evidence, not claims: the agent cannot edit it."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from .telemetry import Measurement


@dataclass(frozen=True)
class ChannelEvidence:
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
    stream_errors: int = 0  # stream lines out of order or malformed
    telemetry: dict[str, Measurement] = field(default_factory=dict)  # Observer sources, by name
    device_class: str = ""  # the kind of device Maxwell ran the agent on (selects the profile)

    @property
    def streamed(self) -> bool:
        return bool(self.stream_tokens)

    @property
    def decode_window(self) -> tuple[float, float, int] | None:
        """(seconds, agent CPU seconds, tokens) between the first and last streamed token."""
        if len(self.stream_t) < 2:
            return None
        cpu = self.stream_cpu_s[-1] - self.stream_cpu_s[0]
        return self.stream_t[-1] - self.stream_t[0], cpu, len(self.stream_t) - 1

    def peak_rss_mb(self) -> float:
        return self.max_rss_kb / 1024

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "telemetry"}
        out["stream_tokens"] = list(self.stream_tokens)
        out["stream_t"] = list(self.stream_t)
        out["stream_cpu_s"] = list(self.stream_cpu_s)
        out["telemetry"] = {name: m.to_dict() for name, m in self.telemetry.items()}
        return out
