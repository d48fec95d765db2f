"""L3 Freivalds speed before and after issue 12's "Freivalds speed" change: the fp32 check of one
GPT-2 block (verifier.exact.check_block) as it stood at commit BEFORE (loaded from git history) and as
it stands now, each over recomputing that block, at several widths, in one process.

Three ways of timing each ratio (median of ROUNDS):
- interleaved: check, recompute, check, recompute ... (each side meets the caches the other left:
  the recompute's weights evict the check's code and data, the check's small working set does not);
- flushed: a 64 MiB buffer is written before every timed call (both sides start cold, as after
  other work: a verifier between audits);
- back_to_back: each side several times in a row (both warm; how bench/exact/audits.py timed it before).

    python -m bench.exact.before_after    # writes bench/results/exact_before_after.json
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.exact.audits import small_block, wrap  # noqa: E402 - the one-block models of bench/exact/audits.py
from maxwell_poi.prover.harness import quiet_libraries
from maxwell_poi.prover.trace import TraceRecorder
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier import exact as after

quiet_libraries()
from bench.common.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "exact_before_after.json": [
        "what",
        "before_commit",
        "positions",
        "torch_threads",
        "rounds",
        "by_width",
        "768_at_42_positions",
        "note",
        "bench_s",
        "measured_at",
    ]
}  # the keys of bench/results/exact_before_after.json this script writes (bench/common/results.py)
BEFORE = "5c38391"  # the last commit before the change
FLUSH = torch.empty(16 << 20)  # 64 MiB, twice the last-level cache here


def load_before(commit: str):
    """verifier/exact.py at `commit`, as a module (its relative imports made absolute)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:src/maxwell_poi/verifier/exact.py"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    path = Path("/tmp") / f"exact_{commit}.py"
    path.write_text(source.replace("from ..", "from maxwell_poi."))
    spec = importlib.util.spec_from_file_location(f"exact_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def medians(fns: dict[str, Callable[[], object]], rounds: int, before_each: Callable[[], object]) -> dict:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            before_each()
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ratios(check: Callable[[], object], recompute: Callable[[], object], rounds: int) -> dict:
    pair = {"check": check, "recompute": recompute}
    plain = medians(pair, rounds, lambda: None)
    flushed = medians(pair, rounds, lambda: FLUSH.add_(1))
    warm = {k: medians({k: fn}, rounds, lambda: None)[k] for k, fn in pair.items()}
    return {
        name: round(m["check"] / m["recompute"], 4)
        for name, m in (("interleaved", plain), ("flushed", flushed), ("back_to_back", warm))
    } | {"check_ms_back_to_back": round(warm["check"] * 1e3, 3)}


def one_width(before, base, width: int, positions: int, rounds: int) -> dict:
    """Both implementations on one seeded GPT-2 block of `width`, over the same recompute."""
    model = wrap(base, small_block("gpt2", width), 1)
    with TraceRecorder(model) as rec, torch.no_grad():
        model.module(torch.randint(0, 64, (1, positions)))
    trace = rec.trace()
    opened, output = {op: trace.tensors[(0, op)] for op in trace.ops}, trace.block_output(0)
    x = torch.from_numpy(trace.tensors[(0, "x")]).unsqueeze(0)

    def recompute() -> object:
        with torch.no_grad():
            return model.layers[0](x)

    row = {}
    for name, impl in (("before", before), ("after", after)):
        key = impl.FreivaldsKey.for_model(model)
        assert impl.check_block(model, key, 0, opened, output).ok

        def check(impl=impl, key=key) -> object:
            return impl.check_block(model, key, 0, opened, output)

        row[name] = ratios(check, recompute, rounds)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", default=BEFORE)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared CPU stalls 2)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "exact_before_after.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    before = load_before(args.before)
    base = Registry().load("gpt2-micro")
    out = {str(w): one_width(before, base, w, args.positions, args.rounds) for w in (768, 1536, 2048)}
    out_42 = one_width(before, base, 768, 42, args.rounds)  # gpt2-small's trace in bench/exact/audits.py: 42
    result = {
        "what": "fp32 check of one GPT-2 block / recomputing it, before and after (same process)",
        "before_commit": args.before,
        "positions": args.positions,
        "torch_threads": torch.get_num_threads(),
        "rounds": args.rounds,
        "by_width": out,
        "768_at_42_positions": out_42,
        "note": "shared 2-core VM; other processes used the CPU meanwhile",
        "bench_s": round(time.perf_counter() - t0),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    write_results("exact_before_after.json", result, writes=WRITES, path=args.out)
    print(result)


if __name__ == "__main__":
    main()
