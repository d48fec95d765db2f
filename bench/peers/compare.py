"""Peer methods on the same honest and cheating generations: TOPLOC (its own package), a
Nineteen/Targon-style logprob-rank check, a DiFR-style same-seed token comparison, and this
project's L4 (bench/peers/checks.py has the methods and their published thresholds).

Each trial runs one variant (bench/common/variants.py) once; every method's evidence then comes from
the model that variant actually ran (the cheater's own: a swapped or perturbed copy; for
cheap-draft and mid-stream-switch the claimed model's prefill over the draft's output, which is
how those cheats build their fingerprints; for one-token-changed the claimed model recomputed
over the tampered output). TOPLOC's proofs are built from the final hidden states the prover's
model produced while answering (its decode steps, captured by a hook) when they line up with the
output, else from that model's prefill over prompt + output (speculative decoding, tampering).

Per method and variant: caught in how many trials; honest false rejects (fp32 claims) with the
one-sided 95 % Clopper-Pearson upper bound; bytes the prover sends per new token beyond the
output; verifier seconds per token as a ratio to honest generation seconds per token in the same
run (both on one thread; CPU, so ratios only). Writes bench/results/peers.json and peers.md.

    python -m bench.peers.compare                 # trained poi-lm: 40 trials per attack, 400 honest
    python -m bench.peers.compare --quick         # seeded gpt2-mini / gpt2-micro, a few trials, /tmp
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from maxwell_poi.prover.harness import quiet_libraries

quiet_libraries()

from scipy.stats import beta  # noqa: E402

from bench.common.results import write_results  # noqa: E402
from bench.common.variants import DRAFT, MODEL, OTHER, PROMPTS, Variant, attack_variants, honest_variants  # noqa: E402
from bench.peers.checks import (  # noqa: E402
    CHECKS,
    DifrCheck,
    Generation,
    LogprobRankCheck,
    MaxwellL4Check,
    ProverView,
    ToplocCheck,
    Verdict,
    load_toploc,
    summary,
)
from maxwell_poi.adversaries._agent import SwappedProver  # noqa: E402
from maxwell_poi.protocol.keys import AgentKey  # noqa: E402
from maxwell_poi.protocol.lease import GenerateJob, Lease  # noqa: E402
from maxwell_poi.registry.forward import prefill  # noqa: E402
from maxwell_poi.registry.models import LoadedModel, Registry  # noqa: E402
from maxwell_poi.verifier.thresholds import Thresholds  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "peers.json": [
        "config",
        "machine",
        "methods",
        "runtime_s",
    ]
}  # the keys of bench/results/peers.json this script writes (bench/common/results.py)
HONEST_FP32 = ("fp32-1thread", "fp32-2threads", "fp32-batch4", "fp32-speculative")
BASELINE = "fp32-1thread"  # the honest generation time verifier costs are divided by
L4_SAME = "maxwell_l4_same_class"


class _Once:
    """A SwappedProver's model maker that builds each modified model once (not per lease)."""

    def __init__(self, swap) -> None:
        self.swap, self.made = swap, {}

    def __call__(self, lease: Lease, registry: Registry) -> LoadedModel:
        if lease.model_id not in self.made:
            self.made[lease.model_id] = self.swap(lease, registry)
        return self.made[lease.model_id]


def build_once(variants: dict[str, Variant]) -> None:
    for v in variants.values():
        if isinstance(v.prover, SwappedProver):
            v.prover._swap = _Once(v.prover._swap)


class FinalStateTap:
    """Row 0 of the final norm's output for every forward pass of one model, while entered."""

    def __init__(self, model: LoadedModel) -> None:
        self.target = model.final_norm if model.final_norm is not None else model.layers[-1]
        self.passes: list[torch.Tensor] = []

    def __enter__(self) -> FinalStateTap:
        self.handle = self.target.register_forward_hook(self._keep)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.handle.remove()

    def _keep(self, _module, _inputs, output) -> None:
        out = output[0] if isinstance(output, tuple) else output
        self.passes.append(out[0].detach().clone())

    def rows(self, expected: int) -> tuple[torch.Tensor | None, str]:
        """The states of positions [0, expected) in order, if the passes produced exactly those:
        all passes together (decode steps) or the last pass alone (a prefill over the output)."""
        if sum(p.shape[0] for p in self.passes) == expected:
            return torch.cat(self.passes), "decode" if len(self.passes) > 1 else "prefill"
        if self.passes and self.passes[-1].shape[0] == expected:
            return self.passes[-1], "prefill"
        return None, "recomputed"


def lease_for(model_id: str, i: int, tokens: int, precision: str) -> Lease:
    job = GenerateJob(
        prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=tokens, temperature=0.0 if i % 2 == 0 else 0.8
    )
    return Lease.issue("peer-agent", model_id, job, precision=precision)  # type: ignore[arg-type]


class Run:
    """Runs trials and keeps, per method and variant, the verdicts, times and bytes."""

    def __init__(self, registry: Registry, model_id: str, checks: dict, tokens: int) -> None:
        self.registry, self.model_id, self.checks, self.tokens = registry, model_id, checks, tokens
        self.reference = registry.load(model_id)
        self.verdicts: dict[str, dict[str, list[Verdict]]] = defaultdict(lambda: defaultdict(list))
        self.verify_s: dict[str, list[float]] = defaultdict(list)
        self.prove_s: dict[str, list[float]] = defaultdict(list)
        self.sent_bytes: dict[str, list[int]] = defaultdict(list)
        self.gen_s: dict[str, list[float]] = defaultdict(list)
        self.new_tokens: dict[str, list[int]] = defaultdict(list)
        self.temperature: dict[str, list[float]] = defaultdict(list)
        self.source: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def trial(self, variant: Variant, i: int) -> None:
        lease = lease_for(self.model_id, i, self.tokens, variant.precision)
        model = variant.prover.model_for(lease)  # the module the variant decodes or prefills with
        with FinalStateTap(model) as tap:
            t0 = time.perf_counter()
            claims = variant.claims(lease)
            self.gen_s[variant.name].append(time.perf_counter() - t0)
        gen = Generation(lease, self.reference.encode_prompt(lease.job.prompt), claims.tokens())
        self.new_tokens[variant.name].append(len(gen.tokens))
        self.temperature[variant.name].append(gen.job.temperature)
        expected = len(gen.prompt_ids) + len(gen.tokens) - 1
        hidden, source = tap.rows(expected) if variant.finish is None else (None, "recomputed")
        own_hidden, own_logits = prefill(model, gen.prompt_ids, gen.tokens)  # the prover's own view
        view = ProverView(hidden=own_hidden if hidden is None else hidden, logits=own_logits, claims=claims)
        self.source[variant.name][source] += 1
        for name, check in self.checks.items():
            t0 = time.perf_counter()
            sent = check.prove(gen, view)
            t1 = time.perf_counter()
            verdict = check.verify(self.reference, gen, sent)
            t2 = time.perf_counter()
            self.verdicts[name][variant.name].append(verdict)
            if name != L4_SAME:
                self.prove_s[name].append(t1 - t0)
                self.verify_s[name].append((t2 - t1) / len(gen.tokens))
                self.sent_bytes[name].append(check.wire_bytes(sent))


def upper95(k: int, n: int) -> float:
    """One-sided 95 % Clopper-Pearson upper bound of a rate seen k times in n trials."""
    return 1.0 if k >= n else float(beta.ppf(0.95, k + 1, n - k))


def interval95(k: int, n: int) -> list[float]:
    lo = 0.0 if k == 0 else float(beta.ppf(0.025, k, n - k + 1))
    hi = 1.0 if k == n else float(beta.ppf(0.975, k + 1, n - k))
    return [round(lo, 4), round(hi, 4)]


def counts(verdicts: list[Verdict], rule: str | None = None) -> tuple[int, int]:
    hits = sum(v.caught if rule is None else v.rules.get(rule, False) for v in verdicts)
    return int(hits), len(verdicts)


def attack_entry(verdicts: list[Verdict], rule: str | None = None) -> dict:
    k, n = counts(verdicts, rule)
    return {
        "caught": k == n,
        "caught_count": k,
        "trials": n,
        "rate": round(k / n, 4) if n else None,
        "rate_ci95": interval95(k, n) if n else None,
    }


def honest_entry(verdicts: list[Verdict], rule: str | None = None) -> dict:
    k, n = counts(verdicts, rule)
    return {
        "false_rejects": k,
        "trials": n,
        "rate": round(k / n, 4) if n else None,
        "upper95_one_sided": round(upper95(k, n), 5) if n else None,
    }


def method_block(run: Run, name: str, attacks: list[str], honest: list[str], bf16: list[str]) -> dict:
    by_variant = run.verdicts[name]
    pooled = [v for h in honest for v in by_variant[h]]

    def at(variants: list[str], temperature: float) -> list[Verdict]:
        return [
            v
            for name in variants
            for v, t in zip(by_variant[name], run.temperature[name], strict=True)
            if t == temperature
        ]

    temps = sorted({t for ts in run.temperature.values() for t in ts})
    bf16_pool = [v for h in bf16 for v in by_variant[h]]
    rules = sorted({r for vs in by_variant.values() for v in vs for r in v.rules})
    rules = rules if len(rules) > 1 else []  # a one-rule method's rule is the method
    block: dict = {
        "attacks": {
            a: {
                **attack_entry(by_variant[a]),
                "by_temperature": {str(t): "{}/{}".format(*counts(at([a], t))) for t in temps},
            }
            for a in attacks
        },
        "honest_fp32": {
            **honest_entry(pooled),
            "by_variant": {h: honest_entry(by_variant[h]) for h in honest},
            "by_temperature": {str(t): honest_entry(at(honest, t)) for t in temps},
        },
        "rules": {
            r: {
                "attacks": {a: attack_entry(by_variant[a], r) for a in attacks},
                "honest_fp32": honest_entry(pooled, r),
                **({"honest_bf16_claim": honest_entry(bf16_pool, r)} if bf16_pool else {}),
            }
            for r in rules
        },
        "stats": {
            variant: {
                s: summary([v.stats.get(s) for v in vs]) for s in sorted({s for v in vs for s in v.stats})
            }
            for variant, vs in by_variant.items()
        },
        "example_reasons": {variant: vs[0].reason for variant, vs in by_variant.items() if vs},
    }
    if bf16_pool:
        block["honest_bf16_claim"] = honest_entry(bf16_pool)
    if name in run.sent_bytes:
        tokens = [t for ts in run.new_tokens.values() for t in ts]
        block["bytes_per_token"] = round(sum(run.sent_bytes[name]) / sum(tokens), 3)
    base = statistics.median(
        g / n for g, n in zip(run.gen_s[BASELINE], run.new_tokens[BASELINE], strict=True)
    )
    if name in run.verify_s:
        per_token = statistics.median(run.verify_s[name])
        block["verifier_cost"] = {
            "ratio_to_honest_generation": round(per_token / base, 4),
            "speedup_vs_generation": round(base / per_token, 2),
            "note": "median verifier s/token (one prefill + the check, 1 thread) / median honest "
            f"generation s/token ({BASELINE})",
        }
        if name in ("toploc", "logprob_rank"):  # L4's commitments are built inside generation
            prove = statistics.median(run.prove_s[name]) / run.tokens
            block["verifier_cost"]["prover_extra_ratio"] = round(prove / base, 5)
            block["verifier_cost"]["prover_note"] = (
                "building what the prover sends from states it already computed, per token, over "
                "honest generation time per token"
            )
    return block


def table(result: dict, attacks: list[str]) -> str:
    m = result["methods"]
    cols = [
        ("toploc", None),
        ("logprob_rank", None),
        ("logprob_rank", "nineteen"),
        ("logprob_rank", "targon_v5"),
    ]
    cols += [("difr", None), ("maxwell_l4", None)]
    if "same_class" in m["maxwell_l4"]:
        cols.append(("maxwell_l4", "same_class"))
    head = {
        ("toploc", None): "TOPLOC",
        ("logprob_rank", None): "logprob-rank",
        ("logprob_rank", "nineteen"): "(Nineteen)",
        ("logprob_rank", "targon_v5"): "(Targon v5)",
        ("difr", None): "DiFR",
        ("maxwell_l4", None): "Maxwell L4 (cross-class)",
        ("maxwell_l4", "same_class"): "Maxwell L4 (same-class)",
    }

    def block(method: str, sub: str | None) -> dict | None:
        b = m[method]
        if b.get("skipped"):
            return None
        if sub == "same_class":
            return b["same_class"]
        if sub == "nineteen":
            return b["nineteen"]
        if sub == "targon_v5":
            return b["rules"]["targon_v5"]
        return b

    def cell(b: dict | None, key: str, row: str) -> str:
        if b is None:
            return "skipped"
        if key == "attack":
            e = b["attacks"][row]
            return (
                f"**{e['caught_count']}/{e['trials']}**"
                if e["caught"]
                else f"{e['caught_count']}/{e['trials']}"
            )
        e = b[key]
        return f"{e['false_rejects']}/{e['trials']} (≤ {e['upper95_one_sided']:.3f})"

    lines = [
        "| variant | " + " | ".join(head[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for a in attacks:
        lines.append(f"| {a} | " + " | ".join(cell(block(*c), "attack", a) for c in cols) + " |")
    lines.append(
        "| **honest fp32 rejected** (95 % upper) | "
        + " | ".join(cell(block(*c), "honest_fp32", "") for c in cols)
        + " |"
    )
    if any((b := block(*c)) is not None and "honest_bf16_claim" in b for c in cols):
        lines.append(
            "| honest bf16 claim rejected | "
            + " | ".join(
                cell(b, "honest_bf16_claim", "")
                if (b := block(*c)) is not None and "honest_bf16_claim" in b
                else "—"
                for c in cols
            )
            + " |"
        )

    def extra(c: tuple[str, str | None], key: str, fmt: str) -> str:
        b = m[c[0]]
        if b.get("skipped") or c[1] is not None:
            return "—" if not b.get("skipped") else "skipped"
        if key == "bytes":
            return fmt.format(b["bytes_per_token"])
        return fmt.format(b["verifier_cost"]["ratio_to_honest_generation"])

    lines.append(
        "| bytes per token (prover → verifier) | "
        + " | ".join(extra(c, "bytes", "{:.2f}") for c in cols)
        + " |"
    )
    lines.append(
        "| verifier s/token ÷ generation s/token | "
        + " | ".join(extra(c, "cost", "{:.3f}") for c in cols)
        + " |"
    )
    return "\n".join(lines)


MARGIN_STATS = [
    ("toploc", "min_exp_matches", "TOPLOC worst-chunk exponent matches /128 (reject < 90)"),
    ("logprob_rank", "mean_distance", "Nineteen mean abs Δp (reject > 0.25)"),
    ("logprob_rank", "max_rank", "Nineteen max rank (reject ≥ 9.7 at T=0, ≥ 43.5 at T=0.8)"),
    ("logprob_rank", "min_logprob", "Targon min logprob (reject ≤ −13)"),
    ("difr", "match_rate", "DiFR match rate (flag < 0.98)"),
    ("maxwell_l4", "max_gap", "L4 max token score gap"),
    ("maxwell_l4", "worst_close", "L4 worst-chunk close fraction"),
]


def margins(result: dict, attacks: list[str]) -> str:
    """What each decision was taken on: honest range against each attack's range (min–max)."""
    m = result["methods"]
    cols = [(meth, stat, label) for meth, stat, label in MARGIN_STATS if not m[meth].get("skipped")]

    def span(meth: str, stat: str, variants: list[str]) -> str:
        parts = [m[meth]["stats"].get(v, {}).get(stat, {}) for v in variants]
        parts = [p for p in parts if "min" in p]
        if not parts:
            return "—"
        lo, hi = min(p["min"] for p in parts), max(p["max"] for p in parts)
        return f"{lo:.4g}" if lo == hi else f"{lo:.4g} – {hi:.4g}"

    rows = [("honest fp32", list(HONEST_FP32)), ("honest bf16 claim", ["bf16-claim"])]
    rows += [(a, [a]) for a in attacks]
    lines = ["| variant | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, variants in rows:
        lines.append(
            f"| {label} | " + " | ".join(span(meth, stat, variants) for meth, stat, _ in cols) + " |"
        )
    return "\n".join(lines)


def markdown(result: dict, attacks: list[str]) -> str:
    cfg = result["config"]
    notes = [
        f"# Peer methods on the same generations ({cfg['model']}, {cfg['tokens']} new tokens)",
        "",
        f"Written by `bench/peers/compare.py` on {result['machine']['date']}; "
        f"data in `{Path(cfg['out']).name}`. "
        f"{cfg['attack_trials']} trials per attack, "
        f"{result['methods']['difr']['honest_fp32']['trials']} honest fp32 generations "
        f"({', '.join(HONEST_FP32)}), prompts from `_variants.PROMPTS`, temperature alternating "
        "0 / 0.8 (top-k 50). Cells: caught / trials (bold = every trial); honest rows: false "
        "rejects / trials and the one-sided 95 % Clopper-Pearson upper bound of the rate.",
        "",
        table(result, attacks),
        "",
        "Thresholds: TOPLOC (its package, k = 128, chunks of 32, prompt as one chunk): a chunk "
        "fails with < 90/128 exponents matching or mantissa error mean > 10 or median > 8; any "
        "failing chunk rejects. logprob-rank = Nineteen (mean |p_val − p_prover| > 0.25 rejects, "
        "0.125–0.25 partial counted as pass; every token's rank < 10/(1.03 − T)) or Targon v5 "
        "(any logprob ≤ −13, or ≥ 5 tokens ≤ −8). DiFR: same-seed redraw by teacher forcing (one "
        "forward pass), flag below 98 % matching tokens. Maxwell L4: token choice + fingerprints "
        "under the calibrated tolerance.",
    ]
    by_t = []
    for name in CHECKS:
        b = result["methods"][name]
        if not b.get("skipped"):
            parts = [
                f"T={t}: {e['false_rejects']}/{e['trials']}"
                for t, e in b["honest_fp32"]["by_temperature"].items()
            ]
            by_t.append(f"{name} {', '.join(parts)}")
    notes += ["", "Honest fp32 false rejects by temperature: " + "; ".join(by_t) + "."]
    blurred = []
    for name in CHECKS:
        b = result["methods"][name]
        if b.get("skipped"):
            continue
        honest_rate = {t: e["rate"] for t, e in b["honest_fp32"]["by_temperature"].items()}
        weak = []
        for a, e in b["attacks"].items():
            cells = {t: tuple(int(x) for x in kn.split("/")) for t, kn in e["by_temperature"].items()}
            if e["caught_count"] and all(
                n == 0 or honest_rate.get(t) is None or k / n <= honest_rate[t] for t, (k, n) in cells.items()
            ):
                weak.append(a)
        if weak:
            blurred.append(f"{name}: {', '.join(weak)}")
    if blurred:
        notes += [
            "",
            "Catches no more frequent than the same method's honest rejects at the same temperature "
            "(not detection): " + "; ".join(blurred) + ".",
        ]
    notes += ["", "What each decision was taken on (min – max over trials):", "", margins(result, attacks)]
    if result["methods"]["toploc"].get("skipped"):
        notes += ["", f"TOPLOC skipped: {result['methods']['toploc']['skipped']}"]
    return "\n".join(notes) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="seeded gpt2-mini / gpt2-micro, few trials, /tmp")
    ap.add_argument("--model", default=None, help=f"claimed model (default {MODEL})")
    ap.add_argument("--draft", default=None, help=f"draft / smaller model (default {DRAFT})")
    ap.add_argument("--other", default=None, help=f"other weights, same vocabulary (default {OTHER})")
    ap.add_argument("--trials", type=int, default=None, help="trials per attack variant (default 40)")
    ap.add_argument("--honest", type=int, default=None, help="honest fp32 trials in all (default 400)")
    ap.add_argument("--bf16", type=int, default=None, help="honest bf16-claim trials (default 40; 0 skips)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=None, help="JSON path (markdown beside it, .md)")
    args = ap.parse_args()
    quick = args.quick
    model_id = args.model or ("gpt2-mini" if quick else MODEL)
    draft = args.draft or ("gpt2-micro" if quick else DRAFT)
    other = args.other or ("gpt2-micro" if quick else OTHER)
    trials = args.trials if args.trials is not None else (2 if quick else 40)
    honest_n = args.honest if args.honest is not None else (8 if quick else 400)
    bf16_n = args.bf16 if args.bf16 is not None else (2 if quick else 40)
    out = args.out or (Path("/tmp/peers-quick.json") if quick else ROOT / "bench/results/peers.json")
    torch.set_num_threads(1)
    started = time.time()

    registry = Registry()
    key = AgentKey.generate()
    honest = honest_variants(registry, key, draft=draft)
    attacks = attack_variants(registry, key, draft=draft, other=other)
    build_once(honest)
    build_once(attacks)

    thresholds = Thresholds.load()
    same_calibrated = "fp32" in thresholds.same_class
    checks: dict = {}
    toploc, why = load_toploc()
    if toploc is not None:
        checks["toploc"] = ToplocCheck(toploc)
    checks["logprob_rank"] = LogprobRankCheck()
    checks["difr"] = DifrCheck()
    checks["maxwell_l4"] = _L4ByPrecision(thresholds, same_class=False)
    if same_calibrated:
        checks[L4_SAME] = _L4ByPrecision(thresholds, same_class=True)

    run = Run(registry, model_id, checks, args.tokens)
    per_honest = [
        honest_n // len(HONEST_FP32) + (j < honest_n % len(HONEST_FP32)) for j in range(len(HONEST_FP32))
    ]
    plan = [(honest[h], n) for h, n in zip(HONEST_FP32, per_honest, strict=True)]
    plan += [(honest["bf16-claim"], bf16_n)] if bf16_n else []
    plan += [(v, trials) for v in attacks.values()]
    for variant, n in plan:
        t0 = time.time()
        for i in range(n):
            run.trial(variant, i)
        print(f"{variant.name:18s} {n:4d} trials {time.time() - t0:6.1f} s", file=sys.stderr, flush=True)

    attack_names = list(attacks)
    bf16_names = ["bf16-claim"] if bf16_n else []
    methods: dict = {}
    for name in CHECKS:
        if name not in checks:
            methods[name] = {"skipped": why}
            continue
        methods[name] = method_block(run, name, attack_names, list(HONEST_FP32), bf16_names)
    if "toploc" in checks:
        methods["toploc"]["version"] = getattr(toploc, "__version__", "?")
        methods["toploc"]["activation_source"] = {k: dict(v) for k, v in run.source.items()}
        methods["toploc"]["note"] = (
            "fp32 final hidden states rounded to bf16 on both sides (TOPLOC's proofs carry bf16 bits); "
            "bytes per token include the prompt chunk's proof (skip_prefill=False)"
        )
    lr = methods["logprob_rank"]
    lr["nineteen"] = {
        "attacks": {
            a: attack_entry(
                [_any(v, "nineteen_distance", "nineteen_rank") for v in run.verdicts["logprob_rank"][a]]
            )
            for a in attack_names
        },
        "honest_fp32": honest_entry(
            [
                _any(v, "nineteen_distance", "nineteen_rank")
                for h in HONEST_FP32
                for v in run.verdicts["logprob_rank"][h]
            ]
        ),
        "note": "rejects on distance > 0.25 or any rank >= 10/(1.03 - T); rank 1 = most likely; distance "
        "over every output position (Nineteen samples up to 5)",
    }
    if same_calibrated:
        same = method_block(run, L4_SAME, attack_names, list(HONEST_FP32), bf16_names)
        methods["maxwell_l4"]["same_class"] = {
            k: same[k] for k in ("attacks", "honest_fp32", "rules", "stats")
        }
        if "honest_bf16_claim" in same:
            methods["maxwell_l4"]["same_class"]["honest_bf16_claim"] = same["honest_bf16_claim"]
    else:
        methods["maxwell_l4"]["same_class_note"] = (
            "same-class thresholds not calibrated yet (no 'same_class.fp32')"
        )
    methods["maxwell_l4"]["tolerance"] = {
        p: vars(thresholds.for_precision(p)) for p in ("fp32", "bf16") if p in thresholds.by_precision
    }

    result = {
        "config": {
            "model": model_id,
            "draft": draft,
            "other": other,
            "tokens": args.tokens,
            "attack_trials": trials,
            "honest_fp32_trials": honest_n,
            "honest_bf16_trials": bf16_n,
            "temperatures": [0.0, 0.8],
            "top_k": GenerateJob.model_fields["top_k"].default,
            "quick": quick,
            "out": str(out),
        },
        "machine": {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": {"verifier": 1, "honest_baseline": BASELINE},
            "honest_generation_s_per_token_median": statistics.median(
                g / n for g, n in zip(run.gen_s[BASELINE], run.new_tokens[BASELINE], strict=True)
            ),
        },
        "methods": methods,
        "runtime_s": round(time.time() - started, 1),
    }
    write_results("peers.json", result, writes=WRITES, path=out)
    md = markdown(result, attack_names)
    out.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['runtime_s']} s", file=sys.stderr)


def _any(v: Verdict, *rules: str) -> Verdict:
    """The verdict of a subset of a method's rules."""
    hit = any(v.rules.get(r, False) for r in rules)
    return Verdict(hit, v.reason, {r: v.rules.get(r, False) for r in rules}, v.stats)


class _L4ByPrecision:
    """MaxwellL4Check with the tolerance of each lease's claimed precision."""

    def __init__(self, thresholds: Thresholds, same_class: bool) -> None:
        self.thresholds, self.same_class = thresholds, same_class

    def _check(self, gen: Generation) -> MaxwellL4Check:
        return MaxwellL4Check(self.thresholds.for_precision(gen.lease.precision, same_class=self.same_class))

    def prove(self, gen: Generation, view: ProverView):
        return self._check(gen).prove(gen, view)

    def wire_bytes(self, sent) -> int:
        return MaxwellL4Check.wire_bytes(sent)

    def verify(self, reference: LoadedModel, gen: Generation, sent) -> Verdict:
        return self._check(gen).verify(reference, gen, sent)


if __name__ == "__main__":
    main()
