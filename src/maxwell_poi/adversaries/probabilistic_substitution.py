"""Cheat, economic: probabilistic substitution. For each lease, with probability p (`--p`, drawn
from a seeded RNG, `--seed`), run the cheap `--substitute` model and claim the leased one; otherwise
serve the lease honestly. Every receipt is signed by the enrolled key and streamed as it is
decoded, so L0 passes; the substituted leases cost less CPU (and so less billed energy), and what
decides whether the cheat pays is whether L1/L2 see the smaller model's work and pace (most of the
time for gpt2-micro under gpt2-mini, bench/results/operation.json `profit_classes`) and how often
the L4 lottery draws one of them (rarely at the default tier policy).

    python -m maxwell_poi.adversaries.probabilistic_substitution --key agent.pem --resident \
        --p 0.3 --substitute gpt2-micro --seed 0

The RNG draws once per lease the agent is handed, in order (a node's unbilled warm-up lease too),
so with the same seed the same positions are substituted. Each decision is also written to stderr
(`probabilistic-substitution: lease <id> substitute|honest`) — the agent's own claim, for a reader
of the sandbox's stderr tail; tests check the tokens instead.
"""

from __future__ import annotations

import random
import sys

from ..protocol.lease import Lease
from ..registry.models import LoadedModel, Registry
from ._agent import SwappedProver, parser, run


class CoinFlipSwap:
    """`swap(lease, registry)` for a SwappedProver: the substitute with probability p, else the
    leased model (at its precision, as the honest prover converts it)."""

    def __init__(self, p: float, substitute: str, seed: int, label: str = "probabilistic-substitution"):
        if not 0.0 <= p <= 1.0:
            raise SystemExit(f"--p: expected a probability in [0, 1], got {p}")
        self.p, self.substitute, self.label = p, substitute, label
        self.rng = random.Random(seed)
        self.honest: SwappedProver | None = None  # set by make(): its own model_for is the honest one

    def decide(self, lease: Lease) -> bool:
        return self.rng.random() < self.p

    def __call__(self, lease: Lease, registry: Registry) -> LoadedModel:
        cheat = self.decide(lease)
        print(f"{self.label}: lease {lease.lease_id} {'substitute' if cheat else 'honest'}", file=sys.stderr)
        if cheat:
            return registry.load(self.substitute)
        assert self.honest is not None
        return super(SwappedProver, self.honest).model_for(lease)  # the honest Prover's choice


def make(key, swap: CoinFlipSwap) -> SwappedProver:
    prover = SwappedProver(key, swap)
    swap.honest = prover
    return prover


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--p", type=float, default=0.3, help="probability of substituting each lease")
    p.add_argument("--substitute", required=True, help="the cheap model id actually run when cheating")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-lease coin")
    args = p.parse_args()
    swap = CoinFlipSwap(args.p, args.substitute, args.seed)
    run(args, lambda key: make(key, swap).run)


if __name__ == "__main__":
    main()
