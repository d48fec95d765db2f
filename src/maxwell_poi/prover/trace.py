"""Records the activation trace L3 audits (protocol.trace: which tensors, how they are committed):
forward hooks on a GPT-2 or Llama model's blocks and their linear operations (registry.blocks), over
every position computed.

Trust note: the hooks run in the agent's process; what they record is a claim, which L3 checks.
"""

from __future__ import annotations

import torch

from ..protocol.trace import OUT, Trace
from ..registry.blocks import linears, require_architecture
from ..registry.models import LoadedModel
from ..registry.unrecorded import recorded


class TraceRecorder:
    """Forward hooks on a model's blocks and their linear operations; keeps batch row `row`.
    Use as a context manager so the hooks go even when generation fails."""

    def __init__(self, model: LoadedModel, row: int = 0) -> None:
        self.arch = require_architecture(model)  # ValueError for blocks the trace does not cover
        self.row = row
        self.blocks = len(model.layers)
        self._parts: dict[tuple[int, str], list[torch.Tensor]] = {}
        self._handles = []
        for b, block in enumerate(model.layers):
            self._handles.append(block.register_forward_pre_hook(self._keep_input(b), with_kwargs=True))
            for op, module in linears(block).items():
                self._handles.append(module.register_forward_hook(self._keep_output(b, op)))
        last = model.layers[-1]
        self._handles.append(last.register_forward_hook(self._keep_output(self.blocks - 1, OUT)))

    def _keep(self, key: tuple[int, str], tensor: torch.Tensor) -> None:
        if not recorded():
            return
        self._parts.setdefault(key, []).append(tensor[self.row].detach().to(torch.float32).cpu())

    def _keep_input(self, block: int):
        def hook(_module, args, kwargs):  # noqa: ANN001, ANN202 - torch's hook signature
            hidden = args[0] if args else kwargs["hidden_states"]
            self._keep((block, "x"), hidden)

        return hook

    def _keep_output(self, block: int, op: str):
        def hook(_module, _inputs, output):  # noqa: ANN001, ANN202
            self._keep((block, op), output[0] if isinstance(output, tuple) else output)

        return hook

    def trace(self) -> Trace:
        return Trace({k: torch.cat(v).numpy() for k, v in self._parts.items()}, self.blocks)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> TraceRecorder:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
