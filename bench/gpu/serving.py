"""A serving loop that is not launch-bound: greedy decoding of a `transformers` Llama or Mistral
model with a preallocated (static) KV cache, its decode step captured once in a CUDA graph and
replayed (on a CPU the same code runs eagerly: smoke runs and tests), and speculative decoding of
a draft + target pair on top of it.

The loop reads the model's own modules and weights (embedding, norms, q/k/v/o projections, rotary
embedding, MLP, LM head); only attention over the static cache is written here (`forward`), so
what runs is the same computation as the model's forward (tests/test_gpu_next.py checks the logits
against the model's on a CPU). No host synchronisation inside a decode step: the chosen token, its
position and the output sequence live on the device, so one graph replay is one decode step.

Used by bench/gpu/collect_traces.py (`--plan serving`: NVML traces of this loop, batch 1/8/32, and
of a speculative pair) and bench/gpu/next_run.py (the audit speed-up against a serving-engine-like
generation of a 7B shape).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name


def _dtype(model: Any) -> torch.dtype:
    return next(model.parameters()).dtype


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


class StaticDecoder:
    """Greedy decoding of `batch` rows up to `max_len` positions with a static KV cache.

    `forward(ids, positions)` runs positions `positions` ([T] long, on the device) of every row
    through the model, writing their keys and values into the cache, and returns logits ([B, T, V]
    if `all_logits` else the last position's [B, V]). `generate(prompt, new)` prefills `prompt`
    ([B, P]) eagerly, then runs `new - 1` decode steps: a CUDA graph replay each on CUDA (`graph`
    defaults to True there), the eager step otherwise. Llama and Mistral blocks only."""

    def __init__(self, model: Any, batch: int, max_len: int, graph: bool | None = None) -> None:
        cfg = model.config
        self.model, self.base = model, model.model
        if not all(hasattr(layer, "self_attn") and hasattr(layer, "mlp") for layer in self.base.layers):
            raise ValueError(f"StaticDecoder covers Llama/Mistral blocks, not {type(model).__name__}")
        self.device, self.dtype = _device(model), _dtype(model)
        self.batch, self.max_len = batch, max_len
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.graph_wanted = self.device.type == "cuda" if graph is None else graph
        shape = (len(self.base.layers), batch, self.kv_heads, max_len, self.head_dim)
        with torch.no_grad():
            self.k = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.v = torch.zeros(shape, device=self.device, dtype=self.dtype)
            self.arange = torch.arange(max_len, device=self.device)
            # decode state, all on the device: the token to feed, its position, the sequences so far
            self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
            self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
            self.seq = torch.zeros(batch, max_len, dtype=torch.long, device=self.device)
        self.graph: Any = None
        self.capture_s: float | None = None
        self.graph_error: str | None = None

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Logits of `ids` [B, T] at `positions` [T]; the cache gains their keys and values. A position
        attends to every cached position <= its own (later entries are stale, masked out)."""
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, t = ids.shape
        x = self.base.embed_tokens(ids)
        cos, sin = self.base.rotary_emb(x, positions[None].expand(b, -1))
        mask = self.arange[None, :] <= positions[:, None]  # [T, L]: True = attend
        rep = self.heads // self.kv_heads
        for i, layer in enumerate(self.base.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            self.k[i].index_copy_(2, positions, k)
            self.v[i].index_copy_(2, positions, v)
            keys, values = self.k[i], self.v[i]
            if rep > 1:  # grouped-query attention: each key/value head serves `rep` query heads
                keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = self.base.norm(x if all_logits else x[:, -1])
        return self.model.lm_head(x)

    def _step(self) -> None:
        """One decode step on the device state: feed `ids` at `pos`, choose greedily, advance."""
        nxt = self.forward(self.ids, self.pos).argmax(-1)  # [B]
        self.seq.index_copy_(1, self.pos + 1, nxt[:, None])
        self.ids.copy_(nxt[:, None])
        self.pos.add_(1)

    def capture(self) -> None:
        """Record one decode step in a CUDA graph (after two warm-up steps on a side stream). The
        warm-up writes cache entries at positions 0-1, which a prefill overwrites. If capture fails,
        decoding goes on eagerly and `graph_error` says why (`graphed` is then False)."""
        if not self.graph_wanted or self.graph is not None:
            return
        try:
            self._capture()
        except Exception as e:  # noqa: BLE001 - the eager step still works; the caller records it
            self.graph_wanted = False
            self.graph_error = f"{type(e).__name__}: {e}"[:300]
            sync(self.device)

    def _capture(self) -> None:
        t = time.monotonic()
        with torch.no_grad():
            self.pos.zero_()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            self.pos.zero_()
            with torch.cuda.graph(graph):
                self._step()
        torch.cuda.synchronize()
        self.graph = graph
        self.capture_s = round(time.monotonic() - t, 3)

    def prefill(self, prompt: torch.Tensor) -> None:
        """Run the prompt [B, P] and choose the first new token; the decode state then points at it."""
        p = prompt.shape[1]
        with torch.no_grad():
            logits = self.forward(prompt, self.arange[:p])
            self.seq[:, :p] = prompt
            nxt = logits.argmax(-1)
            self.seq[:, p] = nxt
            self.ids.copy_(nxt[:, None])
            self.pos.fill_(p)

    def step(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            with torch.no_grad():
                self._step()

    def generate(self, prompt: torch.Tensor, new: int, until: float | None = None) -> int:
        """Greedy: `new` tokens per row after `prompt` (fewer if `until`, a time.monotonic() value,
        passes first; checked every 16 steps). Returns the tokens generated per row; they are in
        `self.seq[:, P:P + n]` once the device has finished."""
        p = prompt.shape[1]
        if p + new > self.max_len:
            raise ValueError(f"{p} + {new} positions exceed the cache's {self.max_len}")
        self.capture()
        self.prefill(prompt)
        done = 1
        while done < new:
            for _ in range(min(16, new - done)):
                self.step()
                done += 1
            if until is not None and done < new:
                sync(self.device)  # keep the queue short, so the work stops with the window
                if time.monotonic() >= until:
                    break
        return done


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class Speculative:
    """Greedy speculative decoding of one row: the draft proposes `k` tokens (graphed decode steps),
    the target checks them in one forward over k + 1 positions and keeps the longest agreeing
    prefix plus its own next token, so the output is the target's greedy output."""

    def __init__(self, draft: Any, target: Any, max_len: int, k: int = 4, graph: bool | None = None) -> None:
        self.k = k
        self.draft = StaticDecoder(draft, 1, max_len + k + 2, graph)
        self.target = StaticDecoder(target, 1, max_len + k + 2, graph=False)  # verify runs eagerly
        self.rounds = self.proposed = self.accepted = self.full = 0  # full: every proposal kept

    def generate(self, prompt: torch.Tensor, new: int, until: float | None = None) -> list[int]:
        """`new` tokens after `prompt` ([1, P]), fewer if `until` passes first (checked per round,
        after the first)."""
        d, t = self.draft, self.target
        d.capture()
        p = prompt.shape[1]
        with torch.no_grad():
            d.prefill(prompt)
            t.prefill(prompt)
            out = [int(t.seq[0, p])]  # the target's first token (the prefill's choice)
            n = p + 1  # positions known: prompt + out; both caches hold keys/values up to n - 2
            rounds = 0  # at least one round per call, however short the time left
            while len(out) < new and (until is None or rounds == 0 or time.monotonic() < until):
                rounds += 1
                last = torch.tensor([[out[-1]]], device=d.device)
                d.ids.copy_(last)
                d.pos.fill_(n - 1)
                for _ in range(self.k):
                    d.step()
                drafts = d.seq[0, n : n + self.k]  # what the draft proposed at positions n..n+k-1
                feed = torch.cat([last[0], drafts])[None]  # [1, k + 1] at positions n-1..n+k-1
                logits = t.forward(feed, t.arange[n - 1 : n + self.k], all_logits=True)
                mine = logits[0].argmax(-1)  # the target's choice after each fed token
                agree = (mine[: self.k] == drafts).long().cumprod(0).sum()
                m = int(agree)  # drafts accepted (one host sync per round)
                kept = drafts[:m].tolist() + [int(mine[m])]
                self.rounds += 1
                self.proposed += self.k
                self.accepted += m
                if m == self.k:  # the draft never fed its last proposal: its cache needs it
                    self.full += 1
                    d.ids.copy_(drafts[-1:][None])
                    d.pos.fill_(n + self.k - 1)
                    d.step()
                out += kept
                n += len(kept)
        return out[:new]

    def stats(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "full_rounds": self.full,
            "acceptance": round(self.accepted / self.proposed, 4) if self.proposed else None,
            "draft_graphed": self.draft.graphed,
        }
