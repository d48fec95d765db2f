"""Maxwell's replay of a block's nonlinear parts from opened values (L3), per architecture: for
each group of linear operations that read one input (registry.blocks.INPUT_GROUPS), that input,
computed from the committed tensors only — never taken from the agent.

GPT-2:  ln_1(x) -> qkv -> causal attention -> attn;  ln_2(x + attn) -> fc -> gelu -> mlp
Llama:  input_layernorm(x) -> q, k, v -> rotary embedding (the model's own, positions 0..T-1),
        causal attention (GQA) -> o;  post_attention_layernorm(x + o) -> gate, up -> silu(gate)·up -> down

The norms and activations are the model's own modules (GPT-2's tanh GELU as x·σ(2z), cheaper);
attention is PyTorch's scaled dot-product attention with a causal mask. Dispute recomputation of a
whole block (`block_forward`) runs the block module itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import NewGELUActivation
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

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
            lambda: module.input_layernorm(x),
            lambda: llama_attention(rotary_embedding(model), attn, t["q"], t["k"], t["v"]),
            lambda: module.post_attention_layernorm(x + t["o"]),
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


def gpt2_attention(qkv: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal softmax attention from the committed q, k, v (GPT-2's, without dropout)."""
    positions, width3 = qkv.shape
    d = width3 // 3
    q, k, v = (z.reshape(positions, heads, d // heads).transpose(0, 1) for z in qkv.split(d, dim=1))
    context = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(d // heads))
    return context.transpose(0, 1).reshape(positions, d)


def llama_attention(
    rotary: nn.Module, attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Causal attention from the committed (pre-rotary) q, k, v at positions 0..T-1: the model's own
    rotary embedding, key/value heads shared by groups of query heads (GQA)."""
    positions, width = q.shape
    width_of_head = attn.head_dim
    q, k, v = (z.reshape(1, positions, -1, width_of_head).transpose(1, 2) for z in (q, k, v))
    cos, sin = rotary(v, torch.arange(positions).unsqueeze(0))
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    context = F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=attn.scaling, enable_gqa=q.shape[1] != k.shape[1]
    )
    return context[0].transpose(0, 1).reshape(positions, width)


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
