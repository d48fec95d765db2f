"""L3-zk circuits: one GPT-2 block's attention or MLP half as an EZKL (Halo2/KZG) circuit with the
model's weights fixed in it, shared by the prover (proving key) and Maxwell (verification key).

    attn   x            -> ln_1 -> c_attn -> causal attention -> c_proj   = the trace's `attn`
    mlp    x + attn     -> ln_2 -> c_fc -> gelu_new -> c_proj             = the trace's `mlp`

over `tokens` consecutive positions. The MLP half is position-wise, so any window of the trace can
be proven; causal attention at position t reads every earlier key and value, so its window starts
at position 0 (a later window would need the earlier keys and values inside the circuit, a circuit
per length). The causal mask multiplies exp(scores) by 0/1 instead of adding -inf: an additive mask
puts -1e4 (x 2^scale) into the exp lookup and blows its table up to 2^19 rows.

Weights are `fixed` (baked into the verification key), so a verification key stands for these
exact weights: keys are cached under $POI_HOME/circuits/<model>/<kind>-b<block>/<key>/, the key a
digest of the block's weights, the circuit config and the EZKL version.

SRS: KZG needs a structured reference string whose secret nobody knows (a ceremony). Nothing here
downloads one. Production installs ceremony files ($POI_HOME/srs/kzg<logrows>.srs; e.g. the
Perpetual Powers of Tau transcript converted to EZKL's format, checked against a pinned digest).
`ezkl.gen_srs` makes a test SRS whose secret this machine saw: allowed only with allow_test_srs
(tests, bench, demo), and every result says which kind it used.

Each heavy step (setup, prove) runs in a child process with an address-space cap (CAP_GB), so one
circuit cannot take the machine down; the child's peak RSS is recorded, and a deadlocked child is
killed by its CPU rate (circuits.capped).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import blake3
import numpy as np
import torch
from torch import nn

from ..protocol.errors import PoiError
from ..registry.models import LoadedModel, poi_home
from .capped import Step, run_capped

Kind = Literal["attn", "mlp"]
KINDS: tuple[Kind, ...] = ("attn", "mlp")
EZKL_VERSION = "23.0.5"


@dataclass(frozen=True)
class CircuitConfig:
    """What shapes the circuit (each field is one row of bench/zk/ezkl.py's settings table)."""

    tokens: int = 8
    input_scale: int = 12  # bits of the fixed-point inputs; seeded GPT-2 activations are ~1e-2
    param_scale: int = 12  # bits of the fixed weights (std 0.02: scale 7 leaves ~2 levels per weight)
    inner_cols: int = 2
    decomp_base_bits: int = 14
    decomp_legs: int = 2
    io: Literal["public", "hashed"] = "public"  # hashed: Poseidon of inputs/outputs inside the circuit
    params: Literal["fixed", "private", "hashed"] = "fixed"
    lookup_margin: int = 2  # calibrated lookup range x this, so honest inputs off the calibration fit
    bounded_log_lookup: bool = False

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


def default_config(kind: Kind, d: int) -> CircuitConfig:
    """The kept settings (bench/zk/ezkl.py): 8 positions of attention; the MLP proves one position per
    challenge (its GELU costs ~110 rows per element, so 8 positions need 2^19+ rows from d = 64)."""
    return CircuitConfig(tokens=8 if kind == "attn" else 1)


@dataclass
class Circuit:
    """The artefacts of one (model, block, kind, config): paths, scales and what setting them up cost."""

    model_id: str
    block: int
    kind: Kind
    config: CircuitConfig
    weights_digest: str
    folder: Path
    settings: dict[str, Any] = field(repr=False)
    srs: Path
    test_srs: bool
    setup: Step | None = None

    @property
    def logrows(self) -> int:
        return int(self.settings["run_args"]["logrows"])

    @property
    def input_scale(self) -> int:
        return int(self.settings["model_input_scales"][0])

    @property
    def width(self) -> int:
        """d: the block's input [1, tokens, d]."""
        return int(self.settings["model_instance_shapes"][0][-1])

    @property
    def output_scale(self) -> int:
        return int(self.settings["model_output_scales"][0])

    def path(self, name: str) -> Path:
        return self.folder / name


class BlockCircuit(nn.Module):
    """The traced computation of one block half, written out so the ONNX graph has only ops EZKL
    lays out well (matmuls by constant weights, exp, a 0/1 mask, layer norm, tanh)."""

    def __init__(self, block: nn.Module, kind: Kind, tokens: int) -> None:
        super().__init__()
        self.block, self.kind = block, kind
        self.heads = block.attn.num_heads
        self.register_buffer("mask", torch.ones(tokens, tokens).tril())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attention(x) if self.kind == "attn" else self._mlp(x)

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.block.attn
        qkv = self.block.ln_1(x) @ attn.c_attn.weight + attn.c_attn.bias
        d = qkv.shape[-1] // 3
        hd = d // self.heads
        heads = []
        for h in range(self.heads):
            q, k, v = (qkv[..., i * d + h * hd : i * d + (h + 1) * hd] for i in range(3))
            e = torch.exp(q @ k.transpose(-1, -2) / math.sqrt(hd)) * self.mask
            heads.append(e / e.sum(-1, keepdim=True) @ v)
        ctx = heads[0] if self.heads == 1 else torch.cat(heads, -1)
        return ctx @ attn.c_proj.weight + attn.c_proj.bias

    def _mlp(self, h: torch.Tensor) -> torch.Tensor:
        mlp = self.block.mlp
        return (
            mlp.act(self.block.ln_2(h) @ mlp.c_fc.weight + mlp.c_fc.bias) @ mlp.c_proj.weight
            + mlp.c_proj.bias
        )


# -- which committed tensors a circuit reads and produces -------------------------------------------


def block_input(tensors: dict[tuple[int, str], np.ndarray], block: int, kind: Kind, start: int, tokens: int):
    """The circuit's input rows [start, start + tokens) from committed tensors: x, or x + attn."""
    rows = slice(start, start + tokens)
    x = np.asarray(tensors[(block, "x")], dtype=np.float32)[rows]
    if kind == "mlp":
        x = x + np.asarray(tensors[(block, "attn")], dtype=np.float32)[rows]  # fp32, as the model adds
    return np.ascontiguousarray(x)


def block_output(tensors: dict[tuple[int, str], np.ndarray], block: int, kind: Kind, start: int, tokens: int):
    return np.asarray(tensors[(block, kind)], dtype=np.float32)[start : start + tokens]


def check_window(kind: Kind, start: int, tokens: int, positions: int) -> str | None:
    """None if the window can be proven; else why not."""
    if kind not in KINDS:
        return f"block kind: expected one of {KINDS}, got {kind!r}"
    if kind == "attn" and start != 0:
        return f"attn window: expected start 0 (causal attention reads every earlier position), got {start}"
    if start < 0 or start + tokens > positions:
        return f"window [{start}, {start + tokens}): expected inside the trace's {positions} positions"
    return None


def quantize(values: np.ndarray, scale: int) -> np.ndarray:
    """EZKL's fixed point: round(v * 2^scale), halves away from zero (Rust's f64::round)."""
    v = np.asarray(values, dtype=np.float64) * float(2**scale)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


# -- building, keys and the SRS ----------------------------------------------------------------------


def block_digest(block: nn.Module) -> str:
    h = blake3.blake3()
    for name, t in sorted(block.state_dict().items()):
        t = t.detach().to(torch.float32).contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}\n".encode() + t.numpy().tobytes())
    return h.hexdigest()


def circuits_home() -> Path:
    return poi_home() / "circuits"


def srs_path(logrows: int, root: Path | None = None) -> Path:
    return (root or poi_home() / "srs") / f"kzg{logrows}.srs"


def ensure_srs(logrows: int, allow_test_srs: bool, root: Path | None = None) -> tuple[Path, bool]:
    """(the SRS file, whether it is a test one). Production: a ceremony file installed beforehand."""
    path = srs_path(logrows, root)
    marker = path.with_suffix(".test-only")
    if path.exists():
        return path, marker.exists()
    if not allow_test_srs:
        raise PoiError(
            f"no KZG SRS for logrows {logrows}: expected a ceremony file at {path} "
            "(nothing is downloaded at run time; pass allow_test_srs for a test-only one)"
        )
    import ezkl

    path.parent.mkdir(parents=True, exist_ok=True)
    ezkl.gen_srs(str(path), logrows)
    marker.write_text("made by ezkl.gen_srs on this machine: its secret is known, tests only\n")
    return path, True


def run_args(config: CircuitConfig):
    import ezkl

    ra = ezkl.PyRunArgs()
    ra.input_scale, ra.param_scale = config.input_scale, config.param_scale
    ra.num_inner_cols = config.inner_cols
    ra.decomp_base, ra.decomp_legs = 1 << config.decomp_base_bits, config.decomp_legs
    ra.input_visibility = ra.output_visibility = config.io
    ra.param_visibility = config.params
    ra.bounded_log_lookup = config.bounded_log_lookup
    return ra


def circuit_for(
    model: LoadedModel,
    block: int,
    kind: Kind,
    config: CircuitConfig = CircuitConfig(),
    *,
    home: Path | None = None,
    allow_test_srs: bool = False,
    calibration: np.ndarray | None = None,
) -> Circuit:
    """The block's circuit with its keys, set up once and cached (Maxwell's reference values)."""
    module = model.layers[block]
    digest = block_digest(module)
    key = blake3.blake3(f"{digest}|{config.key()}|{EZKL_VERSION}".encode()).hexdigest()[:16]
    folder = (home or circuits_home()) / model.spec.model_id / f"{kind}-b{block}" / key
    meta = folder / "circuit.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        srs, test = ensure_srs(info["logrows"], allow_test_srs, _srs_root(home))
        setup = Step(**info["setup"]) if info.get("setup") else None
        settings = json.loads((folder / "settings.json").read_text())
        return Circuit(model.spec.model_id, block, kind, config, digest, folder, settings, srs, test, setup)
    folder.mkdir(parents=True, exist_ok=True)
    if calibration is None:
        calibration = calibration_inputs(model, block, kind, config.tokens)
    settings = compile_block(BlockCircuit(module, kind, config.tokens).eval(), folder, config, calibration)
    srs, test = ensure_srs(settings["run_args"]["logrows"], allow_test_srs, _srs_root(home))
    setup = run_capped("setup", {"folder": str(folder), "srs": str(srs)})
    meta.write_text(json.dumps({"logrows": settings["run_args"]["logrows"], "setup": asdict(setup)}))
    return Circuit(model.spec.model_id, block, kind, config, digest, folder, settings, srs, test, setup)


def _srs_root(home: Path | None) -> Path | None:
    return None if home is None else home.parent / "srs"


def compile_block(module: nn.Module, folder: Path, config: CircuitConfig, calibration: np.ndarray) -> dict:
    """ONNX export, settings, calibration (lookup ranges, logrows) and compilation; returns settings."""
    import ezkl

    tokens, d = config.tokens, calibration.shape[-1]
    onnx, settings = folder / "block.onnx", folder / "settings.json"
    with torch.no_grad():
        torch.onnx.export(
            module,
            (torch.zeros(1, tokens, d),),
            str(onnx),
            input_names=["x"],
            output_names=["y"],
            opset_version=17,
            dynamo=False,
        )
    data = folder / "calibration.json"
    data.write_text(json.dumps({"input_data": [calibration.astype(np.float64).ravel().tolist()]}))
    ezkl.gen_settings(str(onnx), str(settings), py_run_args=run_args(config))
    ezkl.calibrate_settings(
        str(data),
        str(onnx),
        str(settings),
        "resources",
        lookup_safety_margin=config.lookup_margin,
        scales=[config.input_scale],
        scale_rebase_multiplier=[1],
    )
    _pin_scales(settings, config)
    ezkl.compile_circuit(str(onnx), str(folder / "block.ezkl"), str(settings))
    return json.loads(settings.read_text())


def _pin_scales(settings: Path, config: CircuitConfig) -> None:
    """Calibration may move param_scale; the config's scales are what the table measures."""
    s = json.loads(settings.read_text())
    s["run_args"]["param_scale"] = config.param_scale
    settings.write_text(json.dumps(s))


def calibration_inputs(
    model: LoadedModel, block: int, kind: Kind, tokens: int, samples: int = 1, seed: int = 1234
) -> np.ndarray:
    """The block half's inputs on Maxwell's own seeded token windows (sets the lookup ranges)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = model.reference.vocab
    out = []
    with torch.no_grad():
        for _ in range(samples):
            ids = torch.randint(0, vocab, (1, tokens), generator=gen)
            hidden = model.module(input_ids=ids, output_hidden_states=True).hidden_states[block]
            if kind == "mlp":
                hidden = hidden + BlockCircuit(model.layers[block], "attn", tokens)(hidden)
            out.append(hidden[0].numpy())
    return np.concatenate(out, axis=0)


def seeded_gpt2(d: int, heads: int = 1, layers: int = 1, seed: int = 0, vocab: int = 30522) -> LoadedModel:
    """A seeded GPT-2 of width d (one GPT-2 block's parts at any width: bench/zk/ezkl.py's sweep, tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from ..registry.models import ModelSpec, _reference, find_layers, shared_tokenizer

    config = dict(n_embd=d, n_layer=layers, n_head=heads, n_positions=256)
    spec = ModelSpec(
        f"gpt2-zk-d{d}-s{seed}", "causal-lm", "gpt2", f"seeded GPT-2 {layers} x {d}", config, seed
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, **config)).eval()
    tokenizer = shared_tokenizer() if vocab == 30522 else None
    return LoadedModel(
        spec,
        module,
        tokenizer,
        find_layers(module, layers),
        module.transformer.ln_f,
        _reference(spec, module),
    )


# -- the challenge and the proof on the wire ----------------------------------------------------------


@dataclass(frozen=True)
class ZkChallenge:
    """Which block half and which positions Maxwell asks the agent to prove (drawn after the receipt)."""

    block: int
    kind: Kind
    start: int
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ZkChallenge:
        kind = str(d["kind"])
        if kind not in KINDS:
            raise ValueError(f"block kind: expected one of {KINDS}, got {kind!r}")
        return cls(int(d["block"]), kind, int(d["start"]), int(d["tokens"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class BlockProof:
    """The agent's answer: the challenge it answers and EZKL's proof JSON (proof bytes + instances)."""

    challenge: ZkChallenge
    proof: dict[str, Any] = field(repr=False)
    prove: Step | None = None

    def to_bytes(self) -> bytes:
        step = asdict(self.prove) if self.prove else None
        return json.dumps(
            {"challenge": self.challenge.as_dict(), "proof": self.proof, "prove": step}
        ).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> BlockProof:
        """ValueError saying what is wrong for anything but a proof file."""
        try:
            obj = json.loads(raw)
            step = Step(**obj["prove"]) if obj.get("prove") else None
            proof = obj["proof"]
            if not isinstance(proof, dict) or not isinstance(proof.get("instances"), list):
                raise ValueError("no instances in the proof")
            return cls(ZkChallenge.from_dict(obj["challenge"]), proof, step)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"a block proof: {exc}") from None

    @property
    def proof_bytes(self) -> int:
        """The size of the Halo2 proof itself (the file adds the instances and hex)."""
        raw = self.proof.get("proof", "")
        if isinstance(raw, str):
            return len(raw.removeprefix("0x")) // 2
        return len(raw)
