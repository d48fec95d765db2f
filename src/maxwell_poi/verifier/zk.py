"""L3-zk: Maxwell verifies an EZKL proof of one challenged block half and binds it to the receipt.

After the receipt is in, Maxwell draws a block, a half (attn or mlp) and a window of positions
(`draw_challenge`, OS CSPRNG). The agent answers with the opening of that block (protocol.trace)
and a proof made with the proving key of Maxwell's circuit (registry.circuits). Maxwell accepts
only if, in this order:

1. the opening rebuilds the receipt's signed trace root and holds the block's tensors;
2. the proof answers this challenge and verifies under Maxwell's own verification key for this
   model's block (weights fixed in the circuit: another model's keys, or one changed weight, give
   another key and the proof fails here), with Maxwell's settings and SRS;
3. its public inputs equal, exactly, the committed input rows quantized as EZKL does
   (round(v * 2^input_scale)): a proof for any other input is refused;
4. its public outputs (the circuit's fixed-point result) are within tolerance_units(d) units of the
   output scale of the committed output rows.

Tolerance: the circuit's fixed-point layer norm, exp, division and tanh lookups differ from fp32;
bench/zk/ezkl.py measures the honest gap in units of 2^-output_scale (`output_error_units`, scale 12):
attn 1.2 / 8.6 / 13.5 / 120 and mlp 0.6 / 15.9 / 11.7 at d = 16 / 64 / 128 / 384. The tolerance
is 4x the worst honest gap up to the block's width, rounded up to a power of two (TOLERANCE_UNITS);
wider blocks than measured scale it linearly and say so. A committed output off by more is not the
block's output; cheats finer than it are L3-exact's (Freivalds, relative 3e-5) to catch: the
proof's job is the weights, not the last bits.
"""

from __future__ import annotations

import json
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np

from ..circuits.block_circuit import (
    KINDS,
    BlockProof,
    Circuit,
    ZkChallenge,
    block_input,
    block_output,
    check_window,
    quantize,
)
from ..protocol.receipt import ReceiptClaims
from ..protocol.result import LayerName, LayerResult, Status
from ..protocol.trace import OPS, Opening, verify_opening

# width -> tolerance in output units: 4x the worst honest gap measured up to that width
TOLERANCE_UNITS = {128: 64, 384: 512}


def tolerance_units(d: int) -> tuple[float, bool]:
    """(the tolerance for a block of width d, whether d is inside the measured widths)."""
    for width, units in sorted(TOLERANCE_UNITS.items()):
        if d <= width:
            return float(units), True
    width, units = max(TOLERANCE_UNITS.items())
    return units * d / width, False


def draw_challenge(blocks: int, positions: int, tokens: dict[str, int]) -> ZkChallenge:
    """A block, a half and a window, from the OS CSPRNG after the receipt is in. Attention windows
    start at 0 (causal attention reads every earlier position); MLP windows anywhere."""
    kind = KINDS[secrets.randbelow(len(KINDS))]
    width = tokens[kind]
    start = 0 if kind == "attn" else secrets.randbelow(max(positions - width, 0) + 1)
    return ZkChallenge(secrets.randbelow(blocks), kind, start, width)


def appraise_block_proof(
    claims: ReceiptClaims,
    nonce: bytes,
    circuit: Circuit,
    challenge: ZkChallenge,
    blocks: int,
    opening: Opening | None,
    proof: BlockProof | None,
) -> LayerResult:
    """L3-zk for one challenge; FAIL with expected vs got at the first check that does not hold."""
    t0 = time.perf_counter()
    tol, measured = tolerance_units(circuit.width)
    details = {
        "challenge": challenge.as_dict(),
        "logrows": circuit.logrows,
        "tolerance_units": tol,
        "tolerance_measured_at_this_width": measured,
        "srs": "test-only (ezkl.gen_srs)" if circuit.test_srs else "ceremony",
    }
    why = _precheck(claims, nonce, circuit, challenge, blocks, opening, proof)
    if why is None:
        assert opening is not None and proof is not None
        why = _verify(circuit, proof) or _bind(circuit, challenge, opening, proof, details)
    cost = time.perf_counter() - t0
    if why:
        return LayerResult(LayerName.ZK, Status.FAIL, why, cost_s=cost, details=details)
    reason = (
        f"block {challenge.block} {challenge.kind} positions [{challenge.start}, "
        f"{challenge.start + challenge.tokens}) proven (EZKL, logrows {circuit.logrows}) and bound "
        f"to the trace root, output within {details['output_units']:.0f} of {tol:.0f} units"
    )
    return LayerResult(LayerName.ZK, Status.PASS, reason, score=1.0, cost_s=cost, details=details)


def _precheck(claims, nonce, circuit, challenge, blocks, opening, proof) -> str | None:  # noqa: ANN001
    if claims.trace is None:
        return "trace: expected a v3 receipt with a trace root, got none"
    if opening is None or proof is None:
        return f"challenge {challenge.as_dict()}: expected an opening and a proof, got " + (
            "no opening" if opening is None else "no proof"
        )
    if proof.challenge != challenge:
        got = proof.challenge.as_dict()
        return f"proof: expected one for challenge {challenge.as_dict()}, got one for {got}"
    if (circuit.block, circuit.kind, circuit.config.tokens) != (
        challenge.block,
        challenge.kind,
        challenge.tokens,
    ):
        mine = f"{circuit.kind}-b{circuit.block} x{circuit.config.tokens}"
        return (
            f"circuit: expected {challenge.kind}-b{challenge.block} x{challenge.tokens}, Maxwell's is {mine}"
        )
    problem = verify_opening(opening, nonce, claims.trace, blocks)
    if problem:
        return problem
    missing = [op for op in OPS if (challenge.block, op) not in opening.tensors]
    if missing:
        return f"opening: expected block {challenge.block}'s {OPS}, got none for {missing}"
    positions = len(opening.tensors[(challenge.block, "x")])
    return check_window(challenge.kind, challenge.start, challenge.tokens, positions)


def _verify(circuit: Circuit, proof: BlockProof) -> str | None:
    """The SNARK itself, under Maxwell's settings, verification key and SRS (never the agent's)."""
    import ezkl

    with tempfile.TemporaryDirectory(prefix="poi-zk-verify-") as tmp:
        path = Path(tmp) / "proof.json"
        path.write_text(json.dumps(proof.proof))
        try:
            ok = ezkl.verify(
                str(path), str(circuit.path("settings.json")), str(circuit.path("vk")), str(circuit.srs)
            )
        except Exception as exc:  # noqa: BLE001 - EZKL raises RuntimeError or a pyo3 panic on garbage
            ok, err = False, f": {str(exc).splitlines()[0][:160]}"
        else:
            err = ""
    if not ok:
        return (
            f"proof: expected a proof that verifies under Maxwell's key for {circuit.model_id} "
            f"{circuit.kind}-b{circuit.block}, got one that does not{err}"
        )
    return None


def _bind(
    circuit: Circuit, ch: ZkChallenge, opening: Opening, proof: BlockProof, details: dict
) -> str | None:
    """The proof's instances against the committed tensors of the challenged rows."""
    import ezkl

    x = block_input(opening.tensors, ch.block, ch.kind, ch.start, ch.tokens)
    y = block_output(opening.tensors, ch.block, ch.kind, ch.start, ch.tokens)
    try:
        inst = np.array([ezkl.felt_to_int(f) for f in proof.proof["instances"][0]], dtype=np.int64)
    except (KeyError, IndexError, TypeError, ValueError, OverflowError) as exc:
        return f"proof: expected field-element instances, got {exc}"
    if inst.size != x.size + y.size:
        return f"proof: expected {x.size + y.size} public instances (inputs, outputs), got {inst.size}"
    expected = quantize(x, circuit.input_scale).ravel()
    wrong = np.flatnonzero(inst[: x.size] != expected)
    if wrong.size:
        i = int(wrong[0])
        return (
            f"binding: the proof's input is not the committed block {ch.block} {ch.kind} input: "
            f"{wrong.size} of {x.size} values differ, first at {i}: expected {expected[i]}, got {inst[i]}"
        )
    units = np.abs(inst[x.size :] - y.astype(np.float64).ravel() * 2**circuit.output_scale)
    details["output_units"] = float(units.max())
    tol = details["tolerance_units"]
    if not units.max() <= tol:
        return (
            f"binding: the proof's output is not the committed block {ch.block} {ch.kind}: expected within "
            f"{tol:.0f} units of 2^-{circuit.output_scale}, got {units.max():.0f}"
        )
    return None
