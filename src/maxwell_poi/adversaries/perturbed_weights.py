"""Cheat: weights with small multiplicative noise (a cheaper fine-tune, a corrupted copy)."""

from __future__ import annotations

import copy

import torch

from ..registry.models import LoadedModel
from ._agent import parser, run_modified


def perturbed(model: LoadedModel, noise: float, seed: int = 1234) -> LoadedModel:
    module = copy.deepcopy(model.module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen))
    return model.with_module(module)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--noise", type=float, default=0.01, help="relative noise (0.01 = 1%%)")
    args = p.parse_args()
    run_modified(args, lambda model: perturbed(model, args.noise))


if __name__ == "__main__":
    main()
