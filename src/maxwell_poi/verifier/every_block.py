"""L3 on every block of a challenged lease (issue 24 item 6): a cheat confined to one block is caught
on every challenged lease, not only when a draw happens to open that block.

Why every block opened, and not a random linear combination across blocks: the trace's commitment is
a Merkle tree of hashes (protocol.trace), which cannot be combined — Maxwell must see each tensor to
check it against its leaf. And Freivalds is already a random combination inside each operation (a
few secret vectors r per W); combining blocks would leave the same per-block products X_b·(W_b·r_b)
and the same replay of each block's nonlinear parts to compute, so it would save nothing measurable
and lose the block's name. Checking all blocks costs under 1 % of generation (bench/exact/all_blocks.py).

The opening is asked in parts (`plan_openings`): each part at most `most_blocks` blocks and a byte
budget that fits the relay's line (service.wire.OpeningBody: 16 MiB of base64 JSON). Each part is
checked against the signed root as it comes and dropped (Maxwell never holds a whole 1B trace).
Fail closed: a part that does not come, does not rebuild the root, lacks a block, or holds a block
that cannot be checked fails the lease, naming the blocks; the first failure ends the challenge
(the lease has failed; the blocks not yet opened are listed as such). A pass says every block of the
model was checked — the result counts them, so a pass over fewer blocks cannot happen.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..protocol.receipt import ReceiptClaims
from ..protocol.result import LayerName, LayerResult, Status
from ..protocol.trace import Opening
from ..registry.blocks import linears, weight_in_out
from ..registry.models import LoadedModel
from ..registry.w8a8 import is_w8a8
from .exact import (
    FP32_TOLERANCE,
    NO_TRACE_ROOT,
    BlockCheck,
    FreivaldsKey,
    IntFreivaldsKey,
    check_opening,
    checked_how,
)

# Raw tensor bytes per opening: base64 (4/3) and the JSON around it keep the line under the relay's
# 16 MiB (service.wire.OpeningBody) with room to spare.
OPENING_BUDGET = 10 << 20
BlockOpener = Callable[[list[int]], Opening | str]  # the agent's opening of these blocks, or why none


@dataclass(frozen=True)
class EveryBlockCheck:
    """What checking every block of one lease found: each block's check (in order, up to the first
    failure), the openings asked, and — when the lease could not be checked — why, and which blocks
    went unchecked."""

    total: int
    checks: list[BlockCheck] = field(default_factory=list)
    openings: list[list[int]] = field(default_factory=list)
    problem: str | None = None  # an opening that did not come or was refused as a whole
    unchecked: list[int] = field(default_factory=list)
    waited_s: float = 0.0  # the agent's time: asking and waiting for the openings
    cost_s: float = 0.0  # Maxwell's own: roots, digests and the checks

    @property
    def failed(self) -> BlockCheck | None:
        return next((c for c in self.checks if not c.ok), None)

    @property
    def ok(self) -> bool:
        """Passed only when every block of the model was checked and held."""
        passed = sorted(c.block for c in self.checks if c.ok)
        return self.problem is None and passed == list(range(self.total))

    @property
    def reason(self) -> str:
        if self.problem:
            return self.problem
        if (failed := self.failed) is not None:
            return failed.reason
        if not self.ok:  # cannot happen through check_every_block; never a silent pass
            got = sorted(c.block for c in self.checks)
            return f"expected every block 0..{self.total - 1} checked, got {got}"
        n = len(self.openings)
        return f"all {self.total} blocks opened ({n} opening{'' if n == 1 else 's'})"


def bytes_per_position(model: LoadedModel, block: int) -> int:
    """Opened bytes of one block per position: its input and output (float32, d wide) and what each
    linear operation commits (float32 outputs; integer mode: int8 input, int32 accumulator, scale)."""
    widths = []
    for layer in linears(model.layers[block]).values():
        weight = getattr(layer, "weight_q", None)  # W8A8: int8 [in, out]
        shape = weight.shape if weight is not None else weight_in_out(layer)[0].shape
        widths.append((int(shape[0]), int(shape[1])))
    d = widths[0][0]  # the first operation reads the (normed) block input
    if is_w8a8(model):
        return 4 * 2 * d + sum(i + 4 * o + 4 for i, o in widths)
    return 4 * 2 * d + sum(4 * o for _i, o in widths)


def plan_openings(
    model: LoadedModel, positions: int, most_blocks: int | None = None, budget: int = OPENING_BUDGET
) -> list[list[int]]:
    """Every block, once, in order, cut into openings of at most `most_blocks` blocks (None: no cap)
    and `budget` bytes; a block over the budget alone goes alone (the relay may refuse it: then its
    opening does not come and the lease fails, as it must)."""
    cap = most_blocks if most_blocks and most_blocks > 0 else len(model.layers)
    plan: list[list[int]] = [[]]
    used = 0
    for b in range(len(model.layers)):
        size = bytes_per_position(model, b) * max(positions, 1)
        if plan[-1] and (len(plan[-1]) >= cap or used + size > budget):
            plan.append([])
            used = 0
        plan[-1].append(b)
        used += size
    return plan


def check_every_block(
    claims: ReceiptClaims,
    nonce: bytes,
    model: LoadedModel,
    key: FreivaldsKey | IntFreivaldsKey,
    plan: list[list[int]],
    opener: BlockOpener,
    tol: float = FP32_TOLERANCE,
) -> EveryBlockCheck:
    """Ask for each planned opening in turn and check it; stop at the first failure."""
    total = len(model.layers)
    if claims.trace is None:
        return EveryBlockCheck(total, problem=NO_TRACE_ROOT, unchecked=list(range(total)))
    covered = sorted(b for part in plan for b in part)
    if covered != list(range(total)):  # Maxwell's own plan must cover the model once: say so if not
        why = f"L3 plan: expected every block 0..{total - 1} once, got {covered}"
        return EveryBlockCheck(total, problem=why, unchecked=list(range(total)))
    checks: list[BlockCheck] = []
    asked: list[list[int]] = []
    waited = cost = 0.0
    for i, blocks in enumerate(plan):
        t0 = time.perf_counter()
        got = opener(blocks)
        t1 = time.perf_counter()
        waited += t1 - t0
        asked.append(blocks)
        rest = [b for part in plan[i:] for b in part]
        if isinstance(got, str):
            why = f"opening of blocks {blocks}: {got}"
            return EveryBlockCheck(total, checks, asked, why, rest, waited, cost)
        part, problem = check_opening(model, key, nonce, claims.trace, blocks, got, tol)
        cost += time.perf_counter() - t1
        if problem:
            return EveryBlockCheck(total, checks, asked, problem, rest, waited, cost)
        checks += part
        if any(not c.ok for c in part):
            later = [b for b in rest if b not in blocks]
            return EveryBlockCheck(total, checks, asked, None, later, waited, cost)
    return EveryBlockCheck(total, checks, asked, None, [], waited, cost)


def as_layer(found: EveryBlockCheck, key: FreivaldsKey | IntFreivaldsKey, tol: float) -> LayerResult:
    """The L3 result: pass only when every block held; the details name each block's residuals, the
    openings, the blocks left unchecked after a failure and the time spent waiting for the agent."""
    worst = max((r for c in found.checks for r in c.residuals.values()), default=0.0)
    details = {
        "blocks": list(range(found.total)),
        "checked": [c.block for c in found.checks],
        "unchecked": found.unchecked,
        "openings": found.openings,
        "residuals": {str(c.block): c.residuals for c in found.checks},
        "tolerance": tol,
        "waited_for_openings_s": round(found.waited_s, 4),
    }
    if not found.ok:
        return LayerResult(LayerName.EXACT, Status.FAIL, found.reason, cost_s=found.cost_s, details=details)
    reason = f"{found.reason} and {checked_how(key, worst)}"
    return LayerResult(LayerName.EXACT, Status.PASS, reason, score=1.0, cost_s=found.cost_s, details=details)


def appraise_every_block(
    claims: ReceiptClaims,
    nonce: bytes,
    model: LoadedModel,
    key: FreivaldsKey | IntFreivaldsKey,
    opener: BlockOpener,
    *,
    positions: int,
    most_blocks: int | None = None,
    tol: float = FP32_TOLERANCE,
) -> LayerResult:
    """L3 for a challenged lease: every block opened (`positions`: the lease's prompt and output
    tokens, to size the openings) and checked exactly."""
    plan = plan_openings(model, positions, most_blocks)
    return as_layer(check_every_block(claims, nonce, model, key, plan, opener, tol), key, tol)
