"""Shared plumbing for adversary programs: argument parsing, and a Prover whose model is swapped.

The cheat itself lives in each program; this module only saves them repeating the harness.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..protocol.keys import AgentKey
from ..protocol.lease import Lease
from ..prover.harness import one_at_a_time, quiet_libraries, serve_one, serve_resident
from ..prover.sdk import Prover
from ..registry.models import LoadedModel, Registry


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--key", type=Path, required=True, help="this agent's private key (PEM)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--resident", action="store_true", help="answer lease after lease until stdin closes")
    p.add_argument(
        "--trace-dir", type=Path, default=None, help="keep activation traces and answer L3 challenges"
    )
    return p


class SwappedProver(Prover):
    """Runs the honest pipeline on `swap(lease)`'s model while claiming the leased model."""

    def __init__(self, key: AgentKey, swap: Callable[[Lease, Registry], LoadedModel], **kw) -> None:
        super().__init__(key, **kw)
        self._swap = swap

    def model_for(self, lease: Lease) -> LoadedModel:
        return self._swap(lease, self.registry)


def run(
    args: argparse.Namespace,
    make_answer: Callable[[AgentKey], Callable[[Lease], bytes]],
    opener: Callable[[bytes], bytes] | None = None,
    prober: Callable[[bytes], bytes] | None | Literal["leased"] = "leased",
) -> None:
    """`opener`: answers L3 challenges (a prover keeping traces); None refuses them. `prober`:
    answers Maxwell's work probes; "leased" (the default) answers them honestly with the leased
    model, as a cheat that holds real weights could; None answers that it cannot (no weights)."""
    quiet_libraries()
    key = AgentKey.load(args.key)
    honest = Prover(key) if prober == "leased" else None
    if honest is not None:
        prober = honest.probe_line
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    answer = make_answer(key)
    if honest is not None:
        answer = _loading_first(answer, honest)
    resident = serve_resident(one_at_a_time(answer), opener=opener, prober=prober) if args.resident else None
    sys.exit(serve_one(answer) if resident is None else resident)


def _loading_first(answer: Callable[[Lease], bytes], honest: Prover) -> Callable[[Lease], bytes]:
    """Load the leased model for the probes on the main thread before the lease starts: a seeded
    built-in model is made from the process-wide torch RNG, and a cheat that draws random numbers
    while a probe thread builds it (the power burner's matrices) would build other weights."""

    def answer_after_loading(lease: Lease) -> bytes:
        honest.model_for(lease)
        return answer(lease)

    return answer_after_loading


def run_modified(args: argparse.Namespace, modify: Callable[[LoadedModel], LoadedModel]) -> None:
    """Serve leases with the honest pipeline on `modify(leased model)`, claiming the original. With
    --trace-dir it keeps the (faithful) trace of its modified run and opens it when challenged."""
    made: dict[str, LoadedModel] = {}  # modified once per model, not per lease

    def swap(lease: Lease, registry: Registry) -> LoadedModel:
        if lease.model_id not in made:
            made[lease.model_id] = modify(registry.load(lease.model_id))
        return made[lease.model_id]

    trace_dir = getattr(args, "trace_dir", None)
    prover = SwappedProver(AgentKey.load(args.key), swap, trace_dir=trace_dir)
    # the probe runs on the model it serves: this cheat does not keep the honest weights beside it
    run(args, lambda _key: prover.run, prover.open_line if trace_dir else None, prover.probe_line)
