"""Cheat: generate honestly, then change output tokens before returning (and re-sign)."""

from __future__ import annotations

import contextlib

from ..protocol.receipt import sign_receipt, token_output
from ..prover.sdk import Prover
from ..prover.stream import rewritten
from ._agent import parser, run


def tamper(tokens: list[int], positions: list[int], vocab: int) -> list[int]:
    out = list(tokens)
    for pos in positions:
        if pos < len(out):
            out[pos] = (out[pos] + 1 + vocab // 2) % vocab  # a different, valid token id
    return out


class TamperingProver(Prover):
    """Generates honestly, then changes the tokens at `positions` ('middle' = one, mid-output)."""

    def __init__(self, key, positions: str = "middle", stream_forged: bool = False, **kw) -> None:
        super().__init__(key, **kw)
        self.positions = positions
        self.stream_forged = stream_forged  # stream the changed tokens too, at the honest pace

    def run(self, lease):
        where = (
            [lease.job.max_new_tokens // 2]
            if self.positions == "middle"
            else [int(x) for x in self.positions.split(",")]
        )
        vocab = self.registry.reference(lease.model_id).vocab
        forge = rewritten(lambda pos, tok: tamper([tok], [0], vocab)[0] if pos in where else tok)
        with forge if self.stream_forged else contextlib.nullcontext():
            claims = self.claims(lease)
        tokens = claims.tokens()
        forged = claims.model_copy(update={"output": token_output(tamper(tokens, where, vocab), vocab)})
        return sign_receipt(forged, self.key)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--positions", default="middle", help="comma-separated positions or 'middle'")
    p.add_argument("--stream-forged", action="store_true", help="stream the changed tokens, not the computed")
    args = p.parse_args()

    run(args, lambda key: TamperingProver(key, args.positions, args.stream_forged).run)


if __name__ == "__main__":
    main()
