"""Cheat: generate honestly, then change output tokens before returning (and re-sign)."""

from __future__ import annotations

from ..protocol.receipt import sign_receipt, token_output
from ..prover.sdk import Prover
from ._agent import parser, run


def tamper(tokens: list[int], positions: list[int], vocab: int) -> list[int]:
    out = list(tokens)
    for pos in positions:
        if pos < len(out):
            out[pos] = (out[pos] + 1 + vocab // 2) % vocab  # a different, valid token id
    return out


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--positions", default="middle", help="comma-separated positions or 'middle'")
    args = p.parse_args()

    def answer_for(key):
        prover = Prover(key)

        def answer(lease):
            claims = prover.claims(lease)
            tokens = claims.tokens()
            where = (
                [len(tokens) // 2]
                if args.positions == "middle"
                else [int(x) for x in args.positions.split(",")]
            )
            vocab = prover.registry.load(lease.model_id).reference.vocab
            forged = claims.model_copy(update={"output": token_output(tamper(tokens, where, vocab), vocab)})
            return sign_receipt(forged, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
