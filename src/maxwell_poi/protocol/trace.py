"""The activation trace's wire side (L3): which tensors a block commits to, their leaf digests, the
trace root a receipt carries, and an opening of chosen blocks. The recorder is prover.trace; the
check is verifier.exact.

Per transformer block: the block's input and the output of each of its linear operations, over
every position the model computed (one sequence from its first token, row 0 of a batch), committed
in a Merkle tree whose root the receipt carries (`ReceiptClaims.trace`). Which tensors depends on the
block's architecture (`OPS_BY_ARCH`; registry.blocks says where each lives in a module):

GPT-2 blocks (`OPS`), per block `b` (T positions, width d):

    x      the block's input                         [T, d]
    qkv    attn.c_attn(ln_1(x))                      [T, 3d]
    attn   attn.c_proj(attention context)            [T, d]
    fc     mlp.c_fc(ln_2(x + attn))                  [T, 4d]   (before the activation)
    mlp    mlp.c_proj(gelu(fc))                      [T, d]

Llama blocks (`LLAMA_OPS`; H query heads, G key/value heads of width e, MLP width m):

    x      the block's input                         [T, d]
    q      self_attn.q_proj(input_layernorm(x))      [T, H·e]  (before the rotary embedding)
    k      self_attn.k_proj(input_layernorm(x))      [T, G·e]  (before the rotary embedding)
    v      self_attn.v_proj(input_layernorm(x))      [T, G·e]
    o      self_attn.o_proj(attention context)       [T, d]
    gate   mlp.gate_proj(post_attention_layernorm(x + o))   [T, m]
    up     mlp.up_proj(post_attention_layernorm(x + o))     [T, m]
    down   mlp.down_proj(silu(gate) · up)            [T, d]

and after the last block `out`, its output (the final norm's input). A block's output is the next
block's `x`. Leaves: blake3(nonce || block || op || float32 bytes), in block order then the order
above; the root is RFC 6962 (pymerkle). Opening a block hands over its tensors (and the next
block's `x`) with every leaf digest, so Maxwell recomputes the root and checks each tensor against
its leaf (verifier.exact).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import blake3
from pymerkle import InmemoryTree

if TYPE_CHECKING:
    import numpy as np

OPS = ("x", "qkv", "attn", "fc", "mlp")  # GPT-2
LLAMA_OPS = ("x", "q", "k", "v", "o", "gate", "up", "down")
OPS_BY_ARCH = {"gpt2": OPS, "llama": LLAMA_OPS}
OUT = "out"
LINEAR = ("qkv", "attn", "fc", "mlp")
# exact integer (W8A8) mode: per linear operation its int8 input, int32 accumulator and the input's
# per-position float scale (the block input `x` stays float32)
INT_OPS = ("x", *(f"{op}.{part}" for op in LINEAR for part in ("xq", "acc", "xs")))


def leaf_digest(nonce: bytes, block: int, op: str, tensor: np.ndarray) -> bytes:
    import numpy as np

    h = blake3.blake3(nonce)
    h.update(block.to_bytes(4, "little") + op.encode())
    if np.issubdtype(tensor.dtype, np.integer):  # int8 inputs, int32 accumulators: their own bytes
        h.update(tensor.dtype.str.encode() + np.ascontiguousarray(tensor).tobytes())
    else:
        h.update(np.ascontiguousarray(tensor, dtype="<f4").tobytes())
    return h.digest()


def trace_root(leaves: list[bytes]) -> str:
    tree = InmemoryTree(algorithm="sha256")
    for leaf in leaves:
        tree.append_entry(leaf)
    return tree.get_root().hex()


def leaf_order(blocks: int, ops: tuple[str, ...] = OPS) -> list[tuple[int, str]]:
    return [(b, op) for b in range(blocks) for op in ops] + [(blocks - 1, OUT)]


@dataclass
class Trace:
    """Every traced tensor of one lease, by (block, op), float32 [T, ...]."""

    tensors: dict[tuple[int, str], np.ndarray]
    blocks: int

    @property
    def ops(self) -> tuple[str, ...]:
        """The op set the tensors are of: OPS (GPT-2) or LLAMA_OPS for a float trace, INT_OPS for an
        exact integer (W8A8) one."""
        for ops in (INT_OPS, LLAMA_OPS):
            if (0, ops[1]) in self.tensors:
                return ops
        return OPS

    def leaves(self, nonce: bytes) -> list[bytes]:
        order = leaf_order(self.blocks, self.ops)
        return [leaf_digest(nonce, b, op, self.tensors[(b, op)]) for b, op in order]

    def root(self, nonce: bytes) -> str:
        return trace_root(self.leaves(nonce))

    @property
    def positions(self) -> int:
        return self.tensors[(0, "x")].shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    def block_output(self, block: int) -> np.ndarray:
        return self.tensors[output_key(block, self.blocks)]

    def save(self, path: Path) -> None:
        """Kept by the agent for the dispute window (an uncompressed .npz)."""
        import numpy as np

        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez(buf, **{f"{b}.{op}": t for (b, op), t in self.tensors.items()})
        path.write_bytes(buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> Trace:
        import numpy as np

        with np.load(path) as data:
            tensors = {(int(k.split(".", 1)[0]), k.split(".", 1)[1]): data[k] for k in data.files}
        return cls(tensors, 1 + max(b for b, _ in tensors))


@dataclass(frozen=True)
class Opening:
    """What the agent hands over for a challenge: the opened blocks' tensors (and each one's output)
    and every leaf digest of its trace, so Maxwell can rebuild the committed root."""

    tensors: dict[tuple[int, str], np.ndarray]
    leaves: list[bytes]

    @classmethod
    def of(cls, trace: Trace, nonce: bytes, blocks: list[int]) -> Opening:
        wanted = opening_keys(blocks, trace.blocks, trace.ops)
        return cls({k: trace.tensors[k] for k in wanted}, trace.leaves(nonce))


def output_key(block: int, blocks: int) -> tuple[int, str]:
    """The committed tensor that is block `block`'s output: the next block's input, or the last `out`."""
    return (block + 1, "x") if block + 1 < blocks else (block, OUT)


def opening_keys(blocks: list[int], total: int, ops: tuple[str, ...]) -> list[tuple[int, str]]:
    """What opening these blocks hands over: each block's tensors, then each one's output."""
    keys = [(b, op) for b in blocks for op in ops]
    return keys + [k for k in dict.fromkeys(output_key(b, total) for b in blocks) if k not in keys]


def verify_opening(
    opening: Opening, nonce: bytes, root: str, blocks: int, ops: tuple[str, ...] = OPS
) -> str | None:
    """None if the opening is the committed one; else why not."""
    order = leaf_order(blocks, ops)
    if len(opening.leaves) != len(order):
        return f"opening: expected {len(order)} leaf digests, got {len(opening.leaves)}"
    if trace_root(opening.leaves) != root:
        return "opening: the leaf digests do not rebuild the receipt's trace root"
    index = {k: i for i, k in enumerate(order)}
    for (b, op), tensor in opening.tensors.items():
        if (b, op) not in index:
            return f"opening: a tensor ({b}, {op}) the trace does not have"
        if leaf_digest(nonce, b, op, tensor) != opening.leaves[index[(b, op)]]:
            return f"opening: block {b} {op} differs from the committed tensor"
    return None


def opening_line(lease_id: str, opening: Opening) -> bytes:
    """A resident agent's answer to a challenge (protocol.stream.open_request_line), one line."""
    import numpy as np

    tensors = [
        [b, op, t.dtype.str, list(t.shape), base64.b64encode(np.ascontiguousarray(t).tobytes()).decode()]
        for (b, op), t in opening.tensors.items()
    ]
    body = {"o": lease_id, "t": tensors, "leaves": [leaf.hex() for leaf in opening.leaves]}
    return json.dumps(body, separators=(",", ":")).encode() + b"\n"


ALLOWED_DTYPES = ("<f4", "|i1", "<i4")


def opening_from_line(line: bytes) -> Opening:
    """The opening in an agent's `{"o": ...}` line; ValueError saying what is wrong otherwise."""
    import numpy as np

    try:
        obj = json.loads(line)
        tensors = {}
        for b, op, dtype, shape, data in obj["t"]:
            if dtype not in ALLOWED_DTYPES:
                raise ValueError(f"dtype {dtype!r} (expected one of {ALLOWED_DTYPES})")
            raw = base64.b64decode(data, validate=True)
            array = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape([int(n) for n in shape])
            tensors[(int(b), str(op))] = array.copy()  # writable: the checks hand it to torch
        leaves = [bytes.fromhex(h) for h in obj["leaves"]]
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise ValueError(f"an opening line: {exc}") from None
    return Opening(tensors, leaves)
