"""Cheat: produce tokens cheaply with a small model and invent the fingerprints and layer root
(random bytes of the right length), never running the leased model."""

from __future__ import annotations

import secrets

from ..protocol.encoding import b64
from ..protocol.receipt import sign_receipt
from ._agent import SwappedProver, parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--substitute", required=True, help="cheap model that makes the tokens")
    args = p.parse_args()

    def answer_for(key):
        prover = SwappedProver(key, lambda _lease, reg: reg.load(args.substitute))

        def answer(lease):
            claims = prover.claims(lease)
            size = len(claims.fingerprint_bytes())
            invented = claims.fp.model_copy(update={"data": b64(secrets.token_bytes(size))})
            return sign_receipt(
                claims.model_copy(update={"fp": invented, "layers": secrets.token_hex(32)}), key
            )

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
