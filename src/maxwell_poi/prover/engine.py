"""The engine adapter (issue 27): a resident agent that forwards each lease to an unmodified
OpenAI-compatible serving engine, streams the engine's tokens to Maxwell as they arrive, and signs
an engine receipt (receipt v4, protocol.engine) with what the engine returns unmodified: per
position the chosen token's log-probability and the top-k candidates' (`logprobs`), or the tokens
alone from an engine that refuses log-probabilities (`tokens`).

    poi agent --key k.pem --engine-cmd "python -m llama_cpp.server --model lm.gguf --model_alias poi-lm ..."
    poi agent --key k.pem --engine http://127.0.0.1:8000/v1

With `--engine-cmd` the adapter starts the engine as its own child, so it lives in the agent's
sandbox (cgroup) and Maxwell's L1/L2 measure the engine process itself.

The lease's temperature and seed are sent where the engine honours them (the seed sent is a claim in
the receipt); a lease at temperature 0 is decoded greedily. An engine stops at its end-of-sequence
token: the receipt then says `finish: "stop"` with fewer tokens, and L4 checks that the model would
have ended there. Engines return token *text*; the adapter maps each piece back to its id with the
leased model's own tokenizer (byte-level BPE pieces), and refuses a lease whose chosen token it
cannot map (a piece that ends inside a UTF-8 character comes back shortened).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from ..protocol.encoding import sha256_hex
from ..protocol.engine import ENGINE_MAX_TOP, encode_engine_claim
from ..protocol.errors import PoiError
from ..protocol.keys import AgentKey
from ..protocol.lease import GenerateJob, Lease
from ..protocol.probe import ProbeAnswer, ProbeLogprobs, ProbeRequest, parse_probe_request, refuse_probe
from ..protocol.receipt import ReceiptClaims, sign_receipt, token_output
from ..registry.models import Registry, tokenizer_for
from .engine_process import EngineError
from .stream import current_sink

# llama-cpp-python samples with repeat_penalty 1.1 (and top_p/min_p) unless told: not the model's distribution
LLAMA_PLAIN = {"repeat_penalty": 1.0, "top_p": 1.0, "min_p": 0.0}


def byte_level_table() -> dict[int, str]:
    """GPT-2's byte -> printable character table (how byte-level BPE vocabularies spell bytes)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def engine_seed(lease: Lease) -> int:
    """The seed sent to the engine for a sampled lease: u32le of the lease seed's first 4 bytes."""
    return int.from_bytes(lease.seed_bytes[:4], "little")


class PieceMap:
    """Token text as an engine returns it -> the vocabulary id (None where it names no token)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        self.table = byte_level_table()

    def id_of(self, piece: str) -> int | None:
        if not piece:
            return None
        return self.vocab.get("".join(self.table[b] for b in piece.encode("utf-8")))

    def ids_of_text(self, text: str) -> list[int]:
        """A text delta that is not one piece (token-only engines stream text): its tokenization."""
        one = self.id_of(text)
        return [one] if one is not None else list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass
class Dialect:
    """How one engine wants a completion asked for: learned once per model from a 1-token request."""

    model: str  # the name the engine serves the model under
    prefix: str = ""  # text put before the prompt (the bos token, for engines that add none)
    logprobs: bool = True  # the engine returns log-probabilities
    eos: int | None = None  # the model's end-of-sequence id (transformers serve needs it in its config)
    notes: list[str] = field(default_factory=list)


class EngineAdapter:
    """Answers leases through an OpenAI-compatible engine at `base_url` (".../v1")."""

    def __init__(
        self,
        key: AgentKey,
        base_url: str,
        *,
        name: str = "openai-compatible",
        version: str = "",
        top: int = 5,
        served_model: str | None = None,
        registry: Registry | None = None,
        timeout_s: float = 600.0,
        tamper: Callable[[Lease, list[int]], list[int]] | None = None,
        alter_prompt: Callable[[str], str] | None = None,
    ) -> None:
        if not 1 <= top <= ENGINE_MAX_TOP:
            raise PoiError(f"--engine-top: expected 1-{ENGINE_MAX_TOP}, got {top}")
        self.key, self.base = key, base_url.rstrip("/")
        self.name, self.version, self.top = name, version, top
        self.served_model = served_model
        self.registry = registry or Registry()
        self.client = httpx.Client(timeout=timeout_s)
        self._dialects: dict[str, Dialect] = {}
        self._pieces: dict[str, PieceMap] = {}
        self.tamper = tamper  # adversaries only: change the tokens before signing
        self.alter_prompt = alter_prompt  # adversaries only: send the engine another prompt

    # -- talking to the engine -------------------------------------------------------------------
    def served_models(self) -> list[str]:
        url = f"{self.base}/models"
        try:
            resp = self.client.get(url, timeout=10.0)
            resp.raise_for_status()
            return [m["id"] for m in resp.json().get("data", [])]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"engine not reachable: tried GET {url}: {type(exc).__name__}: {exc}") from None

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base}/completions"
        try:
            resp = self.client.post(url, json=body)
        except httpx.HTTPError as exc:
            raise EngineError(
                f"engine not reachable: tried POST {url}: {type(exc).__name__}: {exc}"
            ) from None
        if resp.status_code != 200:
            raise EngineError(f"engine refused POST {url}: HTTP {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def _events(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """The engine's streamed completion, one server-sent event at a time."""
        url = f"{self.base}/completions"
        try:
            with self.client.stream("POST", url, json={**body, "stream": True}) as resp:
                if resp.status_code != 200:
                    raise EngineError(
                        f"engine refused POST {url}: HTTP {resp.status_code}: {resp.read()[:300]!r}"
                    )
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    event = json.loads(data)
                    if "error" in event:
                        raise EngineError(f"engine error mid-stream: {str(event['error'])[:300]}")
                    yield event
        except httpx.HTTPError as exc:
            raise EngineError(
                f"engine not reachable: tried POST {url}: {type(exc).__name__}: {exc}"
            ) from None

    def dialect(self, model_id: str) -> Dialect:
        """Learn, once per model, the served name, whether a bos must be written, whether log-probs come."""
        if model_id in self._dialects:
            return self._dialects[model_id]
        served = self.served_models()
        name = self.served_model or (
            model_id if model_id in served else served[0] if len(served) == 1 else ""
        )
        if not name:
            raise EngineError(f"engine serves {served}, not {model_id!r}: name the model with --engine-model")
        spec = self.registry.get(model_id)
        tok = tokenizer_for(spec)
        probe = "Hello"
        want = len(self.registry.encode_prompt(model_id, probe))
        d = Dialect(model=name, eos=getattr(tok, "eos_token_id", None))
        body = {"model": name, "prompt": probe, "max_tokens": 1, "temperature": 0, "logprobs": self.top}
        answer = self._post({**body, **self._extra(d, 0, 0, None)})
        got = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
        bos = getattr(tok, "bos_token", None)
        if got == want - 1 and bos and spec.family != "local":
            d.prefix = bos
            d.notes.append(f"the engine adds no {bos}: it is written before the prompt")
        elif got != want:
            raise EngineError(
                f"engine tokenizes the prompt {probe!r} as {got} tokens, the leased model {model_id} "
                f"as {want}: "
                "it does not serve that model's tokenizer"
            )
        lp = (answer.get("choices") or [{}])[0].get("logprobs")
        if not (isinstance(lp, dict) and lp.get("top_logprobs")):
            d.logprobs = False
            d.notes.append("the engine returned no log-probabilities: token-only receipts (fp_kind 'tokens')")
        self._dialects[model_id] = d
        self._pieces[model_id] = PieceMap(tok)
        return d

    def _extra(self, d: Dialect, temperature: float, top_k: int, seed: int | None) -> dict[str, Any]:
        """Engine-specific fields that make it sample from the model's own distribution."""
        if self.name == "llama.cpp":
            return {**LLAMA_PLAIN, "top_k": top_k, **({"seed": seed} if seed is not None else {})}
        if self.name == "transformers serve":
            cfg = {
                "do_sample": temperature > 0,
                "top_p": 1.0,
                "top_k": top_k or None,
                "repetition_penalty": 1.0,
                "eos_token_id": d.eos,
            }
            if temperature > 0:
                cfg["temperature"] = temperature
            return {"generation_config": json.dumps(cfg), **({"seed": seed} if seed is not None else {})}
        return {"top_p": 1.0, **({"seed": seed} if seed is not None else {})}

    # -- one lease -------------------------------------------------------------------------------
    def request_body(self, lease: Lease) -> dict[str, Any]:
        """The completion request for `lease` (streamed by `run`; the benchmark sends it bare too)."""
        job = lease.job
        assert isinstance(job, GenerateJob)
        d = self.dialect(lease.model_id)
        body: dict[str, Any] = {
            "model": d.model,
            "prompt": d.prefix + (self.alter_prompt(job.prompt) if self.alter_prompt else job.prompt),
            "max_tokens": job.max_new_tokens,
            "temperature": job.temperature,
            **self._extra(
                d, job.temperature, job.top_k, None if job.temperature == 0 else engine_seed(lease)
            ),
        }
        if d.logprobs:
            body["logprobs"] = self.top
        return body

    def run(self, lease: Lease) -> bytes:
        job = lease.job
        if not isinstance(job, GenerateJob):
            raise PoiError("the engine adapter serves generation leases only")
        d = self.dialect(lease.model_id)
        pieces = self._pieces[lease.model_id]
        ref = self.registry.reference(lease.model_id)
        greedy = job.temperature == 0
        seed = engine_seed(lease)
        body = self.request_body(lease)
        sink = current_sink()
        tokens: list[int] = []
        chosen_lp: list[float] = []
        top: list[list[tuple[int | None, float]]] = []
        finish = "length"
        text = ""
        for event in self._events(body):
            choice = (event.get("choices") or [{}])[0]
            finish = choice.get("finish_reason") or finish
            if d.logprobs:
                new = self._logprob_tokens(choice.get("logprobs"), pieces)
                for tid, lp, row in new:
                    tokens.append(tid)
                    chosen_lp.append(lp)
                    top.append(row)
                    if sink:
                        sink(len(tokens) - 1, tid)
            else:  # token-only: text deltas; ids of all but the last (maybe partial) token are settled
                text += choice.get("text") or ""
                ids = pieces.ids_of_text(text) if text else []
                while len(tokens) < len(ids) - 1:
                    tokens.append(ids[len(tokens)])
                    if sink:
                        sink(len(tokens) - 1, tokens[-1])
        if not d.logprobs and text:
            ids = pieces.ids_of_text(text)
            if ids[: len(tokens)] != tokens:
                raise EngineError(
                    "token-only engine: the text's tokenization changed after tokens were streamed"
                )
            for tid in ids[len(tokens) :]:
                tokens.append(tid)
                if sink:
                    sink(len(tokens) - 1, tid)
        finish = "length" if len(tokens) >= job.max_new_tokens else "stop"
        tokens = tokens[: job.max_new_tokens]
        if self.tamper is not None:
            tokens = self.tamper(lease, tokens)
        claim = encode_engine_claim(
            name=self.name,
            version=self.version,
            decoding="greedy" if greedy else "sampled",
            finish=finish,  # type: ignore[arg-type]
            width=token_output([], ref.vocab).width,
            seed=None if greedy else seed,
            chosen_lp=chosen_lp[: len(tokens)] if d.logprobs else None,
            top=top[: len(tokens)] if d.logprobs else None,
            top_n=self.top if d.logprobs else 0,
        )
        claims = ReceiptClaims(
            lease=lease.lease_id,
            nonce=lease.nonce,
            agent=lease.agent_id,
            model=lease.model_id,
            weights=ref.weights_digest,
            precision=lease.precision,
            input=sha256_hex(lease.input_bytes()),
            output=token_output(tokens, ref.vocab),
            engine=claim,
            runtime={
                "engine_url": self.base,
                "engine_model": d.model,
                "notes": list(d.notes),
                "at": time.time(),
            },
        )
        return sign_receipt(claims, self.key)

    def _logprob_tokens(
        self, lp: dict[str, Any] | None, pieces: PieceMap
    ) -> list[tuple[int, float, list[tuple[int | None, float]]]]:
        """(id, chosen log-prob, top (id, log-prob) pairs) for each token in one streamed event."""
        if not lp:
            return []
        out = []
        for piece, chosen, cands in zip(
            lp.get("tokens") or [], lp.get("token_logprobs") or [], lp.get("top_logprobs") or [], strict=False
        ):
            tid = pieces.id_of(piece)
            if tid is None:
                raise EngineError(f"engine returned a token the adapter cannot map to an id: {piece!r}")
            ranked = sorted((cands or {}).items(), key=lambda kv: -kv[1])[: self.top]
            row = [(pieces.id_of(p), float(v)) for p, v in ranked]
            out.append((tid, float(chosen) if chosen is not None else math.nan, row))
        return out

    # -- Maxwell's work probe (protocol.probe, the engine form `e`) -----------------------------
    def probe(self, raw: bytes) -> bytes:
        """A serve_resident `prober`: one probe line in, one answer line out (an error line when the
        engine cannot answer it; never an exception, the lease goes on)."""
        try:
            req = parse_probe_request(raw)
        except ValueError as exc:
            return refuse_probe(raw, str(exc))
        try:
            return ProbeAnswer(req.lease_id, req.number, logprobs=self.probe_logprobs(req)).line()
        except (PoiError, ValueError, KeyError, TypeError) as exc:
            return ProbeAnswer(req.lease_id, req.number, error=f"{type(exc).__name__}: {exc}").line()

    def probe_logprobs(self, req: ProbeRequest) -> ProbeLogprobs:
        """The engine's top log-probs after the probe's ids: a 1-token greedy completion of their text.
        Engines' completions take text (llama-cpp-python's server refuses token-id prompts), so the
        ids are decoded with the leased model's tokenizer and the engine re-encodes them like a lease
        prompt; Maxwell judges the position after that re-encoding (node.probe), and the engine's
        prompt-token count must be the model's."""
        d = self.dialect(req.model_id)
        if not d.logprobs:
            raise EngineError(
                "the engine returns no log-probabilities (token-only): its work probe answer could not "
                "be judged"
            )
        vocab = self.registry.reference(req.model_id).vocab
        if any(not 0 <= i < vocab for i in req.ids):
            raise ValueError(
                f"probe ids: expected token ids in [0, {vocab}), got {min(req.ids)}..{max(req.ids)}"
            )
        text = self.registry.decode(req.model_id, list(req.ids))
        want = len(self.registry.encode_prompt(req.model_id, text))
        pieces = self._pieces[req.model_id]
        # a position whose best pieces all end inside a UTF-8 character names no id: ask for more once
        for top in dict.fromkeys((self.top, ENGINE_MAX_TOP)):
            body = {"model": d.model, "prompt": d.prefix + text, "max_tokens": 1, "temperature": 0,
                    "logprobs": top, **self._extra(d, 0, 0, None)}  # fmt: skip
            answer = self._post(body)
            got = int((answer.get("usage") or {}).get("prompt_tokens") or 0)
            if got != want:
                raise EngineError(
                    f"the engine read the probe's text as {got} prompt tokens, the leased model as {want}"
                )
            lp = (answer.get("choices") or [{}])[0].get("logprobs") or {}
            cands = ((lp.get("top_logprobs") or [None])[0] or {}).items()
            # the best `top`, ids mapped back as for leases; a piece naming no token is left out
            ranked = sorted(((pieces.id_of(p), float(v)) for p, v in cands), key=lambda iv: -iv[1])[:top]
            named = [(i, v) for i, v in ranked if i is not None]
            if named:
                return ProbeLogprobs(top=top, ids=tuple(i for i, _ in named), lp=tuple(v for _, v in named))
        raise EngineError(
            f"the engine's top {ENGINE_MAX_TOP} log-probs at the probe's position name no token of the model"
        )

    def close(self) -> None:
        self.client.close()
