"""The W8A8 variant of a GPT-2 model (L3's exact integer mode): its four linear operations per block
run on int8 weights (per output channel) and int8 activations (per position), accumulated in int32,
so their outputs are bit-exact on any hardware and a Freivalds check needs no tolerance.

`quantized(model)` derives the variant deterministically from a registered float model (symmetric,
round to nearest, scales from the weights' own maxima): its weights are fixed by the float model's
digest and the rule here. The prover runs it (prover.w8a8 records its trace); the verifier reads
the same quantized weights from here.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .blocks import linears, replace_linears
from .loaded import LoadedModel
from .unrecorded import recorded

__all__ = ["QMAX", "W8A8Linear", "is_w8a8", "linears", "quantize_blocks", "quantize_rows", "quantized"]

QMAX = 127


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scale per row): x ≈ q · scale, symmetric, round to nearest."""
    scale = (x.abs().amax(dim=-1, keepdim=True) / QMAX).clamp(min=1e-12)
    return torch.round(x / scale).clamp(-QMAX, QMAX).to(torch.int8), scale.to(torch.float32)


class W8A8Linear(nn.Module):
    """Stands in for a GPT-2 Conv1D (y = x·W + b): int8 x, int8 W, int32 accumulation, then scales."""

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        weight = conv.weight.detach().to(torch.float32)  # [in, out]
        q, scale = quantize_rows(weight.T)  # per output channel
        self.register_buffer("weight_q", q.T.contiguous())  # int8 [in, out]
        self.register_buffer("weight_scale", scale.T.contiguous())  # [1, out]
        self.register_buffer("bias", conv.bias.detach().to(torch.float32).clone())
        self.taps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # recorder's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = quantize_rows(x.to(torch.float32))
        acc = x_q.to(torch.int32) @ self.weight_q.to(torch.int32)  # exact: |acc| < 127² · in < 2³¹
        if self.taps is not None and recorded():
            self.taps.append((x_q, acc, x_scale))
        return acc.to(torch.float32) * x_scale * self.weight_scale + self.bias


def quantize_blocks(layers: nn.ModuleList) -> None:
    """Swap every block's linear operations for their W8A8 stand-ins, in place."""
    for block in layers:
        replace_linears(block, W8A8Linear)


def quantized(model: LoadedModel) -> LoadedModel:
    """The W8A8 variant of a GPT-2 model (a copy; the registry's stays float). The registry's
    `<model>-w8a8` entries are the same derivation, registered with their own id and digest."""
    if model.spec.family != "gpt2":
        raise ValueError(f"the W8A8 variant covers GPT-2 blocks so far, not {model.spec.family!r}")
    if is_w8a8(model):
        return model
    variant = model.with_module(copy.deepcopy(model.module))
    quantize_blocks(variant.layers)
    return variant


def is_w8a8(model: LoadedModel) -> bool:
    """Whether the model's blocks run W8A8 (a registered variant, or one derived here)."""
    return isinstance(next(iter(linears(model.layers[0]).values())), W8A8Linear)
