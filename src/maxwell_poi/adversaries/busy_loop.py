"""Cheat: look busy without inferring. A tight Python loop keeps a core at 100% between tokens
streamed at an honest pace; the tokens and commitments are invented."""

from __future__ import annotations

import time

from ..protocol.receipt import sign_receipt
from ..registry.models import Registry
from ._agent import parser, run
from ._fake import garbage_claims, honest_pace, stream_paced


def spin_until(deadline: float) -> None:
    x = 0
    while time.perf_counter() < deadline:
        x += 1


def main() -> None:
    args = parser(__doc__).parse_args()

    def answer_for(key):
        registry = Registry()

        def answer(lease):
            claims = garbage_claims(lease, registry)
            stream_paced(claims.tokens(), honest_pace(lease.model_id), spin_until)
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
