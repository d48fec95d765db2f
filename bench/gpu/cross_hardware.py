"""GPU check for issue 2: honest provers on the GPU, verified by Maxwell's CPU reference.

- cross-hardware acceptance: gpt2-small and llama-small generate on the GPU (bf16 claims in
  bf16, fp32 claims in fp32 with TF32 off); the fp32 CPU verifier must affirm them;
- the same cheats as on CPU, run on the GPU (bf16 while claiming fp32, int8-rounded weights,
  cheap draft): they must still be contraindicated;
- audit_speedup_256 on the GPU: generating 256 tokens vs the L4 audit of them, both on the GPU
  (and, for orientation, the CPU audit of the same receipt).

Writes $OUT/gpu_core.json (or --out). Runs in ~3-5 minutes on one H100/H200; `--device cpu
--quick` is a smoke run for machines without a GPU (its numbers are not GPU results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from maxwell_poi.adversaries._agent import SwappedProver  # noqa: E402
from maxwell_poi.adversaries.cheap_draft import DraftProver  # noqa: E402
from maxwell_poi.adversaries.precision_downgrade import downgraded  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey, Keyring  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.prover.sdk import Prover  # noqa: E402
from maxwell_poi.registry.models import Registry  # noqa: E402
from maxwell_poi.verifier.policy import Verifier  # noqa: E402

PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def acceptance(reg, key, cpu_verifier, device, models, tokens) -> dict:
    out = {}
    for model in models:
        for precision in ("bf16", "fp32"):
            prover = Prover(key, reg, device=device)
            rows = []
            for i, prompt in enumerate(PROMPTS):
                job = GenerateJob(prompt=prompt, max_new_tokens=tokens, temperature=0.8 if i % 2 else 0.0)
                lease = Lease.issue("gpu", model, job, precision=precision)
                raw = prover.run(lease)
                result = cpu_verifier.appraise(lease, raw)
                audit = result.layer("L4-audit").details
                rows.append(
                    {
                        "verdict": result.verdict.value,
                        "reason": result.reason[:300],
                        "max_token_gap": audit.get("max_token_gap"),
                        "worst_close": min((c["close"] for c in audit.get("chunks", [])), default=None),
                        "worst_median_rel": max(
                            (c["median_rel"] for c in audit.get("chunks", [])), default=None
                        ),
                    }
                )
                log(f"{model} {precision} prompt {i}: {result.verdict.value} {result.reason[:120]}")
            out[f"{model}/{precision}"] = {
                "trials": len(rows),
                "affirmed": sum(r["verdict"] == "affirming" for r in rows),
                "runs": rows,
            }
    return out


def cheats_on_gpu(reg, key, cpu_verifier, device, model, small, tokens) -> dict:
    plans = {
        "precision-bf16 (claims fp32)": (
            SwappedProver(key, lambda lease, r: downgraded(r.load(lease.model_id), "bf16"), registry=reg),
            "fp32",
        ),
        "precision-int8 (claims fp32)": (
            SwappedProver(key, lambda lease, r: downgraded(r.load(lease.model_id), "int8"), registry=reg),
            "fp32",
        ),
        "precision-int8 (claims bf16)": (
            SwappedProver(key, lambda lease, r: downgraded(r.load(lease.model_id), "int8"), registry=reg),
            "bf16",
        ),
        "cheap-draft (claims bf16)": (DraftProver(key, small), "bf16"),
    }
    out = {}
    for name, (prover, precision) in plans.items():
        base = prover.model_for
        prover.model_for = lambda lease, base=base: _moved(base(lease), device)  # type: ignore[method-assign]
        caught = 0
        reasons = []
        for prompt in PROMPTS[:2]:
            lease = Lease.issue(
                "gpu", model, GenerateJob(prompt=prompt, max_new_tokens=tokens), precision=precision
            )
            result = cpu_verifier.appraise(lease, prover.run(lease))
            caught += result.verdict.value == "contraindicated"
            reasons.append(result.reason[:200])
        out[name] = {"trials": 2, "caught": caught, "reasons": reasons}
        log(f"cheat {name}: caught {caught}/2")
    return out


def _moved(model, device):
    if next(model.module.parameters()).device.type == torch.device(device).type:
        return model
    return model.copied_to(device)


def speedup(reg, key, ring, device, model, tokens, reps) -> dict:
    res = {}
    for precision in ("bf16", "fp32"):
        prover = Prover(key, reg, device=device)
        gpu_verifier = Verifier(reg, ring, device=device)
        gens, audits, cpu_audits, verdicts = [], [], [], []
        for rep in range(reps + 1):  # the first rep warms up kernels and is dropped
            lease = Lease.issue(
                "gpu",
                model,
                GenerateJob(prompt=PROMPTS[rep % 4], max_new_tokens=tokens, temperature=0.8),
                precision=precision,
            )
            sync(device)
            t0 = time.perf_counter()
            raw = prover.run(lease)
            sync(device)
            gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            result = gpu_verifier.appraise(lease, raw)
            sync(device)
            audit = time.perf_counter() - t0
            cpu_verifier = Verifier(reg, ring)  # a second appraisal of one lease is refused as replay
            t0 = time.perf_counter()
            cpu_result = cpu_verifier.appraise(lease, raw)
            cpu_audit = time.perf_counter() - t0
            verdicts.append(
                {
                    "audit_device": result.verdict.value,
                    "cpu": cpu_result.verdict.value,
                    "reason": result.reason[:200],
                }
            )
            log(
                f"{precision} rep {rep}: generate {gen:.3f}s audit(GPU) {audit:.4f}s "
                f"audit(CPU) {cpu_audit:.3f}s {result.verdict.value}"
            )
            if rep:
                gens.append(gen)
                audits.append(audit)
                cpu_audits.append(cpu_audit)
        res[precision] = {
            "generate_s": [round(x, 4) for x in gens],
            "new_tokens": tokens,
            "audit_device": device,
            "audit_s": [round(x, 5) for x in audits],
            "audit_cpu_s": [round(x, 4) for x in cpu_audits],
            "audit_speedup": round(statistics.median(gens) / statistics.median(audits), 2),
            "verdicts": verdicts,
            "gpu_generation_vs_cpu_audit": round(statistics.median(gens) / statistics.median(cpu_audits), 3),
        }
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "gpu_core.json"
    )
    args = ap.parse_args()
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 claims mean fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
    models = ["gpt2-small", "llama-small"]
    tokens = 16 if args.quick else 64
    reg = Registry()
    key = AgentKey.generate()
    ring = Keyring({"gpu": key.public_hex})
    cpu_verifier = Verifier(reg, ring)
    started = time.time()
    result: dict = {
        "what": "cross-hardware acceptance and GPU audit speed (issue 2, item 11)",
        "card": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "none (CPU smoke run)",
        "driver_torch": f"torch {torch.__version__}, CUDA {torch.version.cuda}",
        "host": platform.node(),
        "verifier": "float32 reference on the CPU, thresholds from src/maxwell_poi/data/thresholds.json",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a timeout keeps what was measured
        result["wall_s"] = round(time.time() - started, 1)
        args.out.write_text(json.dumps(result, indent=2))

    result["acceptance"] = acceptance(
        reg, key, cpu_verifier, args.device, models[:1] if args.quick else models, tokens
    )
    save()
    result["cheats_on_gpu"] = cheats_on_gpu(
        reg, key, cpu_verifier, args.device, "gpt2-small", "gpt2-mini", tokens
    )
    save()
    result["speedup"] = speedup(
        reg,
        key,
        ring,
        args.device,
        "gpt2-small",
        32 if args.quick else args.tokens,
        1 if args.quick else args.reps,
    )
    save()
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
