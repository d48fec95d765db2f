"""Cheat: mine instead of inferring. A SHA-256 proof-of-work loop (searching for a hash with
leading zero bits) runs on every core between tokens streamed at an honest pace; the answer is
invented."""

from __future__ import annotations

import hashlib
import os
import threading
import time

from ..protocol.receipt import sign_receipt
from ..registry.models import Registry
from ._agent import parser, run
from ._fake import garbage_claims, honest_pace, stream_paced

FOUND: list[bytes] = []


def mine_until(deadline: float, header: bytes = b"block") -> None:
    nonce = 0
    while time.perf_counter() < deadline:
        for _ in range(2000):  # hashlib releases the GIL only for large inputs: batch the checks
            digest = hashlib.sha256(header + nonce.to_bytes(8, "little")).digest()
            if digest[0] == 0 and digest[1] == 0:
                FOUND.append(digest)
            nonce += 1


def main() -> None:
    args = parser(__doc__).parse_args()

    def answer_for(key):
        registry = Registry()

        def answer(lease):
            claims = garbage_claims(lease, registry)
            pace = honest_pace(lease.model_id)
            end = time.perf_counter() + pace * (len(claims.tokens()) + 1)
            helpers = [
                threading.Thread(target=mine_until, args=(end, b"w%d" % i), daemon=True)
                for i in range((os.cpu_count() or 2) - 1)
            ]
            for h in helpers:
                h.start()
            stream_paced(claims.tokens(), pace, mine_until)
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
