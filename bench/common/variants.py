"""Honest and cheating provers on one claimed model, in process, for the error-rate benchmarks
(reliability.py, peers.py, detection_floor.py). Each is the real forward pass of a real model;
only the Observer and runner are left out, which add nothing to what L4 measures (L4 reads the
receipt and re-executes; the channel's evidence feeds L1/L2, measured in bench/audit/core.py).

    honest = honest_variants(registry, key)         # name -> Variant
    cheats = attack_variants(registry, key)         # name -> Variant
    claims = variant.claims(lease)                  # what the agent would sign
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from maxwell_poi.adversaries._agent import SwappedProver
from maxwell_poi.adversaries.cheap_draft import DraftProver
from maxwell_poi.adversaries.mid_switch import MidSwitchProver
from maxwell_poi.adversaries.output_tampering import tamper
from maxwell_poi.adversaries.perturbed_weights import perturbed
from maxwell_poi.adversaries.precision_downgrade import downgraded
from maxwell_poi.adversaries.skipped_layers import early_exit
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.receipt import ReceiptClaims, token_output
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.prover.speculative import SpeculativeProver
from maxwell_poi.registry.models import Registry

MODEL, DRAFT, OTHER = "poi-lm", "poi-lm-draft", "poi-lm-init"
PROMPTS = [
    "Return the number of items in a container.",
    "Open the file and return a stream. Raise OSError upon failure.",
    "This module provides access to the mathematical functions",
    "Create a new dictionary with keys from iterable and values set to value.",
    "Parse a URL into six components, returning a 6-item named tuple.",
    "Args:\n    config (PretrainedConfig): the model configuration",
    "The tokenizer converts text into",
    "Convert a string to a floating point number",
    "Return True if the path refers to an existing directory.",
    "Decorator to wrap a function with a memoizing callable",
    "Base class for all exceptions raised by",
    "Compute the softmax of the input tensor along",
]


@dataclass
class Variant:
    """One way of answering a lease: `claims(lease)` runs it (threads set for the run)."""

    name: str
    prover: Prover
    threads: int = 2
    precision: str = "fp32"  # the precision the lease claims
    finish: Callable[[ReceiptClaims, Lease], ReceiptClaims] | None = None  # post-hoc tampering

    def claims(self, lease: Lease) -> ReceiptClaims:
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            claims = self.prover.claims(lease)
        finally:
            torch.set_num_threads(before)
        return self.finish(claims, lease) if self.finish else claims


def honest_variants(registry: Registry, key: AgentKey, draft: str = DRAFT) -> dict[str, Variant]:
    """fp32 at 1 and 2 threads, in a batch of 4, speculative; bf16 compute under a bf16 claim."""
    return {
        "fp32-1thread": Variant("fp32-1thread", Prover(key, registry), threads=1),
        "fp32-2threads": Variant("fp32-2threads", Prover(key, registry), threads=2),
        "fp32-batch4": Variant("fp32-batch4", Prover(key, registry, batch=4), threads=2),
        "fp32-speculative": Variant("fp32-speculative", SpeculativeProver(key, draft, registry=registry)),
        "bf16-claim": Variant("bf16-claim", Prover(key, registry), precision="bf16"),
    }


def swapped(key: AgentKey, registry: Registry, make) -> SwappedProver:
    """A prover that runs `make(reference model)` while claiming the leased model."""
    return SwappedProver(key, lambda lease, reg: make(reg.load(lease.model_id)), registry=registry)


def one_token_changer(registry: Registry) -> Callable[[ReceiptClaims, Lease], ReceiptClaims]:
    """Honest claims with the middle output token replaced by another valid id."""

    def change(claims: ReceiptClaims, lease: Lease) -> ReceiptClaims:
        tokens, vocab = claims.tokens(), registry.reference(lease.model_id).vocab
        return claims.model_copy(
            update={"output": token_output(tamper(tokens, [len(tokens) // 2], vocab), vocab)}
        )

    return change


def attack_variants(
    registry: Registry, key: AgentKey, *, draft: str = DRAFT, other: str = OTHER
) -> dict[str, Variant]:
    """The attack classes the peers table and the reliability benchmark share (all claim fp32)."""

    def swap(make) -> Prover:
        return swapped(key, registry, make)

    return {
        "other-weights": Variant("other-weights", swap(lambda _m: registry.load(other))),
        "smaller-model": Variant("smaller-model", swap(lambda _m: registry.load(draft))),
        "noise-1%": Variant("noise-1%", swap(lambda m: perturbed(m, 0.01))),
        "noise-0.1%": Variant("noise-0.1%", swap(lambda m: perturbed(m, 0.001))),
        "bf16-downgrade": Variant("bf16-downgrade", swap(lambda m: downgraded(m, "bf16"))),
        "int8-downgrade": Variant("int8-downgrade", swap(lambda m: downgraded(m, "int8"))),
        "skipped-layers": Variant("skipped-layers", swap(lambda m: early_exit(m, 0.5))),
        "cheap-draft": Variant("cheap-draft", DraftProver(key, draft, registry=registry)),
        "one-token-changed": Variant(
            "one-token-changed", Prover(key, registry), finish=one_token_changer(registry)
        ),
        "mid-stream-switch": Variant("mid-stream-switch", MidSwitchProver(key, draft, registry=registry)),
    }
