"""`poi prove-block` (the agent proves the block half Maxwell challenged, EZKL) and `poi verify-block`
(Maxwell verifies the proof and binds it to the receipt's trace root: layer L3-zk).

Offline, from files, like `poi audit-exact`: the lease, the agent's v3 receipt, the trace the agent
kept (which plays its opening), and the challenge Maxwell drew (--block, --kind, --start). Keys:
Maxwell sets each circuit up once per model and config under $POI_HOME/circuits/ and publishes the
proving key; in this prototype both sides read that one cache. --allow-test-srs lets a missing SRS
be made by ezkl.gen_srs (test only: production installs a ceremony SRS, registry.circuits).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import EXIT_OK, EXIT_REJECTED, JsonOpt, _bad_input, _quiet, app, out
from .exact import LeaseOpt, ReceiptOpt, TraceOpt, _inputs

BlockOpt = Annotated[int, typer.Option(help="the challenged block")]
KindOpt = Annotated[str, typer.Option(help="attn or mlp")]
StartOpt = Annotated[int, typer.Option(help="first challenged position (attn: 0)")]
ConfigOpt = Annotated[
    str, typer.Option("--config", help='circuit settings as JSON, e.g. {"tokens": 4}; default: the kept ones')
]
TestSrsOpt = Annotated[bool, typer.Option(help="make a test-only SRS with ezkl.gen_srs if none is installed")]


def _config(kind: str, d: int, raw: str) -> Any:
    from ..circuits.block_circuit import KINDS, CircuitConfig, default_config

    if kind not in KINDS:
        raise _bad_input(f"--kind: expected one of {KINDS}, got {kind!r}")
    if not raw:
        return default_config(kind, d)  # type: ignore[arg-type]
    try:
        given = json.loads(raw)
        known = {f.name for f in fields(CircuitConfig)}
        if not isinstance(given, dict) or set(given) - known:
            raise ValueError(f"expected an object with keys among {sorted(known)}")
        return CircuitConfig(**given)
    except (ValueError, TypeError) as exc:
        raise _bad_input(f"--config: {exc}") from None


def _circuit(model: Any, block: int, kind: str, raw: str, allow_test_srs: bool) -> Any:
    from ..circuits.block_circuit import circuit_for
    from ..protocol.errors import PoiError

    if not 0 <= block < len(model.layers):
        raise _bad_input(f"--block: expected 0..{len(model.layers) - 1}, got {block}")
    config = _config(kind, model.reference.hidden, raw)
    try:
        return circuit_for(model, block, kind, config, allow_test_srs=allow_test_srs)
    except PoiError as exc:
        raise _bad_input(str(exc)) from None


@app.command("prove-block")
def prove_block_cmd(
    lease_path: LeaseOpt,
    receipt: ReceiptOpt,
    trace: TraceOpt,
    out_path: Annotated[Path, typer.Option("--out", help="where to write the proof (JSON)")],
    block: BlockOpt = 0,
    kind: KindOpt = "attn",
    start: StartOpt = 0,
    config: ConfigOpt = "",
    allow_test_srs: TestSrsOpt = False,
) -> None:
    """The agent: prove the challenged block half on its committed trace. Exit 0 proven, 2 bad input."""
    _quiet()
    from ..circuits.block_circuit import ZkChallenge
    from ..protocol.errors import PoiError
    from ..prover.zk import prove_block

    _lease, _claims, kept, model = _inputs(lease_path, receipt, trace)
    circuit = _circuit(model, block, kind, config, allow_test_srs)
    challenge = ZkChallenge(block, kind, start, circuit.config.tokens)  # type: ignore[arg-type]
    try:
        proof = prove_block(circuit, kept.tensors, challenge)
    except (ValueError, PoiError) as exc:
        raise _bad_input(str(exc)) from None
    out_path.write_bytes(proof.to_bytes())
    step = proof.prove
    out.print(
        f"proved {kind}-b{block} [{start}, {start + challenge.tokens}) in {step.seconds:.1f} s, peak "
        f"{step.peak_gb:.2f} GiB, proof {proof.proof_bytes} bytes -> {out_path}"
    )


@app.command("verify-block")
def verify_block_cmd(
    lease_path: LeaseOpt,
    receipt: ReceiptOpt,
    trace: TraceOpt,
    proof_path: Annotated[Path, typer.Option("--proof", help="the agent's proof (poi prove-block)")],
    block: BlockOpt = 0,
    kind: KindOpt = "attn",
    start: StartOpt = 0,
    config: ConfigOpt = "",
    allow_test_srs: TestSrsOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Maxwell: verify the proof under its own key and bind it to the receipt. Exit 0 pass, 1 fail,
    2 bad input."""
    _quiet()
    from ..circuits.block_circuit import BlockProof, ZkChallenge
    from ..protocol.result import Status
    from ..protocol.trace import Opening
    from ..verifier.zk import appraise_block_proof

    lease, claims, kept, model = _inputs(lease_path, receipt, trace)
    circuit = _circuit(model, block, kind, config, allow_test_srs)
    challenge = ZkChallenge(block, kind, start, circuit.config.tokens)  # type: ignore[arg-type]
    try:
        proof = BlockProof.from_bytes(proof_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise _bad_input(f"cannot read the proof {proof_path}: {exc}") from None
    opening = Opening.of(kept, lease.nonce_bytes, [block]) if kept.blocks == len(model.layers) else None
    result = appraise_block_proof(
        claims, lease.nonce_bytes, circuit, challenge, len(model.layers), opening, proof
    )
    if json_out:
        print(json.dumps(result.as_dict(), indent=2, default=str))
    else:
        out.print(f"L3-zk {result.status.value}: {result.reason}")
    raise typer.Exit(EXIT_OK if result.status is Status.PASS else EXIT_REJECTED)


def demo_zk_challenge(
    model: Any, lease: Any, receipt: bytes, trace: Any, *, kind: str = "attn", config: Any = None
) -> Any:
    """For `poi demo`: Maxwell draws a block of a high-tier lease, the agent proves its `kind` half
    on the committed trace, Maxwell verifies and binds it. Returns the L3-zk LayerResult (details:
    challenge, prove seconds and peak, proof bytes, SRS kind). Uses a test SRS (ezkl.gen_srs)."""
    import secrets

    from ..circuits.block_circuit import ZkChallenge, circuit_for, default_config
    from ..protocol.receipt import max_receipt_bytes, open_receipt
    from ..protocol.trace import Opening
    from ..prover.zk import prove_block
    from ..verifier.zk import appraise_block_proof

    claims = open_receipt(receipt, max_receipt_bytes(lease, model.reference.hidden)).claims
    block = secrets.randbelow(len(model.layers))
    config = config or default_config(kind, model.reference.hidden)  # type: ignore[arg-type]
    circuit = circuit_for(model, block, kind, config, allow_test_srs=True)  # Maxwell's, cached
    start = 0 if kind == "attn" else secrets.randbelow(trace.positions - config.tokens + 1)
    challenge = ZkChallenge(block, kind, start, config.tokens)  # type: ignore[arg-type]
    proof = prove_block(circuit, trace.tensors, challenge)  # the agent
    opening = Opening.of(trace, lease.nonce_bytes, [block])
    result = appraise_block_proof(
        claims, lease.nonce_bytes, circuit, challenge, len(model.layers), opening, proof
    )
    result.details.update(
        prove_s=proof.prove.seconds,
        prove_peak_gb=proof.prove.peak_gb,
        proof_bytes=proof.proof_bytes,
        width=model.reference.hidden,
    )
    return result
