"""Maxwell's replay of a block's nonlinear parts from opened values (L3), per architecture: for
each group of linear operations that read one input (registry.blocks.INPUT_GROUPS), that input,
computed from the committed tensors only — never taken from the agent.

GPT-2:  ln_1(x) -> qkv -> causal attention -> attn;  ln_2(x + attn) -> fc -> gelu -> mlp
Llama:  input_layernorm(x) -> q, k, v -> rotary embedding (the model's own, positions 0..T-1),
        causal attention (GQA) -> o;  post_attention_layernorm(x + o) -> gate, up -> silu(gate)·up -> down

The norms, activations and rotary tables are the model's own (its modules and parameters; where a
cheaper equal form exists it runs instead: Llama's RMSNorm as PyTorch's fused kernel, GPT-2's tanh
GELU as x·σ(2z)); attention is PyTorch's scaled dot-product attention with a causal mask. A dispute's
recomputation of a whole block (`block_forward`) runs the block module itself.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..registry.blocks import INPUT_GROUPS, require_architecture, rotary_embedding
from ..registry.models import LoadedModel

Step = tuple[tuple[str, ...], Callable[[], torch.Tensor]]  # (linear ops, their input from the opening)


def steps(model: LoadedModel, block: int, t: dict[str, torch.Tensor]) -> list[Step]:
    """Each input group of the block with Maxwell's replay of its input from the opened tensors `t`."""
    arch = require_architecture(model)
    module = model.layers[block]
    x = t["x"]
    if arch == "gpt2":
        replays = (
            lambda: module.ln_1(x),
            lambda: gpt2_attention(t["qkv"], module.attn.num_heads),
            lambda: module.ln_2(x + t["attn"]),
            lambda: activation(module.mlp.act, t["fc"]),
        )
    else:
        attn = module.self_attn
        replays = (
            lambda: rms_norm(module.input_layernorm, x),
            lambda: llama_attention(rotary_embedding(model), attn, t["q"], t["k"], t["v"]),
            lambda: rms_norm(module.post_attention_layernorm, x + t["o"]),
            lambda: module.mlp.act_fn(t["gate"]) * t["up"],
        )
    return list(zip(INPUT_GROUPS[arch], replays, strict=True))


GELU_C = 2 * math.sqrt(2 / math.pi)


def activation(act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's MLP activation. GPT-2's tanh GELU 0.5·x·(1 + tanh(z)) equals x·σ(2z) (tanh(z) =
    2σ(2z) − 1), run in place on one buffer: on CPU sigmoid is a cheaper kernel than tanh and the
    module's own version makes 7 passes (both agree with it to ~4e-8 of the largest value)."""
    if not isinstance(act, NewGELUActivation):
        return act(x)
    u = x * x
    return u.mul_(x).mul_(0.044715).add_(x).mul_(GELU_C).sigmoid_().mul_(x)


def rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Llama's RMSNorm as PyTorch's one fused kernel (bit-identical to the module's five ops on CPU
    float32); another norm module runs itself."""
    if type(norm) is not LlamaRMSNorm:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def gpt2_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal softmax attention from the committed q, k, v (GPT-2's, without dropout); [1, heads, T, e]
    views, the layout the model's own attention runs (a cheaper path than 3-d inputs)."""
    positions, width3 = qkv.shape
    d = width3 // 3
    q, k, v = (z.view(1, positions, heads, d // heads).transpose(1, 2) for z in qkv.split(d, dim=1))
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(d // heads))
    return context.transpose(1, 2).reshape(positions, d)


def llama_attention(
    rotary: nn.Module, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Causal attention from the committed (pre-rotary) q, k, v at positions 0..T-1: the model's own
    rotary embedding, key/value heads shared by groups of query heads (GQA)."""
    positions, width = q.shape
    width_of_head = attn.head_dim
    q, k, v = (z.view(1, positions, -1, width_of_head).transpose(1, 2) for z in (q, k, v))
    q, k = rotate(torch.cat((q, k), dim=1), *rotary_table(rotary, positions)).split(
        (q.shape[1], k.shape[1]), dim=1
    )
    context = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    return context[0].transpose(0, 1).reshape(positions, width)


def rotate(z: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb (z·cos + rotate_half(z)·sin), on q and k stacked at once."""
    half = z.shape[-1] // 2
    return z * cos + torch.cat((-z[..., half:], z[..., :half]), dim=-1) * sin


_TABLES: weakref.WeakKeyDictionary[nn.Module, tuple[int, torch.Tensor, torch.Tensor]]
_TABLES = weakref.WeakKeyDictionary()


def rotary_table(rotary: nn.Module, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [1, T, e] of the model's own rotary embedding at positions 0..T-1. The last length is
    kept per module: every opened block of a lease shares it, as every block of a forward pass does."""
    kept = _TABLES.get(rotary)
    if kept is None or kept[0] != positions:
        probe = torch.empty(0)  # only its dtype and device are read: float32, CPU
        kept = (positions, *rotary(probe, torch.arange(positions).unsqueeze(0)))
        _TABLES[rotary] = kept
    return kept[1], kept[2]


def block_forward(model: LoadedModel, block: int, x: torch.Tensor) -> torch.Tensor | tuple:
    """The block module run on one sequence `x` [T, d] at positions 0..T-1 with a causal mask (the
    dispute's recomputation); the module's own output."""
    module = model.layers[block]
    hidden = x.unsqueeze(0)
    if require_architecture(model) == "gpt2":
        return module(hidden)
    positions = torch.arange(x.shape[0]).unsqueeze(0)
    mask = torch.full((x.shape[0], x.shape[0]), float("-inf")).triu(1)[None, None]
    rotary = rotary_embedding(model)(hidden, positions)
    return module(hidden, attention_mask=mask, position_ids=positions, position_embeddings=rotary)
