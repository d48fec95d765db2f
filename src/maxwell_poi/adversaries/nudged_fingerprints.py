"""Cheat: honest tokens, fingerprints off by a fraction of a float16 ulp's worth more than honest
kernels of the verifier's own class ever are — a stand-in for a cheaper numeric path (an int8 KV
cache, a fused low-precision norm) whose error hides inside the cross-class tolerance.

The final norm's output, which the fingerprints commit, is scaled by (1 + `--nudge`, default 7e-4)
and the language-model head's input scaled back, so the sampled tokens are the honest ones and only
the committed top-k values move (median relative error ~7e-4: over the same-class set's 2.4e-4, under
the cross-class set's 1.5e-3). A verifier that applies the cross-class set to a prover its node
measured on its own class passes it; the same-class set it should have applied catches it.
"""

from __future__ import annotations

import copy

from ..registry.models import LoadedModel
from ._agent import parser, run_modified

NUDGE = 7e-4


def nudged(model: LoadedModel, nudge: float = NUDGE) -> LoadedModel:
    """The model with its final-norm output scaled by (1 + nudge) and the head's input unscaled."""
    module = copy.deepcopy(model.module)
    clone = model.with_module(module)
    head = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if clone.final_norm is None or head is None:
        raise ValueError(f"{model.spec.model_id}: expected a final norm and an output head to nudge between")
    clone.final_norm.register_forward_hook(lambda _m, _i, out: out * (1 + nudge))
    head.register_forward_pre_hook(lambda _m, args: (args[0] / (1 + nudge), *args[1:]))
    return clone


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--nudge", type=float, default=NUDGE, help="relative scale of the committed values")
    args = p.parse_args()
    run_modified(args, lambda model: nudged(model, args.nudge))


if __name__ == "__main__":
    main()
