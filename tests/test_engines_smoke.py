"""Real serving engines answer poi-lm greedily through the `openai` client as the HF model does
(issue 27 groundwork): llama.cpp (llama-cpp-python's server, on GGUF exports of poi-lm) and
`transformers serve`. Missing engine packages skip these tests, or fail them under CI=true."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from openai import OpenAI

from maxwell_poi.prover.engine import byte_level_table
from maxwell_poi.registry.loaded import LoadedModel
from maxwell_poi.registry.models import Registry, model_dir
from tests.engines import llama_cpp_server, require_engine, transformers_server

PROMPT = "Once upon a time"
MAX_TOKENS = 16
# llama-cpp-python's server samples with repeat_penalty 1.1 unless told otherwise, even at
# temperature 0: its "greedy" is then not the model's argmax
LLAMA_GREEDY = {"repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


@pytest.fixture(scope="module")
def poi_lm() -> LoadedModel:
    return Registry().load("poi-lm")


@torch.no_grad()
def hf_greedy(lm: LoadedModel, ids: list[int], n: int) -> list[int]:
    """The fp32 model's argmax continuation, without a final eos: neither engine returns that token
    (llama.cpp ends with finish_reason "stop" and counts it nowhere)."""
    out = list(ids)
    for _ in range(n):
        nxt = int(lm.module(torch.tensor([out])).logits[0, -1].argmax())
        if nxt == lm.tokenizer.eos_token_id:
            break
        out.append(nxt)
    return out[len(ids) :]


@torch.no_grad()
def hf_logprobs(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Log-probs of the next token at every position of `ids`, fp32 forward, float64 softmax."""
    return torch.log_softmax(lm.module(torch.tensor([ids])).logits[0].double(), -1)


def token_ids(lm: LoadedModel, pieces: list[str]) -> list[int | None]:
    """The vocabulary ids of llama.cpp's returned token strings (None where a string names no token:
    llama-cpp-python decodes each token with errors="ignore", so a token ending inside a UTF-8
    character comes back shortened or empty)."""
    table = byte_level_table()
    vocab = lm.tokenizer.get_vocab()
    return [vocab.get("".join(table[b] for b in p.encode("utf-8"))) for p in pieces]


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory, poi_lm: LoadedModel) -> Iterator[dict[str, Path]]:
    from maxwell_poi.registry.gguf_export import GGUF_TYPES, export_gguf

    folder = tmp_path_factory.mktemp("gguf")
    yield {t: export_gguf("poi-lm", folder / f"poi-lm-{t}.gguf", t) for t in GGUF_TYPES}


def test_llama_cpp_greedy_matches_hf(request: pytest.FixtureRequest, poi_lm: LoadedModel) -> None:
    require_engine("llama.cpp")  # before the exports, so a missing engine fails the test, not its set-up
    ggufs: dict[str, Path] = request.getfixturevalue("ggufs")
    ids = poi_lm.encode_prompt(PROMPT)
    want = hf_greedy(poi_lm, ids, MAX_TOKENS)
    measured: dict[str, str] = {}
    for ftype, path in ggufs.items():
        with llama_cpp_server(path) as url:
            client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
            resp = client.completions.create(
                model="poi-lm",
                prompt=PROMPT,
                max_tokens=MAX_TOKENS,
                temperature=0,
                logprobs=5,
                extra_body=LLAMA_GREEDY,
            )
        choice = resp.choices[0]
        assert choice.logprobs is not None and choice.logprobs.tokens is not None
        got = token_ids(poi_lm, choice.logprobs.tokens)
        # the engine's prompt is Maxwell's: llama.cpp adds the GGUF's bos itself
        assert resp.usage is not None and resp.usage.prompt_tokens == len(ids)
        ref = hf_logprobs(poi_lm, ids + [t for t in got if t is not None])
        worst = 0.0
        for pos, top in enumerate(choice.logprobs.top_logprobs or []):
            for piece, lp in top.items():
                tid = token_ids(poi_lm, [piece])[0]
                if tid is not None:
                    worst = max(worst, abs(lp - float(ref[len(ids) - 1 + pos, tid])))
        same = sum(a == b for a, b in zip(got, want, strict=False))
        measured[ftype] = f"{same}/{len(want)} greedy tokens as HF, max |d top-5 logprob| {worst:.2g}"
        if ftype == "f32":
            assert got == want, (got, want)
            assert choice.text == poi_lm.decode(want)
            assert choice.finish_reason == ("length" if len(want) == MAX_TOKENS else "stop")
            assert worst < 1e-4, worst
    # f16 and q8_0 are numbers to look at, not asserts: a quantised engine may flip a near tie
    print("llama.cpp vs HF fp32:", measured)


def test_transformers_serve_greedy_matches_hf(poi_lm: LoadedModel) -> None:
    require_engine("transformers serve")
    folder = model_dir(poi_lm.spec)
    ids = poi_lm.encode_prompt(PROMPT)
    want = hf_greedy(poi_lm, ids, MAX_TOKENS)
    with transformers_server(folder) as url:
        client = OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
        # its tokenizer adds no bos: the bos token written as text gives Maxwell's prompt ids
        resp = client.completions.create(
            model=str(folder),
            prompt=poi_lm.tokenizer.bos_token + PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == len(ids)
    assert resp.usage.completion_tokens >= len(want)  # an eos, if it came, is counted here
    # text only: no logprobs, no token ids (it ignores `logprobs` with a warning)
    assert resp.choices[0].logprobs is None
    assert resp.choices[0].text == poi_lm.decode(want)
