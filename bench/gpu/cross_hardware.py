"""GPU check for issue 2: honest provers on the GPU, verified by Maxwell's CPU reference.

Three sections, in this order by default (the main GPU figure first):

- speedup: audit_speedup_256 on the GPU (generating 256 tokens vs the L4 audit of them, both on the
  GPU), and, for orientation, the CPU audit of the same receipt;
- acceptance: gpt2-small and llama-small generate on the GPU (bf16 claims in bf16, fp32 claims in
  strict fp32: TF32 off, attention on the math SDPA backend); the fp32 CPU verifier must affirm;
- cheats_on_gpu: the same cheats as on CPU, run on the GPU (bf16 while claiming fp32, int8-rounded
  weights, cheap draft decoding on the GPU too): they must still be contraindicated.

Nothing measured is lost to an exception or a kill: every section and every trial runs wrapped (a
failure is recorded in `errors` with its section, trial and traceback, and the run goes on), the
result is written atomically (temp file + rename) after every trial, and with --budget-s the trials
that no longer fit are listed in `skipped` instead of being started. SIGTERM (from `timeout`)
records `terminated` and saves before exiting.

Writes $OUT/gpu_core.json (or --out). About 2-4 minutes on one H100/H200; `--device cpu --quick` is
a smoke run for machines without a GPU (its numbers are not GPU results).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_env  # bench/gpu/gpu_env.py: environment block, atomic JSON write, Run
import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from torch.nn.attention import SDPBackend, sdpa_kernel

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.cheap_draft import DraftProver
from maxwell_poi.adversaries.precision_downgrade import downgraded
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.models import LoadedModel, Registry
from maxwell_poi.verifier.policy import Verifier

Run, Terminated = gpu_env.Run, gpu_env.Terminated  # the result saved after every trial; SIGTERM

FORMAT = "maxwell-poi-gpu-core/v2"
SECTIONS = ("speedup", "acceptance", "cheats_on_gpu")  # default order: the main GPU figure first
PROMPTS = [
    "The history of the steam engine begins with",
    "In a quiet village by the sea, the old lighthouse keeper",
    "Proof of inference lets a hypervisor check that an agent",
    "Once upon a time, in a kingdom far away, there lived",
]
STRICT_FP32 = (
    "fp32 claims run with TF32 off (cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False, "
    "float32_matmul_precision 'highest') and attention on the math SDPA backend "
    "(sdpa_kernel(SDPBackend.MATH)) around the fp32 prover's generation and the fp32 GPU audit; "
    "bf16 claims run with the default SDPA backends"
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def strict_fp32(precision: str) -> Iterator[None]:
    """Attention on the math backend for an fp32 claim (flash / memory-efficient kernels may use
    reduced-precision paths); nothing changes for bf16."""
    if precision != "fp32":
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


@dataclasses.dataclass
class Context:
    reg: Registry
    key: AgentKey
    ring: Keyring
    device: str
    models: list[str]  # acceptance models; the first one is also the cheats' and speedup's
    draft: str
    tokens: int
    speedup_tokens: int
    reps: int
    cpu_verifier: Verifier


# ---------------------------------------------------------------------------------------------
# sections: each writes its cells into run.result[<section>] and saves after every trial


def acceptance(run: Run, ctx: Context) -> None:
    out = run.result.setdefault("acceptance", {})
    for model in ctx.models:
        for precision in ("bf16", "fp32"):
            prover = Prover(ctx.key, ctx.reg, device=ctx.device)
            cell = out[f"{model}/{precision}"] = {
                "planned": len(PROMPTS),
                "trials": 0,
                "affirmed": 0,
                "runs": [],
            }
            for i, prompt in enumerate(PROMPTS):
                row = run.trial(
                    "acceptance",
                    f"{model}/{precision} prompt {i}",
                    lambda prover=prover, model=model, precision=precision, i=i, prompt=prompt: accept_one(
                        ctx, prover, model, precision, i, prompt
                    ),
                )
                if row is None:
                    continue
                cell["runs"].append(row)
                cell["trials"] += 1
                cell["affirmed"] += row["verdict"] == "affirming"
                log(f"{model} {precision} prompt {i}: {row['verdict']} {row['reason'][:120]}")
                run.save()


def accept_one(ctx: Context, prover: Prover, model: str, precision: str, i: int, prompt: str) -> dict:
    job = GenerateJob(prompt=prompt, max_new_tokens=ctx.tokens, temperature=0.8 if i % 2 else 0.0)
    lease = Lease.issue("gpu", model, job, precision=precision)
    with strict_fp32(precision):
        raw = prover.run(lease)
    result = ctx.cpu_verifier.appraise(lease, raw)
    audit = result.layer("L4-audit").details
    chunks = audit.get("chunks", [])
    return {
        "verdict": result.verdict.value,
        "reason": result.reason[:300],
        "max_token_gap": audit.get("max_token_gap"),
        "worst_close": min((c["close"] for c in chunks), default=None),
        "worst_median_rel": max((c["median_rel"] for c in chunks), default=None),
    }


def _moved(model: LoadedModel, device: str) -> LoadedModel:
    if next(model.module.parameters()).device.type == torch.device(device).type:
        return model
    return model.copied_to(device)


def cheat_provers(ctx: Context) -> dict[str, tuple[Callable[[], Prover], str]]:
    """name -> (builds the cheating prover, the precision it claims); every model on ctx.device."""
    dev, reg, key = ctx.device, ctx.reg, ctx.key

    def swapped(dtype: str) -> Callable[[], Prover]:
        return lambda: SwappedProver(
            key, lambda lease, r: _moved(downgraded(r.load(lease.model_id), dtype), dev), registry=reg
        )

    return {
        "precision-bf16 (claims fp32)": (swapped("bf16"), "fp32"),
        "precision-int8 (claims fp32)": (swapped("int8"), "fp32"),
        "precision-int8 (claims bf16)": (swapped("int8"), "bf16"),
        # the draft decodes on the prover's device (DraftProver moves it there), not on the CPU
        f"cheap-draft {ctx.draft} (claims bf16)": (
            lambda: DraftProver(key, ctx.draft, registry=reg, device=dev),
            "bf16",
        ),
    }


def cheats_on_gpu(run: Run, ctx: Context) -> None:
    out = run.result.setdefault("cheats_on_gpu", {})
    model = ctx.models[0]
    for name, (make, precision) in cheat_provers(ctx).items():
        cell = out[name] = {"model": model, "planned": 2, "trials": 0, "caught": 0, "reasons": []}
        made: list[Prover] = []

        def one(prompt: str, make=make, precision=precision, made=made) -> Any:
            if not made:
                made.append(make())
            lease = Lease.issue(
                "gpu", model, GenerateJob(prompt=prompt, max_new_tokens=ctx.tokens), precision=precision
            )
            with strict_fp32(precision):
                raw = made[0].run(lease)
            return ctx.cpu_verifier.appraise(lease, raw)

        for i, prompt in enumerate(PROMPTS[:2]):
            result = run.trial(
                "cheats_on_gpu", f"{name} prompt {i}", lambda one=one, prompt=prompt: one(prompt)
            )
            if result is None:
                continue
            cell["trials"] += 1
            cell["caught"] += result.verdict.value == "contraindicated"
            cell["reasons"].append(result.reason[:200])
            run.save()
        log(f"cheat {name}: caught {cell['caught']}/{cell['trials']}")


def speedup(run: Run, ctx: Context) -> None:
    out = run.result.setdefault("speedup", {})
    model, tokens, dev = ctx.models[0], ctx.speedup_tokens, ctx.device
    for precision in ("bf16", "fp32"):
        prover = Prover(ctx.key, ctx.reg, device=dev)
        gpu_verifier = Verifier.offline(ctx.reg, ctx.ring, device=dev)  # receipts alone: L0 and L4
        cell = out[precision] = {
            "model": model,
            "new_tokens": tokens,
            "audit_device": dev,
            "reps_planned": ctx.reps,
            "note": "the first repetition warms up kernels and is dropped; medians over the others",
            "generate_s": [],
            "audit_s": [],
            "audit_cpu_s": [],
            "verdicts": [],
        }

        def rep_once(rep: int, prover=prover, gpu_verifier=gpu_verifier, precision=precision) -> dict:
            lease = Lease.issue(
                "gpu",
                model,
                GenerateJob(prompt=PROMPTS[rep % 4], max_new_tokens=tokens, temperature=0.8),
                precision=precision,
            )
            sync(dev)
            t0 = time.perf_counter()
            with strict_fp32(precision):
                raw = prover.run(lease)
            sync(dev)
            gen = time.perf_counter() - t0
            t0 = time.perf_counter()
            with strict_fp32("fp32"):  # the audit is Maxwell's fp32 reference, on the GPU here
                result = gpu_verifier.appraise(lease, raw)
            sync(dev)
            audit = time.perf_counter() - t0
            cpu_verifier = Verifier.default(ctx.reg, ctx.ring)  # a second appraisal would be a replay
            t0 = time.perf_counter()
            cpu_result = cpu_verifier.appraise(lease, raw)
            cpu_audit = time.perf_counter() - t0
            log(
                f"{precision} rep {rep}: generate {gen:.3f}s audit({dev}) {audit:.4f}s "
                f"audit(CPU) {cpu_audit:.3f}s {result.verdict.value}"
            )
            return {
                "gen": gen,
                "audit": audit,
                "cpu_audit": cpu_audit,
                "verdict": {
                    "audit_device": result.verdict.value,
                    "cpu": cpu_result.verdict.value,
                    "reason": result.reason[:200],
                },
            }

        for rep in range(ctx.reps + 1):
            r = run.trial("speedup", f"{precision} rep {rep}", lambda rep=rep, f=rep_once: f(rep))
            if r is None:
                continue
            cell["verdicts"].append({"rep": rep, **r["verdict"]})
            if rep == 0:
                cell["warmup"] = {k: round(r[k], 4) for k in ("gen", "audit", "cpu_audit")}
            else:
                cell["generate_s"].append(round(r["gen"], 4))
                cell["audit_s"].append(round(r["audit"], 5))
                cell["audit_cpu_s"].append(round(r["cpu_audit"], 4))
                gens, audits, cpus = cell["generate_s"], cell["audit_s"], cell["audit_cpu_s"]
                cell["audit_speedup"] = round(statistics.median(gens) / statistics.median(audits), 2)
                cell["gpu_generation_vs_cpu_audit"] = round(
                    statistics.median(gens) / statistics.median(cpus), 3
                )
            run.save()


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tokens", type=int, help="new tokens per speedup generation (256; --quick 32)")
    ap.add_argument(
        "--accept-tokens", type=int, help="new tokens per acceptance/cheat trial (64; --quick 16)"
    )
    ap.add_argument("--reps", type=int, help="speedup repetitions after the warm-up (3; --quick 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: one model, 16/32 tokens, 1 rep")
    ap.add_argument("--models", help="comma list (default gpt2-small,llama-small; --quick gpt2-small)")
    ap.add_argument("--draft", default="gpt2-mini", help="the cheap-draft cheat's draft model")
    ap.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"comma list, run in this order (default {','.join(SECTIONS)})",
    )
    ap.add_argument("--budget-s", type=float, help="no trial is started after this many seconds")
    ap.add_argument("--commit", help="the project commit (default $POI_COMMIT, else git rev-parse HEAD)")
    ap.add_argument(
        "--out", type=Path, default=Path(os.environ.get("OUT", "bench/results")) / "gpu_core.json"
    )
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        ap.error(f"--sections: unknown {unknown}; known: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpu = args.device.startswith("cuda")
    # fp32 claims mean fp32, not TF32 (also set on a CPU, where it changes nothing)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    commit = gpu_env.commit_of(args.commit)
    models = (args.models or ("gpt2-small" if args.quick else "gpt2-small,llama-small")).split(",")
    tokens = args.accept_tokens or (16 if args.quick else 64)
    speedup_tokens = args.tokens or (32 if args.quick else 256)
    reps = args.reps if args.reps is not None else (1 if args.quick else 3)
    result: dict[str, Any] = {
        "format": FORMAT,
        "what": "cross-hardware acceptance and GPU audit speed (issue 2, item 11)",
        "kind": "gpu" if gpu else "cpu-smoke",
        "card": torch.cuda.get_device_name(0)
        if gpu and torch.cuda.is_available()
        else "none (CPU smoke run)",
        "commit": commit,
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "verifier": "float32 reference on the CPU, thresholds from src/maxwell_poi/data/thresholds.json",
        "precision": {"policy": STRICT_FP32, "settings": gpu_env.precision_settings()},
        "config": {
            "device": args.device,
            "quick": args.quick,
            "models": models,
            "draft": args.draft,
            "tokens": tokens,
            "speedup_tokens": speedup_tokens,
            "reps": reps,
            "sections": args.sections,
            "budget_s": args.budget_s,
        },
        "sections": {},
        "errors": [],
        "skipped": [],
        "complete": False,
    }
    run = Run(args.out, result, args.budget_s)

    def on_term(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        result["env"] = gpu_env.environment(commit)
        run.save()
        ctx: Context | None = None
        try:
            reg = Registry()
            key = AgentKey.generate()
            ring = Keyring({"gpu": key.public_hex})
            ctx = Context(
                reg,
                key,
                ring,
                args.device,
                models,
                args.draft,
                tokens,
                speedup_tokens,
                reps,
                Verifier.offline(reg, ring),  # receipts alone: L0 and L4
            )
        except Exception as e:
            run.error("setup", None, e)
        for name in args.sections:
            if ctx is None:
                result["sections"][name] = {"status": "not run: setup failed"}
                continue
            t = time.monotonic()
            result["sections"][name] = {"status": "running"}
            run.save()
            try:
                globals()[name](run, ctx)  # the function of that name, looked up now (tests replace one)
                status = "done"
            except Exception as e:
                run.error(name, None, e)
                status = "failed"
            result["sections"][name] = {"status": status, "wall_s": round(time.monotonic() - t, 1)}
            run.save()
        result["complete"] = (
            all(s.get("status") == "done" for s in result["sections"].values())
            and not result["errors"]
            and not result["skipped"]
        )
    except Terminated as e:
        result["terminated"] = f"{e} after {time.monotonic() - run.t0:.0f} s"
        log(f"terminated ({e}): saving what was measured")
    finally:
        signal.signal(signal.SIGTERM, previous)
        run.save()
    log(f"wrote {args.out}: {len(result['errors'])} errors, {len(result['skipped'])} skipped")
    return 0 if result["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
