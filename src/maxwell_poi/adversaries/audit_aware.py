"""Cheat, economic: audit-aware substitution. Runs the cheap `--substitute` model (claiming the
leased one) only when everything it can observe suggests no audit is coming; otherwise honest.

What an agent can observe — all of it, in this protocol (docs/receipt.md, protocol/lease.py):

1. The lease line on stdin: `version`, `lease_id` (uuid4, random), `agent_id`, `model_id`,
   `precision`, `nonce` (32 bytes from Maxwell's CSPRNG), `seed` (= H(nonce)), `issued_at`,
   `deadline`, and the job (`prompt`, `max_new_tokens`, `temperature`, `top_k`, `chunk`,
   `fingerprint_k`). The lease carries **no tier, no price, no stake, no audit probability, no
   node id** (`Lease` forbids extra fields). The job's shape is the agent's own bid (or, for a
   gateway lease, the requester's request: the gateway sets `chunk` 16, bids default to 32).
2. Other lines on stdin: an L3 challenge `{"open": <lease>, "keys": ...}`, sent only for
   exact-tier leases and only after their receipt is in; a gateway cut ends a lease early.
3. Timing: when each lease arrives, the gap since the previous lease was answered, how many
   leases arrive together, how long after `issued_at` it arrives, `deadline - issued_at` (the
   control plane's lease lifetime, 600 s by default — the same as the node's own unbilled warm-up
   lease, so it does not tell the two apart), and how many leases it has answered since it started
   (the first one a node hands a freshly started agent is that warm-up lease, node/remote.py).
4. Outside the channel, the agent's owner can read its own leases' tier and audit probability
   from the control plane (`poi client leases`) — after they are issued, and both follow from
   its own bid (value = price x expected joules picks the tier; p from economics/deterrence.py).

What decides whether a lease is audited: `verifier/lottery.draw_audit`, one draw from the OS
CSPRNG made by intake **after the receipt is in** (for a gateway lease, at issue, kept on the
control plane). No field of the lease, no line on stdin and no timing the agent sees depends on
that draw, so nothing observable predicts *which* lease is audited; the observables only bear on
the audit *probability* (tier) or on extra checks (L3 on the exact tier, the gateway's live
audit and its cut-off). This program keys its decision on each of them anyway:

- never cheats again once an L3 `open` request has been seen (exact tier: traces are opened);
- never cheats on a gateway-shaped lease (`chunk` == `--gateway-chunk`, 16): streamed through
  the live audit, and a cut also deletes the agent's standing offer;
- never cheats on a lease larger than `--max-tokens` new tokens (value grows with the lease's
  energy, and with it the tier: high audits every lease);
- never cheats on the first lease after it started (the node's warm-up: never billed, nothing
  to save);
- cheats only when the gap since its previous answer is at least `--min-gap` seconds (default 0,
  no filter: no timing signal was found to carry information about the draw) and the lease arrived
  within `--max-lag` seconds of being issued (default: no filter);
- and then at the fixed rate `--rate` (a seeded coin, `--seed`).

When every lease looks alike (the bench: bid leases of one shape at one tier) the rule reduces to
the coin, and its catch rate should equal probabilistic substitution's at the same rate: the
measurement that the observable signals carry no information about the audit. Each decision and
the signals behind it go to stderr (the agent's own account, not evidence).

    python -m maxwell_poi.adversaries.audit_aware --key agent.pem --resident --substitute gpt2-micro
"""

from __future__ import annotations

import sys
import time

from ..protocol.lease import GenerateJob, Lease
from ..protocol.stream import refusal_line
from ..registry.models import LoadedModel, Registry
from ._agent import parser, run
from .probabilistic_substitution import CoinFlipSwap, make


class AuditAware(CoinFlipSwap):
    def __init__(self, args) -> None:
        super().__init__(args.rate, args.substitute, args.seed, label="audit-aware")
        self.args = args
        self.l3_seen = False
        self.last_answered: float | None = None
        self.answered = 0

    def opener(self, raw: bytes) -> bytes:
        """An L3 challenge: remember that this agent's leases are on the exact tier; keeps no trace."""
        self.l3_seen = True
        lease_id = raw.split(b'"open":"', 1)[-1][:32].decode("ascii", "replace")
        return refusal_line(lease_id if len(lease_id) == 32 else "", "this agent keeps no trace")

    def signals(self, lease: Lease) -> dict[str, object]:
        now = time.time()
        job = lease.job
        return {
            "l3_seen": self.l3_seen,
            "chunk": job.chunk if isinstance(job, GenerateJob) else None,
            "max_new_tokens": job.max_new_tokens if isinstance(job, GenerateJob) else None,
            "ttl_s": round(lease.deadline - lease.issued_at, 1),
            "answered": self.answered,
            "lag_s": round(now - lease.issued_at, 3),
            "gap_s": None if self.last_answered is None else round(now - self.last_answered, 3),
        }

    def risky(self, s: dict[str, object]) -> str:
        a = self.args
        if s["l3_seen"]:
            return "L3 challenges seen"
        if s["chunk"] is None:
            return "not a generation"
        if s["chunk"] == a.gateway_chunk:
            return "gateway-shaped"
        if s["max_new_tokens"] > a.max_tokens:  # type: ignore[operator]
            return "large lease"
        if s["answered"] == 0:
            return "first lease (the node's warm-up)"
        if s["gap_s"] is not None and s["gap_s"] < a.min_gap:  # type: ignore[operator]
            return "gap too short"
        if a.max_lag is not None and s["lag_s"] > a.max_lag:  # type: ignore[operator]
            return "arrived late"
        return ""

    def decide(self, lease: Lease) -> bool:
        s = self.signals(lease)
        why = self.risky(s)
        cheat = not why and self.rng.random() < self.p
        print(
            f"audit-aware: signals {s} -> {'cheat' if cheat else why or 'coin says honest'}", file=sys.stderr
        )
        return cheat

    def __call__(self, lease: Lease, registry: Registry) -> LoadedModel:
        try:
            return super().__call__(lease, registry)
        finally:
            self.last_answered = time.time()  # the model is chosen; the answer follows at once
            self.answered += 1


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--substitute", required=True, help="the cheap model id actually run when cheating")
    p.add_argument("--rate", type=float, default=0.3, help="cheat rate on leases that look unaudited")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64, help="cheat only on leases this small or smaller")
    p.add_argument("--gateway-chunk", type=int, default=16, help="the gateway's fingerprint chunk")
    p.add_argument("--min-gap", type=float, default=0.0, help="seconds since the previous answer")
    p.add_argument("--max-lag", type=float, default=None, help="seconds between issue and arrival")
    args = p.parse_args()
    aware = AuditAware(args)
    run(args, lambda key: make(key, aware).run, aware.opener)


if __name__ == "__main__":
    main()
