"""A registered model's description and a built model in hand: the types that the rest of the
registry (blocks, W8A8, loading) builds on, with nothing above them."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..protocol.errors import PoiError

Kind = Literal["causal-lm", "embedding"]
BERT_CLS, BERT_SEP, BERT_PAD = 101, 102, 0


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    kind: Kind
    family: str  # gpt2 | llama | bert | trained | trained-init | local
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    path: str | None = None  # local: a folder; trained / trained-init: a folder under data/models
    digest: str | None = None  # trained: the weights digest the packaged file must have
    quant: str | None = None  # "w8a8": the registered integer variant (registry.w8a8), L3's exact mode

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ReferenceValues:
    """What Maxwell knows to be true about a model, measured by Maxwell, never by an agent."""

    model_id: str
    weights_digest: str  # blake3 over names, dtypes, shapes and bytes of the fp32 state dict
    param_count: int
    flops_per_token: int  # 2 x parameters touched per token (embedding look-ups excluded)
    dtype: str
    layers: int
    hidden: int
    vocab: int
    max_positions: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def find_layers(module: nn.Module, count: int) -> nn.ModuleList:
    """The stack of transformer blocks: the ModuleList as long as the config's layer count."""
    for sub in module.modules():
        if isinstance(sub, nn.ModuleList) and len(sub) == count:
            return sub
    raise PoiError(f"cannot find {count} transformer layers in {type(module).__name__}")


def find_final_norm(module: nn.Module) -> nn.Module | None:
    base = getattr(module, "base_model", module)
    for name in ("ln_f", "norm", "final_layer_norm", "final_layernorm"):
        sub = getattr(base, name, None)
        if isinstance(sub, nn.Module):
            return sub
    return None


def encode_prompt(tokenizer: Any, spec: ModelSpec, text: str) -> list[int]:
    """Prompt token ids as prover and verifier both feed them: seeded models get [CLS] first,
    trained ones their tokenizer's begin-of-text token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if spec.family == "local":
        return ids or [0]
    first = tokenizer.bos_token_id if spec.family.startswith("trained") else BERT_CLS
    return [first, *ids]


@dataclass
class LoadedModel:
    """A built model in eval mode plus what the prover and verifier need to drive it."""

    spec: ModelSpec
    module: nn.Module
    tokenizer: Any
    layers: nn.ModuleList
    final_norm: nn.Module | None
    reference: ReferenceValues

    def encode_prompt(self, text: str) -> list[int]:
        return encode_prompt(self.tokenizer, self.spec, text)

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    def copied_to(self, where: torch.dtype | str) -> LoadedModel:
        """A copy in another dtype or on another device; this one (the registry's) is left as is."""
        return self.with_module(copy.deepcopy(self.module).to(where))

    def with_module(self, module: nn.Module) -> LoadedModel:
        """The same entry around another module (a converted or modified copy of the weights)."""
        return LoadedModel(
            spec=self.spec,
            module=module,
            tokenizer=self.tokenizer,
            layers=find_layers(module, len(self.layers)),
            final_norm=find_final_norm(module) if self.final_norm is not None else None,
            reference=self.reference,
        )
