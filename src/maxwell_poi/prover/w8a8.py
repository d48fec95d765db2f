"""Records the exact integer mode's activation trace (protocol.trace.INT_OPS) of a W8A8 model
(registry.w8a8): per block the float input, and per linear operation its int8 input, int32
accumulator and per-position scale, tapped inside the quantized modules.

Trust note: recorded in the agent's process; a claim that L3 checks exactly.
"""

from __future__ import annotations

import numpy as np
import torch

from ..protocol.trace import OUT, Trace
from ..registry.blocks import linears
from ..registry.models import LoadedModel
from ..registry.unrecorded import recorded


class IntTraceRecorder:
    """Records an exact-mode trace of a W8A8 model (batch row `row`); a context manager."""

    def __init__(self, model: LoadedModel, row: int = 0) -> None:
        self.row = row
        self.model = model
        self.blocks = len(model.layers)
        self._x: dict[int, list[torch.Tensor]] = {}
        self._out: list[torch.Tensor] = []
        self._handles = [
            block.register_forward_pre_hook(self._keep_input(b), with_kwargs=True)
            for b, block in enumerate(model.layers)
        ]
        self._handles.append(model.layers[-1].register_forward_hook(self._keep_out))
        self._taps: dict[tuple[int, str], list] = {}
        for b, block in enumerate(model.layers):
            for op, module in linears(block).items():
                module.taps = self._taps[(b, op)] = []  # kept here too: close() unhooks the modules

    def _keep_input(self, block: int):
        def hook(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's hook signature
            if not recorded():
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            self._x.setdefault(block, []).append(hidden[self.row].detach().to(torch.float32))

        return hook

    def _keep_out(self, _module, _inputs, output) -> None:  # noqa: ANN001
        if not recorded():
            return
        self._out.append((output[0] if isinstance(output, tuple) else output)[self.row].detach())

    def trace(self) -> Trace:
        tensors: dict[tuple[int, str], np.ndarray] = {}
        for b, block in enumerate(self.model.layers):
            tensors[(b, "x")] = torch.cat(self._x[b]).numpy()
            for op in linears(block):
                taps = self._taps[(b, op)]
                for i, part in enumerate(("xq", "acc", "xs")):
                    tensors[(b, f"{op}.{part}")] = torch.cat([t[i][self.row] for t in taps]).numpy()
        tensors[(self.blocks - 1, OUT)] = torch.cat(self._out).to(torch.float32).numpy()
        return Trace(tensors, self.blocks)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for block in self.model.layers:
            for module in linears(block).values():
                module.taps = None

    def __enter__(self) -> IntTraceRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
