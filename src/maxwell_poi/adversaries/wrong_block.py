"""Cheat: one transformer block runs other weights (a patched or cheaper block), the rest honest.

Everything else is the honest pipeline — the agent even keeps a faithful activation trace of what it
ran (`--trace-dir`) and opens it when challenged, so L3 sees a trace whose blocks all follow from
their inputs except the changed one: caught when a challenge draws that block, and named by a
dispute's bisection when L4 disagrees.
"""

from __future__ import annotations

import copy

import torch

from ..registry.models import LoadedModel
from ._agent import parser, run_modified


def one_block_changed(model: LoadedModel, block: int, noise: float, seed: int = 1234) -> LoadedModel:
    """A copy whose block `block` (negative counts from the end) has multiplicative weight noise."""
    module = copy.deepcopy(model.module)
    changed = model.with_module(module)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in changed.layers[block].parameters():
            p.mul_(1 + noise * torch.randn(p.shape, generator=gen))
    return changed


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--block", type=int, default=-1, help="which block (default the last)")
    p.add_argument("--noise", type=float, default=0.05, help="relative noise on its weights (0.05 = 5%%)")
    args = p.parse_args()
    run_modified(args, lambda model: one_block_changed(model, args.block, args.noise))


if __name__ == "__main__":
    main()
