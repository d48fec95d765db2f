"""Train the project's own small causal LMs (poi-lm and its draft poi-lm-draft) on text that ships
with this machine, so detection figures come from a model whose logits are peaked like a real one's.

Corpus recipe (offline, deterministic for a given Python and `transformers` version):
  1. every docstring (module, class, function) of every `.py` file of the Python standard library
     (`sysconfig` stdlib path; `test/`, `tests/`, `idlelib/`, `site-packages/` excluded);
  2. every docstring of the installed `transformers` package (pinned in constraints.txt);
  files in sorted path order, docstrings in source order, exact duplicates dropped (the first kept),
  docstrings under 40 characters dropped. A file whose blake2b(path) is 0 mod 20 is held out.
Tokenizer: byte-level BPE (`tokenizers`), 4,096 tokens, trained on the training split only.
Models (`transformers` Llama, tied embeddings): poi-lm 4 x 256 (SwiGLU 704, 4 heads), poi-lm-draft
2 x 128. AdamW, cosine schedule, fixed steps and seeds, 2 threads.

Writes src/maxwell_poi/data/models/{poi-lm,poi-lm-draft}/ (config, safetensors, tokenizer) and
bench/results/trained_model.json (parameters, corpus, time, held-out perplexity, top-1 probability
distribution against the seeded models').

    python -m bench.audit.train_model            # ~22 min on 2 cores
    python -m bench.audit.train_model --quick    # a smoke run into a scratch folder
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import math
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from bench.common.results import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WRITES = {
    "trained_model.json": [
        "corpus",
        "tokenizer",
        "machine",
        "models",
        "seeded_top1_probability",
        "total_s",
    ]
}  # the keys of bench/results/trained_model.json this script writes (bench/common/results.py)
MODELS = ROOT / "src" / "maxwell_poi" / "data" / "models"
OUT = ROOT / "bench" / "results" / "trained_model.json"
VOCAB = 4096
SEQ = 128
SPECIALS = ["<|bos|>", "<|eos|>", "<|pad|>"]
ARCH = {
    "poi-lm": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4),
    "poi-lm-draft": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=2, num_attention_heads=2),
}
EXCLUDED_DIRS = {"test", "tests", "idlelib", "site-packages", "__pycache__"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    return [d for n in ast.walk(tree) if isinstance(n, nodes) and (d := ast.get_docstring(n))]


def corpus() -> tuple[list[str], list[str], dict]:
    """(training documents, held-out documents, the recipe's record)."""
    import transformers

    roots = [
        ("stdlib", Path(sysconfig.get_paths()["stdlib"])),
        ("transformers", Path(transformers.__file__).parent),
    ]
    seen: set[str] = set()
    train, held = [], []
    record = {"sources": [], "min_chars": 40, "held_out_rule": "blake2b(relative path) % 20 == 0"}
    for label, root in roots:
        files = [p for p in sorted(root.rglob("*.py")) if not EXCLUDED_DIRS & set(p.relative_to(root).parts)]
        chars = 0
        for path in files:
            rel = f"{label}/{path.relative_to(root)}"
            held_out = (
                int.from_bytes(hashlib.blake2b(rel.encode(), digest_size=8).digest(), "little") % 20 == 0
            )
            for doc in docstrings(path):
                if len(doc) < 40 or doc in seen:
                    continue
                seen.add(doc)
                (held if held_out else train).append(doc)
                chars += len(doc)
        record["sources"].append({"name": label, "root": str(root), "files": len(files), "chars": chars})
    digest = hashlib.blake2b("\x00".join(train + ["--held--"] + held).encode(), digest_size=16).hexdigest()
    record.update(
        train_docs=len(train),
        held_docs=len(held),
        digest=digest,
        python=platform.python_version(),
        transformers=transformers.__version__,
    )
    return train, held, record


def train_tokenizer(docs: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def encode(tok, docs: list[str]) -> np.ndarray:
    bos, eos = tok.token_to_id("<|bos|>"), tok.token_to_id("<|eos|>")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids += [bos, *enc.ids, eos]
    return np.asarray(ids, dtype=np.int64)


def build(name: str, tok, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=VOCAB,
        max_position_embeddings=1024,
        num_key_value_heads=ARCH[name]["num_attention_heads"],
        tie_word_embeddings=True,
        bos_token_id=tok.token_to_id("<|bos|>"),
        eos_token_id=tok.token_to_id("<|eos|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        **ARCH[name],
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batches(data: np.ndarray, batch: int, steps: int, seed: int):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, len(data) - SEQ - 1, size=batch)
        yield torch.from_numpy(np.stack([data[s : s + SEQ + 1] for s in starts]))


def fit(model, data: np.ndarray, steps: int, batch: int, lr: float, seed: int) -> list[dict]:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))
    )
    model.train()
    history, t0 = [], time.perf_counter()
    for step, xb in enumerate(batches(data, batch, steps, seed)):
        loss = model(input_ids=xb[:, :-1], labels=xb[:, :-1].clone()).loss  # HF shifts the labels
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(
                {"step": step, "loss": round(loss.item(), 4), "s": round(time.perf_counter() - t0, 1)}
            )
            log(f"  step {step}/{steps} loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return history


@torch.inference_mode()
def perplexity(model, data: np.ndarray, windows: int = 200) -> float:
    starts = np.linspace(0, len(data) - SEQ - 1, windows).astype(int)
    losses = [
        float(
            model(
                input_ids=torch.from_numpy(data[s : s + SEQ])[None],
                labels=torch.from_numpy(data[s : s + SEQ])[None],
            ).loss
        )
        for s in starts
    ]
    return float(math.exp(np.mean(losses)))


@torch.inference_mode()
def top1_probabilities(module, ids: np.ndarray, windows: int = 40) -> np.ndarray:
    """Top-1 next-token probability at every position of `windows` held-out windows."""
    starts = np.linspace(0, len(ids) - SEQ - 1, windows).astype(int)
    probs = [
        torch.softmax(module(input_ids=torch.from_numpy(ids[s : s + SEQ])[None]).logits[0].float(), -1)
        .max(-1)
        .values
        for s in starts
    ]
    return torch.cat(probs).numpy()


def summary(p: np.ndarray) -> dict:
    q = np.quantile(p, [0.1, 0.25, 0.5, 0.75, 0.9])
    return {
        "mean": round(float(p.mean()), 4),
        **{
            f"p{int(k * 100)}": round(float(v), 4)
            for k, v in zip([0.1, 0.25, 0.5, 0.75, 0.9], q, strict=True)
        },
        "share_above_0.5": round(float((p > 0.5).mean()), 4),
        "positions": int(p.size),
    }


def seeded_top1(held: list[str]) -> dict:
    """The seeded built-in models' top-1 probabilities on the same held-out text (their tokenizer)."""
    from maxwell_poi.registry.models import Registry

    reg, out = Registry(), {}
    for model_id in ("gpt2-small", "llama-small"):
        m = reg.load(model_id)
        ids = np.asarray(
            m.tokenizer("\n\n".join(held[:400]), add_special_tokens=False)["input_ids"], dtype=np.int64
        )
        out[model_id] = summary(top1_probabilities(m.module, ids))
    return out


def save(model, tok, folder: Path) -> str:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    ).save_pretrained(folder)
    for extra in ("generation_config.json",):
        (folder / extra).unlink(missing_ok=True)
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1600)
    ap.add_argument("--draft-steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="30 steps each into /tmp/poi-train (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models_dir, out = (
        (Path("/tmp/poi-train"), Path("/tmp/poi-train/trained_model.json")) if args.quick else (MODELS, OUT)
    )
    if args.quick:
        args.steps = args.draft_steps = 30
    t0 = time.perf_counter()
    train_docs, held_docs, record = corpus()
    log(f"corpus: {record['train_docs']} training and {record['held_docs']} held-out docstrings")
    tok = train_tokenizer(train_docs)
    train_ids, held_ids = encode(tok, train_docs), encode(tok, held_docs)
    record.update(train_tokens=int(train_ids.size), held_tokens=int(held_ids.size))
    log(f"tokens: {train_ids.size:,} training, {held_ids.size:,} held out")
    result = {
        "corpus": record,
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab": VOCAB},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "torch": torch.__version__,
        },
        "models": {},
    }
    for name, steps, seed in (("poi-lm", args.steps, 0), ("poi-lm-draft", args.draft_steps, 1)):
        model = build(name, tok, seed)
        params = sum(p.numel() for p in model.parameters())
        log(f"{name}: {params:,} parameters, {steps} steps of {args.batch} x {SEQ} tokens")
        start = time.perf_counter()
        history = fit(model, train_ids, steps, args.batch, 3e-3 if name == "poi-lm" else 4e-3, seed)
        took = time.perf_counter() - start
        sha = save(model, tok, models_dir / name)
        result["models"][name] = {
            "parameters": params,
            "architecture": {"family": "llama", "vocab": VOCAB, **ARCH[name]},
            "steps": steps,
            "batch": args.batch,
            "seq": SEQ,
            "tokens_seen": steps * args.batch * SEQ,
            "training_s": round(took, 1),
            "safetensors_sha256": sha,
            "safetensors_bytes": (models_dir / name / "model.safetensors").stat().st_size,
            "held_out_perplexity": round(perplexity(model, held_ids), 3),
            "train_perplexity": round(perplexity(model, train_ids), 3),
            "top1_probability": summary(top1_probabilities(model, held_ids)),
            "loss_history": history,
        }
        log(f"{name}: held-out perplexity {result['models'][name]['held_out_perplexity']}")
    result["seeded_top1_probability"] = seeded_top1(held_docs)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write_results("trained_model.json", result, writes=WRITES, path=out)
    log(f"wrote {out} and {models_dir} in {result['total_s']:.0f} s")


if __name__ == "__main__":
    main()
