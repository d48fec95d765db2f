"""Export a registered Llama-style causal LM (poi-lm) to a GGUF file for llama.cpp (issue 27).

llama.cpp's own converter (`convert_hf_to_gguf.py`) ships only in llama.cpp's source tree (and the
llama-cpp-python sdist), not in any installed package, and it refuses poi-lm's tokenizer: it
recognises byte-level BPE pre-tokenizers by a hash of known vocabularies ("BPE pre-tokenizer was not
recognized"). So this module writes the file with the `gguf` package (the `engines` extra) from
the registry's own weights (digest-checked by `Registry.load`) and the packaged tokenizer.json,
offline. The layout follows that converter's LlamaModel: same tensor names, the same Q/K row
permutation for llama.cpp's RoPE, norms kept in f32, the tied output projection left to
llama.cpp (it reuses token_embd). Checked once against that converter (0.3.36's, told to take the
tokenizer as "gpt-2"): every tensor bit-identical at f32 and q8_0, the same tokens and merges; only
add_bos_token differs, on purpose (below).

    python -m maxwell_poi.registry.gguf_export poi-lm f32 /tmp/poi-lm-f32.gguf
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..protocol.errors import PoiError
from .models import LoadedModel, Registry, model_dir

GgufType = Literal["f32", "f16", "q8_0"]
GGUF_TYPES: tuple[GgufType, ...] = ("f32", "f16", "q8_0")

# HF LlamaForCausalLM parameter names -> GGUF names (llama.cpp's "llama" architecture)
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as exc:  # an optional extra: say how to get it
        raise PoiError("GGUF export needs the `gguf` package: pip install -e '.[engines]'") from exc
    return gguf


def _permute_for_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotates the two halves of each head (rotate_half); llama.cpp's LLAMA rope pairs adjacent
    dimensions. Reorder Q/K output rows so both compute the same thing (the converter's `permute`)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_tables(folder: Path) -> tuple[list[str], list[int], list[str]]:
    """Tokens (the byte-level strings as in tokenizer.json), their GGUF types (special added tokens
    are CONTROL, so llama.cpp never prints them) and the merges."""
    gguf = _gguf()
    tok = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    model = tok["model"]
    if model.get("type") != "BPE":
        raise PoiError(f"GGUF export handles byte-level BPE tokenizers, got {model.get('type')!r}")
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space"):
        # llama.cpp's "gpt-2" pre-tokenizer is exactly ByteLevel with GPT-2's regex and no prefix space
        raise PoiError(f"GGUF export handles a plain GPT-2 ByteLevel pre-tokenizer, got {pre}")
    vocab: dict[str, int] = model["vocab"]
    special = {t["id"] for t in tok.get("added_tokens", []) if t.get("special")}
    for t in tok.get("added_tokens", []):
        vocab.setdefault(t["content"], t["id"])
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    if "" in tokens:
        raise PoiError("tokenizer.json's ids are not contiguous")
    control, normal = int(gguf.TokenType.CONTROL), int(gguf.TokenType.NORMAL)
    types = [control if i in special else normal for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(
    model_id: str,
    out: str | Path,
    ftype: GgufType = "f32",
    registry: Registry | None = None,
    loaded: LoadedModel | None = None,
) -> Path:
    """Write `model_id` (a registered Llama causal LM with its own tokenizer) to `out` as GGUF.

    f32 and f16 store every matrix at that type; q8_0 quantises them (blocks of 32, one f16 scale:
    llama.cpp's Q8_0). 1-D norm weights stay f32 at every type, as llama.cpp's converter keeps them.
    `loaded`: write these weights instead of the registry's (a modified copy: the engine benchmark's
    weight-noise cheat); the tokenizer and config are still `model_id`'s.
    """
    gguf = _gguf()
    if ftype not in GGUF_TYPES:
        raise PoiError(f"GGUF type must be one of {GGUF_TYPES}, got {ftype!r}")
    registry = registry or Registry()
    loaded = loaded or registry.load(model_id)  # the registry's weights, digest-checked, from local files
    cfg = loaded.module.config
    if getattr(cfg, "model_type", None) != "llama" or loaded.spec.path is None:
        raise PoiError(f"GGUF export handles the registry's Llama causal LMs, not {model_id!r}")
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head
    rope = getattr(cfg, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise PoiError(f"GGUF export handles plain RoPE, got {rope}")
    theta = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out), "llama")
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[ftype]
    writer.add_type("model")
    writer.add_name(model_id)
    writer.add_description(f"{model_id} weights digest {loaded.reference.weights_digest}")
    writer.add_file_type(int(file_type))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(head_dim)

    tokens, types, merges = _tokenizer_tables(model_dir(loaded.spec))
    if len(tokens) != cfg.vocab_size:
        raise PoiError(f"tokenizer has {len(tokens)} tokens, the model {cfg.vocab_size}")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    tk = loaded.tokenizer
    writer.add_bos_token_id(int(tk.bos_token_id))
    writer.add_eos_token_id(int(tk.eos_token_id))
    if tk.pad_token_id is not None:
        writer.add_pad_token_id(int(tk.pad_token_id))
    # Maxwell's prompts are [bos, *text ids] (registry.loaded.encode_prompt): llama.cpp then adds
    # the same bos to a plain-text prompt
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)

    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[ftype]
    state = {k: v.detach().to(torch.float32).numpy() for k, v in loaded.module.state_dict().items()}
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    named: list[tuple[str, np.ndarray]] = [("token_embd.weight", state["model.embed_tokens.weight"])]
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_TENSORS.items():
            w = state[f"model.layers.{i}.{hf}"]
            if hf == "self_attn.q_proj.weight":
                w = _permute_for_rope(w, n_head)
            elif hf == "self_attn.k_proj.weight":
                w = _permute_for_rope(w, n_kv)
            named.append((f"blk.{i}.{gg}", w))
    named.append(("output_norm.weight", state["model.norm.weight"]))
    if not tied:
        named.append(("output.weight", state["lm_head.weight"]))
    for name, w in named:
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, w)
        else:
            writer.add_tensor(name, gguf.quants.quantize(w, qtype), raw_dtype=qtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    types = {t: t for t in GGUF_TYPES}
    if len(args) != 3 or args[1] not in types:
        raise SystemExit(f"usage: python -m maxwell_poi.registry.gguf_export MODEL {{{','.join(types)}}} OUT")
    print(export_gguf(args[0], args[2], types[args[1]]))


if __name__ == "__main__":
    main()
