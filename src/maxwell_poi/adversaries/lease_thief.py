"""Cheat: an enrolled agent that answers a lease addressed to another agent (to collect its
reward), signing with its own valid key."""

from __future__ import annotations

import sys

from ..prover.sdk import Prover
from ._agent import parser, run


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--me", default="mallory", help="this agent's own id")
    args = p.parse_args()

    def answer_for(key):
        prover = Prover(key)

        def answer(lease):
            if lease.agent_id != args.me:
                print(f"lease_thief: answering {lease.agent_id}'s lease as {args.me}", file=sys.stderr)
            return prover.run(lease)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
