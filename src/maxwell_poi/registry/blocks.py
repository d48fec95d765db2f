"""Where a GPT-2 block keeps its four linear operations, by the names the activation trace uses
(protocol.trace.LINEAR): one map for the trace recorder, the W8A8 variant, L3 and disputes."""

from __future__ import annotations

from torch import nn

# op -> (the block's submodule, its attribute): qkv = attn.c_attn, attn = attn.c_proj, ...
LINEAR_PLACES = {
    "qkv": ("attn", "c_attn"),
    "attn": ("attn", "c_proj"),
    "fc": ("mlp", "c_fc"),
    "mlp": ("mlp", "c_proj"),
}


def linears(block: nn.Module) -> dict[str, nn.Module]:
    """The block's linear operations by trace name (GPT-2 Conv1D, or their W8A8 stand-ins)."""
    return {op: getattr(getattr(block, part), attr) for op, (part, attr) in LINEAR_PLACES.items()}


def replace_linears(block: nn.Module, make: type[nn.Module]) -> None:
    """Swap each linear operation of the block for `make(the original)`."""
    for part, attr in LINEAR_PLACES.values():
        owner = getattr(block, part)
        setattr(owner, attr, make(getattr(owner, attr)))
