"""Disputes by bisection over a committed activation trace (protocol.trace), down to one block and
one operation.

When a staked receipt is challenged — an L4 re-execution disagreed, or the lottery drew it — Maxwell
already has (or computes once) its own per-block inputs for the lease's positions: one prefill of
the claimed model with hooks (`reference_inputs`). The agent's committed block inputs agree with
Maxwell's up to the first block that did something else, and disagree from there on (a wrong
block's output feeds every later block). Maxwell bisects on that: it asks for the committed input of
the middle block, checks the opening against the receipt's trace root, and keeps the half where the
agreement ends — log2(blocks + 1) small openings. The culprit is the last block whose input still
agreed; Maxwell opens it whole, recomputes that one block from its committed input, and names the
first operation whose committed output differs (float claims: a relative tolerance per operation).

An agent that does not open what is asked, or opens something that is not the committed tensor,
loses the dispute. A trace that agrees with Maxwell's everywhere means the disagreement is not in
the blocks (the final norm or head): the dispute says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..protocol.trace import OUT, Opening, verify_opening
from ..registry.blocks import linears
from ..registry.forward import prefill
from ..registry.models import LoadedModel
from ..registry.w8a8 import is_w8a8
from .exact import ExactProducts, check_block_int, traced_ops
from .replay import block_forward

STATE_TOL = 1e-4  # relative; honest same-class traces agree with Maxwell's prefill to ~1e-6
OP_TOL = 1e-4
Opener = Callable[[list[tuple[int, str]]], Opening | None]  # asks the agent for these tensors


@dataclass(frozen=True)
class DisputeResult:
    agent_wins: bool
    block: int | None
    op: str | None
    probes: list[int] = field(default_factory=list)  # blocks whose committed input was opened
    reason: str = ""
    cost_s: float = 0.0


def reference_inputs(model: LoadedModel, prompt: list[int], tokens: list[int]) -> list[np.ndarray]:
    """Maxwell's own input to every block, then the last block's output, at every position the agent
    computed (prompt + tokens[:-1]): one prefill with hooks."""
    kept: list[torch.Tensor] = []
    hooks = [
        block.register_forward_pre_hook(
            lambda _m, args, kwargs: kept.append((args[0] if args else kwargs["hidden_states"])[0].detach()),
            with_kwargs=True,
        )
        for block in model.layers
    ]
    hooks.append(
        model.layers[-1].register_forward_hook(lambda _m, _i, out: kept.append(_first(out)[0].detach()))
    )
    try:
        with torch.no_grad():
            prefill(model, prompt, tokens)
    finally:
        for h in hooks:
            h.remove()
    return [t.to(torch.float32).numpy() for t in kept]


def _first(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[return-value]


def _key(blocks: int, index: int) -> tuple[int, str]:
    """The committed tensor that is block `index`'s input (index == blocks: the last output)."""
    return (index, "x") if index < blocks else (blocks - 1, OUT)


def _agrees(committed: np.ndarray, reference: np.ndarray) -> bool:
    if committed.shape != reference.shape:
        return False
    return relative_diff(committed, reference) <= STATE_TOL


def relative_diff(theirs: np.ndarray, mine: np.ndarray) -> float:
    """max |theirs − mine| over max |mine|: how far a committed tensor is from Maxwell's."""
    return float(np.abs(theirs - mine).max()) / max(float(np.abs(mine).max()), 1e-30)


def bisect(
    model: LoadedModel, reference: list[np.ndarray], root: str, nonce: bytes, open_tensors: Opener
) -> DisputeResult:
    t0 = time.perf_counter()
    blocks = len(model.layers)
    ops = traced_ops(model)
    probes: list[int] = []

    def committed(index: int) -> np.ndarray | str:
        key = _key(blocks, index)
        opening = open_tensors([key])
        if opening is None or key not in opening.tensors:
            return f"the agent did not open block {index}'s input in time"
        problem = verify_opening(opening, nonce, root, blocks, ops)
        probes.append(index)
        return problem or opening.tensors[key]

    def lost(why: str) -> DisputeResult:
        return DisputeResult(False, None, None, probes, why, time.perf_counter() - t0)

    lo, hi = 0, blocks
    first, last = committed(lo), committed(hi)
    for got in (first, last):
        if isinstance(got, str):
            return lost(got)
    if not _agrees(first, reference[lo]):
        return DisputeResult(False, None, "embedding", probes, "the first block's input (the embeddings) "
                             "differs from Maxwell's", time.perf_counter() - t0)  # fmt: skip
    if _agrees(last, reference[hi]):
        return DisputeResult(True, None, None, probes, "the last block's output agrees with Maxwell's: the "
                             "blocks are not where the answers part", time.perf_counter() - t0)  # fmt: skip
    while hi - lo > 1:
        mid = (lo + hi) // 2
        got = committed(mid)
        if isinstance(got, str):
            return lost(got)
        lo, hi = (mid, hi) if _agrees(got, reference[mid]) else (lo, mid)
    return _settle(model, lo, open_tensors, root, nonce, probes, t0)


def _settle(
    model: LoadedModel,
    block: int,
    open_tensors: Opener,
    root: str,
    nonce: bytes,
    probes: list[int],
    t0: float,
) -> DisputeResult:
    """Recompute the culprit block from its committed input; name the first operation that differs."""
    blocks = len(model.layers)
    ops = traced_ops(model)
    keys = [(block, op) for op in ops] + [_key(blocks, block + 1)]
    opening = open_tensors(keys)
    if opening is None or any(k not in opening.tensors for k in keys):
        return DisputeResult(False, block, None, probes, f"the agent did not open block {block} in time",
                             time.perf_counter() - t0)  # fmt: skip
    problem = verify_opening(opening, nonce, root, blocks, ops)
    if problem:
        return DisputeResult(False, block, None, probes, problem, time.perf_counter() - t0)
    if is_w8a8(model):  # exact mode: every int8 product recomputed, compared with zero tolerance
        opened = {op: opening.tensors[(block, op)] for op in ops}
        check = check_block_int(model, ExactProducts(model), block, opened, opening.tensors[keys[-1]], OP_TOL)
        why = check.reason if not check.ok else f"block {block} recomputes as committed (int8 products exact)"
        return DisputeResult(check.ok, block, check.failed_op, probes, why, time.perf_counter() - t0)
    mine = recompute_block(model, block, opening.tensors[(block, "x")])
    for op in (*ops[1:], "out"):
        theirs = opening.tensors[(block, op)] if op != "out" else opening.tensors[_key(blocks, block + 1)]
        diff = relative_diff(theirs, mine[op])
        if not diff <= OP_TOL:
            return DisputeResult(
                False, block, op, probes,
                f"block {block} {op}: the committed output differs from Maxwell's recomputation from the "
                f"committed input by {diff:.3g} (relative; tolerance {OP_TOL:g})",
                time.perf_counter() - t0,
            )  # fmt: skip
    return DisputeResult(True, block, None, probes, f"block {block} recomputes as committed",
                         time.perf_counter() - t0)  # fmt: skip


def recompute_block(model: LoadedModel, block: int, x: np.ndarray) -> dict[str, np.ndarray]:
    """Maxwell's own run of one block (GPT-2 or Llama, the module itself at positions 0..T-1, causal)
    from an input: each linear output and the block's output."""
    module = model.layers[block]
    got: dict[str, np.ndarray] = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, out, op=op: got.__setitem__(op, out[0].detach().numpy()))
        for op, m in linears(module).items()
    ]
    try:
        with torch.no_grad():
            out = block_forward(model, block, torch.from_numpy(np.asarray(x, dtype=np.float32)))
    finally:
        for h in hooks:
            h.remove()
    got["out"] = _first(out)[0].detach().numpy()
    return got
