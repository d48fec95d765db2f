"""Peer verification methods, run side by side with this project's L4 by bench/peers/compare.py.

Each check has one job and the same two halves:

    sent = check.prove(gen, view)                 # what that method's prover sends besides the output
    verdict = check.verify(reference, gen, sent)  # the verifier's re-execution and its decision

`gen` is the lease and the output tokens the verifier received; `view` is what the prover's own
model produced for that output (its final hidden states and logits, and Maxwell's signed claims),
so a cheater's evidence comes from the cheater's model. `reference` is the verifier's float32 copy
of the claimed model. Every verifier runs one prefill over prompt + output (teacher forcing).

- `ToplocCheck`      TOPLOC's own package (`toploc` 0.1.6): top-128 of the last hidden state per
                     chunk of 32 decode tokens (prompt as one chunk), bf16 values in a polynomial;
                     thresholds of its experiments (PrimeIntellect-ai/toploc vllm_validate_poly.py:
                     TEXP = 90, TMEAN = 10, TMEDIAN = 8): a chunk fails with fewer than 90 of 128
                     exponents matching, or mantissa error mean > 10 or median > 8 (bf16 mantissa
                     units, over the values whose exponent matched). Any failing chunk rejects.
- `LogprobRankCheck` Nineteen (SN19) and Targon v5 (SN4) style: the prover reports its logprob of
                     each output token; Nineteen: mean |p_val - p_miner| <= 0.125 scores 1, > 0.25
                     scores 0 (reject), in between partial (passes here), and each token's rank
                     (1 = most likely) must be < 10 / (1.03 - T); Targon v5: reject on any token
                     logprob <= -13, or 5 or more tokens <= -8. Caught if either system rejects.
- `DifrCheck`        DiFR style (arXiv 2511.20621): the verifier redraws every token with the
                     claimed model under the same seeded Gumbel-max sampler (given the claimed
                     prefix) and flags the output when fewer than 98 % of tokens match.
- `MaxwellL4Check`   this project's L4: `measure_generation` + `token_choice` and
                     `fingerprints_match` under a calibrated tolerance (cross- or same-class).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np
import torch

from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import ReceiptClaims
from maxwell_poi.registry.forward import prefill
from maxwell_poi.registry.models import LoadedModel
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.verifier.audit import fingerprints_match, measure_generation, token_choice
from maxwell_poi.verifier.thresholds import Tolerance


@dataclass(frozen=True)
class Generation:
    """One answered lease as the verifier receives it."""

    lease: Lease
    prompt_ids: list[int]
    tokens: list[int]

    @property
    def job(self) -> GenerateJob:
        assert isinstance(self.lease.job, GenerateJob)
        return self.lease.job


@dataclass(frozen=True)
class ProverView:
    """What the prover's own model produced for the output it returns."""

    hidden: torch.Tensor  # final hidden states [P + N - 1, d], after the last norm
    logits: torch.Tensor  # [N, V]: the logits each output token was chosen from
    claims: ReceiptClaims | None = None  # Maxwell's signed claims (L4 only)


@dataclass(frozen=True)
class Verdict:
    caught: bool
    reason: str
    rules: dict[str, bool] = field(default_factory=dict)  # per sub-rule: did it reject?
    stats: dict[str, float] = field(default_factory=dict)  # what the decision was taken on


def _decide(reason: str, rules: dict[str, bool], stats: dict[str, float]) -> Verdict:
    return Verdict(any(rules.values()), reason, rules, stats)


# ---------------------------------------------------------------------------------------------
# TOPLOC


def load_toploc() -> tuple[ModuleType | None, str]:
    """(the `toploc` module, '') or (None, why it cannot be used)."""
    try:
        import toploc  # optional extra: the PyPI wheel is built for another torch
    except Exception as exc:  # ImportError, or an undefined symbol from the C extension
        return None, f"import toploc failed: {type(exc).__name__}: {exc}"
    return toploc, ""


class _KeepThreads:
    """toploc's C helpers call omp_set_num_threads(all cores); give torch its count back."""

    def __enter__(self) -> None:
        self.threads = torch.get_num_threads()

    def __exit__(self, *_exc: object) -> None:
        torch.set_num_threads(self.threads)


class ToplocCheck:
    name = "toploc"
    TOPK = 128
    DECODE_BATCH = 32
    MIN_EXP_MATCHES = 90  # of TOPK
    MAX_MANT_MEAN = 10.0
    MAX_MANT_MEDIAN = 8.0

    def __init__(self, toploc: ModuleType) -> None:
        self.toploc = toploc

    @staticmethod
    def activations(hidden: torch.Tensor, prompt_len: int) -> list[torch.Tensor]:
        """TOPLOC's layout: the prefill [P, d] then one [d] row per decode step, in bf16 (its
        proofs carry bf16 bits; our fp32 states are rounded to bf16 as a bf16 server's would be)."""
        h = hidden.detach().to(torch.bfloat16).contiguous()
        return [h[:prompt_len], *h[prompt_len:].unbind(0)]

    def chunks(self, gen: Generation) -> int:
        decode = max(len(gen.tokens) - 1, 0)
        return 1 + math.ceil(decode / self.DECODE_BATCH)

    def prove(self, gen: Generation, view: ProverView) -> list[bytes]:
        with _KeepThreads():
            return self.toploc.build_proofs_bytes(
                self.activations(view.hidden, len(gen.prompt_ids)),
                decode_batching_size=self.DECODE_BATCH,
                topk=self.TOPK,
                skip_prefill=False,
            )

    @staticmethod
    def wire_bytes(sent: list[bytes]) -> int:
        return sum(len(p) for p in sent)

    def verify(self, reference: LoadedModel, gen: Generation, sent: list[bytes]) -> Verdict:
        hidden, _ = prefill(reference, gen.prompt_ids, gen.tokens)
        if len(sent) != self.chunks(gen):
            return Verdict(
                True, f"expected {self.chunks(gen)} proofs, got {len(sent)}", {"proof_count": True}
            )
        with _KeepThreads():
            results = self.toploc.verify_proofs_bytes(
                self.activations(hidden, len(gen.prompt_ids)),
                sent,
                decode_batching_size=self.DECODE_BATCH,
                topk=self.TOPK,
                skip_prefill=False,
            )
        matches = [self.TOPK - r.exp_mismatches for r in results]
        means = [float(r.mant_err_mean) for r in results]
        medians = [float(r.mant_err_median) for r in results]
        rules = {
            "exp_matches": min(matches) < self.MIN_EXP_MATCHES,
            "mant_err_mean": max(means) > self.MAX_MANT_MEAN,
            "mant_err_median": max(medians) > self.MAX_MANT_MEDIAN,
        }
        stats = {
            "min_exp_matches": min(matches),
            "max_mant_mean": max(means),
            "max_mant_median": max(medians),
        }
        reason = (
            f"worst chunk: {min(matches)}/{self.TOPK} exponents match (need >= {self.MIN_EXP_MATCHES}), "
            f"mantissa error mean {max(means):.3g} (<= {self.MAX_MANT_MEAN:g}), "
            f"median {max(medians):.3g} (<= {self.MAX_MANT_MEDIAN:g})"
        )
        return _decide(reason, rules, stats)


# ---------------------------------------------------------------------------------------------
# Nineteen / Targon logprob re-query


def token_logprobs(logits: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """log p(token) under the model's own (temperature 1) distribution, per position, float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1)


class LogprobRankCheck:
    name = "logprob_rank"
    NINETEEN_FULL = 0.125  # mean distance at or below: score 1
    NINETEEN_ZERO = 0.25  # above: score 0 (rejected); between: partial score, counted as a pass
    TARGON_ANY = -13.0  # any token logprob at or below: reject
    TARGON_SOME = -8.0  # this many or more tokens at or below: reject
    TARGON_COUNT = 5

    @staticmethod
    def rank_limit(temperature: float) -> float:
        """Nineteen: a token's rank (1 = most likely) must be below 10 / (1.03 - T)."""
        return 10.0 / (1.03 - temperature) if temperature < 1.03 else math.inf

    def prove(self, gen: Generation, view: ProverView) -> np.ndarray:
        """The prover's own logprob of each output token (what an OpenAI-style API returns)."""
        return token_logprobs(view.logits, gen.tokens).cpu().numpy().astype(np.float32)

    @staticmethod
    def wire_bytes(sent: np.ndarray) -> int:
        return int(sent.nbytes)

    def verify(self, reference: LoadedModel, gen: Generation, sent: np.ndarray) -> Verdict:
        _, logits = prefill(reference, gen.prompt_ids, gen.tokens)
        logits = logits.float()
        ids = torch.tensor(gen.tokens).unsqueeze(1)
        mine = token_logprobs(logits, gen.tokens).numpy().astype(np.float64)
        ranks = (1 + (logits > logits.gather(1, ids)).sum(dim=1)).numpy()
        theirs = np.asarray(sent, dtype=np.float64)
        if theirs.shape != mine.shape:
            return Verdict(True, f"expected {len(mine)} logprobs, got {theirs.shape}", {"shape": True})
        distance = np.minimum(np.abs(np.exp(mine) - np.exp(theirs)), 1.0)
        mean_distance = float(np.where(np.isfinite(distance), distance, 1.0).mean())
        limit = self.rank_limit(gen.job.temperature)
        low = int((mine <= self.TARGON_SOME).sum())
        rules = {
            "nineteen_distance": mean_distance > self.NINETEEN_ZERO,
            "nineteen_rank": bool((ranks >= limit).any()),
            "targon_v5": bool((mine <= self.TARGON_ANY).any()) or low >= self.TARGON_COUNT,
        }
        stats = {
            "mean_distance": mean_distance,
            "nineteen_partial": float(self.NINETEEN_FULL < mean_distance <= self.NINETEEN_ZERO),
            "max_rank": int(ranks.max()),
            "rank_limit": limit,
            "min_logprob": float(mine.min()),
            "tokens_at_or_below_-8": low,
        }
        reason = (
            f"mean |p_val - p_prover| {mean_distance:.3g} (reject > {self.NINETEEN_ZERO}), max rank "
            f"{int(ranks.max())} (must be < {limit:.3g}), min logprob {mine.min():.3g}, {low} tokens <= "
            f"{self.TARGON_SOME:g} (reject at {self.TARGON_COUNT}, or any <= {self.TARGON_ANY:g})"
        )
        return _decide(reason, rules, stats)


# ---------------------------------------------------------------------------------------------
# DiFR same-seed token comparison


class DifrCheck:
    name = "difr"
    MIN_MATCH = 0.98  # DiFR: honest reruns match on > 98 % of tokens

    def prove(self, gen: Generation, view: ProverView) -> None:
        return None  # nothing beyond the output: the seed is the lease's

    @staticmethod
    def wire_bytes(sent: None) -> int:
        return 0

    def verify(self, reference: LoadedModel, gen: Generation, sent: None = None) -> Verdict:
        _, logits = prefill(reference, gen.prompt_ids, gen.tokens)
        sampler = SeededSampler(gen.lease.seed_bytes, gen.job.temperature, gen.job.top_k)
        redrawn = [sampler.choose(logits[i], i) for i in range(len(gen.tokens))]
        matches = sum(a == b for a, b in zip(redrawn, gen.tokens, strict=True))
        rate = matches / len(gen.tokens)
        reason = (
            f"{matches}/{len(gen.tokens)} tokens match the same-seed redraw (flag below {self.MIN_MATCH:.0%})"
        )
        return _decide(reason, {"match_rate": rate < self.MIN_MATCH}, {"match_rate": rate})


# ---------------------------------------------------------------------------------------------
# Maxwell L4


class MaxwellL4Check:
    name = "maxwell_l4"

    def __init__(self, tolerance: Tolerance) -> None:
        self.tol = tolerance

    def prove(self, gen: Generation, view: ProverView) -> ReceiptClaims:
        if view.claims is None:
            raise ValueError("maxwell_l4 needs the prover's signed claims")
        return view.claims

    @staticmethod
    def wire_bytes(sent: ReceiptClaims) -> int:
        return len(sent.fingerprint_bytes())

    def verify(self, reference: LoadedModel, gen: Generation, sent: ReceiptClaims) -> Verdict:
        if sent.tokens() != gen.tokens:
            return Verdict(True, "claims' output is not the output received", {"output": True})
        m = measure_generation(gen.lease, sent, reference, self.tol.logit_tol)
        tokens, prints = token_choice(m, self.tol), fingerprints_match(m.chunks, self.tol)
        rules = {"token_choice": tokens is not None, "fingerprints": prints is not None}
        stats = {"max_gap": m.max_gap, "worst_close": m.worst_close, "worst_median_rel": m.worst_median_rel}
        first = tokens or prints
        return _decide(first.reason if first else "tokens and fingerprints within tolerance", rules, stats)


CHECKS: tuple[str, ...] = ("toploc", "logprob_rank", "difr", "maxwell_l4")


def summary(values: list[float]) -> dict[str, Any]:
    """min / median / max of a statistic over trials (JSON-friendly)."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return {"n": len(values)}
    return {
        "n": len(values),
        "min": min(finite),
        "median": statistics.median(finite),
        "max": max(finite),
    }
