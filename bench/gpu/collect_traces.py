"""GPU telemetry traces for L1: NVML recordings of real inference and of non-inference workloads.

Records labelled windows with `NvmlSource(hz=20)` (plus `ProcessSource` for the host CPU side) and
writes them as maxwell-poi-trace/v1 files (`.json.gz`) with an `index.json`:

- inference, seeded random weights (no download) in bf16 on the GPU, real `generate()` with a KV
  cache, greedy, 128 new tokens per call, looped until the window is used, at batch 1 and batch 8:
  GPT-2 124M (GPT2Config defaults, vocab 30,522), a ~1B Llama shape (2048 x 16, 32 heads, SwiGLU
  5632), Llama-2-7B shape (4096 x 32, 32 heads, 11008) and Mistral-7B shape (4096 x 32, GQA 32/8,
  14336); the Llama/Mistral shapes keep their real 32,000-token vocabulary;
- non-inference: an integer-hash miner (splitmix64-style multiply-xor-shift on int64 CUDA tensors,
  no tensor cores), a bf16 matmul power burner (8192^3 matmuls back to back), and idle (sleep with
  the CUDA context held).

Repetitions are interleaved in rounds (every label once, then again), so when the global deadline
(--budget-s) comes the missing ones are the last round's, never a whole label; everything skipped is
listed in index.json with the reason. index.json is rewritten after every recording, and with
--pack the folder is re-packed into one .tar.gz after every recording, so a kill leaves a usable
result. Total size is capped (--max-mb).

    python bench/gpu/collect_traces.py                          # GPU, ~5.5 min on one H100
    python bench/gpu/collect_traces.py --out /tmp/t --pack $OUT/traces.tar.gz
    python bench/gpu/collect_traces.py --device cpu --quick     # CPU smoke run, < 2 min

`--device cpu` records ProcessSource traces of tiny models: smoke traces, NOT GPU telemetry.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.util
import io
import json
import math
import os
import platform
import re
import shutil
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.monotonic()  # the global deadline counts from here (before torch is imported)
INDEX_FORMAT = "maxwell-poi-trace-index/v1"

# splitmix64 constants as signed int64 (torch has no uint64 arithmetic on CUDA)
GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
MIX2 = 0x94D049BB133111EB - (1 << 64)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.monotonic() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def load_telemetry() -> Any:
    """maxwell_poi.observer.telemetry; if the package's other dependencies are missing on this
    machine, the telemetry package loaded by path (it needs only numpy, psutil and pynvml)."""
    try:
        from maxwell_poi.observer import telemetry

        return telemetry
    except ImportError as e:
        log(f"import maxwell_poi failed ({e}); loading the telemetry package directly")
        return load_telemetry_standalone()


def load_telemetry_standalone(name: str = "poi_telemetry") -> Any:
    """src/maxwell_poi/observer/telemetry/ as a top-level package called `name`, without importing
    maxwell_poi: its modules import only each other (relatively), numpy, psutil and pynvml."""
    folder = Path(__file__).resolve().parents[2] / "src/maxwell_poi/observer/telemetry"
    spec = importlib.util.spec_from_file_location(
        name, folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before exec: relative imports and dataclasses find the package by name
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return mod


# ---------------------------------------------------------------------------------------------
# models


@dataclasses.dataclass(frozen=True)
class ModelShape:
    key: str
    family: str  # gpt2 | llama | mistral
    description: str
    config: dict[str, Any]
    quick: dict[str, Any]  # the tiny stand-in for --quick (same family, same code path)
    seed: int = 0


GPT2_IDS = dict(vocab_size=30522, bos_token_id=101, eos_token_id=102, pad_token_id=0)  # BERT ids
LLAMA_IDS = dict(vocab_size=32000, bos_token_id=1, eos_token_id=2, pad_token_id=0)
TINY_LLAMA = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128
)
MODELS = [
    ModelShape(
        "gpt2-124m",
        "gpt2",
        "GPT-2 124M shape (GPT2Config defaults: 12 x 768, 12 heads; 109M with vocab 30,522), seed 0",
        dict(**GPT2_IDS),
        dict(**GPT2_IDS, n_embd=64, n_layer=2, n_head=2),
    ),
    ModelShape(
        "llama-1b",
        "llama",
        "~1B Llama shape (16 x 2048, 32 heads, SwiGLU 5632), vocab 32,000, seed 0",
        dict(
            **LLAMA_IDS,
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=5632,
            max_position_embeddings=2048,
        ),
        dict(**LLAMA_IDS, **TINY_LLAMA),
    ),
    ModelShape(
        "llama2-7b",
        "llama",
        "Llama-2-7B shape (32 x 4096, 32 heads, SwiGLU 11008), vocab 32,000, seed 0",
        dict(
            **LLAMA_IDS,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            max_position_embeddings=4096,
        ),
        dict(**LLAMA_IDS, **TINY_LLAMA),
    ),
    ModelShape(
        "mistral-7b",
        "mistral",
        "Mistral-7B shape (32 x 4096, GQA 32/8 heads, SwiGLU 14336), vocab 32,000, seed 0",
        dict(
            **LLAMA_IDS,
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            max_position_embeddings=32768,
            sliding_window=4096,
        ),
        dict(**LLAMA_IDS, **TINY_LLAMA),
    ),
]


def build_model(shape: ModelShape, device: str, quick: bool) -> Any:
    """Seeded random weights, created directly on `device` in bf16 (no fp32 copy, no host copy)."""
    import torch
    import transformers as tf

    config_cls, model_cls = {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[shape.family]
    config = config_cls(**(shape.quick if quick else shape.config))
    prev = torch.get_default_dtype()
    torch.manual_seed(shape.seed)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(torch.bfloat16).eval()


def model_facts(model: Any) -> dict[str, Any]:
    """Parameter count and FLOPs/token estimate (2 x weights touched; embedding look-ups excluded)."""
    from torch import nn

    cfg = model.config
    embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = list({id(p): p for p in model.parameters()}.values())
    touched = sum(p.numel() for p in params if id(p) not in embed) + cfg.hidden_size * cfg.vocab_size
    return {
        "params": sum(p.numel() for p in params),
        "flops_per_token_est": 2 * touched,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
    }


# ---------------------------------------------------------------------------------------------
# workloads: each runs until `until` (a time.monotonic() value), synchronises, returns its work


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Inference:
    def __init__(self, model: Any, batch: int, prompt_len: int, new_tokens: int, device: str) -> None:
        import torch

        self.model, self.batch, self.new_tokens, self.device = model, batch, new_tokens, device
        g = torch.Generator().manual_seed(1000 + batch)
        vocab = model.config.vocab_size
        self.ids = torch.randint(1000, vocab, (batch, prompt_len), generator=g).to(device)
        self.mask = torch.ones_like(self.ids)
        self.pad = model.config.pad_token_id or 0

    def generate(self, max_new: int, max_time: float | None) -> int:
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                self.ids,
                attention_mask=self.mask,
                max_new_tokens=max_new,
                min_new_tokens=max_new,  # random weights may emit EOS; the work must not stop early
                do_sample=False,
                use_cache=True,
                pad_token_id=self.pad,
                max_time=max_time,
            )
        return int(out.shape[1] - self.ids.shape[1])

    def warmup(self) -> None:
        self.generate(4, None)
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        calls = steps = 0
        while (left := until - time.monotonic()) > 0.05:
            steps += self.generate(self.new_tokens, left)  # max_time stops it at the window's end
            calls += 1
        sync(self.device)
        return {
            "batch": self.batch,
            "prompt_len": int(self.ids.shape[1]),
            "max_new_tokens": self.new_tokens,
            "generate_calls": calls,
            "decode_steps": steps,
            "new_tokens": steps * self.batch,
        }


class Miner:
    """Integer hashing like a GPU miner's inner loop: splitmix64 rounds over int64 tensors."""

    def __init__(self, n: int, device: str) -> None:
        import torch

        self.device = device
        self.x = torch.arange(n, dtype=torch.int64, device=device)
        self.hits = torch.zeros((), dtype=torch.int64, device=device)

    def round(self) -> None:
        x = self.x
        x.add_(GOLDEN)
        z = x ^ (x >> 30)
        z.mul_(MIX1)
        z.bitwise_xor_(z >> 27)
        z.mul_(MIX2)
        z.bitwise_xor_(z >> 31)
        self.hits += ((z & 0xFFFFF) == 0).sum()  # "difficulty" check: 20 low bits zero

    def warmup(self) -> None:
        self.round()
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        rounds = 0
        while time.monotonic() < until:
            for _ in range(8):
                self.round()
            rounds += 8
            sync(self.device)  # keep the queue short so the work ends with the window
        return {
            "hashes": rounds * self.x.numel(),
            "rounds": rounds,
            "tensor_elems": self.x.numel(),
            "hits": int(self.hits.item()),
        }


class Burner:
    """bf16 matmuls back to back: maximum tensor-core power, no useful answer."""

    def __init__(self, n: int, device: str) -> None:
        import torch

        g = torch.Generator(device=device).manual_seed(3)
        self.n, self.device = n, device
        self.a = torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16)
        self.b = torch.randn(n, n, generator=g, device=device, dtype=torch.bfloat16)
        self.c = torch.empty(n, n, device=device, dtype=torch.bfloat16)

    def warmup(self) -> None:
        import torch

        torch.mm(self.a, self.b, out=self.c)
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        import torch

        count = 0
        while time.monotonic() < until:
            for _ in range(10):
                torch.mm(self.a, self.b, out=self.c)
            count += 10
            sync(self.device)
        return {"matmuls": count, "n": self.n, "flops": 2 * self.n**3 * count}


class Idle:
    def warmup(self) -> None:
        pass

    def __call__(self, until: float) -> dict[str, Any]:
        time.sleep(max(0.0, until - time.monotonic()))
        return {}


# ---------------------------------------------------------------------------------------------
# the plan


@dataclasses.dataclass
class Job:
    key: str  # file-name stem
    label: str  # the trace's label
    kind: str  # inference | miner | burner | idle
    setup_s: float  # estimated first-use cost (workload + warm-up), for the deadline
    make: Callable[[], Any]  # builds the workload (once; kept for later rounds)
    model: str | None = None
    build_s: float = 0.0  # estimated cost of building `model` when no job has built it yet
    workload: Any = None
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)
    failed: str = ""


class Models:
    """Built models, kept across rounds; evicts the others when the GPU lacks room for the next."""

    def __init__(self, device: str, quick: bool) -> None:
        self.device, self.quick = device, quick
        self.built: dict[str, Any] = {}
        self.facts: dict[str, dict[str, Any]] = {}
        self.jobs: list[Job] = []  # whose workloads hold a model and must let go of it on eviction

    def get(self, shape: ModelShape) -> Any:
        if shape.key in self.built:
            return self.built[shape.key]
        self._make_room(shape)
        t = time.monotonic()
        model = build_model(shape, self.device, self.quick)
        sync(self.device)
        self.facts[shape.key] = {**model_facts(model), "build_s": round(time.monotonic() - t, 2)}
        log(f"built {shape.key}: {self.facts[shape.key]}")
        self.built[shape.key] = model
        return model

    def _make_room(self, shape: ModelShape) -> None:
        if not self.device.startswith("cuda") or not self.built:
            return
        import torch

        c = shape.config
        h, n_layers, inter = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
        need = 2 * (n_layers * (4 * h * h + 3 * h * inter) + 2 * h * c["vocab_size"]) * 1.3 + 4e9
        free, _ = torch.cuda.mem_get_info()
        if free < need:
            log(f"{free / 1e9:.1f} GB free, {shape.key} needs ~{need / 1e9:.1f} GB: evicting built models")
            self.built.clear()
            for job in self.jobs:
                if job.model:
                    job.workload = None
            gc.collect()
            torch.cuda.empty_cache()


def plan(args: argparse.Namespace, models: Models) -> list[Job]:
    dev, quick = args.device, args.quick
    gpu = dev.startswith("cuda")
    where = "GPU" if gpu else "CPU"
    jobs = [
        Job(
            "idle",
            "idle: sleep" + (" with the CUDA context held (GPU)" if gpu else " (CPU)"),
            "idle",
            0.0,
            Idle,
        ),
        Job(
            "miner-int64",
            f"miner: splitmix64 int64 multiply-xor-shift hashing, no tensor cores ({where})",
            "miner",
            2.0,
            lambda: Miner(1 << (18 if quick else 24), dev),
        ),
        Job(
            "burner-bf16-mm",
            f"power burner: bf16 matmuls back to back, no answer ({where})",
            "burner",
            2.0,
            lambda: Burner(256 if quick else 8192, dev),
        ),
    ]
    for shape in MODELS:
        big = shape.config.get("hidden_size", 768) >= 4096 and not quick
        for batch in (1, 8):

            def make(shape: ModelShape = shape, batch: int = batch) -> Inference:
                model = models.get(shape)
                return Inference(model, batch, args.prompt_len, args.new_tokens, dev)

            jobs.append(
                Job(
                    f"infer-{shape.key}-b{batch}",
                    f"inference {shape.key} batch {batch}: generate {args.new_tokens} new tokens, KV cache, "
                    f"greedy, bf16 ({where}); {shape.description}"
                    + ("; TINY stand-in config (--quick)" if quick else ""),
                    "inference",
                    3.0,
                    make,
                    model=shape.key,
                    build_s=20.0 if big else 8.0,
                )
            )
    models.jobs = jobs
    return jobs


# ---------------------------------------------------------------------------------------------
# output


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def env_info(device: str) -> dict[str, Any]:
    import numpy
    import torch
    import transformers

    info: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
    }
    if device.startswith("cuda"):
        info["card"] = torch.cuda.get_device_name(device)
        try:
            import pynvml

            pynvml.nvmlInit()
            try:
                v = pynvml.nvmlSystemGetDriverVersion()
                info["driver"] = v.decode() if isinstance(v, bytes) else v
                h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
                info["power_limit_w"] = pynvml.nvmlDeviceGetPowerManagementLimit(h) / 1000.0
                info["memory_total_gb"] = round(pynvml.nvmlDeviceGetMemoryInfo(h).total / 1e9, 1)
                with contextlib.suppress(Exception):
                    info["vbios"] = pynvml.nvmlDeviceGetVbiosVersion(h)
            finally:
                pynvml.nvmlShutdown()
        except Exception as e:  # the index says why instead of failing the run
            info["driver"] = f"unknown ({type(e).__name__}: {e})"
    else:
        info["card"] = "none (CPU smoke run)"
        info["driver"] = "none"
        info["cpu"] = platform.processor() or platform.machine()
        info["cpu_count"] = os.cpu_count()
    return info


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def write_index(folder: Path, index: dict[str, Any]) -> None:
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1, allow_nan=False, default=_json_default))
    tmp.replace(folder / "index.json")


def _json_default(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return str(x)


def clean(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (round(v, 6) if math.isfinite(v) else None) for k, v in d.items()}


def pack(folder: Path, target: Path) -> None:
    """One .tar.gz of the folder (files under traces/), written atomically, plus a copy of the index."""
    target.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for p in sorted(folder.iterdir()):
            if p.is_file() and not p.name.endswith(".tmp"):
                tar.add(p, arcname=f"traces/{p.name}")
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)
    idx = folder / "index.json"
    if idx.exists():
        shutil.copyfile(idx, target.with_name(target.name.removesuffix(".tar.gz") + "_index.json"))


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out_default = Path(os.environ["OUT"]) / "traces" if os.environ.get("OUT") else Path("data/traces/gpu")
    ap.add_argument("--device", default="cuda", help="cuda (NVML traces) or cpu (ProcessSource smoke)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 rep, 2 s windows, 100 s budget")
    ap.add_argument("--out", type=Path, default=out_default, help=f"trace folder (default {out_default})")
    ap.add_argument("--pack", type=Path, help="also pack the folder into this .tar.gz after every window")
    ap.add_argument("--reps", type=int, help="repetitions per label (default 3; 1 with --quick)")
    ap.add_argument("--seconds", type=float, help="window length (default 8; 2 with --quick)")
    ap.add_argument("--budget-s", type=float, help="global deadline from start (default 330; 100 --quick)")
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-mb", type=float, default=20.0, help="cap on the folder's total size")
    ap.add_argument("--only", help="regex: record only labels whose key matches")
    args = ap.parse_args()
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    budget = args.budget_s or (100.0 if args.quick else 330.0)
    deadline = T0 + budget
    gpu = args.device.startswith("cuda")
    if args.pack and not args.pack.name.endswith(".tar.gz"):
        ap.error(f"--pack: expected a .tar.gz path, got {args.pack}")

    telemetry = load_telemetry()
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.json.gz"):  # a fresh run must not mix with an old one's traces
        old.unlink()

    def give_up(why: str, rc: int) -> int:  # still leave an index that says why
        log(why)
        index = {
            "format": INDEX_FORMAT,
            "kind": "failed",
            "errors": [why],
            "recordings": [],
            "complete": False,
        }
        write_index(args.out, index)
        if args.pack:
            pack(args.out, args.pack)
        return rc

    if gpu and not torch.cuda.is_available():
        return give_up("no CUDA device visible to torch: nothing recorded (--device cpu for a smoke run)", 2)
    if gpu:
        nvml = telemetry.NvmlSource(index=torch.cuda.current_device(), hz=args.hz)
        if not nvml.available:
            reasons = "; ".join(sorted({c.reason for c in nvml.capabilities()}))
            return give_up(f"NVML unavailable, nothing recorded: {reasons}", 3)
        sources = [nvml, telemetry.ProcessSource(hz=args.hz)]
    else:
        sources = [telemetry.ProcessSource(hz=args.hz)]
    observer = telemetry.Observer(sources)
    primary = sources[0].name

    info = env_info(args.device)
    log(f"device: {info.get('card')} driver {info.get('driver')}; torch {info['torch']}")
    models = Models(args.device, args.quick)
    jobs = plan(args, models)
    if args.only:
        jobs = [j for j in jobs if re.search(args.only, j.key)]
    index: dict[str, Any] = {
        "format": INDEX_FORMAT,
        "kind": "gpu" if gpu else "cpu-smoke",
        "note": (
            f"NVML telemetry ({primary}, {args.hz:g} Hz requested) of labelled GPU workloads; "
            "the process source records the host side of the same windows."
            if gpu
            else "CPU SMOKE TRACES (ProcessSource of tiny models on the CPU), NOT GPU telemetry: "
            "they test the script, and must never be used as GPU results or for calibration."
        ),
        "trace_format": telemetry.TRACE_FORMAT,
        "env": info,
        "config": {
            "device": args.device,
            "quick": args.quick,
            "reps": reps,
            "window_s": seconds,
            "budget_s": budget,
            "hz": args.hz,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "sources": [s.name for s in sources],
            "capabilities": {s.name: [dataclasses.asdict(c) for c in s.capabilities()] for s in sources},
        },
        "workloads": {j.key: {"label": j.label, "kind": j.kind, "model": j.model} for j in jobs},
        "recordings": [],
        "skipped": [],
        "errors": [],
        "models": models.facts,
        "complete": False,
    }

    def save_index() -> None:
        index["wall_s"] = round(time.monotonic() - T0, 1)
        write_index(args.out, index)
        if args.pack:
            pack(args.out, args.pack)

    save_index()
    max_bytes = args.max_mb * 2**20
    for rep in range(reps):
        for job in jobs:
            if job.failed:
                index["skipped"].append(
                    {"key": job.key, "rep": rep, "reason": f"failed earlier: {job.failed}"}
                )
                continue
            left = deadline - time.monotonic()
            need = seconds + 3.0
            if job.workload is None:
                need += job.setup_s + (job.build_s if job.model not in models.built else 0.0)
            if left < need:
                why = f"deadline: {left:.0f} s left of the {budget:.0f} s budget, needs ~{need:.0f} s"
                index["skipped"].append({"key": job.key, "rep": rep, "reason": why})
                log(f"skip {job.key} rep {rep}: {why}")
                continue
            if folder_bytes(args.out) > max_bytes:
                why = f"size cap: folder over {args.max_mb:g} MB"
                index["skipped"].append({"key": job.key, "rep": rep, "reason": why})
                continue
            try:
                if job.workload is None:
                    t = time.monotonic()
                    job.workload = job.make()
                    job.workload.warmup()
                    job.facts = dict(models.facts.get(job.model, {})) if job.model else {}
                    job.facts["setup_s"] = round(time.monotonic() - t, 2)
                    log(f"{job.key}: ready in {job.facts['setup_s']} s")
                else:
                    sync(args.device)
                observer.begin_window()
                t_begin = time.monotonic()
                try:
                    work = job.workload(t_begin + seconds)
                finally:
                    ms = observer.end_window()
            except Exception as e:  # one workload failing must not cost the others
                job.failed = f"{type(e).__name__}: {e}"[:500]
                job.workload = None
                index["errors"].append({"key": job.key, "rep": rep, "error": job.failed})
                log(f"FAILED {job.key} rep {rep}: {job.failed}")
                if gpu:
                    gc.collect()
                    torch.cuda.empty_cache()
                save_index()
                continue
            files, summaries = {}, {}
            for name, m in ms.items():
                m = dataclasses.replace(m, label=job.label)
                fname = f"{job.key}__r{rep}.{slug(name.split(':')[0])}.json.gz"
                telemetry.save_trace(m, args.out / fname)
                files[name] = fname
                summaries[name] = clean(m.summary())
                summaries[name]["achieved_hz"] = round((m.t.shape[0] - 1) / max(m.duration_s, 1e-9), 2)
            rec = {
                "key": job.key,
                "label": job.label,
                "kind": job.kind,
                "model": job.model,
                "rep": rep,
                "files": files,
                "work": work,
                "setup": job.facts,
                "summary": summaries,
            }
            p = summaries[primary]
            if job.kind == "inference" and work.get("new_tokens"):
                dur = p["duration_s"] or seconds
                rec["work"]["tokens_per_s"] = round(work["new_tokens"] / dur, 2)
                fpt = job.facts.get("flops_per_token_est")
                if fpt:
                    rec["work"]["flops_est"] = fpt * work["new_tokens"]
            energy = p.get("energy_j")
            flops = rec["work"].get("flops_est") or rec["work"].get("flops")
            if energy and flops:
                rec["work"]["j_per_tflop_est"] = round(energy / (flops / 1e12), 4)
            index["recordings"].append(rec)
            headline = {
                k: p.get(k) for k in ("power_w_mean", "energy_j", "tensor_util_mean", "int_util_mean")
            }
            if not gpu:
                headline = {k: p.get(k) for k in ("cpu_util_mean", "cpu_s", "peak_rss_mb")}
            log(f"recorded {job.key} rep {rep}: {json.dumps(headline)} work {json.dumps(rec['work'])}")
            save_index()
    index["complete"] = not index["skipped"] and not index["errors"]
    index["total_bytes"] = folder_bytes(args.out)
    save_index()
    for s in sources:
        if hasattr(s, "close"):
            s.close()
    n = len(index["recordings"])
    log(
        f"done: {n} recordings, {len(index['skipped'])} skipped, {len(index['errors'])} errors, "
        f"{index['total_bytes'] / 1e6:.2f} MB in {args.out}"
        + (f", packed into {args.pack}" if args.pack else "")
    )
    return 0 if n else 1


if __name__ == "__main__":
    sys.exit(main())
