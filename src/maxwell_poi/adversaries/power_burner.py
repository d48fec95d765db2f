"""Cheat: burn the energy an honest run would, but answer from a cheap model. Matrix products
spin on every core between tokens that a small model produced and that are streamed at the
leased model's pace; the receipt claims the leased model."""

from __future__ import annotations

import time

import torch

from ..protocol.receipt import sign_receipt
from ..prover.stream import silenced
from ._agent import SwappedProver, parser, run
from ._fake import honest_pace, stream_paced


def burn_until(deadline: float, n: int = 256) -> None:
    a = torch.randn(n, n)
    while time.perf_counter() < deadline:
        a = torch.tanh(a @ a / n)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--substitute", required=True, help="cheap model that makes the answer")
    args = p.parse_args()

    def answer_for(key):
        cheap = SwappedProver(key, lambda _lease, reg: reg.load(args.substitute))

        def answer(lease):
            with silenced():  # the cheap model is fast: hide its pace, stream at the leased one's
                claims = cheap.claims(lease)
            stream_paced(claims.tokens(), honest_pace(lease.model_id), burn_until)
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
