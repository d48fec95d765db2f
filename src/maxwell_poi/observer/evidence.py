"""What Maxwell itself observed of one lease. Evidence, not claims: the agent cannot edit it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class ChannelEvidence:
    """Measured by the runner around the agent's process and its stdin/stdout channel."""

    started_at: float  # Maxwell's clock, unix seconds
    finished_at: float
    wall_s: float
    cpu_s: float  # user + system CPU time of the agent process (rusage of the child)
    max_rss_kb: int
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

    @property
    def streamed(self) -> bool:
        return bool(self.stream_tokens)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
