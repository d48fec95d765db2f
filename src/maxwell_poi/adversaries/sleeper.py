"""Cheat: do no inference at all. Sleep, then return random tokens (or a random embedding) with
invented commitments in a receipt that is well formed and validly signed."""

from __future__ import annotations

import secrets
import time

import numpy as np

from ..protocol.encoding import b64, sha256_hex
from ..protocol.fingerprint import chunk_size_bytes
from ..protocol.lease import GenerateJob
from ..protocol.receipt import Fingerprints, ReceiptClaims, embedding_output, sign_receipt
from ..prover.sdk import token_output
from ..registry.models import Registry
from ._agent import parser, run


def garbage_claims(lease, registry: Registry) -> ReceiptClaims:
    ref = registry.load(lease.model_id).reference
    job = lease.job
    rng = np.random.default_rng(secrets.randbits(64))
    if isinstance(job, GenerateJob):
        output = token_output(rng.integers(0, ref.vocab, job.max_new_tokens).tolist(), ref.vocab)
        prompt_len = len(registry.load(lease.model_id).encode_prompt(job.prompt))
        from ..protocol.fingerprint import chunk_spans

        chunks = len(chunk_spans(prompt_len, job.max_new_tokens, job.chunk))
        chunk = job.chunk
    else:
        matrix = rng.standard_normal((len(job.texts), ref.hidden)).astype(np.float32)
        output = embedding_output(matrix / np.linalg.norm(matrix, axis=1, keepdims=True))
        chunks, chunk = len(job.texts), 1
    return ReceiptClaims(
        lease=lease.lease_id,
        nonce=lease.nonce,
        agent=lease.agent_id,
        model=lease.model_id,
        weights=ref.weights_digest,
        precision=lease.precision,
        input=sha256_hex(lease.input_bytes()),
        output=output,
        fp=Fingerprints(
            k=job.topk, chunk=chunk, data=b64(secrets.token_bytes(chunks * chunk_size_bytes(job.topk)))
        ),
        layers=secrets.token_hex(32),
    )


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sleep", type=float, default=1.0, help="seconds to idle before answering")
    args = p.parse_args()

    def answer_for(key):
        registry = Registry()

        def answer(lease):
            time.sleep(args.sleep)
            return sign_receipt(garbage_claims(lease, registry), key)

        return answer

    run(args, answer_for)


if __name__ == "__main__":
    main()
