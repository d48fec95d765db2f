"""Adversary agents: real programs that each actually do their cheat, for the test suite and demo.

Each module is runnable as `python -m maxwell_poi.adversaries.<name> --key KEY [options]` and
speaks the same stdin/stdout protocol as the honest agent (`poi agent`). The catalogue below
maps attack classes (design.md section 4) to the program and options that carry them out.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..protocol.result import LayerName


@dataclass(frozen=True)
class Attack:
    name: str  # attack class, as reported by `poi demo`
    module: str  # maxwell_poi.adversaries.<module>
    summary: str
    args: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ("generate",)  # which jobs it applies to
    needs_priming: bool = False  # must have answered one earlier lease honestly first
    must_catch: tuple[LayerName, ...] = (LayerName.AUDIT,)  # layers that must each reject it
    reason_has: str = ""  # a fragment the rejection reason must contain
    needs_gpu: bool = False  # runs only where CUDA is available
    batch: int = 1  # leases handed to the (resident) agent at once
    # greedy leases (temperature 0), each its own prompt: Maxwell's scheduler answers an identical
    # greedy job from the lease of its twin (service.market: a cached bid), so no batch holds two
    greedy: bool = False
    pause_s: float = 0.0  # idle gap before the judged lease (after the priming one)
    needs_worker: bool = False  # forwards its leases to an honest relay worker outside its sandbox


# fmt: off
L0, L1, L2, L4 = (LayerName.INTEGRITY,), (LayerName.THERMODYNAMIC,), (LayerName.BOUNDARY,), (LayerName.AUDIT,)
CATALOGUE: list[Attack] = [
    Attack("smaller-model", "substitute_model", "runs a much smaller model, claims the leased one",
           ("--substitute", "{small}")),
    Attack("other-weights", "substitute_model", "same architecture, other weights (seed 1)",
           ("--substitute", "{alt}")),
    Attack("perturbed-weights", "perturbed_weights", "weights with ~1% multiplicative noise",
           ("--noise", "0.01")),
    Attack("precision-bf16", "precision_downgrade", "runs bfloat16 weights while claiming fp32",
           ("--dtype", "bf16"), kinds=("generate", "embed")),
    Attack("precision-int8", "precision_downgrade", "int8-rounded weights while claiming fp32",
           ("--dtype", "int8")),
    Attack("prompt-alteration", "prompt_alteration", "answers an altered prompt"),
    Attack("output-tampering", "output_tampering", "changes output tokens after generating",
           must_catch=L2 + L4, reason_has="differ from the"),
    Attack("replay-old-receipt", "replay", "returns a receipt from an earlier lease verbatim",
           ("--store", "{store}"), needs_priming=True, must_catch=L0, reason_has="lease id"),
    Attack("old-answer-new-nonce", "resign_old_answer",
           "re-signs an earlier answer under the new lease and nonce", ("--store", "{store}"),
           needs_priming=True, must_catch=L1 + L2 + L4, reason_has="token choice"),
    Attack("fabricated-fingerprints", "fabricated_fingerprints", "cheap tokens plus invented fingerprints",
           ("--substitute", "{small}")),
    Attack("skipped-layers", "skipped_layers", "early exit: runs only the first half of the layers",
           kinds=("generate", "embed")),
    Attack("cheap-draft", "cheap_draft",
           "a small model decodes, the leased model only prefills to build fingerprints",
           ("--draft", "{small}"), reason_has="token choice"),
    Attack("mid-stream-switch", "mid_switch",
           "decodes half the answer honestly, then a small model continues; the leased model prefills",
           ("--draft", "{small}"), reason_has="token choice"),
    Attack("forged-signature", "forged_signature", "signs with a key that is not the agent's",
           must_catch=L0, reason_has="not in the keyring"),
    Attack("other-agents-lease", "lease_thief", "an enrolled agent answers a lease issued to another agent",
           must_catch=L0, reason_has="enrolled agent 'mallory'"),
    Attack("sleeper", "sleeper", "sleeps; streams random tokens at an honest pace; invented receipt",
           ("--sleep", "1"), must_catch=L1 + L4, reason_has="CPU"),  # physics floor or work check
    Attack("busy-loop", "busy_loop", "spins a core between paced random tokens; never loads the model",
           must_catch=L1 + L4),
    Attack("cpu-miner", "cpu_miner", "SHA-256 mining on every core between paced random tokens",
           must_catch=L1 + L4),
    # it holds the leased weights to answer the work probe, so L1's memory floor and L2's probe
    # pass it as they should (its CPU and memory are real); only the audit sees whose answer it is
    Attack("power-burner", "power_burner",
           "burns matmuls to look busy and holds the leased weights, answers from a small model at "
           "the leased model's pace", ("--substitute", "{small}"), must_catch=L4),
    Attack("fast-fabricator", "fast_fabricator", "streams an invented answer at once, faster than physics",
           must_catch=L1 + L2 + L4),
    Attack("gpu-miner", "gpu_miner", "integer-hash kernel on the GPU between paced random tokens",
           must_catch=L1 + L4, needs_gpu=True),
    Attack("relay", "relay",
           "forwards each lease to an honest worker outside its sandbox, re-signs the answer",
           ("--upstream", "{upstream}"), kinds=("generate",), needs_worker=True, must_catch=L1,
           reason_has="CPU"),
    Attack("padded-relay", "relay",
           "relays each lease, burns the sandbox's cores and holds memory meanwhile (L1 sees work)",
           ("--upstream", "{upstream}", "--pad-cores", "2", "--hold-mb", "1024"), kinds=("generate",),
           needs_worker=True, must_catch=L2, reason_has="work probe"),
    Attack("batch-copier", "batch_copier",
           "handed 2 greedy leases in one batch, computes 1 and copies its answer to the other",
           ("--max-batch", "2"), batch=2, greedy=True, must_catch=L4, reason_has="token choice"),
    Attack("moonlighter", "moonlighter",
           "answers honestly, but a child escaped from its process tree mines between leases",
           needs_priming=True, pause_s=1.0, must_catch=L1, reason_has="between leases"),
    Attack("malformed-receipt", "malformed", "returns a truncated receipt", ("--mode", "truncated"),
           must_catch=L0, reason_has="DSSE envelope"),
    Attack("oversized-receipt", "malformed", "floods the channel with an oversized receipt",
           ("--mode", "oversized"), must_catch=L0, reason_has="at most"),
]
# fmt: on


@dataclass(frozen=True)
class EconomicAttack:
    """A cheat on the economics rather than on one receipt: no layer is expected to reject every
    lease it serves (some of its leases are honest, or its answers are), so it is not in CATALOGUE
    (tests/test_adversaries.py asserts a catch for each entry there). What it earns against honest
    serving is measured through the control plane by bench/economics/profit.py
    (bench/results/operation.json `profit_*`); tests/test_economic_adversaries.py checks that each
    really does its cheat."""

    name: str
    module: str
    summary: str
    args: tuple[str, ...] = ()
    batch: int = 1  # leases the node hands the agent at once
    caught_by: str = ""  # what catches the leases it cheats on, as measured (profit_* in operation.json)


# fmt: off
ECONOMIC: list[EconomicAttack] = [
    EconomicAttack("probabilistic-substitution", "probabilistic_substitution",
                   "each lease with probability p served by the cheap model (claiming the leased one), "
                   "else honestly", ("--p", "0.3", "--substitute", "{small}", "--seed", "0"),
                   caught_by="its substituted leases, by L1 work per token (and L2 pace) most of the time, "
                             "not all: 10/11, 39/39, 42/64 at p 0.1/0.3/0.5 (gpt2-micro for gpt2-mini, "
                             "busy host); L4 only when the lottery draws one (p 0.00093, default policy)"),
    EconomicAttack("audit-aware", "audit_aware",
                   "substitutes only where its observables suggest no audit; the lease carries no tier, "
                   "stake or audit probability and the draw is made after the receipt, so it is a coin",
                   ("--rate", "0.3", "--substitute", "{small}", "--seed", "0"),
                   caught_by="as probabilistic substitution at the same rate: 20/39 and 31/39 in two "
                             "runs, vs 39/39 and 27/39 for p 0.3 (the spread is host load, not a signal)"),
    EconomicAttack("hidden-batch-rows", "hidden_batch_rows",
                   "answers honestly, with private rows of its own in its forward passes, never streamed",
                   ("--rows", "4"),
                   caught_by="no layer (0/150 with 4 rows, 0/150 with 64): L1 has no ceiling on work per "
                             "token; the private work is billed to the agent at the clearing price, past its "
                             "energy hold from its wallet (ledger.settle_energy): rented, not stolen"),
]
# fmt: on
