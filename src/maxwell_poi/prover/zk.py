"""The agent's side of L3-zk: prove the block half Maxwell challenged (registry.circuits) on the
tensors its trace committed, with the proving key Maxwell's setup published for the model.

The agent feeds the committed input rows as floats; EZKL quantizes them (round(v * 2^scale)), runs
the circuit and proves it. The proof's public instances are those quantized inputs and the
circuit's outputs; Maxwell binds them to the receipt's trace root (verifier.zk).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ..circuits.block_circuit import BlockProof, Circuit, ZkChallenge, block_input, check_window
from ..circuits.capped import CAP_GB, run_capped
from ..protocol.trace import Trace


def prove_block(
    circuit: Circuit,
    tensors: dict[tuple[int, str], np.ndarray],
    challenge: ZkChallenge,
    cap_gb: float = CAP_GB,
) -> BlockProof:
    """Prove `challenge` on the committed tensors; ValueError for a window the circuit cannot take."""
    positions = len(tensors[(challenge.block, "x")])
    problem = check_window(challenge.kind, challenge.start, challenge.tokens, positions)
    if problem or (circuit.block, circuit.kind, circuit.config.tokens) != (
        challenge.block,
        challenge.kind,
        challenge.tokens,
    ):
        raise ValueError(
            problem or f"challenge {challenge} does not fit the circuit {circuit.kind}-b{circuit.block}"
        )
    x = block_input(tensors, challenge.block, challenge.kind, challenge.start, challenge.tokens)
    with tempfile.TemporaryDirectory(prefix="poi-zk-") as tmp:
        work = Path(tmp)
        (work / "input.json").write_text(json.dumps({"input_data": [x.astype(np.float64).ravel().tolist()]}))
        step = run_capped(
            "prove", {"folder": str(circuit.folder), "srs": str(circuit.srs), "work": tmp}, cap_gb
        )
        proof = json.loads((work / "proof.json").read_text())
    return BlockProof(challenge, proof, step)


def prove_from_trace(circuit: Circuit, trace_path: Path, challenge: ZkChallenge) -> BlockProof:
    """What `poi prove-block` does with the trace the agent kept for the dispute window."""
    return prove_block(circuit, Trace.load(trace_path).tensors, challenge)
