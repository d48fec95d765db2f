"""L3: the exact check of an opened block, without recomputing its matrix products.

Each linear operation Y = X·W + b of the block is checked with Freivalds' algorithm: Maxwell keeps
secret random vectors r (`FreivaldsKey`, drawn from its CSPRNG, precomputed W·r and b·r once per
model, never revealed) and compares Y·r with X·(W·r) + b·r — O(T·d) per vector instead of
O(T·d²). X is never taken from the agent: Maxwell replays the nonlinear parts between the linear
operations (norms, rotary embeddings, causal softmax attention, activations, residuals) from the
opened values (verifier.replay), so each committed output must follow from the committed block
input through Maxwell's own replay. Operations that read one input (Llama's q, k, v; gate, up) are
checked with one product X·[W_q·r | W_k·r | W_v·r].

GPT-2 block (prover.trace names):  ln_1(x) -> qkv -> attention -> attn -> x + attn = h
                                   ln_2(h) -> fc -> gelu -> mlp -> h + mlp = the block's output
Llama block:  input_layernorm(x) -> q, k, v -> rotary, attention -> o -> x + o = h
              post_attention_layernorm(h) -> gate, up -> silu(gate)·up -> down -> h + down = output

Float claims (fp32) are compared with a relative tolerance calibrated on honest runs
(bench/exact/audits.py); the result names the first operation that fails and its residual. The products
are shaped [vectors, n] @ [n, T] (the orientation BLAS runs fastest for so few vectors) and run in
float32; a group whose residual comes near the tolerance is decided again in float64 (SCREEN).
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..protocol.receipt import ReceiptClaims
from ..protocol.result import LayerName, LayerResult, Status
from ..protocol.trace import INT_OPS, OPS_BY_ARCH, Opening, opening_keys, output_key, verify_opening
from ..registry.blocks import BRANCHES, INPUT_GROUPS, linears, require_architecture, weight_in_out
from ..registry.models import LoadedModel
from ..registry.w8a8 import is_w8a8, quantize_rows
from .replay import gpt2_attention, steps

VECTORS = 2  # independent r per operation: a wrong product passes both with probability ~0 (floats)
# Relative residuals, float64, bench/exact/audits.py `calibration_fp32` (CPU, threads 1-2, batch 1-4): honest
# traces of GPT-2 and Llama models up to the ~1B shapes stay under 4e-6 (worst: the GPT-2 ~1B shape);
# 0.1 % multiplicative noise on any one weight matrix gives >= 2.7e-4 (~100x apart). The tolerance sits
# between them on a log scale (8-12x from each side); it catches noise down to ~0.01 % of one matrix.
FP32_TOLERANCE = 3e-5
# The products run in float32 first (no float64 copy of the opened [T, n] tensors; their own rounding
# is ~1e-6 of max |Y·r| at n <= 5632, measured beside the calibration): a group whose float32 residual
# is above SCREEN·tol (or NaN) is recomputed in float64 and decided there, so a float32 pass means a
# float64 residual under SCREEN·tol + that rounding, well under tol.
SCREEN = 0.5
F32, F64 = torch.float32, torch.float64


@dataclass
class FreivaldsKey:
    """Secret r (float32 values) and the precomputed W·r, b·r (float64, and rounded to float32) for
    every linear operation of a model, kept transposed: rt [vectors, out] per operation; per input
    group the stacked (W·r)ᵀ [ops·vectors, in] and (b·r)ᵀ [ops·vectors, 1]. Keyed by dtype."""

    rt: dict[torch.dtype, dict[tuple[int, str], torch.Tensor]] = field(repr=False)
    wrt: dict[torch.dtype, dict[tuple[int, tuple[str, ...]], torch.Tensor]] = field(repr=False)
    brt: dict[torch.dtype, dict[tuple[int, tuple[str, ...]], torch.Tensor]] = field(repr=False)
    group_of: dict[str, tuple[str, ...]]  # op -> the input group it belongs to
    vectors: int = VECTORS

    @classmethod
    def for_model(cls, model: LoadedModel, vectors: int = VECTORS) -> FreivaldsKey:
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))  # Maxwell's secret
        groups = INPUT_GROUPS[require_architecture(model)]
        rt, wrt, brt = {}, {}, {}
        with torch.no_grad():
            for b, block in enumerate(model.layers):
                layers = linears(block)
                for group in groups:
                    parts_w, parts_b = [], []
                    for op in group:
                        weight, bias = weight_in_out(layers[op])  # y = x·W + b, W [in, out]
                        vec = torch.randn(vectors, weight.shape[1], generator=gen).to(F64)  # float32 values
                        rt[(b, op)] = vec
                        parts_w.append(vec @ weight.to(F64).T)  # (W·r)ᵀ [vectors, in]
                        no_bias = torch.zeros(vectors, dtype=F64)
                        parts_b.append(vec @ bias.to(F64) if bias is not None else no_bias)
                    wrt[(b, group)] = torch.cat(parts_w).contiguous()
                    brt[(b, group)] = torch.cat(parts_b).unsqueeze(1)
        both = [{dt: {k: v.to(dt) for k, v in d.items()} for dt in (F32, F64)} for d in (rt, wrt, brt)]
        return cls(*both, {op: g for g in groups for op in g}, vectors)

    def widths(self, block: int, op: str) -> tuple[int, int]:
        """(in, out) of an operation."""
        return self.wrt[F64][(block, self.group_of[op])].shape[1], self.rt[F64][(block, op)].shape[1]

    def residuals(
        self,
        block: int,
        group: tuple[str, ...],
        x: torch.Tensor,
        ys: dict[str, torch.Tensor],
        dtype: torch.dtype = F64,
    ) -> dict[str, float]:
        """Per operation of the group: max |Y·r − (X·(W·r) + b·r)| / max |Y·r| over rows and vectors,
        products in `dtype`. X (the group's input) enters one product for the whole group; the
        [vectors, n] @ [n, T] orientation is the one BLAS runs fastest."""
        key = (block, group)
        rhs = torch.addmm(self.brt[dtype][key], self.wrt[dtype][key], x.to(dtype).T).numpy()  # [ops·V, T]
        out = {}
        for i, op in enumerate(group):  # the [V, T] results are tiny: numpy's per-call cost is lower
            lhs = torch.mm(self.rt[dtype][(block, op)], ys[op].to(dtype).T).numpy()
            mine = rhs[i * self.vectors : (i + 1) * self.vectors]
            out[op] = float(np.abs(lhs - mine).max()) / max(float(np.abs(lhs).max()), 1e-30)
        return out

    def screened(
        self, block: int, group: tuple[str, ...], x: torch.Tensor, ys: dict[str, torch.Tensor], tol: float
    ) -> dict[str, float]:
        """Float32 residuals where all sit under SCREEN·tol; else the group's float64 residuals."""
        fast = self.residuals(block, group, x, ys, F32)
        if all(r <= SCREEN * tol for r in fast.values()):  # NaN is not <=: decided in float64
            return fast
        return self.residuals(block, group, x, ys, F64)


@dataclass(frozen=True)
class BlockCheck:
    block: int
    ok: bool
    failed_op: str | None
    residuals: dict[str, float]
    reason: str


def check_block(
    model: LoadedModel,
    key: FreivaldsKey,
    block: int,
    opened: dict[str, np.ndarray],
    output: np.ndarray,
    tol: float = FP32_TOLERANCE,
    *,
    precise: bool = False,
) -> BlockCheck:
    """Check one opened block: `opened` has the architecture's op tensors (protocol.trace.OPS_BY_ARCH),
    `output` the block's committed output. `precise`: every product in float64 (no float32 screen)."""
    arch = require_architecture(model)
    t = {op: torch.from_numpy(np.asarray(opened[op], dtype=np.float32)) for op in OPS_BY_ARCH[arch]}
    shape_problem = _shapes(key, block, t, output)
    if shape_problem:
        op, why = shape_problem
        return BlockCheck(block, False, op, {}, why)
    residuals: dict[str, float] = {}
    with torch.no_grad():
        for group, replay in steps(model, block, t):
            x = replay()
            got = key.residuals(block, group, x, t) if precise else key.screened(block, group, x, t, tol)
            residuals.update(got)
            for op in group:
                if not residuals[op] <= tol:  # NaN fails too
                    return BlockCheck(block, False, op, residuals, _why(block, op, residuals[op], tol))
        attention, mlp = BRANCHES[arch]
        ok = f"block {block}: {len(OPS_BY_ARCH[arch]) - 1} linear operations and the residual stream hold"
        mine = t["x"].numpy() + t[attention].numpy() + t[mlp].numpy()  # float32, in the block's order
        return _residual_stream(block, mine, output, tol, residuals, ok)


def _shapes(
    key: FreivaldsKey, block: int, t: dict[str, torch.Tensor], output: np.ndarray
) -> tuple[str, str] | None:
    """(op, why) for the first opened tensor whose shape is not [T, that operation's width]: the
    leaves bind the bytes, not the shape."""
    rows = t["x"].shape[0] if t["x"].ndim == 2 else -1
    linear = [op for op in t if op != "x"]
    width = key.widths(block, linear[0])[0]  # the first group reads the block input (d wide)
    expected = {"x": (rows, width), **{op: (rows, key.widths(block, op)[1]) for op in linear}}
    got = {op: tuple(v.shape) for op, v in t.items()}
    expected["output"], got["output"] = (rows, width), tuple(np.shape(output))
    for op, shape in expected.items():
        if got[op] != shape:
            return op, f"block {block} {op}: expected an opened tensor of shape {shape}, got {got[op]}"
    return None


def _residual_stream(
    block: int, mine: np.ndarray, output: np.ndarray, tol: float, residuals: dict[str, float], ok: str
) -> BlockCheck:
    """The block's committed output must be its input plus the two committed branches."""
    committed = np.asarray(output, dtype=np.float32)
    diff = float(np.abs(mine - committed).max()) / max(float(np.abs(committed).max()), 1e-30)
    residuals["residual_stream"] = diff
    if not diff <= tol:
        return BlockCheck(
            block, False, "residual_stream", residuals, _why(block, "residual_stream", diff, tol)
        )
    return BlockCheck(block, True, None, residuals, ok)


def _why(block: int, op: str, residual: float, tol: float) -> str:
    return (
        f"block {block} {op}: expected the committed output to follow from the committed input "
        f"(relative residual <= {tol:g}), got {residual:.3g}"
    )


def audit_blocks(
    model: LoadedModel, key: FreivaldsKey, opening: Opening, blocks: list[int], tol: float = FP32_TOLERANCE
) -> list[BlockCheck]:
    ops, n = OPS_BY_ARCH[require_architecture(model)], len(model.layers)
    return [check_block(model, key, *_opened(opening, b, ops, n), tol) for b in blocks]


def draw_blocks(total: int, count: int) -> list[int]:
    """Which blocks to open, drawn from the OS CSPRNG after the receipt is in (the agent cannot know)."""
    pool = list(range(total))
    return sorted(pool.pop(secrets.randbelow(len(pool))) for _ in range(min(count, total)))


def appraise_opening(
    claims: ReceiptClaims,
    nonce: bytes,
    model: LoadedModel,
    key: FreivaldsKey | IntFreivaldsKey,
    blocks: list[int],
    opening: Opening | None,
    tol: float = FP32_TOLERANCE,
) -> LayerResult:
    """L3 for one opening: it must rebuild the receipt's trace root, and every opened block must hold
    under Freivalds and Maxwell's replay (float mode, or with an IntFreivaldsKey the exact integer
    mode of a W8A8 model). No opening (refused, late) fails. (verifier.every_block asks for every
    block of a challenged lease, in as many openings as the relay carries, through `check_opening`.)"""
    t0 = time.perf_counter()
    if claims.trace is None:  # an engine receipt (v4) never has one: the reason says which it was
        engine = " (an engine receipt: engines commit to no activations)" if claims.engine else ""
        return LayerResult(LayerName.EXACT, Status.FAIL, NO_TRACE_ROOT + engine)
    if opening is None:
        return LayerResult(LayerName.EXACT, Status.FAIL, f"opening of blocks {blocks}: none came in time")
    checks, problem = check_opening(model, key, nonce, claims.trace, blocks, opening, tol)
    cost = time.perf_counter() - t0
    if problem:
        return LayerResult(LayerName.EXACT, Status.FAIL, problem, cost_s=cost)
    worst = max((r for c in checks for r in c.residuals.values()), default=0.0)  # none: a shape failed
    details = {"blocks": blocks, "residuals": {str(c.block): c.residuals for c in checks}, "tolerance": tol}
    failed = next((c for c in checks if not c.ok), None)
    if failed:
        return LayerResult(LayerName.EXACT, Status.FAIL, failed.reason, cost_s=cost, details=details)
    reason = f"blocks {blocks} opened and {checked_how(key, worst)}"
    return LayerResult(LayerName.EXACT, Status.PASS, reason, score=1.0, cost_s=cost, details=details)


NO_TRACE_ROOT = "trace: expected a v3 receipt with a trace root, got none"


def check_opening(
    model: LoadedModel,
    key: FreivaldsKey | IntFreivaldsKey,
    nonce: bytes,
    root: str,
    blocks: list[int],
    opening: Opening,
    tol: float = FP32_TOLERANCE,
) -> tuple[list[BlockCheck], str | None]:
    """(each block's check, None), or ([], why the opening itself is refused: it does not rebuild
    the signed root, or lacks a tensor of a block asked for). A block whose check raises (a tensor
    the replay cannot take) is a failed check naming the error, never a pass."""
    ops, total = traced_ops(model), len(model.layers)
    problem = verify_opening(opening, nonce, root, total, ops)
    missing = [b for b in blocks if any(k not in opening.tensors for k in opening_keys([b], total, ops))]
    if problem or missing:
        return [], problem or f"opening: expected blocks {blocks}, got none for {missing}"
    checks = []
    for b in blocks:
        _, opened, output = _opened(opening, b, ops, total)
        try:
            if isinstance(key, IntFreivaldsKey):
                checks.append(check_block_int(model, key, b, opened, output, tol))
            else:
                checks.append(check_block(model, key, b, opened, output, tol))
        except (ValueError, TypeError, RuntimeError, IndexError, KeyError) as exc:  # fail closed
            why = f"block {b}: could not be checked ({type(exc).__name__}: {exc})"
            checks.append(BlockCheck(b, False, None, {}, why))
    return checks, None


def checked_how(key: FreivaldsKey | IntFreivaldsKey, worst: float) -> str:
    """How passing blocks were checked, for a verdict's reason."""
    if isinstance(key, IntFreivaldsKey):
        return (f"checked exactly: int8 products at zero tolerance (Freivalds, soundness error "
                f"{key.soundness_error:.0e} per operation) + replay")  # fmt: skip
    return f"checked exactly (Freivalds + replay), worst residual {worst:.2g}"


# -- exact integer mode (W8A8, registry.w8a8) -------------------------------------------------------

R_BITS = 20  # r drawn uniformly from [0, 2^20): a wrong accumulator row passes one vector w.p. <= 2^-20


@dataclass
class IntFreivaldsKey:
    """Secret integer r and W_q·r (int64, exact) for every linear operation of a W8A8 model."""

    wr: dict[tuple[int, str], torch.Tensor] = field(repr=False)
    r: dict[tuple[int, str], torch.Tensor] = field(repr=False)
    vectors: int = VECTORS

    @classmethod
    def for_model(cls, variant: LoadedModel, vectors: int = VECTORS) -> IntFreivaldsKey:
        gen = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little"))
        wr, r = {}, {}
        for b, block in enumerate(variant.layers):
            for op, module in linears(block).items():
                w = module.weight_q.to(torch.int64)  # [in, out]
                vec = torch.randint(0, 1 << R_BITS, (w.shape[1], vectors), generator=gen, dtype=torch.int64)
                r[(b, op)], wr[(b, op)] = vec, w @ vec
        return cls(wr, r, vectors)

    def holds(self, block: int, op: str, x_q: np.ndarray, acc: np.ndarray) -> bool:
        """acc·r == x_q·(W_q·r), exactly (|terms| < 2^63 for widths up to ~10^5)."""
        lhs = torch.from_numpy(np.asarray(acc, dtype=np.int64)) @ self.r[(block, op)]
        rhs = torch.from_numpy(np.asarray(x_q, dtype=np.int64)) @ self.wr[(block, op)]
        return bool(torch.equal(lhs, rhs))

    @property
    def soundness_error(self) -> float:
        """Chance a wrong accumulator passes all vectors of one operation."""
        return 2.0 ** (-R_BITS * self.vectors)


def check_block_int(
    variant: LoadedModel, key: IntFreivaldsKey, block: int, opened: dict[str, np.ndarray], output: np.ndarray,
    tol: float = FP32_TOLERANCE,
) -> BlockCheck:  # fmt: skip
    """Exact mode: each accumulator exactly (zero tolerance); each int8 input must be the
    quantization of Maxwell's replay from the committed float values (at most one step off, where
    float rounding differs by device); the dequantized outputs carry the replay to the block output."""
    module = variant.layers[block]
    mods = linears(module)
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in opened.items()}
    residuals: dict[str, float] = {}

    def out(op: str) -> torch.Tensor:
        acc, xs = t[f"{op}.acc"].to(torch.float32), t[f"{op}.xs"]
        return acc * xs * mods[op].weight_scale + mods[op].bias

    with torch.no_grad():
        x = t["x"].to(torch.float32)
        replays = (
            ("qkv", lambda: module.ln_1(x)),
            ("attn", lambda: gpt2_attention(out("qkv"), module.attn.num_heads)),
            ("fc", lambda: module.ln_2(x + out("attn"))),
            ("mlp", lambda: module.mlp.act(out("fc"))),
        )
        for op, replay in replays:
            mine, _ = quantize_rows(replay())
            steps = int((mine.to(torch.int16) - t[f"{op}.xq"].to(torch.int16)).abs().max())
            residuals[f"{op}.xq_steps"] = float(steps)
            if steps > 1:
                why = f"block {block} {op}: the committed int8 input is {steps} steps from Maxwell's replay"
                return BlockCheck(block, False, op, residuals, why)
            if not key.holds(block, op, opened[f"{op}.xq"], opened[f"{op}.acc"]):
                why = (f"block {block} {op}: the int32 accumulator does not equal the int8 product "
                       f"(exact Freivalds, soundness error {key.soundness_error:.0e})")  # fmt: skip
                return BlockCheck(block, False, op, residuals, why)
        ok = f"block {block}: 4 int8 products exact, residual stream holds"
        mine = (x + out("attn") + out("mlp")).numpy()
        return _residual_stream(block, mine, output, tol, residuals, ok)


class ExactProducts:
    """The int8 products recomputed in full (a dispute's one block): `holds` like IntFreivaldsKey's,
    with no soundness error at all."""

    soundness_error = 0.0

    def __init__(self, variant: LoadedModel) -> None:
        self.variant = variant

    def holds(self, block: int, op: str, x_q: np.ndarray, acc: np.ndarray) -> bool:
        w = linears(self.variant.layers[block])[op].weight_q.to(torch.int64)
        mine = torch.from_numpy(np.asarray(x_q, dtype=np.int64)) @ w
        return bool(torch.equal(mine, torch.from_numpy(np.asarray(acc, dtype=np.int64))))


def traced_ops(model: LoadedModel) -> tuple[str, ...]:
    """What each block of this model's trace commits: its architecture's float tensors, or the exact
    integer mode's int8 inputs, int32 accumulators and scales for a W8A8 variant."""
    return INT_OPS if is_w8a8(model) else OPS_BY_ARCH[require_architecture(model)]


def key_for(model: LoadedModel) -> FreivaldsKey | IntFreivaldsKey:
    """Maxwell's secret vectors for this model, in the mode its trace is checked in."""
    return IntFreivaldsKey.for_model(model) if is_w8a8(model) else FreivaldsKey.for_model(model)


def _opened(
    opening: Opening, block: int, ops: tuple[str, ...], total: int
) -> tuple[int, dict[str, np.ndarray], np.ndarray]:
    return block, {op: opening.tensors[(block, op)] for op in ops}, opening.tensors[output_key(block, total)]
