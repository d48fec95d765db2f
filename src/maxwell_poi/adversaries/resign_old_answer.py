"""Cheat: reuse an earlier answer (tokens and fingerprints) for the same prompt, re-bound to the
new lease id, nonce and agent, and freshly signed. Only a nonce-seeded sampler exposes it: with
greedy decoding the old answer is also the right one, and only L1 (energy) can tell."""

from __future__ import annotations

from pathlib import Path

from ..protocol.receipt import ReceiptClaims, sign_receipt
from ..prover.sdk import Prover
from ._agent import parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--store", type=Path, required=True, help="directory for kept answers")
    args = p.parse_args()
    kept = args.store / "claims.json"

    def answer_for(key):
        def answer(lease):
            if kept.exists():
                old = ReceiptClaims.model_validate_json(kept.read_text())
                fresh = old.model_copy(
                    update={"lease": lease.lease_id, "nonce": lease.nonce, "agent": lease.agent_id}
                )
                return sign_receipt(fresh, key)
            claims = Prover(key).claims(lease)
            args.store.mkdir(parents=True, exist_ok=True)
            kept.write_text(claims.model_dump_json())
            return sign_receipt(claims, key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
