"""Cheat: run at lower precision (bfloat16 weights and activations, or int8-rounded weights)
while the lease and the receipt say fp32."""

from __future__ import annotations

import copy

import torch

from ..prover.sdk import with_dtype
from ..registry.models import LoadedModel
from ._agent import parser, run_modified


def int8_rounded(model: LoadedModel) -> LoadedModel:
    """Symmetric per-output-row int8 quantise-dequantise of every matrix (weight-only int8)."""
    module = copy.deepcopy(model.module)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() == 2:
                scale = p.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
                p.copy_(torch.round(p / scale).clamp(-127, 127) * scale)
    return model.with_module(module)


def downgraded(model: LoadedModel, dtype: str) -> LoadedModel:
    return with_dtype(model, torch.bfloat16) if dtype == "bf16" else int8_rounded(model)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--dtype", choices=["bf16", "int8"], required=True)
    args = p.parse_args()
    run_modified(args, lambda model: downgraded(model, args.dtype))


if __name__ == "__main__":
    main()
