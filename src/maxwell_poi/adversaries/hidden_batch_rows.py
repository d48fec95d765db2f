"""Cheat, economic: hidden batch rows. Answers every lease honestly — the right model, the right
tokens, streamed as decoded, signed — but runs `--rows` private rows of its own (other prompts)
in the same batched forward passes, and never streams them: private work on Maxwell's node,
inside the lease's measured window.

    python -m maxwell_poi.adversaries.hidden_batch_rows --key agent.pem --resident --rows 4

What Maxwell sees: the lease's tokens and fingerprints are the honest ones (L0, L2, L4 pass: the
batch changes floats only by kernel rounding, which L4's tolerance is for); the receipt claims a
batch of the leases it was handed (the private rows are hidden from the claim too). The sandbox's
CPU over the decode window is higher than honest per streamed token. L1 has a floor on work per
token (too little work is a cheat) and no ceiling, so nothing rejects the lease; the energy bill
(window CPU-seconds x watts per core, the lease's share by streamed tokens) charges the private
rows to the lease, up to the energy hold (3 x the bid's expected joules): past the hold, the
private work is on Maxwell. The private outputs are kept in memory (their count goes to stderr).
"""

from __future__ import annotations

import sys
import threading

from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.receipt import ReceiptClaims, sign_receipt
from ..protocol.stream import TaggedChunk, TaggedToken, parse_resident_line
from ..prover.batched import BatchedProver
from ..prover.harness import quiet_libraries, serve_resident
from ..prover.stream import chunk_sink_for, current_lease_sink, current_sink, streaming_leases_to
from ..registry.prompts import PROMPTS
from ._agent import parser, run

PRIVATE = [p[::-1].strip() or "x" for p in PROMPTS]  # its own prompts, unlike any lease's


class _Hiding:
    """A byte sink for `streaming_leases_to` inside the batched run: a private row's lines are
    dropped; the leases' tokens and fingerprint chunks go on to the sinks that were active before
    (resident: tagged lines on the channel; one-shot: the untagged token stream)."""

    def __init__(self, leases: list[Lease]) -> None:
        self.tagged, self.plain = current_lease_sink(), current_sink()
        self.chunks = {x.lease_id: chunk_sink_for(x.lease_id) for x in leases}

    def write(self, data: bytes) -> int:
        item = parse_resident_line(data)
        if item.lease_id not in self.chunks:  # a private row: never streamed
            return len(data)
        if isinstance(item, TaggedToken):
            if self.tagged is not None:
                self.tagged(item.lease_id, item.position, item.token)
            elif self.plain is not None:
                self.plain(item.position, item.token)
        elif isinstance(item, TaggedChunk) and (sink := self.chunks[item.lease_id]) is not None:
            sink(item.index, item.data)
        return len(data)

    def flush(self) -> None:
        pass


class HiddenRows:
    def __init__(self, key: AgentKey, rows: int) -> None:
        self.key, self.rows = key, rows
        self.batched = BatchedProver(key)
        self.private_tokens = 0
        self._next = 0

    def private_for(self, lease: Lease) -> list[Lease]:
        assert isinstance(lease.job, GenerateJob)
        out = []
        for _ in range(self.rows):
            prompt = PRIVATE[self._next % len(PRIVATE)]
            self._next += 1
            job = GenerateJob(prompt=prompt, max_new_tokens=lease.job.max_new_tokens)
            out.append(Lease.issue(lease.agent_id, lease.model_id, job, precision=lease.precision))
        return out

    def answer_many(self, leases: list[Lease]) -> list[bytes]:
        gen = [x for x in leases if isinstance(x.job, GenerateJob)]
        private = self.private_for(gen[0]) if gen and self.rows > 0 else []
        with streaming_leases_to(_Hiding(leases), threading.Lock()):  # type: ignore[arg-type]
            claims = self.batched.claims_many(leases + private)
        mine = claims[: len(leases)]
        self.private_tokens += sum(len(c.tokens()) for c in claims[len(leases) :])
        print(
            f"hidden-batch-rows: {len(private)} private rows, {self.private_tokens} private tokens so far",
            file=sys.stderr,
        )
        return [sign_receipt(self.looks_unbatched(c, len(leases)), self.key) for c in mine]

    @staticmethod
    def looks_unbatched(c: ReceiptClaims, batch: int) -> ReceiptClaims:
        """The claim names the batch the node handed over, not the rows run."""
        return c.model_copy(update={"runtime": {**c.runtime, "batch": batch}})


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--rows", type=int, default=4, help="private rows run beside each batch of leases")
    p.add_argument("--max-batch", type=int, default=1, help="leases gathered per batch")
    p.add_argument("--gather", type=float, default=0.05, help="seconds to wait for more leases")
    args = p.parse_args()
    if not args.resident:
        run(args, lambda key: lambda lease: HiddenRows(key, args.rows).answer_many([lease])[0])
        return
    quiet_libraries()
    key = AgentKey.load(args.key)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    agent = HiddenRows(key, args.rows)
    prober = agent.batched.probe_line  # it holds the real weights: it answers probes honestly
    sys.exit(serve_resident(agent.answer_many, max_batch=args.max_batch, gather_s=args.gather, prober=prober))


if __name__ == "__main__":
    main()
