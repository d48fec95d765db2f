"""Hooks that watch a model's activations, and the commitments built from them.

Trust note: these hooks run inside the agent's process, so what they record is the agent's
claim. The verifier never trusts them; it recomputes (L4). In production the Observer side of
Maxwell sees the bus (GPU driver shim in the VMM, mediated device), not these hooks.
"""

from __future__ import annotations

from collections.abc import Callable

import blake3
import torch
from pymerkle import InmemoryTree

from ..registry.fingerprint import encode_chunk
from ..registry.models import LoadedModel
from ..registry.unrecorded import recorded


def _first_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


class ActivationRecorder:
    """Forward hooks on every block and on the final norm; keeps one batch row, position by position.

    Use as a context manager so the hooks are removed even when generation fails.

    For a row of a left-padded batch: `skip` leading positions of each pass are left out (the
    row's pads in the prefill; set it back to 0 for the decode steps), and `active = False`
    stops recording (a row that has finished while the batch decodes on).
    """

    def __init__(self, model: LoadedModel, row: int = 0, *, skip: int = 0) -> None:
        self.row = row
        self.skip = skip
        self.active = True
        self._layers: list[list[torch.Tensor]] = [[] for _ in model.layers]
        self._final: list[torch.Tensor] = []
        self._handles = [
            block.register_forward_hook(self._keep_layer(i)) for i, block in enumerate(model.layers)
        ]
        # Encoders without a final norm (BERT) use the last block's output as the final state.
        self._final_from_last = model.final_norm is None
        if model.final_norm is not None:
            self._handles.append(model.final_norm.register_forward_hook(self._keep_final))

    def _keep_layer(self, index: int):
        last = index == len(self._layers) - 1

        def hook(_module: torch.nn.Module, _inputs: object, output: object) -> None:
            if not self.active or not recorded():
                return
            t = _first_tensor(output)[self.row, self.skip :].detach()
            self._layers[index].append(t)
            if last and self._final_from_last:
                self._final.append(t)

        return hook

    def _keep_final(self, _module: torch.nn.Module, _inputs: object, output: object) -> None:
        if self.active and recorded():
            self._final.append(_first_tensor(output)[self.row, self.skip :].detach())

    @property
    def pending(self) -> int:
        return sum(t.shape[0] for t in self._final)

    def take(self, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Remove and return the first n recorded positions: (final [n, d], per-layer [n, d])."""
        final = torch.cat(self._final)
        layers = [torch.cat(buf) for buf in self._layers]
        self._final = [final[n:]] if final.shape[0] > n else []
        self._layers = [[t[n:]] if t.shape[0] > n else [] for t in layers]
        return final[:n], [t[:n] for t in layers]

    def discard_last(self, n: int) -> None:
        """Forget the last n recorded positions (a speculative pass's refused proposals)."""
        if n <= 0:
            return
        if n > self.pending:
            raise ValueError(f"cannot discard {n} positions, {self.pending} recorded")
        keep = self.pending - n
        self._final = [torch.cat(self._final)[:keep]]
        self._layers = [[torch.cat(buf)[:keep]] for buf in self._layers]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class CommitmentBuilder:
    """Builds the receipt's commitments, chunk by chunk.

    - fingerprints: top-k of the final hidden state per chunk (tolerant; checked by L4);
    - per-layer digests: blake3(nonce || chunk || layer || float16 activations), gathered in a
      Merkle tree (pymerkle, RFC 6962 hashing) whose root goes in the receipt. The agent keeps
      the leaves so a dispute can bisect to one layer later.
    """

    def __init__(self, nonce: bytes, k: int, on_chunk: Callable[[int, bytes], None] | None = None) -> None:
        self.nonce = nonce
        self.k = k
        self.on_chunk = on_chunk  # streams each chunk as it is made (prover.stream.chunk_sink_for)
        self.chunks: list[bytes] = []
        self.leaves: list[bytes] = []
        self._tree = InmemoryTree(algorithm="sha256")

    def add(self, final: torch.Tensor, layers: list[torch.Tensor]) -> None:
        index = len(self.chunks)
        self.chunks.append(encode_chunk(final, self.k))
        if self.on_chunk is not None:
            self.on_chunk(index, self.chunks[-1])
        for layer, acts in enumerate(layers):
            h = blake3.blake3(self.nonce)
            h.update(index.to_bytes(4, "little") + layer.to_bytes(4, "little"))
            h.update(acts.to(torch.float16).contiguous().cpu().numpy().tobytes())
            leaf = h.digest()
            self.leaves.append(leaf)
            self._tree.append_entry(leaf)

    def drain(self, recorder: ActivationRecorder, n: int | None = None) -> None:
        """Commit the next n recorded positions (all pending ones by default)."""
        n = recorder.pending if n is None else n
        if n:
            self.add(*recorder.take(n))

    @property
    def fingerprint_bytes(self) -> bytes:
        return b"".join(self.chunks)

    @property
    def layer_root(self) -> str:
        return self._tree.get_root().hex() if self.leaves else blake3.blake3(self.nonce).hexdigest()
