"""Cheat: do no inference at all. Stream random tokens at an honest-looking pace while sleeping,
then return them with invented commitments in a receipt that is well formed and validly signed.
Never loads the model (its reference values are public)."""

from __future__ import annotations

import time

from ..protocol.lease import GenerateJob
from ..protocol.receipt import sign_receipt
from ..registry.models import Registry
from ._agent import parser, run
from ._fake import garbage_claims, honest_pace, sleep_until, stream_paced


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sleep", type=float, default=1.0, help="seconds to idle before answering")
    args = p.parse_args()

    def answer_for(key):
        registry = Registry()

        def answer(lease):
            time.sleep(args.sleep)
            claims = garbage_claims(lease, registry)
            if isinstance(lease.job, GenerateJob):
                stream_paced(claims.tokens(), honest_pace(lease.model_id), sleep_until)
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
