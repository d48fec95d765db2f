"""The next step for native bf16 audits, measured: re-execute a bf16 answer the way the prover
decoded it (the prompt in one pass, then one token at a time on a KV cache) instead of in one
prefill over prompt + output.

bench/audit/native_bf16.py found that a native bf16 prefill leaves honest bf16 runs only 56-91 %
of their top-k values close (the prefill rounds differently from the prover's token-by-token
decode), so int8-rounded weights hide in that room (29 / 40 caught on poi-lm). Here each run's
fingerprint chunks are compared against both references in bf16 on this class: honest provers at
2 and 1 threads, in a batch of 4 and decoding speculatively (its verify passes feed blocks of
tokens, so a token-by-token replay does not reproduce them), and int8 weights computing in bf16.
Nothing here changes the audit; it measures whether a decode replay would separate them.

    python -m bench.audit.native_replay            # poi-lm, 20 bf16-claim leases per variant
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from bench.audit.reliability import machine  # noqa: E402
from bench.common.results import write_results  # noqa: E402
from bench.common.variants import PROMPTS, Variant, swapped  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import int8_rounded  # noqa: E402
from maxwell_poi.protocol.fingerprint import ChunkComparison, chunk_spans  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.protocol.receipt import ReceiptClaims  # noqa: E402
from maxwell_poi.prover.sdk import Prover, with_dtype  # noqa: E402
from maxwell_poi.prover.speculative import SpeculativeProver  # noqa: E402
from maxwell_poi.registry.fingerprint import compare_chunk  # noqa: E402
from maxwell_poi.registry.forward import KVCached  # noqa: E402
from maxwell_poi.registry.models import LoadedModel, Registry  # noqa: E402
from maxwell_poi.verifier.audit import measure_generation  # noqa: E402

WRITES = {"bf16_int8.json": ["native_replay"]}  # the keys this script writes (bench/common/results.py)
DRAFTS = {"poi-lm": "poi-lm-draft", "gpt2-small": "gpt2-mini"}


def replayed(model: LoadedModel, lease: Lease, claims: ReceiptClaims) -> list[ChunkComparison]:
    """The fingerprint chunks against a token-by-token decode of the answer (the last token is
    never fed: the prover chose it from the previous step's logits)."""
    job = lease.job
    assert isinstance(job, GenerateJob)
    prompt, tokens = model.encode_prompt(job.prompt), claims.tokens()
    kv = KVCached(model)
    hidden = [kv.feed_hidden(prompt)[0], *(kv.feed_hidden([t])[0] for t in tokens[:-1])]
    states = torch.cat(hidden)
    spans = chunk_spans(len(prompt), len(tokens), job.chunk)
    data = claims.fingerprint_bytes()
    size = len(data) // len(spans)
    return [
        compare_chunk(data[i * size : (i + 1) * size], states[s:e], job.fingerprint_k, (s, e))
        for i, (s, e) in enumerate(spans)
    ]


def spread(values: list[float]) -> list[float]:
    return [float(min(values)), float(np.median(values)), float(max(values))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="poi-lm")
    ap.add_argument("--runs", type=int, default=20, help="bf16-claim leases per variant")
    args = ap.parse_args()
    t0 = time.time()
    registry, key = Registry(), AgentKey.generate()
    ref16 = with_dtype(registry.load(args.model), torch.bfloat16)
    variants = {
        "honest-bf16-2threads": Variant("a", Prover(key, registry), threads=2, precision="bf16"),
        "honest-bf16-1thread": Variant("b", Prover(key, registry), threads=1, precision="bf16"),
        "honest-bf16-batch4": Variant("c", Prover(key, registry, batch=4), precision="bf16"),
        "honest-bf16-speculative": Variant(
            "d", SpeculativeProver(key, DRAFTS[args.model], registry=registry), precision="bf16"
        ),
        "int8-weights-bf16-compute": Variant(
            "e",
            swapped(key, registry, lambda m: with_dtype(int8_rounded(m), torch.bfloat16)),
            precision="bf16",
        ),
    }
    out = {}
    for name, v in variants.items():
        prefill, decode = [], []
        for i in range(args.runs):
            job = GenerateJob(
                prompt=f"{PROMPTS[i % len(PROMPTS)]} ({i})",  # numbered: a greedy repeat is no new trial
                max_new_tokens=32,
                temperature=0.8 if i % 2 else 0.0,
                chunk=16,
            )
            lease = Lease.issue("agent-1", args.model, job, precision="bf16")
            claims = v.claims(lease)
            m = measure_generation(lease, claims, ref16, 0.0)
            r = replayed(ref16, lease, claims)
            prefill.append((m.worst_close, m.worst_median_rel))
            decode.append((min(c.close_fraction for c in r), max(c.median_rel_error for c in r)))
        out[name] = {
            "runs": args.runs,
            "prefill_worst_close": spread([p[0] for p in prefill]),
            "prefill_worst_median_rel": spread([p[1] for p in prefill]),
            "decode_replay_worst_close": spread([d[0] for d in decode]),
            "decode_replay_worst_median_rel": spread([d[1] for d in decode]),
        }
        print(f"[{time.time() - t0:6.1f} s] {name}: {out[name]}", flush=True)
    result = {
        "what": "fingerprint closeness of bf16-claim answers against a bf16 prefill and a bf16 "
        "token-by-token decode replay, on this class ([min, median, max] over runs of each run's "
        "worst chunk)",
        "model": args.model,
        "variants": out,
        "machine": machine(),
        "seconds": round(time.time() - t0, 1),
    }
    write_results("bf16_int8.json", {"native_replay": result}, writes=WRITES)


if __name__ == "__main__":
    main()
