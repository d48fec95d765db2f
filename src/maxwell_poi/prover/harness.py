"""The agent side of the channel: read one lease on stdin, write one receipt on stdout.

Maxwell's runner (observer.channel) starts the agent as its own process and speaks this
protocol; every agent program in this repo, honest or not, goes through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from ..protocol.errors import PoiError
from ..protocol.lease import Lease
from .stream import streaming_to


def quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def serve_one(answer: Callable[[Lease], bytes], lease_bytes: bytes | None = None) -> int:
    """Read a lease, compute the answer (streaming tokens as they come), write the receipt to
    stdout as the last line. Exit status 0 or 2."""
    raw = sys.stdin.buffer.read() if lease_bytes is None else lease_bytes
    try:
        lease = Lease.from_json(raw)
        with streaming_to(sys.stdout.buffer):
            receipt = answer(lease)
    except PoiError as exc:
        print(f"agent: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(receipt)
    sys.stdout.buffer.flush()
    return 0
