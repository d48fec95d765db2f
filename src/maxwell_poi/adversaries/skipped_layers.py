"""Cheat: early exit. The second half of the transformer blocks is replaced by the identity, so
each token costs about half the compute; the receipt claims the full model."""

from __future__ import annotations

import copy

import torch

from ..registry.models import LoadedModel
from ._agent import parser, run_modified


class Skip(torch.nn.Module):
    """Stands in for a transformer block and does nothing."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


def early_exit(model: LoadedModel, keep: float) -> LoadedModel:
    module = copy.deepcopy(model.module)
    shallow = model.with_module(module)
    first_skipped = max(1, int(len(shallow.layers) * keep))
    for i in range(first_skipped, len(shallow.layers)):
        shallow.layers[i] = Skip()
    return shallow


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--keep", type=float, default=0.5, help="fraction of blocks actually run")
    args = p.parse_args()
    run_modified(args, lambda model: early_exit(model, args.keep))


if __name__ == "__main__":
    main()
