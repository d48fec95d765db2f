"""Engine receipts (issue 27): honest leases through real engines, the calibrated L4 tolerance, the
catch rate of each cheat for engine receipts and SDK receipts side by side on the same leases, the
adapter's overhead over the bare engine, and receipt bytes per token.

    python -m bench.engines.run [--honest 300] [--trials 40] [--tf-honest 40] [--tokens 32]

llama.cpp (llama-cpp-python's server, 1 thread, f32 KV cache) serves GGUF exports of poi-lm; the
adapter (prover.engine.EngineAdapter) runs in this process against it over HTTP, as `poi agent
--engine` does inside a sandbox (tests/test_engine_adapter.py runs that path for real). Honest
leases alternate greedy (temperature 0) and sampled (0.8, top-k 50); the tolerance is fitted on the
even-numbered honest leases and its false rejects counted on the odd ones, then written to
`src/maxwell_poi/data/engine_tolerance.json` with this run's provenance. Every receipt is appraised by
the real verifier (L0 + L4). Cheats (each a real run, `trials` leases each):

| cheat | engine receipt | SDK receipt (same leases) |
|---|---|---|
| substitution | llama.cpp serving poi-lm-draft under the poi-lm alias | SwappedProver on poi-lm-draft |
| weight noise | llama.cpp serving poi-lm x (1 + 1% noise) | the same weights in the SDK |
| precision downgrade | llama.cpp on the q8_0 (and f16) GGUF under an fp32 lease | int8 (fp16) weights |
| cheap draft | tokens from poi-lm-draft's engine, log-probs from a poi-lm prefill | adversaries.cheap_draft |
| prompt alteration | the engine answers an injected prompt | adversaries.prompt_alteration |
| tampering | one token changed after generation | adversaries.output_tampering |
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from bench.common.results import commit, write_results
from bench.common.stats import rate_block
from bench.common.variants import PROMPTS as BASE_PROMPTS
from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.cheap_draft import DraftProver
from maxwell_poi.adversaries.output_tampering import TamperingProver, tamper
from maxwell_poi.adversaries.perturbed_weights import perturbed
from maxwell_poi.adversaries.precision_downgrade import int8_rounded, weight_rounded
from maxwell_poi.adversaries.prompt_alteration import INJECTION, AlteringProver
from maxwell_poi.protocol.engine import encode_engine_claim
from maxwell_poi.protocol.keys import AgentKey, Keyring
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt, sign_receipt
from maxwell_poi.prover.engine import EngineAdapter
from maxwell_poi.prover.engine_process import (
    engine_identity,
    llama_cpp_argv,
    missing_engine,
    serve,
    transformers_serve_argv,
    with_port,
)
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.forward import prefill
from maxwell_poi.registry.gguf_export import export_gguf
from maxwell_poi.registry.models import Registry, model_dir
from maxwell_poi.verifier import engine_audit
from maxwell_poi.verifier.audit import AuditLayer
from maxwell_poi.verifier.engine_audit import measure_engine
from maxwell_poi.verifier.integrity import IntegrityLayer
from maxwell_poi.verifier.policy import Verifier

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE_PATH = ROOT / "src" / "maxwell_poi" / "data" / "engine_tolerance.json"
MODEL, DRAFT, AGENT = "poi-lm", "poi-lm-draft", "engine-bench"
WRITES = {
    "engines.json": [
        "what",
        "model",
        "tokens_per_lease",
        "engines",
        "honest",
        "calibration",
        "catch_rates",
        "overhead",
        "receipt_bytes",
        "transformers_serve",
        "seconds",
    ]
}  # the keys of bench/results/engines.json this script writes (bench/common/results.py)
MARGIN = 4.0  # tolerance = MARGIN x the largest honest value on the fitting half (with floors)
FLOORS = {"logprob_abs": 1e-4, "tie_gap": 1e-4}
EXTRA_PROMPTS = [
    "Return a new list containing",
    "Raise ValueError if the",
    "This function is deprecated since",
    "Read the configuration file and",
    "The default value of the",
    "Write the data to the",
    "If the argument is omitted,",
    "Return the absolute path of",
    "A context manager that",
    "Split the string at the",
    "Each element of the iterable",
    "The encoding defaults to",
]
# open-ended prompts only: poi-lm often ends a whole sentence with eos at once, and an empty answer
# carries one position of evidence
PROMPTS = [*(p.rstrip(".") + " and" for p in BASE_PROMPTS if p.endswith(".")), *EXTRA_PROMPTS]


def leases(n: int, offset: int, tokens: int) -> list[Lease]:
    """Even leases greedy, odd ones sampled at 0.8 / top-k 50; prompts in turn."""
    out = []
    for i in range(offset, offset + n):
        temp = 0.0 if i % 2 == 0 else 0.8
        job = GenerateJob(prompt=PROMPTS[(i // 2) % len(PROMPTS)], max_new_tokens=tokens, temperature=temp)
        out.append(Lease.issue(AGENT, MODEL, job))
    return out


@contextlib.contextmanager
def llama(gguf: Path):
    argv, port = with_port(llama_cpp_argv(gguf, alias=MODEL))
    base = f"http://127.0.0.1:{port}/v1"
    with serve(argv, f"{base}/models", base, 180.0) as url:
        yield url


class Bench:
    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.registry = Registry()
        self.key = AgentKey.generate()
        self.keyring = Keyring({AGENT: self.key.public_hex})
        self.ref = self.registry.load(MODEL)
        self.name, self.version = engine_identity(llama_cpp_argv("x.gguf"))

    def verifier(self) -> Verifier:
        return Verifier(IntegrityLayer(self.registry, self.keyring), drawn=[AuditLayer(self.registry)])

    def adapter(self, url: str, **kw) -> EngineAdapter:
        return EngineAdapter(
            self.key, url, name=self.name, version=self.version, registry=self.registry, **kw
        )

    def claims(self, lease: Lease, raw: bytes):
        return open_receipt(raw, max_receipt_bytes(lease, self.ref.reference.hidden)).claims

    def appraise(self, lease: Lease, raw: bytes) -> tuple[str, str]:
        result = self.verifier().appraise(lease, raw)
        return result.verdict, result.reason


def fit(rows: list[dict]) -> dict[str, float]:
    """Tolerances from honest measurements: MARGIN x the largest value, floored; the tie gap is at
    least twice the log-prob tolerance (a flip needs the two to differ by the gap)."""
    lp = max([r["max_logprob_err"] for r in rows if r["max_logprob_err"] is not None] or [0.0])
    gap = max([r["max_gap"] for r in rows if r["greedy"]] or [0.0])
    logprob_abs = max(FLOORS["logprob_abs"], MARGIN * lp)
    return {
        "logprob_abs": float(logprob_abs),
        "tie_gap": float(max(FLOORS["tie_gap"], MARGIN * gap, 2 * logprob_abs)),
    }


def measured(bench: Bench, lease: Lease, raw: bytes) -> dict:
    claims = bench.claims(lease, raw)
    m = measure_engine(lease, claims, bench.ref)
    assert isinstance(lease.job, GenerateJob)
    return {
        "greedy": lease.job.temperature == 0,
        "max_gap": m.max_gap,
        "max_logprob_err": m.max_lp_err if claims.engine and claims.engine.fp_kind == "logprobs" else None,
        "z": m.z,
        "finish": claims.engine.finish if claims.engine else None,
        "tokens": len(claims.tokens()),
        "bytes": len(raw),
    }


def honest_llama(bench: Bench, url: str, n: int) -> tuple[list[Lease], list[bytes], list[dict], int]:
    adapter = bench.adapter(url)
    ls, raws, rows, refused = [], [], [], 0
    for lease in leases(n, 0, bench.tokens):
        try:
            raw = adapter.run(lease)
        except Exception as exc:  # an unmappable piece: counted, not hidden
            refused += 1
            print(f"honest lease refused by the adapter: {exc}", flush=True)
            continue
        ls.append(lease)
        raws.append(raw)
        rows.append(measured(bench, lease, raw))
    return ls, raws, rows, refused


def write_tolerance(llama_fit: dict, tf_fit: dict | None, runs: dict, z: float) -> None:
    engines = {bench_name(): {"fp32": llama_fit}}
    if tf_fit is not None:
        engines["transformers serve"] = {"fp32": {"tie_gap": tf_fit["tie_gap"]}}
    data = {
        "provenance": {
            "script": "bench/engines/run.py",
            "commit": commit(),
            "runs": runs,
            "fitted_on": "even-numbered honest leases; false rejects counted on the odd ones (engines.json)",
            "margin": f"{MARGIN} x the largest honest value, floors {FLOORS}, tie gap >= 2 x logprob_abs",
        },
        "likelihood_z": z,
        "engines": engines,
    }
    TOLERANCE_PATH.write_text(json.dumps(data, indent=2) + "\n")
    engine_audit._cache.clear()


def bench_name() -> str:
    return engine_identity(llama_cpp_argv("x.gguf"))[0]


def verdicts(bench: Bench, pairs: list[tuple[Lease, bytes]]) -> dict:
    out = [bench.appraise(lease, raw) for lease, raw in pairs]
    rejected = [r for v, r in out if v == "contraindicated"]
    warned = sum(v == "warning" for v, _ in out)
    block = rate_block(len(rejected), len(out), "rejected")
    block["warned"] = warned
    if rejected:
        block["first_reason"] = rejected[0][:300]
    return block


def caught_block(bench: Bench, pairs: list[tuple[Lease, bytes | None]]) -> dict:
    """Catch rate: contraindicated = caught; a refused lease (no receipt) counts as not judged."""
    judged = [(lease, raw) for lease, raw in pairs if raw is not None]
    out = [bench.appraise(lease, raw) for lease, raw in judged]
    caught = [r for v, r in out if v == "contraindicated"]
    block = rate_block(len(caught), len(out))
    block["not_answered"] = len(pairs) - len(judged)
    by_mode = {"greedy": [0, 0], "sampled": [0, 0]}
    for (lease, _), (v, _) in zip(judged, out, strict=True):
        mode = "greedy" if lease.job.temperature == 0 else "sampled"  # type: ignore[union-attr]
        by_mode[mode][1] += 1
        by_mode[mode][0] += v == "contraindicated"
    block["by_mode"] = {k: f"{c}/{n}" for k, (c, n) in by_mode.items()}
    if caught:
        block["example_reason"] = caught[0][:240]
    missed = [r for v, r in out if v != "contraindicated"]
    if missed:
        block["example_missed"] = missed[0][:240]
    return block


def run_engine(adapter: EngineAdapter, lease: Lease) -> bytes | None:
    try:
        return adapter.run(lease)
    except Exception as exc:
        print(f"  adapter refused: {exc}", flush=True)
        return None


def cheap_draft_receipt(bench: Bench, draft: EngineAdapter, lease: Lease) -> bytes | None:
    """Tokens decoded by the draft's engine; log-probs from one prefill of the leased model."""
    raw = run_engine(draft, lease)
    if raw is None:
        return None
    claims = bench.claims(lease, raw)
    tokens = claims.tokens()
    job = lease.job
    assert isinstance(job, GenerateJob) and claims.engine is not None
    prompt = bench.ref.encode_prompt(job.prompt)
    if not tokens:
        return raw
    _, logits = prefill(bench.ref, prompt, tokens)
    logp = torch.log_softmax(logits.double(), -1)
    top = torch.topk(logp, 5, dim=-1)
    claim = encode_engine_claim(
        name=claims.engine.name, version=claims.engine.version, decoding=claims.engine.decoding,
        finish=claims.engine.finish, width=claims.output.width, seed=claims.engine.seed,
        chosen_lp=[float(logp[i, t]) for i, t in enumerate(tokens)],
        top=[list(zip(top.indices[i].tolist(), top.values[i].tolist(), strict=True))
             for i in range(len(tokens))],
        top_n=5,
    )  # fmt: skip
    return sign_receipt(claims.model_copy(update={"engine": claim}), bench.key)


def sdk_pairs(prover: Prover, ls: list[Lease]) -> list[tuple[Lease, bytes | None]]:
    return [(lease, prover.run(lease)) for lease in ls]


def overhead(bench: Bench, url: str, n: int) -> dict:
    """Adapter (in this process, receipt signed) vs the bare engine asked the same completion over
    the same HTTP, alternating, on the same leases: ratio of medians."""
    adapter = bench.adapter(url)
    client = httpx.Client(timeout=120)
    bare_lp, bare_plain, adapted = [], [], []
    for i, lease in enumerate(leases(n, 10_000, bench.tokens)):
        body = {**adapter.request_body(lease), "stream": True}  # the very request the adapter sends
        plain = {k: v for k, v in body.items() if k != "logprobs"}

        def bare(request: dict) -> float:
            t = time.perf_counter()
            with client.stream("POST", f"{url}/completions", json=request) as resp:
                for _ in resp.iter_lines():
                    pass
            return time.perf_counter() - t

        def adapted_run(lease: Lease) -> float:
            t = time.perf_counter()
            adapter.run(lease)
            return time.perf_counter() - t

        order = [(bare_lp, bare, body), (bare_plain, bare, plain), (adapted, adapted_run, lease)]
        for which, measure, arg in order[i % 3 :] + order[: i % 3]:  # rotate: no step always goes first
            which.append(measure(arg))
    med = statistics.median
    return {
        "leases": n,
        "adapter_median_s": round(med(adapted), 4),
        "bare_same_request_median_s": round(med(bare_lp), 4),
        "bare_no_logprobs_median_s": round(med(bare_plain), 4),
        "ratio_vs_same_request": round(med(adapted) / med(bare_lp), 3),
        "ratio_vs_no_logprobs": round(med(adapted) / med(bare_plain), 3),
        "note": "in-process adapter over HTTP (no resident channel); llama.cpp at 1 thread, this 2-core host",
    }


def transformers_part(bench: Bench, n: int, trials: int) -> tuple[dict, dict | None]:
    """Token-only mode: honest greedy and sampled leases, a substituted model (greedy and sampled)."""
    if (why := missing_engine("transformers serve")) is not None:
        return {"skipped": why}, None
    out: dict = {}
    argv, port = with_port(transformers_serve_argv(model_dir(bench.registry.get(MODEL))))
    base = f"http://127.0.0.1:{port}"
    name = "transformers serve"
    ls = leases(n, 20_000, bench.tokens)
    with serve(argv, f"{base}/health", f"{base}/v1", 240.0) as url:
        adapter = EngineAdapter(bench.key, url, name=name, registry=bench.registry)
        pairs = [(lease, run_engine(adapter, lease)) for lease in ls]
    answered = [(lease, raw) for lease, raw in pairs if raw is not None]
    rows = [measured(bench, lease, raw) for lease, raw in answered]
    fit_rows = rows[0::2]
    tf_fit = fit(fit_rows)
    out["honest_rows"] = len(rows)
    out["refused_by_adapter"] = len(pairs) - len(answered)
    out["max_gap_greedy"] = max([r["max_gap"] for r in rows if r["greedy"]] or [0.0])
    out["z_sampled"] = sorted(round(r["z"], 2) for r in rows if r["z"] is not None)[:5]
    out["bytes_per_token"] = per_token(rows)
    return out | {"_pairs": answered}, tf_fit


def per_token(rows: list[dict]) -> float | None:
    """Receipt bytes per token over the leases that ran to max_new_tokens (else all with tokens)."""
    full = [r for r in rows if r["finish"] == "length"] or [r for r in rows if r["tokens"]]
    return round(sum(r["bytes"] for r in full) / sum(r["tokens"] for r in full), 1) if full else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--honest", type=int, default=300)
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--tf-honest", type=int, default=40)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--overhead", type=int, default=20)
    p.add_argument("--z", type=float, default=-4.0, help="likelihood bound (z-score) for sampled output")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if (why := missing_engine("llama.cpp")) is not None:
        raise SystemExit(why)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    bench = Bench(args.tokens)
    result: dict = {
        "what": "engine receipts (issue 27): honest leases, calibrated L4 tolerance, cheats caught for "
        "engine "
        "vs SDK receipts on the same leases, adapter overhead, receipt bytes per token",
        "model": MODEL,
        "tokens_per_lease": args.tokens,
        "engines": {"llama.cpp": f"{bench.name} {bench.version} (llama-cpp-python server, 1 thread, f32 KV)"},
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ggufs = {t: export_gguf(MODEL, folder / f"{MODEL}-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}
        ggufs["draft"] = export_gguf(DRAFT, folder / "draft.gguf", "f32")
        ggufs["noise"] = export_gguf(MODEL, folder / "noise.gguf", "f32", loaded=perturbed(bench.ref, 0.01))
        print("exported", {k: v.stat().st_size for k, v in ggufs.items()}, flush=True)

        with llama(ggufs["f32"]) as url:
            ls, raws, rows, refused = honest_llama(bench, url, args.honest)
            print(f"honest: {len(rows)} receipts ({refused} refused by the adapter)", flush=True)
            result["overhead"] = overhead(bench, url, args.overhead)
            tf, tf_fit = transformers_part(bench, args.tf_honest, args.trials)
            llama_fit = fit(rows[0::2])
            runs = {"llama.cpp": len(rows), "transformers serve": tf.get("honest_rows", 0)}
            write_tolerance(llama_fit, tf_fit, runs, args.z)
            held = list(zip(ls[1::2], raws[1::2], strict=True))
            fitted = list(zip(ls[0::2], raws[0::2], strict=True))
            result["honest"] = {
                "llama.cpp": {
                    "leases": len(rows) + refused,
                    "refused_by_adapter": refused,
                    "held_out": verdicts(bench, held),
                    "fitting_half": verdicts(bench, fitted),
                    "all": verdicts(bench, held + fitted),
                    "finish_stop": sum(r["finish"] == "stop" for r in rows),
                },
            }
            if "_pairs" in tf:
                tf_pairs = tf.pop("_pairs")
                tf["held_out"] = verdicts(bench, tf_pairs[1::2])
                tf["all"] = verdicts(bench, tf_pairs)
            result["calibration"] = {
                "llama.cpp fp32": llama_fit | {
                    "fit_max_logprob_err": max(r["max_logprob_err"] or 0 for r in rows[0::2]),
                    "held_max_logprob_err": max(r["max_logprob_err"] or 0 for r in rows[1::2]),
                    "fit_max_gap_greedy": max([r["max_gap"] for r in rows[0::2] if r["greedy"]] or [0]),
                    "held_max_gap_greedy": max([r["max_gap"] for r in rows[1::2] if r["greedy"]] or [0]),
                    "sampled_z_lowest": sorted(round(r["z"], 2) for r in rows if r["z"] is not None)[:5],
                },
                "transformers serve fp32": tf_fit,
                "likelihood_z": args.z,
                "margin": MARGIN,
                "file": "src/maxwell_poi/data/engine_tolerance.json",
            }  # fmt: skip
            lp_rows = [r for r in rows if r["max_logprob_err"] is not None]
            result["receipt_bytes"] = {
                "logprobs_top5_per_token": per_token(lp_rows),
                "note": "whole DSSE receipt bytes / tokens over the leases that ran to max_new_tokens "
                "(finish 'length'), top 5 float32 log-probs",
                "transformers_serve_tokens_only_per_token": tf.get("bytes_per_token"),
            }
            result["transformers_serve"] = tf
            cheat_leases = leases(args.trials, 30_000, args.tokens)
            honest_adapter = bench.adapter(url)
            vocab = bench.ref.reference.vocab
            altering = bench.adapter(url, alter_prompt=lambda p: INJECTION + p)
            tampering = bench.adapter(url, tamper=lambda _lz, t: tamper(t, [len(t) // 2], vocab))
            engine_side: dict[str, list] = {
                "prompt alteration": [(lease, run_engine(altering, lease)) for lease in cheat_leases],
                "tampering": [(lease, run_engine(tampering, lease)) for lease in cheat_leases],
            }
            del honest_adapter
        served = (("substitution", "draft"), ("weight noise 1%", "noise"),
                  ("precision downgrade q8_0", "q8_0"), ("precision downgrade f16", "f16"))  # fmt: skip
        for cheat, gguf in served:
            with llama(ggufs[gguf]) as url:
                adapter = bench.adapter(url)
                engine_side[cheat] = [(lease, run_engine(adapter, lease)) for lease in cheat_leases]
                if gguf == "draft":
                    engine_side["cheap draft"] = [
                        (lease, cheap_draft_receipt(bench, adapter, lease)) for lease in cheat_leases
                    ]
            print(f"engine side done: {cheat}", flush=True)
        sdk_side = {
            "substitution": SwappedProver(bench.key, lambda _l, reg: reg.load(DRAFT)),
            "weight noise 1%": SwappedProver(bench.key, lambda _l, reg: noisy),
            "precision downgrade q8_0": SwappedProver(bench.key, lambda _l, reg: int8),
            "precision downgrade f16": SwappedProver(bench.key, lambda _l, reg: fp16),
            "cheap draft": DraftProver(bench.key, DRAFT),
            "prompt alteration": AlteringProver(bench.key),
            "tampering": TamperingProver(bench.key),
        }
        noisy = perturbed(bench.ref, 0.01)
        int8 = int8_rounded(bench.ref)
        fp16 = weight_rounded(bench.ref, torch.float16)
        result["catch_rates"] = {}
        for cheat, prover in sdk_side.items():
            row = {
                "engine_receipt": caught_block(bench, engine_side[cheat]),
                "sdk_receipt": caught_block(bench, sdk_pairs(prover, cheat_leases)),
            }
            if cheat.startswith("precision downgrade"):
                row["sdk_analogue"] = (
                    "int8 weight-only (per row)" if "q8_0" in cheat else "fp16-rounded weights"
                )
            result["catch_rates"][cheat] = row
            counts = {k: (v["caught"], v["trials"]) for k, v in row.items() if isinstance(v, dict)}
            print(cheat, json.dumps(counts), flush=True)
        if tf.get("skipped") is None:
            result["transformers_serve"]["substitution"] = tf_substitution(bench, cheat_leases)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    write_results("engines.json", result, writes=WRITES, path=args.out)
    print(json.dumps(result, indent=1, default=str)[:4000])


def tf_substitution(bench: Bench, ls: list[Lease]) -> dict:
    """`transformers serve` serving poi-lm-draft's folder under a poi-lm lease (token-only)."""
    argv, port = with_port(transformers_serve_argv(model_dir(bench.registry.get(DRAFT))))
    base = f"http://127.0.0.1:{port}"
    with serve(argv, f"{base}/health", f"{base}/v1", 240.0) as url:
        adapter = EngineAdapter(bench.key, url, name="transformers serve", registry=bench.registry)
        pairs = [(lease, run_engine(adapter, lease)) for lease in ls]
    return caught_block(bench, pairs)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
