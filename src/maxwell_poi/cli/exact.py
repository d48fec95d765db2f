"""`poi audit-exact` (L3: open every block of a lease's activation trace and check it exactly) and
`poi dispute` (bisect the trace to the first block whose committed output does not follow).

Offline, from files: the lease, the agent's v3 receipt, and the trace file the agent kept
(`poi agent --trace-dir DIR` writes DIR/<lease_id>.npz). The trace file plays the agent's answer
to the challenge: every opened tensor is checked against the receipt's signed trace root.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import EXIT_OK, EXIT_REJECTED, JsonOpt, _bad_input, _quiet, _read, app, out

LeaseOpt = Annotated[Path, typer.Option("--lease", help="the lease JSON Maxwell issued")]
ReceiptOpt = Annotated[Path, typer.Option(help="the agent's v3 receipt (DSSE JSON)")]
TraceOpt = Annotated[Path, typer.Option(help="the agent's kept trace (<lease_id>.npz)")]


def _inputs(lease_path: Path, receipt: Path, trace_path: Path) -> tuple[Any, Any, Any, Any]:
    from ..protocol.errors import LeaseFormatError, PoiError
    from ..protocol.lease import GenerateJob, Lease
    from ..protocol.receipt import max_receipt_bytes, open_receipt
    from ..protocol.trace import Trace
    from ..registry.models import Registry

    try:
        lease = Lease.from_json(_read(lease_path, "lease"))
    except LeaseFormatError as exc:
        raise _bad_input(str(exc)) from None
    if not isinstance(lease.job, GenerateJob):
        raise _bad_input("expected a generation lease (activation traces cover generation)")
    registry = Registry()
    try:
        model = registry.load(lease.model_id)
        claims = open_receipt(
            _read(receipt, "receipt"), max_receipt_bytes(lease, model.reference.hidden)
        ).claims
    except PoiError as exc:
        raise _bad_input(str(exc)) from None
    if claims.lease != lease.lease_id:
        raise _bad_input(f"expected a receipt for lease {lease.lease_id}, got one for {claims.lease}")
    try:
        trace = Trace.load(trace_path)
    except (OSError, ValueError, KeyError) as exc:
        raise _bad_input(f"cannot read the trace {trace_path}: {exc}") from None
    return lease, claims, trace, model


@app.command("audit-exact")
def audit_exact(
    lease_path: LeaseOpt,
    receipt: ReceiptOpt,
    trace: TraceOpt,
    per_opening: Annotated[
        int, typer.Option(help="most blocks per opening (0: as many as the relay's byte budget takes)")
    ] = 0,
    json_out: JsonOpt = False,
) -> None:
    """L3: open every block from the trace, in openings as the service asks for them, and check each
    against the signed root and each block with Freivalds + replay. Exit 0 pass, 1 fail, 2 bad input."""
    _quiet()
    from ..protocol.result import Status
    from ..protocol.trace import Opening, opening_keys
    from ..verifier.every_block import appraise_every_block
    from ..verifier.exact import key_for

    lease, claims, kept, model = _inputs(lease_path, receipt, trace)
    if per_opening < 0:
        raise _bad_input(f"--per-opening: expected 0 or more, got {per_opening}")
    leaves = kept.leaves(lease.nonce_bytes)  # the agent's side: computed once, sent with every opening

    def from_file(blocks: list[int]) -> Opening | str:
        if kept.blocks != len(model.layers):
            return f"the trace file has {kept.blocks} blocks, {lease.model_id} has {len(model.layers)}"
        keys = opening_keys(blocks, kept.blocks, kept.ops)
        return Opening({k: kept.tensors[k] for k in keys if k in kept.tensors}, leaves)

    positions = len(model.encode_prompt(lease.job.prompt)) + len(claims.tokens())
    key = key_for(model)  # Maxwell's secret vectors, in the model's mode (float or W8A8)
    result = appraise_every_block(
        claims, lease.nonce_bytes, model, key, from_file, positions=positions, most_blocks=per_opening
    )
    _print(result.as_dict(), json_out, f"L3 {result.status.value}: {result.reason}")
    raise typer.Exit(EXIT_OK if result.status is Status.PASS else EXIT_REJECTED)


@app.command()
def dispute(lease_path: LeaseOpt, receipt: ReceiptOpt, trace: TraceOpt, json_out: JsonOpt = False) -> None:
    """Bisect the trace against Maxwell's own prefill down to one block and one operation. Exit 0
    if the agent wins, 1 if it loses, 2 bad input."""
    _quiet()
    from dataclasses import asdict

    from ..protocol.trace import Opening
    from ..verifier.dispute import bisect, reference_inputs

    lease, claims, kept, model = _inputs(lease_path, receipt, trace)
    if claims.trace is None:
        raise _bad_input("expected a v3 receipt with a trace root (the agent kept no trace)")
    reference = reference_inputs(model, model.encode_prompt(lease.job.prompt), claims.tokens())
    leaves = kept.leaves(lease.nonce_bytes)

    def open_tensors(keys: list[tuple[int, str]]) -> Opening | None:
        if any(k not in kept.tensors for k in keys):
            return None
        return Opening({k: kept.tensors[k] for k in keys}, leaves)

    result = bisect(model, reference, claims.trace, lease.nonce_bytes, open_tensors)
    verdict = "agent wins" if result.agent_wins else "agent loses"
    _print(asdict(result), json_out, f"dispute: {verdict} — {result.reason} (openings at {result.probes})")
    raise typer.Exit(EXIT_OK if result.agent_wins else EXIT_REJECTED)


def _print(data: dict[str, Any], json_out: bool, line: str) -> None:
    if json_out:
        print(json.dumps(data, indent=2, default=str))
    else:
        out.print(line)
