"""Cheat: a padded cache. The agent holds no model: it answers each lease from a store of earlier
honest answers to the same greedy job (`--store`, one claims file per job, filled by whoever ran
the model before), re-bound to the new lease id, nonce and agent and freshly signed. With greedy
decoding the old answer is the right one (L4 passes), so it paces its stream like real decoding
(`--pace-ms`, L2 passes), and pads: it burns `--pad-cores` cores while a lease is in flight and
holds `--hold-mb` of memory, so L1 sees an honest agent's CPU and memory (issue 24).

What it cannot do is compute: Maxwell's work probe (node.probe) asks for a fresh random sequence's
fingerprint under the leased weights. It answers with its best forgery, a real fingerprint chunk
of the same model taken from its store (the right size and distribution, the wrong sequence).

    python -m maxwell_poi.adversaries.padded_cache --key agent.pem --resident --store DIR \\
        --pace-ms 30 --pad-cores 2 --hold-mb 600

Torch-free (adversaries._light): a cache does not need the weights, and holding them would only
cost it memory it pads anyway.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

from ..protocol.errors import PoiError
from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.probe import ProbeAnswer, parse_probe_request, refuse_probe
from ..protocol.receipt import ReceiptClaims, sign_receipt
from ..prover.harness import one_at_a_time, serve_one, serve_resident
from ..prover.stream import current_sink
from ._light import main_light
from ._pad import Padding


class CacheMiss(PoiError):
    """No earlier answer to this job in the store: the cache has nothing to serve."""


def job_key(lease: Lease) -> str:
    """Which leases one stored answer serves: the same model, precision and greedy job."""
    job = lease.job
    if not isinstance(job, GenerateJob):
        raise CacheMiss("padded cache: only generation leases are cached")
    fields = [lease.model_id, lease.precision, job.prompt, job.max_new_tokens, job.temperature]
    fields += [job.top_k, job.chunk, job.fingerprint_k]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()


def store_answer(store: Path, lease: Lease, claims: ReceiptClaims) -> None:
    """Keep an honest answer for later leases of the same job (what a cache's owner does)."""
    store.mkdir(parents=True, exist_ok=True)
    (store / f"{job_key(lease)}.json").write_text(claims.model_dump_json())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--key", type=Path, required=True, help="this agent's private key (PEM)")
    p.add_argument("--store", type=Path, required=True, help="directory of earlier answers")
    p.add_argument("--resident", action="store_true", help="answer lease after lease until stdin closes")
    p.add_argument("--threads", type=int, default=None, help="ignored: the cache computes nothing")
    p.add_argument("--pace-ms", type=float, default=30.0, help="gap between streamed tokens")
    p.add_argument("--pad-cores", type=int, default=0, help="cores burnt while a lease is in flight")
    p.add_argument("--hold-mb", type=int, default=0, help="memory held (touched) the whole time")
    return p.parse_args(argv)


def cached_answer(key: AgentKey, store: Path, pace_s: float, padding: Padding):
    def answer(lease: Lease) -> bytes:
        path = store / f"{job_key(lease)}.json"
        if not path.exists():
            raise CacheMiss(f"padded cache: no earlier answer to this job in {store}")
        old = ReceiptClaims.model_validate_json(path.read_text())
        fresh = old.model_copy(
            update={"lease": lease.lease_id, "nonce": lease.nonce, "agent": lease.agent_id}
        )
        sink = current_sink()
        with padding.busy():
            for position, token in enumerate(old.tokens()):
                time.sleep(pace_s)
                if sink:
                    sink(position, token)
        return sign_receipt(fresh, key)

    return answer


def forged_probe(store: Path):
    """Answers a probe with a real chunk of the store's (same size when the k matches)."""

    def prober(raw: bytes) -> bytes:
        try:
            req = parse_probe_request(raw)
        except ValueError as exc:
            return refuse_probe(raw, str(exc))
        size = 2 + 2 * req.fingerprint_k  # protocol.fingerprint.chunk_size_bytes
        for path in sorted(store.glob("*.json")):
            data = ReceiptClaims.model_validate_json(path.read_text()).fingerprint_bytes()
            if len(data) >= size:
                return ProbeAnswer(req.lease_id, req.number, data[-size:]).line()
        return refuse_probe(raw, "padded cache: nothing in the store to forge a probe answer from")

    return prober


def serve(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    padding = Padding(args.pad_cores, args.hold_mb)  # forked before the harness starts its threads
    answer = cached_answer(AgentKey.load(args.key), args.store, args.pace_ms / 1000, padding)
    if not args.resident:
        return serve_one(answer)
    return serve_resident(one_at_a_time(answer), prober=forged_probe(args.store))


def main() -> None:
    main_light("padded_cache", parse_args, serve)


if __name__ == "__main__":
    main()
