"""The fp32 tolerance of L3 (verifier.exact.FP32_TOLERANCE) measured, not assumed: relative Freivalds
residuals of honest traces (threads 1 and 2, batch 1 and 4, GPT-2 and Llama models) against those
of one weight matrix with 0.1 % multiplicative noise, every linear operation in turn. Residuals are
the float64 ones (check_block(precise=True)); the float32 screen's own rounding is measured beside
them (the largest |float32 − float64| residual), since the screen passes a group at SCREEN·tol.
Used by bench/exact/audits.py."""

from __future__ import annotations

import torch

from maxwell_poi.prover.sdk import batch_peers
from maxwell_poi.prover.trace import TraceRecorder
from maxwell_poi.registry.blocks import architecture, linears
from maxwell_poi.registry.forward import generate
from maxwell_poi.registry.models import LoadedModel, Registry
from maxwell_poi.registry.sampling import SeededSampler
from maxwell_poi.verifier.exact import FP32_TOLERANCE, SCREEN, FreivaldsKey, check_block

PROMPT = "The history of the river is long and it begins"
HONEST = [(1, 1), (2, 1), (2, 4)]  # (threads, batch rows)


def traced(model: LoadedModel, tokens: int, threads: int, batch: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        prompt = model.encode_prompt(PROMPT)
        peers = batch_peers(len(prompt), batch - 1, model.reference.vocab)
        with TraceRecorder(model) as rec:
            generate(model, prompt, tokens, SeededSampler(b"s" * 32, 0.8, 50), peers=peers)
        return rec.trace()
    finally:
        torch.set_num_threads(before)


def block_residuals(model: LoadedModel, key: FreivaldsKey, trace, block: int, precise: bool) -> dict:
    opened = {op: trace.tensors[(block, op)] for op in trace.ops}
    check = check_block(model, key, block, opened, trace.block_output(block), precise=precise)
    return {op: r for op, r in check.residuals.items() if op != "residual_stream"}


def honest(model: LoadedModel, key: FreivaldsKey, tokens: int) -> dict:
    worst, gap, trials = {}, 0.0, 0
    for threads, batch in HONEST:
        trace = traced(model, tokens, threads, batch)
        name = f"threads {threads}, batch {batch}"
        worst[name] = 0.0
        for b in range(trace.blocks):
            precise = block_residuals(model, key, trace, b, True)
            fast = block_residuals(model, key, trace, b, False)
            worst[name] = max(worst[name], *precise.values())
            gap = max(gap, *(abs(fast[op] - precise[op]) for op in precise))
            trials += len(precise)
    return {
        "worst_by_setting": worst,
        "worst": max(worst.values()),
        "float32_rounding": gap,
        "trials": trials,
    }


def cheats(registry: Registry, model_id: str, key: FreivaldsKey, tokens: int, blocks: list[int]) -> dict:
    """0.1 % multiplicative noise on one operation's weight in one block; that op's residual."""
    smallest: dict[str, float] = {}
    for b in blocks:
        for op in linears(registry.load(model_id).layers[b]):
            cheat = registry.load(model_id).copied_to(torch.float32)
            with torch.no_grad():
                w = linears(cheat.layers[b])[op].weight
                w.mul_(1 + 0.001 * torch.randn(w.shape, generator=torch.Generator().manual_seed(b)))
            trace = traced(cheat, tokens, 2, 1)
            got = block_residuals(registry.load(model_id), key, trace, b, True)[op]
            smallest[op] = min(smallest.get(op, float("inf")), got)
    return {
        "smallest_by_op": smallest,
        "smallest": min(smallest.values()),
        "trials": len(blocks) * len(smallest),
    }


def calibrate(
    registry: Registry, model_ids: list[str], tokens: int = 16, also_honest: dict[str, float] | None = None
) -> dict:
    """Per model: honest residuals in every setting, the smallest 0.1 %-noise residual per operation.
    `also_honest`: the worst honest residual of other traces (bench/exact/audits.py's shapes) to count in."""
    out: dict = {"tolerance": FP32_TOLERANCE, "screen": SCREEN * FP32_TOLERANCE, "models": {}}
    for model_id in model_ids:
        model = registry.load(model_id)
        key = FreivaldsKey.for_model(model)
        h = honest(model, key, tokens)
        c = cheats(registry, model_id, key, tokens, [len(model.layers) // 2])
        out["models"][model_id] = {"architecture": architecture(model), "honest": h, "cheat_0.1%_noise": c}
    out["honest_worst_other_shapes"] = also_honest or {}
    worst = max(m["honest"]["worst"] for m in out["models"].values())
    worst = max(worst, *out["honest_worst_other_shapes"].values())
    smallest = min(m["cheat_0.1%_noise"]["smallest"] for m in out["models"].values())
    out["honest_worst"] = worst
    out["cheat_smallest"] = smallest
    out["separation"] = round(smallest / worst, 1)  # cheat's smallest over honest's largest
    out["honest_margin"] = round(FP32_TOLERANCE / worst, 1)  # tolerance over the honest worst
    out["cheat_margin"] = round(smallest / FP32_TOLERANCE, 1)  # cheat's smallest over the tolerance
    out["float32_rounding_worst"] = max(m["honest"]["float32_rounding"] for m in out["models"].values())
    out["honest_trials"] = sum(m["honest"]["trials"] for m in out["models"].values())
    out["cheat_trials"] = sum(m["cheat_0.1%_noise"]["trials"] for m in out["models"].values())
    return out
