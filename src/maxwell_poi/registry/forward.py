"""Forward passes of registered models, shared by every role: seeded generation (the agent),
one-pass prefill and embeddings (the verifier's re-execution)."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import numpy as np
import torch

from .models import BERT_CLS, BERT_SEP, LoadedModel
from .sampling import SeededSampler

EMBED_MAX_TOKENS = 256  # all-MiniLM-L6-v2 was trained with 256-token inputs


def _cache_keyword(module: torch.nn.Module) -> str:
    """transformers >= 5.2x names the KV-cache argument `cache`; older releases `past_key_values`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def generate(
    model: LoadedModel,
    prompt_ids: list[int],
    new_tokens: int,
    sampler: SeededSampler,
    *,
    after_step: Callable[[int], None] | None = None,
    peers: list[list[int]] | None = None,
    on_token: Callable[[int, int], None] | None = None,
) -> list[int]:
    """Seeded generation with a KV cache. Row 0 is the lease; `peers` are other prompts of the
    same length batched alongside (a serving engine's batch), decoded greedily and discarded.

    `after_step(pos)` runs after each forward pass (pos = -1 after the prefill);
    `on_token(pos, token)` the moment a token is chosen (streaming).
    """
    rows = [prompt_ids, *(peers or [])]
    if any(len(r) != len(prompt_ids) for r in rows):
        raise ValueError("batched peers must have the prompt's length")
    device = next(model.module.parameters()).device
    tokens: list[int] = []
    cache_kw = _cache_keyword(model.module)
    with torch.inference_mode():
        out = model.module(input_ids=torch.tensor(rows, device=device), use_cache=True, logits_to_keep=1)
        if after_step:
            after_step(-1)
        for pos in range(new_tokens):
            logits = out.logits[:, -1]
            tokens.append(sampler.choose(logits[0], pos))
            if on_token:
                on_token(pos, tokens[-1])
            if pos == new_tokens - 1:
                break
            feed = [[tokens[-1]]] + [[int(logits[b].argmax())] for b in range(1, len(rows))]
            out = model.module(
                input_ids=torch.tensor(feed, device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: getattr(out, cache_kw)},  # the output names the cache as the input does
            )
            if after_step:
                after_step(pos)
    return tokens


def left_padded(
    prompts: list[list[int]], width: int, pad: int, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts left-padded to `width` as one batch: (ids, attention mask, position ids counting from
    each row's first real token). One place, so a decode replay pads exactly as `generate_batch` did."""
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)  # pads sit at 0; they are masked anyway


def _pad_id(model: LoadedModel) -> int:
    pad = getattr(model.tokenizer, "pad_token_id", None)
    return int(pad) if pad is not None else 0


def generate_batch(
    model: LoadedModel,
    prompts: list[list[int]],
    new_tokens: list[int],
    samplers: list[SeededSampler],
    *,
    after_step: Callable[[int], None] | None = None,
    on_token: Callable[[int, int, int], None] | None = None,
) -> list[list[int]]:
    """Seeded generation of several prompts in one batch, each row with its own sampler and length.

    Prompts are left-padded to a common width (so every row's last prompt position is the batch's
    last column and the logits kept there are each row's own); an attention mask hides the pads
    and explicit position ids count from each row's first real token, so a row sees what it
    would see alone. `after_step(pos)` runs after each forward pass (pos = -1 after the prefill);
    `on_token(row, pos, token)` the moment a row's token is chosen, rows in order at each step.
    """
    if not prompts or not len(prompts) == len(new_tokens) == len(samplers):
        raise ValueError("generate_batch needs one length and one sampler per prompt")
    if any(not p for p in prompts) or any(n < 1 for n in new_tokens):
        raise ValueError("every row needs a prompt and at least one new token")
    device = next(model.module.parameters()).device
    pad = _pad_id(model)
    rows, width, steps = len(prompts), max(len(p) for p in prompts), max(new_tokens)
    ids, mask, positions = left_padded(prompts, width, pad, device)
    tokens: list[list[int]] = [[] for _ in prompts]
    cache_kw = _cache_keyword(model.module)
    with torch.inference_mode():
        out = model.module(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        if after_step:
            after_step(-1)
        for pos in range(steps):
            logits = out.logits[:, -1]
            for r in range(rows):
                if pos < new_tokens[r]:
                    tokens[r].append(samplers[r].choose(logits[r], pos))
                    if on_token:
                        on_token(r, pos, tokens[r][-1])
            if pos == steps - 1:
                break
            # A finished row stays in the batch and decodes pad filler (its outputs are ignored):
            # the cache keeps its shape, which is simpler than re-slicing it per architecture.
            # Its position is held at its last real one so it never runs past max_positions.
            feed = [[tokens[r][-1] if pos < new_tokens[r] - 1 else pad] for r in range(rows)]
            step_pos = [[len(p) + min(pos, n - 2)] for p, n in zip(prompts, new_tokens, strict=True)]
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            out = model.module(
                input_ids=torch.tensor(feed, device=device),
                attention_mask=mask,
                position_ids=torch.tensor(step_pos, device=device),
                use_cache=True,
                logits_to_keep=1,
                **{cache_kw: getattr(out, cache_kw)},
            )
            if after_step:
                after_step(pos)
    return tokens


def prefill(
    model: LoadedModel, prompt_ids: list[int], tokens: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over prompt + output[:-1]: (final hidden states [P+N-1, d], logits [N, V]).

    Logits are computed only where a new token was chosen (the prompt's last position onward),
    which keeps the verifier's output projection to N rows.
    """
    hidden = final_hidden(model, prompt_ids + tokens[:-1])
    with torch.inference_mode():
        head = model.module.get_output_embeddings()
        logits = head(hidden[len(prompt_ids) - 1 :])
    return hidden, logits


def final_hidden(model: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Final hidden states [len(ids), d] of `ids` run as a sequence of its own, one forward pass."""
    t = torch.tensor([ids], device=next(model.module.parameters()).device)
    with torch.inference_mode():
        return model.module.base_model(input_ids=t).last_hidden_state[0]


def embed_one(model: LoadedModel, text: str) -> tuple[torch.Tensor, np.ndarray]:
    """Sentence-transformers pipeline for one text: last hidden states and the L2-normalised
    mean-pooled embedding."""
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"][: EMBED_MAX_TOKENS - 2]
    ids = [BERT_CLS, *ids, BERT_SEP]
    device = next(model.module.parameters()).device
    with torch.inference_mode():
        hidden = model.module(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]
        pooled = hidden.float().mean(dim=0)
        emb = torch.nn.functional.normalize(pooled, dim=0)
    return hidden, emb.cpu().numpy().astype(np.float32)


class KVCached:
    """One model with its KV cache and the token ids the cache holds: fed piece by piece, cropped
    back where a piece turned out wrong (speculative decoding, streaming appraisal)."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.cache = None
        self.fed: list[int] = []
        self.device = next(model.module.parameters()).device
        self.kw = _cache_keyword(model.module)

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Run the model over `ids` after what the cache holds; logits for every fed position."""
        return self.feed_hidden(ids)[1]

    def feed_hidden(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Like `feed`, also returning the final hidden states (after the last norm) of the fed
        positions: (hidden [n, d], logits [n, V])."""
        args = {self.kw: self.cache} if self.cache is not None else {}
        with torch.inference_mode():
            out = self.model.module.base_model(
                input_ids=torch.tensor([ids], device=self.device), use_cache=True, **args
            )
            hidden = out.last_hidden_state[0]
            logits = self.model.module.get_output_embeddings()(hidden)
        self.cache = getattr(out, self.kw)
        self.fed += ids
        return hidden, logits

    def crop(self, length: int) -> None:
        if length < len(self.fed):  # a negative count removes that many (old and new transformers)
            self.cache.crop(length - len(self.fed))
            del self.fed[length:]

    def catch_up(self, seq: list[int]) -> torch.Tensor:
        """Logits after `seq`: keep the cache's longest prefix of it (leaving one token to feed)."""
        same = 0
        for a, b in zip(self.fed, seq, strict=False):
            if a != b:
                break
            same += 1
        self.crop(min(same, len(seq) - 1))
        return self.feed(seq[len(self.fed) :])


def replay_decode(
    model: LoadedModel,
    prompt_ids: list[int],
    tokens: list[int],
    passes: tuple[tuple[int, int], ...],
    batch: int = 1,
    pad: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The answer fed back the way its prover decoded it (protocol.schedule): the prompt in one pass,
    then each declared pass of `fed` positions on the KV cache, keeping its first `kept` rows and
    cropping the rest (a speculative decoder's refused proposals). Refused rows are fed as copies of
    the pass's last kept token: causal attention keeps them out of the kept rows, and only their count
    shapes the pass's kernels. A declared batch (`batch` rows, `pad` columns of left padding: plain
    decoding only) is replayed as `generate_batch` ran it, the lease in row 0. Same shapes as
    `prefill`: (hidden [P+N-1, d], logits [N, V])."""
    if batch > 1 or pad > 0:
        hidden = _replay_batched(model, prompt_ids, tokens, batch, pad)
        with torch.inference_mode():
            return hidden, model.module.get_output_embeddings()(hidden[len(prompt_ids) - 1 :])
    kv = KVCached(model)
    seq = prompt_ids + tokens[:-1]
    rows = [kv.feed_hidden(prompt_ids)[0]]
    at = len(prompt_ids)
    for fed, kept in passes:
        piece = seq[at : at + kept]
        rows.append(kv.feed_hidden(piece + [piece[-1]] * (fed - kept))[0][:kept])
        kv.crop(at + kept)
        at += kept
    hidden = torch.cat(rows)
    with torch.inference_mode():
        logits = model.module.get_output_embeddings()(hidden[len(prompt_ids) - 1 :])
    return hidden, logits


def _replay_batched(
    model: LoadedModel, prompt_ids: list[int], tokens: list[int], rows: int, pad: int
) -> torch.Tensor:
    """Row 0's final hidden states when the answer is decoded one token per pass in a batch of `rows`
    rows, its prompt left-padded by `pad` columns (mask and positions as `generate_batch` sets them).
    The other rows repeat row 0: a pass's rounding depends on its shape, not on the other rows."""
    device = next(model.module.parameters()).device
    ids, mask, positions = left_padded([prompt_ids] * rows, len(prompt_ids) + pad, _pad_id(model), device)
    cache_kw = _cache_keyword(model.module)
    with torch.inference_mode():
        out = model.module.base_model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True
        )
        hidden = [out.last_hidden_state[0, pad:]]
        for pos, token in enumerate(tokens[:-1]):
            mask = torch.cat([mask, mask.new_ones(rows, 1)], dim=1)
            out = model.module.base_model(
                input_ids=torch.tensor([[token]] * rows, device=device),
                attention_mask=mask,
                position_ids=torch.tensor([[len(prompt_ids) + pos]] * rows, device=device),
                use_cache=True,
                **{cache_kw: getattr(out, cache_kw)},
            )
            hidden.append(out.last_hidden_state[0])
    return torch.cat(hidden)
