"""Cheat: mine instead of inferring. A SHA-256 proof-of-work loop (searching for a hash with
leading zero bits) runs on every core between tokens streamed at an honest pace; the answer is
invented."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from ._agent import parser, run
from ._fake import paced_garbage_agent

FOUND: list[bytes] = []


def mine_until(deadline: float, header: bytes = b"block") -> None:
    nonce = 0
    while time.perf_counter() < deadline:
        for _ in range(2000):  # hashlib releases the GIL only for large inputs: batch the checks
            digest = hashlib.sha256(header + nonce.to_bytes(8, "little")).digest()
            if digest[0] == 0 and digest[1] == 0:
                FOUND.append(digest)
            nonce += 1


def mine_on_every_core(deadline: float) -> None:
    """The main thread mines one pace; helper threads keep the other cores mining meanwhile."""
    helpers = [
        threading.Thread(target=mine_until, args=(deadline, b"w%d" % i), daemon=True)
        for i in range((os.cpu_count() or 2) - 1)
    ]
    for h in helpers:
        h.start()
    mine_until(deadline)


def main() -> None:
    run(
        parser(__doc__).parse_args(), paced_garbage_agent(mine_on_every_core), prober=None
    )  # no weights: it cannot answer a work probe


if __name__ == "__main__":
    main()
