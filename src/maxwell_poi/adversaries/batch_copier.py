"""Cheat: batching. A resident agent that gathers up to N waiting leases (`--max-batch`, default 2)
as an honest batching server would, but computes only the first N-1 of them, in one batched
forward pass, and answers the last with a copy of lease 0's answer: the same output tokens,
fingerprints and layer root, re-bound to the last lease's id, nonce and input, and signed. The
copied tokens are streamed right after lease 0's real ones, so the channel looks like a batch of
N decoding in step. With only one lease waiting it answers honestly.

The case it was built for: N leases with the same prompt and greedy decoding (temperature 0), where
the copy is exactly the right answer (the fingerprints are top-k of the same activations), L0, L2
and L4 all pass, and only the measured work could tell — which on a CPU, where a batch of 2 costs
little more than one row, L1 could not (0/150 caught through the control plane, issue 23). So
Maxwell's scheduler no longer puts two identical greedy jobs of an agent in one batch: the second is
answered by the first's lease as a cached bid, priced as a cached answer (no lease, hold or charge;
service.market). Every lease this program is handed in a batch now has its own prompt, its copy is
the wrong answer for its input, and L4 catches it whenever the lease is audited ("token choice").

    python -m maxwell_poi.adversaries.batch_copier --key agent.pem --resident --max-batch 2
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable

from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims, claims_for_lease, sign_receipt
from ..protocol.stream import TaggedToken, parse_resident_line
from ..prover.harness import quiet_libraries, serve_resident
from ..prover.sdk import Prover
from ..prover.stream import bound_to_lease, current_lease_sink, streaming_leases_to
from ._agent import parser, run


class _CopyingSink:
    """A byte sink for `streaming_leases_to` that forwards every token line to the real channel and
    emits a copy of each of lease 0's tokens, right after it, under the copied lease's id."""

    def __init__(self, out: Callable[[str, int, int], None] | None, source: str, copy: str) -> None:
        self.out, self.source, self.copy = out, source, copy

    def write(self, data: bytes) -> int:
        item = parse_resident_line(data)
        if not isinstance(item, TaggedToken):  # fingerprint chunks: this cheater streams none
            return len(data)
        if self.out:
            self.out(item.lease_id, item.position, item.token)
            if item.lease_id == self.source:
                self.out(self.copy, item.position, item.token)
        return len(data)

    def flush(self) -> None:
        pass


class BatchCopier:
    """Answers a gathered batch: the first N-1 leases honestly in one pass, the last by copy."""

    def __init__(self, key: AgentKey) -> None:
        self.key = key
        try:  # the batched prover if this tree has it, else the one-lease prover in turn
            from ..prover.batched import BatchedProver

            self._batched: BatchedProver | None = BatchedProver(key)
            self.prover = self._batched.prover
        except ImportError:
            self._batched = None
            self.prover = Prover(key)

    def claims_many(self, leases: list[Lease]) -> list[ReceiptClaims]:
        """Honest claims for `leases`, each lease's tokens streamed through current_lease_sink()."""
        if self._batched is not None:
            return self._batched.claims_many(leases)
        out = []
        for lease in leases:
            with bound_to_lease(lease.lease_id):
                out.append(self.prover.claims(lease))
        return out

    @staticmethod
    def copyable(source: Lease, target: Lease) -> bool:
        return (
            isinstance(source.job, GenerateJob)
            and isinstance(target.job, GenerateJob)
            and (source.model_id, source.precision) == (target.model_id, target.precision)
        )

    def answer_many(self, leases: list[Lease]) -> list[bytes]:
        if len(leases) < 2 or not self.copyable(leases[0], leases[-1]):
            return [sign_receipt(c, self.key) for c in self.claims_many(leases)]
        *computed, last = leases
        tee = _CopyingSink(current_lease_sink(), computed[0].lease_id, last.lease_id)
        with streaming_leases_to(tee, threading.Lock()):  # type: ignore[arg-type]
            claims = self.claims_many(computed)
        source = claims[0]
        copied = claims_for_lease(
            last, source.weights, source.output, source.fingerprint_bytes(), source.layers, source.runtime
        )
        # every receipt claims the batch of N the channel showed
        looks = [c.model_copy(update={"runtime": {**c.runtime, "batch": len(leases)}}) for c in claims]
        looks.append(copied.model_copy(update={"runtime": {**copied.runtime, "batch": len(leases)}}))
        return [sign_receipt(c, self.key) for c in looks]


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--max-batch", type=int, default=2, help="leases gathered per batch (the last is copied)")
    p.add_argument("--gather", type=float, default=0.05, help="seconds to wait for more leases")
    args = p.parse_args()
    if not args.resident:  # one lease per process: nothing to copy from, so it is honest
        run(args, lambda key: BatchCopier(key).prover.run)
        return
    quiet_libraries()
    key = AgentKey.load(args.key)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    copier = BatchCopier(key)
    prober = copier.prover.probe_line  # it holds the real weights: it answers probes honestly
    sys.exit(
        serve_resident(copier.answer_many, max_batch=args.max_batch, gather_s=args.gather, prober=prober)
    )


if __name__ == "__main__":
    main()
