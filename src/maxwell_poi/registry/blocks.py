"""Where a transformer block keeps its linear operations, by the names the activation trace uses
(protocol.trace.OPS_BY_ARCH), per architecture: one map for the trace recorder, the W8A8 variant,
L3 and disputes. Also which operations read the same input (Maxwell checks them with one product)
and how each kind of layer stores its weight.

    gpt2   GPT2Block: Conv1D (y = x·W + b, W stored [in, out])
    llama  LlamaDecoderLayer: nn.Linear (y = x·Wᵀ + b, W stored [out, in], usually no bias)
"""

from __future__ import annotations

import torch
from torch import nn

from ..protocol.trace import OPS_BY_ARCH
from .loaded import LoadedModel

# the block module's class -> its architecture
BLOCK_CLASSES = {"GPT2Block": "gpt2", "LlamaDecoderLayer": "llama"}

# op -> (the block's submodule, its attribute): qkv = attn.c_attn, attn = attn.c_proj, ...
PLACES: dict[str, dict[str, tuple[str, str]]] = {
    "gpt2": {
        "qkv": ("attn", "c_attn"),
        "attn": ("attn", "c_proj"),
        "fc": ("mlp", "c_fc"),
        "mlp": ("mlp", "c_proj"),
    },
    "llama": {
        "q": ("self_attn", "q_proj"),
        "k": ("self_attn", "k_proj"),
        "v": ("self_attn", "v_proj"),
        "o": ("self_attn", "o_proj"),
        "gate": ("mlp", "gate_proj"),
        "up": ("mlp", "up_proj"),
        "down": ("mlp", "down_proj"),
    },
}
LINEAR_PLACES = PLACES["gpt2"]  # the W8A8 variant's (GPT-2 only)

# linear operations that read one input, in the order the block runs them
INPUT_GROUPS: dict[str, tuple[tuple[str, ...], ...]] = {
    "gpt2": (("qkv",), ("attn",), ("fc",), ("mlp",)),
    "llama": (("q", "k", "v"), ("o",), ("gate", "up"), ("down",)),
}
# the two branches the residual stream adds to the block input: output = x + attention + MLP
BRANCHES = {"gpt2": ("attn", "mlp"), "llama": ("o", "down")}

for _arch, _places in PLACES.items():  # the trace's op names and these maps must not drift apart
    assert tuple(_places) == OPS_BY_ARCH[_arch][1:] == sum(INPUT_GROUPS[_arch], ()), _arch


def block_architecture(block: nn.Module) -> str | None:
    """'gpt2' or 'llama' for a block the trace covers, else None."""
    return BLOCK_CLASSES.get(type(block).__name__)


def architecture(model: LoadedModel) -> str | None:
    """The architecture of a model's blocks if the activation trace covers it, else None."""
    return block_architecture(model.layers[0]) if len(model.layers) else None


def require_architecture(model: LoadedModel) -> str:
    arch = architecture(model)
    if arch is None:
        kind = type(model.layers[0]).__name__ if len(model.layers) else "no blocks"
        raise ValueError(
            f"activation traces cover GPT-2 and Llama blocks, not {kind} ({model.spec.model_id})"
        )
    return arch


def linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear operations by trace name (Conv1D, nn.Linear, or their W8A8 stand-ins)."""
    arch = block_architecture(block)
    if arch is None:
        raise ValueError(f"no map of linear operations for a {type(block).__name__}")
    return {op: getattr(getattr(block, part), attr) for op, (part, attr) in PLACES[arch].items()}


def replace_linears(block: nn.Module, make: type[nn.Module]) -> None:
    """Swap each linear operation of the block for `make(the original)`."""
    arch = block_architecture(block)
    if arch is None:
        raise ValueError(f"no map of linear operations for a {type(block).__name__}")
    for part, attr in PLACES[arch].values():
        owner = getattr(block, part)
        setattr(owner, attr, make(getattr(owner, attr)))


def weight_in_out(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W as [in, out] so that y = x·W + b, b or None), for a Conv1D or an nn.Linear."""
    if isinstance(layer, nn.Linear):
        return layer.weight.detach().T, None if layer.bias is None else layer.bias.detach()
    from transformers.pytorch_utils import Conv1D  # here: importing the registry stays light

    if isinstance(layer, Conv1D):
        return layer.weight.detach(), layer.bias.detach()
    raise TypeError(f"expected a Conv1D or nn.Linear, got {type(layer).__name__}")


def rotary_embedding(model: LoadedModel) -> nn.Module:
    """The model's own rotary position embedding (Llama): cos, sin = it(x, position_ids)."""
    base = getattr(model.module, "base_model", model.module)
    rotary = getattr(base, "rotary_emb", None)
    if rotary is None:
        raise ValueError(f"{model.spec.model_id}: no rotary embedding at base_model.rotary_emb")
    return rotary
