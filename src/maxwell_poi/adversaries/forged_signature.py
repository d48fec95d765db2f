"""Cheat: answer in the leased agent's name without its key, signing with a fresh key instead."""

from __future__ import annotations

from ..protocol.keys import AgentKey
from ..prover.sdk import Prover
from ._agent import parser, run


def main() -> None:
    args = parser(__doc__).parse_args()
    run(args, lambda _own_key: Prover(AgentKey.generate()).run)


if __name__ == "__main__":
    main()
