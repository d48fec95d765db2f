"""Cheat: keep receipts and return an old one verbatim instead of computing.

Its first lease (priming) is answered honestly and stored; every later lease gets that receipt.
"""

from __future__ import annotations

from pathlib import Path

from ..prover.sdk import Prover
from ._agent import parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--store", type=Path, required=True, help="directory for kept receipts")
    args = p.parse_args()
    kept = args.store / "receipt.json"

    def answer_for(key):
        def answer(lease):
            if kept.exists():
                return kept.read_bytes()
            receipt = Prover(key).run(lease)
            args.store.mkdir(parents=True, exist_ok=True)
            kept.write_bytes(receipt)
            return receipt

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
