"""GPU telemetry traces for L1: NVML recordings of real inference and of non-inference workloads.

Records labelled windows with `NvmlSource(hz=20)` (plus `ProcessSource` for the host CPU side) and
writes them as maxwell-poi-trace/v1 files (`.json.gz`) with an `index.json`:

- inference, seeded random weights (no download) in bf16 on the GPU, real `generate()` with a KV
  cache, greedy, 128 new tokens per call, looped until the window is used, at batch 1 and batch 8:
  GPT-2 124M (GPT2Config defaults, vocab 30,522), a ~1B Llama shape (2048 x 16, 32 heads, SwiGLU
  5632), Llama-2-7B shape (4096 x 32, 32 heads, 11008) and Mistral-7B shape (4096 x 32, GQA 32/8,
  14336); the Llama/Mistral shapes keep their real 32,000-token vocabulary. FLOPs per window count
  every call's prefill as well as its decode steps (`generation_flops`);
- non-inference: an integer-hash miner (the Triton kernel of maxwell_poi/adversaries/gpu_hash.py:
  256 rounds of real uint64 splitmix64 per element in registers, no tensor cores, little DRAM
  traffic), a bf16 matmul power burner (8192^3 matmuls back to back), and idle (sleep with the
  CUDA context held).

NVML on the lent machine is the guest VM's driver, so its traces are labelled
`TrustLevel.GUEST` (`--nvml-trust`, default guest-driver); index.json records the kernel, the
virtualisation hints, the CUDA runtime and driver versions, the precision switches and the commit.

Repetitions are interleaved in rounds (every label once, then again), so when the global deadline
(--budget-s) comes the missing ones are the last round's, never a whole label; everything skipped is
listed in index.json with the reason. index.json is rewritten (atomically) after every recording,
and with --pack the folder is re-packed into one .tar.gz after every recording, so a kill leaves a
usable result. The total size is capped (--max-mb, 15 MiB: one file that comes back from the lent
machine may be 16 MiB).

    python bench/gpu/collect_traces.py                          # GPU, ~6.5 min on one H100 (budget 520 s)
    python bench/gpu/collect_traces.py --out /tmp/t --pack $OUT/traces.tar.gz --budget-s 520
    python bench/gpu/collect_traces.py --device cpu --quick     # CPU smoke run, < 1 min

`--device cpu` records ProcessSource traces of tiny models (and the numpy reference of the miner
kernel): smoke traces, NOT GPU telemetry.
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
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.monotonic()  # the global deadline counts from here (before torch is imported)
INDEX_FORMAT = "maxwell-poi-trace-index/v1"
# The lent machine is a Firecracker VM: its NVML is the guest's driver, which the agent controls
NVML_TRUST_DEFAULT = "guest-driver"  # TrustLevel.GUEST
HERE = Path(__file__).resolve().parent
GPU_HASH_PY = HERE.parents[1] / "src/maxwell_poi/adversaries/gpu_hash.py"

sys.path.insert(0, str(HERE))
import gpu_env  # bench/gpu/gpu_env.py: environment block, atomic JSON write (stdlib only)


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


def load_gpu_hash() -> Any:
    """maxwell_poi.adversaries.gpu_hash (the miner kernel, one copy shared with the gpu_miner
    adversary); if `import maxwell_poi` fails here, the same file loaded by path (it imports
    nothing of the package)."""
    try:
        from maxwell_poi.adversaries import gpu_hash

        return gpu_hash
    except ImportError as e:
        log(f"import maxwell_poi failed ({e}); loading {GPU_HASH_PY} directly")
        name = "poi_gpu_hash"
        if name in sys.modules:
            return sys.modules[name]
        spec = importlib.util.spec_from_file_location(name, GPU_HASH_PY)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
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


def build_model(shape: ModelShape, device: str, quick: bool, dtype: Any = None) -> Any:
    """Seeded random weights, created directly on `device` in bf16 (no fp32 copy, no host copy), or
    in `dtype` (next_run.py's fp32 reference)."""
    import torch
    import transformers as tf

    dtype = dtype or torch.bfloat16

    config_cls, model_cls = {
        "gpt2": (tf.GPT2Config, tf.GPT2LMHeadModel),
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
    }[shape.family]
    config = config_cls(**(shape.quick if quick else shape.config))
    prev = torch.get_default_dtype()
    torch.manual_seed(shape.seed)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(config)
    finally:
        torch.set_default_dtype(prev)
    return model.to(dtype).eval()


def model_facts(model: Any) -> dict[str, Any]:
    """Parameter count and FLOPs per token position (2 x weights touched; embedding look-ups
    excluded). The LM head is counted once, tied (GPT-2: the token embedding) or not (Llama,
    Mistral: its own Linear), and kept apart: generate() computes its logits only at the last
    prompt position (see generation_flops). Attention-score FLOPs (4 x layers x hidden x context
    per position) are left out: under 5% at these shapes' 64 + 128 positions."""
    from torch import nn

    cfg = model.config
    embed = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    params = list({id(p): p for p in model.parameters()}.values())
    body = sum(p.numel() for p in params if id(p) not in embed and id(p) not in head_ids)
    head_params = sum(p.numel() for p in params if id(p) in head_ids) if head_ids else 0
    if not head_params:  # no separate head module found: a hidden x vocab projection
        head_params = cfg.hidden_size * cfg.vocab_size
    return {
        "params": sum(p.numel() for p in params),
        "flops_per_token_est": 2 * (body + head_params),
        "body_flops_per_token_est": 2 * body,
        "head_flops_per_token_est": 2 * head_params,
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "vocab": cfg.vocab_size,
    }


def generation_flops(
    body_flops_per_token: float,
    head_flops_per_token: float,
    *,
    batch: int,
    prompt_len: int,
    calls: int,
    new_tokens_per_row: int,
) -> dict[str, float]:
    """Estimated FLOPs of `calls` generate() calls of `batch` rows each, `new_tokens_per_row`
    tokens generated per row over all calls together. Each call first runs the whole prompt
    through the model (prefill: `prompt_len` positions, which yields the first new token), then
    one position per further new token; the last new token is never fed back. The LM head runs
    once per new token (prefill keeps only the last position's logits, `logits_to_keep=1`). Per
    row, so times `batch`:

        body x (calls x prompt_len + new_tokens_per_row - calls)  +  head x new_tokens_per_row

    (Counting decode tokens alone, as before, left out every prefill: a third of the positions at
    64 prompt + 128 new tokens.)"""
    calls = max(0, int(calls))
    new = max(0, int(new_tokens_per_row))
    fed_back = max(0, new - calls)  # new tokens that went through the body as inputs
    prefill_positions = calls * prompt_len
    body = body_flops_per_token * batch * (prefill_positions + fed_back)
    head = head_flops_per_token * batch * new
    return {
        "prompt_tokens": batch * prefill_positions,
        "new_tokens": batch * new,
        "positions_through_body": batch * (prefill_positions + fed_back),
        "prefill_flops_est": body_flops_per_token * batch * prefill_positions,
        "flops_est": body + head,
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
    """A GPU miner's inner loop: gpu_hash.py's Triton kernel, 256 rounds of uint64 splitmix64 per
    element in registers, launched back to back (integer pipes busy; no tensor cores, little DRAM).
    On a CPU (smoke runs) the numpy reference of the same computation stands in."""

    def __init__(self, n: int, device: str) -> None:
        self.device = device
        self.gpu_hash = load_gpu_hash()
        if device.startswith("cuda"):
            why = self.gpu_hash.unavailable_reason()
            if why:
                raise RuntimeError(f"the miner kernel cannot run: {why}")
            self.hasher = self.gpu_hash.GpuHasher(n, device)
        else:
            import numpy as np

            self.states = np.arange(n, dtype=np.uint64)
            self.cpu_rounds, self.cpu_launches, self.cpu_hits = 8, 0, 0
        self.n = n

    def step(self) -> None:
        if self.device.startswith("cuda"):
            self.hasher.step()
        else:
            self.states, _, hits = self.gpu_hash.reference_rounds(self.states, self.cpu_rounds)
            self.cpu_launches += 1
            self.cpu_hits += int(hits.sum())

    def warmup(self) -> None:
        self.step()  # compiles the kernel on first use
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        if self.device.startswith("cuda"):
            start = self.hasher.launches
            while time.monotonic() < until:
                for _ in range(4):
                    self.hasher.step()
                sync(self.device)  # keep the queue short so the work ends with the window
            launches, rounds = self.hasher.launches - start, self.hasher.rounds
            hits = int(self.hasher.hits.item())
            impl = "triton splitmix64 kernel (uint64, in registers)"
        else:
            start = self.cpu_launches
            while time.monotonic() < until:
                self.step()
            launches, rounds, hits = self.cpu_launches - start, self.cpu_rounds, self.cpu_hits
            impl = "numpy reference of the kernel (CPU smoke)"
        return {
            "impl": impl,
            "hashes": launches * rounds * self.n,
            "launches": launches,
            "rounds_per_launch": rounds,
            "elements": self.n,
            "hits_total": hits,
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


class Serving:
    """A serving loop that is not launch-bound (serving.StaticDecoder): static KV cache, the decode
    step one CUDA graph replay (eager on a CPU), greedy, `new_tokens` per call, looped until the
    window is used. Work is counted as for `Inference` (generation_flops)."""

    def __init__(self, model: Any, batch: int, prompt_len: int, new_tokens: int, device: str) -> None:
        import serving
        import torch

        self.batch, self.new_tokens, self.device = batch, new_tokens, device
        self.decoder = serving.StaticDecoder(model, batch, prompt_len + new_tokens)
        g = torch.Generator().manual_seed(1000 + batch)
        self.ids = torch.randint(1000, model.config.vocab_size, (batch, prompt_len), generator=g).to(device)

    def warmup(self) -> None:
        self.decoder.generate(self.ids, 4)  # captures the graph
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        calls = steps = 0
        while until - time.monotonic() > 0.05:
            steps += self.decoder.generate(self.ids, self.new_tokens, until)
            calls += 1
        sync(self.device)
        return {
            "loop": "static KV cache, decode step "
            + ("one CUDA graph replay" if self.decoder.graphed else "eager (no CUDA graph)"),
            "graph_capture_s": self.decoder.capture_s,
            "graph_error": self.decoder.graph_error,
            "batch": self.batch,
            "prompt_len": int(self.ids.shape[1]),
            "max_new_tokens": self.new_tokens,
            "generate_calls": calls,
            "decode_steps": steps,
            "new_tokens": steps * self.batch,
        }


class SpeculativePair:
    """Greedy speculative decoding (serving.Speculative): the draft proposes `k` tokens with graphed
    decode steps, the target checks k + 1 positions per round. FLOPs count both models: per call
    the two prefills, per round the draft's k (or k + 1) positions and the target's k + 1, each with
    its LM head (the target's at every checked position); prefills as in generation_flops."""

    def __init__(
        self, draft: Any, target: Any, facts: tuple[dict, dict], prompt_len: int, new_tokens: int,
        device: str, k: int = 4,
    ) -> None:  # fmt: skip
        import serving
        import torch

        self.new_tokens, self.device, self.k = new_tokens, device, k
        self.facts = facts
        self.spec = serving.Speculative(draft, target, prompt_len + new_tokens, k)
        g = torch.Generator().manual_seed(2000)
        self.ids = torch.randint(1000, target.config.vocab_size, (1, prompt_len), generator=g).to(device)

    def warmup(self) -> None:
        self.spec.generate(self.ids, 2)
        sync(self.device)

    def __call__(self, until: float) -> dict[str, Any]:
        before = self.spec.stats()
        calls = tokens = 0
        while until - time.monotonic() > 0.05:
            tokens += len(self.spec.generate(self.ids, self.new_tokens, until))
            calls += 1
        sync(self.device)
        after = self.spec.stats()
        rounds = after["rounds"] - before["rounds"]
        accepted = after["accepted"] - before["accepted"]
        full = after["full_rounds"] - before["full_rounds"]  # the draft then feeds one more position
        p = int(self.ids.shape[1])
        (d, t), k = self.facts, self.k
        d_pos = rounds * k + full  # draft decode positions (each with its LM head)
        draft_flops = d["body_flops_per_token_est"] * (calls * p + d_pos)
        draft_flops += d["head_flops_per_token_est"] * (calls + d_pos)
        target_flops = t["body_flops_per_token_est"] * (calls * p + rounds * (k + 1))
        target_flops += t["head_flops_per_token_est"] * (calls + rounds * (k + 1))
        return {
            "loop": "speculative: draft decode steps "
            + ("CUDA graph replays" if self.spec.draft.graphed else "eager")
            + f", target checks {k + 1} positions per round (eager), greedy",
            "batch": 1,
            "prompt_len": p,
            "max_new_tokens": self.new_tokens,
            "generate_calls": calls,
            "decode_steps": tokens,
            "new_tokens": tokens,
            "rounds": rounds,
            "k": k,
            "drafts_accepted": accepted,
            "acceptance": round(accepted / (rounds * k), 4) if rounds else None,
            "flops_est": draft_flops + target_flops,
            "draft_flops_est": draft_flops,
            "target_flops_est": target_flops,
        }


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

        need = approx_bytes(shape) * 1.3 + 4e9  # weights, plus KV cache, activations, allocator slack
        free, _ = torch.cuda.mem_get_info()
        if free < need:
            log(f"{free / 1e9:.1f} GB free, {shape.key} needs ~{need / 1e9:.1f} GB: evicting built models")
            self.built.clear()
            for job in self.jobs:
                if job.model:
                    job.workload = None
            gc.collect()
            torch.cuda.empty_cache()


def approx_params(shape: ModelShape) -> int:
    """Parameters of the full-size shape, from its config (GPT-2 names its sizes n_embd, n_layer,
    n_inner; Llama and Mistral hidden_size, num_hidden_layers, intermediate_size)."""
    import transformers as tf

    config_cls = {"gpt2": tf.GPT2Config, "llama": tf.LlamaConfig, "mistral": tf.MistralConfig}[shape.family]
    cfg = config_cls(**shape.config)
    h, layers, vocab = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    if shape.family == "gpt2":
        inter = getattr(cfg, "n_inner", None) or 4 * h
        per_layer = 4 * h * h + 2 * h * inter
        embeddings = vocab * h + cfg.n_positions * h  # the head is tied to the token embedding
    else:
        inter = cfg.intermediate_size
        heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
        per_layer = 2 * h * h + 2 * h * (h * kv // heads) + 3 * h * inter
        embeddings = 2 * vocab * h  # token embedding and an untied head
    return int(layers * per_layer + embeddings)


def approx_bytes(shape: ModelShape) -> int:
    """bf16 weights of the full-size shape."""
    return 2 * approx_params(shape)


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
            "miner-splitmix64",
            "miner: 256 rounds of uint64 splitmix64 per element in registers, no tensor cores "
            + ("(GPU, Triton kernel)" if gpu else "(CPU, numpy reference of the kernel)"),
            "miner",
            6.0 if gpu else 1.0,  # the first launch compiles the kernel
            lambda: Miner(1 << (16 if quick or not gpu else 24), dev),
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


SERVING_SHAPES = ("llama-1b", "llama2-7b", "mistral-7b")  # StaticDecoder covers Llama/Mistral blocks
SERVING_BATCHES = (1, 8, 32)
SPECULATIVE = ("llama-1b", "llama2-7b")  # draft, target


def plan_serving(args: argparse.Namespace, models: Models) -> list[Job]:
    """`--plan serving`: idle (this run's baseline), then the serving loop (serving.StaticDecoder:
    static KV cache, CUDA-graph decode steps) of the Llama and Mistral shapes at batch 1, 8 and 32,
    and a speculative pair (draft llama-1b, target llama2-7b, 4 proposals per round)."""
    dev, quick = args.device, args.quick
    where = "GPU, CUDA graph" if dev.startswith("cuda") else "CPU, eager"
    tiny = "; TINY stand-in config (--quick)" if quick else ""
    shapes = {s.key: s for s in MODELS}
    jobs = [
        Job("idle", "idle: sleep" + (" with the CUDA context held (GPU)" if dev != "cpu" else " (CPU)"),
            "idle", 0.0, Idle),
    ]  # fmt: skip
    for key in SERVING_SHAPES:
        shape = shapes[key]
        big = shape.config.get("hidden_size", 768) >= 4096 and not quick
        for batch in SERVING_BATCHES:

            def make(shape: ModelShape = shape, batch: int = batch) -> Serving:
                return Serving(models.get(shape), batch, args.prompt_len, args.new_tokens, dev)

            jobs.append(
                Job(
                    f"serve-{key}-b{batch}",
                    f"inference {key} batch {batch}: serving loop, static KV cache, greedy, "
                    f"{args.new_tokens} new tokens per call, bf16 ({where}); {shape.description}{tiny}",
                    "inference",
                    5.0,  # graph capture
                    make,
                    model=key,
                    build_s=20.0 if big else 8.0,
                )
            )
    draft, target = (shapes[k] for k in SPECULATIVE)

    def make_pair() -> SpeculativePair:
        d, t = models.get(draft), models.get(target)
        facts = (models.facts[draft.key], models.facts[target.key])
        return SpeculativePair(d, t, facts, args.prompt_len, args.new_tokens, dev)

    jobs.append(
        Job(
            f"spec-{draft.key}-{target.key}-b1",
            f"inference speculative pair batch 1: draft {draft.key} proposes 4 tokens per round, target "
            f"{target.key} checks them, greedy, bf16 ({where}){tiny}",
            "inference",
            5.0,
            make_pair,
            model=target.key,
            build_s=40.0 if not quick else 8.0,
        )
    )
    models.jobs = jobs
    return jobs


PLANS = {"default": plan, "serving": plan_serving}


# ---------------------------------------------------------------------------------------------
# output


def slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def env_info(device: str, commit: str) -> dict[str, Any]:
    """Card, driver, versions; the kernel, virtualisation hints, CUDA runtime and driver versions
    and the precision switches (gpu_env.environment, under "platform"); the commit."""
    import numpy
    import torch
    import transformers

    info: dict[str, Any] = {
        "commit": commit,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "platform": gpu_env.environment(commit),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    out_default = Path(os.environ["OUT"]) / "traces" if os.environ.get("OUT") else Path("data/traces/gpu")
    ap.add_argument("--device", default="cuda", help="cuda (NVML traces) or cpu (ProcessSource smoke)")
    ap.add_argument("--quick", action="store_true", help="tiny models, 1 rep, 2 s windows, 100 s budget")
    ap.add_argument("--out", type=Path, default=out_default, help=f"trace folder (default {out_default})")
    ap.add_argument("--pack", type=Path, help="also pack the folder into this .tar.gz after every window")
    ap.add_argument("--reps", type=int, help="repetitions per label (default 3; 1 with --quick)")
    ap.add_argument("--seconds", type=float, help="window length (default 8; 2 with --quick)")
    ap.add_argument("--budget-s", type=float, help="global deadline from start (default 520; 100 --quick)")
    ap.add_argument("--hz", type=float, default=20.0)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument(
        "--max-mb",
        type=float,
        default=15.0,
        help="cap (MiB) on the folder and on the packed .tar.gz (default 15: a file that comes back "
        "from the lent machine may be 16 MiB)",
    )
    ap.add_argument("--only", help="regex: record only labels whose key matches")
    ap.add_argument(
        "--plan",
        choices=sorted(PLANS),
        default="default",
        help="default: HF generate at batch 1/8, miner, burner, idle; serving: the static-cache "
        "CUDA-graph serving loop at batch 1/8/32 and a speculative pair, idle",
    )
    ap.add_argument(
        "--nvml-trust",
        default=NVML_TRUST_DEFAULT,
        help="TrustLevel of the NVML traces (default guest-driver: on the lent machine, a Firecracker "
        "VM, NVML is the guest's driver, not Maxwell's host; 'host' only where it really is)",
    )
    ap.add_argument("--commit", help="the project commit (default $POI_COMMIT, else git rev-parse HEAD)")
    args = ap.parse_args(argv)
    reps = args.reps or (1 if args.quick else 3)
    seconds = args.seconds or (2.0 if args.quick else 8.0)
    budget = args.budget_s or (100.0 if args.quick else 520.0)
    commit = gpu_env.commit_of(args.commit)
    deadline = T0 + budget
    gpu = args.device.startswith("cuda")
    if args.pack and not args.pack.name.endswith(".tar.gz"):
        ap.error(f"--pack: expected a .tar.gz path, got {args.pack}")

    telemetry = load_telemetry()
    try:
        nvml_trust = telemetry.TrustLevel(args.nvml_trust)
    except ValueError:
        ap.error(f"--nvml-trust: one of {', '.join(t.value for t in telemetry.TrustLevel)}")
    import torch

    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.json.gz"):  # a fresh run must not mix with an old one's traces
        old.unlink()

    def give_up(why: str, rc: int) -> int:  # still leave an index that says why
        log(why)
        index = {
            "format": INDEX_FORMAT,
            "kind": "failed",
            "commit": commit,
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
        nvml = telemetry.NvmlSource(index=torch.cuda.current_device(), hz=args.hz, trust=nvml_trust)
        if not nvml.available:
            reasons = "; ".join(sorted({c.reason for c in nvml.capabilities()}))
            return give_up(f"NVML unavailable, nothing recorded: {reasons}", 3)
        sources = [nvml, telemetry.ProcessSource(hz=args.hz)]
    else:
        sources = [telemetry.ProcessSource(hz=args.hz)]
    observer = telemetry.Observer(sources)
    primary = sources[0].name

    info = env_info(args.device, commit)
    log(f"device: {info.get('card')} driver {info.get('driver')}; torch {info['torch']}")
    models = Models(args.device, args.quick)
    jobs = PLANS[args.plan](args, models)
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
        "commit": commit,
        "env": info,
        "precision": {
            "note": "the models run in bf16; these switches decide fp32 matmuls and attention kernels",
            "settings": gpu_env.precision_settings(),
        },
        "config": {
            "device": args.device,
            "quick": args.quick,
            "reps": reps,
            "window_s": seconds,
            "budget_s": budget,
            "hz": args.hz,
            "new_tokens": args.new_tokens,
            "prompt_len": args.prompt_len,
            "plan": args.plan,
            "sources": [s.name for s in sources],
            "trust": {s.name: str(getattr(s, "trust", "?")) for s in sources},
            "nvml_trust_why": "the lent machine is a VM (Firecracker): its NVML is the guest's driver"
            if gpu and nvml_trust == telemetry.TrustLevel.GUEST
            else None,
            "max_mb": args.max_mb,
            "flops": "generation_flops: every call's prefill (prompt positions) plus decode positions, "
            "2 x weights per position; LM head once per new token",
            "capabilities": {s.name: [dataclasses.asdict(c) for c in s.capabilities()] for s in sources},
        },
        "workloads": {j.key: {"label": j.label, "kind": j.kind, "model": j.model} for j in jobs},
        "recordings": [],
        "skipped": [],
        "errors": [],
        "models": models.facts,
        "complete": False,
    }

    max_bytes = args.max_mb * 2**20

    def save_index() -> None:
        index["wall_s"] = round(time.monotonic() - T0, 1)
        write_index(args.out, index)
        if args.pack:
            pack(args.out, args.pack)
            index["packed_bytes"] = args.pack.stat().st_size
            if index["packed_bytes"] > max_bytes:
                log(f"!! {args.pack} is {index['packed_bytes'] / 2**20:.1f} MiB, over {args.max_mb:g} MiB")

    def skip(job: Job, rep: int, why: str) -> None:
        index["skipped"].append({"key": job.key, "rep": rep, "reason": why})
        log(f"skip {job.key} rep {rep}: {why}")
        save_index()

    save_index()
    largest = 0  # bytes of the largest recording so far: the next one is assumed no larger
    for rep in range(reps):
        for job in jobs:
            if job.failed:
                skip(job, rep, f"failed earlier: {job.failed}")
                continue
            left = deadline - time.monotonic()
            need = seconds + 3.0
            if job.workload is None:
                need += job.setup_s + (job.build_s if job.model not in models.built else 0.0)
            if left < need:
                skip(
                    job, rep, f"deadline: {left:.0f} s left of the {budget:.0f} s budget, needs ~{need:.0f} s"
                )
                continue
            size = max(folder_bytes(args.out), index.get("packed_bytes", 0))
            if size + largest > max_bytes:
                skip(
                    job,
                    rep,
                    f"size cap: {size / 2**20:.1f} MiB written, the next recording (~{largest / 2**20:.1f} "
                    f"MiB) would pass {args.max_mb:g} MiB",
                )
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
                index["errors"].append(
                    {
                        "key": job.key,
                        "rep": rep,
                        "error": job.failed,
                        "traceback": "".join(traceback.format_exception(e))[-6000:],
                    }
                )
                log(f"FAILED {job.key} rep {rep}: {job.failed}")
                if gpu:
                    gc.collect()
                    torch.cuda.empty_cache()
                save_index()
                continue
            files, summaries, written = {}, {}, 0
            for name, m in ms.items():
                m = dataclasses.replace(m, label=job.label)
                fname = f"{job.key}__r{rep}.{slug(name.split(':')[0])}.json.gz"
                telemetry.save_trace(m, args.out / fname)
                files[name] = fname
                written += (args.out / fname).stat().st_size
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
            largest = max(largest, written)
            p = summaries[primary]
            if job.kind == "inference" and work.get("new_tokens"):
                dur = p["duration_s"] or seconds
                rec["work"]["tokens_per_s"] = round(work["new_tokens"] / dur, 2)
                body, head = (
                    job.facts.get("body_flops_per_token_est"),
                    job.facts.get("head_flops_per_token_est"),
                )
                if body and "flops_est" not in work:  # a speculative pair counts its own
                    rec["work"].update(
                        generation_flops(
                            body,
                            head or 0,
                            batch=work["batch"],
                            prompt_len=work["prompt_len"],
                            calls=work["generate_calls"],
                            new_tokens_per_row=work["decode_steps"],
                        )
                    )
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
