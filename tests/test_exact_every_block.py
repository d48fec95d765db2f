"""L3 opens and checks EVERY block of a challenged lease (verifier.every_block, issue 24 item 6): a
cheat confined to one block — the one-block adversary's 0.1 % weight noise, which L4's fingerprints
miss — is caught on every challenged lease whatever its position (first, middle, last; GPT-2, Llama
and the W8A8 integer mode), an honest lease passes with every block checked, and a block that
cannot be checked fails the lease (fail closed), naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from maxwell_poi.adversaries.wrong_block import one_block_changed
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import ReceiptClaims, max_receipt_bytes, open_receipt
from maxwell_poi.protocol.result import LayerResult, Status
from maxwell_poi.protocol.trace import Opening, Trace, opening_keys
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.blocks import linears
from maxwell_poi.registry.models import Registry
from maxwell_poi.verifier import exact
from maxwell_poi.verifier.every_block import (
    appraise_every_block,
    bytes_per_position,
    check_every_block,
    plan_openings,
)
from maxwell_poi.verifier.exact import appraise_opening, key_for

NOISE = 0.001  # the one-block adversary at 0.1 %: L4's fingerprints stay exact (issue 24's measurement)
PROMPTS = ("The river bends past the mill", "A lantern in the window of the")


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry()


@pytest.fixture(scope="module")
def keys(registry: Registry) -> dict:
    return {}  # Maxwell's secret vectors, made once per model on first use


def key_of(registry: Registry, keys: dict, model_id: str):
    if model_id not in keys:
        keys[model_id] = key_for(registry.load(model_id))
    return keys[model_id]


def serve(registry: Registry, model_id: str, tmp: Path, prompt: str, change=None):
    """(lease, claims, kept trace) from an agent whose model copy is `change(model)` (or honest)."""
    prover = Prover(AgentKey.generate(), registry, trace_dir=tmp)
    if change is not None:
        prover._converted[(model_id, "fp32")] = change(registry.load(model_id).copied_to(torch.float32))
    lease = Lease.issue("alice", model_id, GenerateJob(prompt=prompt, max_new_tokens=8))
    raw = prover.run(lease)
    bound = max_receipt_bytes(lease, registry.reference(model_id).hidden)
    return lease, open_receipt(raw, bound).claims, Trace.load(tmp / f"{lease.lease_id}.npz")


class FromTrace:
    """The agent's side of a challenge, from its kept trace; records what was asked."""

    def __init__(self, trace: Trace, nonce: bytes) -> None:
        self.trace, self.leaves, self.asked = trace, trace.leaves(nonce), []

    def __call__(self, blocks: list[int]) -> Opening | str:
        self.asked.append(blocks)
        keys = opening_keys(blocks, self.trace.blocks, self.trace.ops)
        return Opening({k: self.trace.tensors[k] for k in keys}, self.leaves)


def challenge(registry, keys, lease: Lease, claims: ReceiptClaims, opener, most_blocks=None) -> LayerResult:
    model = registry.load(lease.model_id)
    positions = len(model.encode_prompt(lease.job.prompt)) + len(claims.tokens())
    return appraise_every_block(
        claims,
        lease.nonce_bytes,
        model,
        key_of(registry, keys, lease.model_id),
        opener,
        positions=positions,
        most_blocks=most_blocks,
    )


@pytest.mark.parametrize("model_id", ["gpt2-mini", "llama-small", "gpt2-mini-w8a8"])
def test_an_honest_lease_passes_with_every_block_checked(model_id, registry, keys, tmp_path) -> None:
    lease, claims, trace = serve(registry, model_id, tmp_path, PROMPTS[0])
    opener = FromTrace(trace, lease.nonce_bytes)
    result = challenge(registry, keys, lease, claims, opener, most_blocks=3)
    assert result.status is Status.PASS, result.reason
    every = list(range(trace.blocks))
    assert result.details["checked"] == every and result.details["unchecked"] == []
    assert sorted(b for part in opener.asked for b in part) == every  # each block opened once
    assert all(len(part) <= 3 for part in opener.asked) and len(opener.asked) == -(-trace.blocks // 3)
    assert result.reason.startswith(f"all {trace.blocks} blocks opened ({len(opener.asked)} openings)")


GPT2_POSITIONS = [0, 1, 2, 3]  # gpt2-mini: 4 blocks; first, both middles, last
LLAMA_POSITIONS = [0, 4, 7]  # llama-small: 8 blocks


@pytest.mark.parametrize(
    ("model_id", "block"),
    [("gpt2-mini", b) for b in GPT2_POSITIONS] + [("llama-small", b) for b in LLAMA_POSITIONS],
)
def test_a_one_block_cheat_is_caught_on_every_challenged_lease(model_id, block, registry, keys, tmp_path):
    """The adversary (adversaries.wrong_block) at 0.1 %: every lease is caught, naming its block —
    and a spot check of any other block passes, so only opening every block catches it every time."""
    model = registry.load(model_id)
    for i, prompt in enumerate(PROMPTS):
        cheat = lambda m, i=i: one_block_changed(m, block, NOISE, seed=100 + i)  # noqa: E731
        lease, claims, trace = serve(registry, model_id, tmp_path / str(i), prompt, cheat)
        result = challenge(registry, keys, lease, claims, FromTrace(trace, lease.nonce_bytes))
        assert result.status is Status.FAIL and result.reason.startswith(f"block {block} "), result.reason
        assert result.details["checked"] == list(range(len(model.layers)))  # one opening: all checked
        others = [b for b in range(len(model.layers)) if b != block]
        spot = appraise_opening(
            claims,
            lease.nonce_bytes,
            model,
            key_of(registry, keys, model_id),
            others,
            Opening.of(trace, lease.nonce_bytes, others),
        )
        assert spot.status is Status.PASS, spot.reason  # a draw that missed the block passed it


def test_one_changed_int8_weight_is_caught_in_every_position(registry, keys, tmp_path) -> None:
    for block in (0, 2, 3):

        def cheat(model, block=block):
            with torch.no_grad():
                w = linears(model.layers[block])["fc"].weight_q
                w[3, 5] = -w[3, 5] if w[3, 5] != 0 else 7
            return model

        lease, claims, trace = serve(registry, "gpt2-mini-w8a8", tmp_path / str(block), PROMPTS[0], cheat)
        result = challenge(registry, keys, lease, claims, FromTrace(trace, lease.nonce_bytes))
        assert result.status is Status.FAIL and result.reason.startswith(f"block {block} fc"), result.reason


# -- fail closed ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def honest(registry, tmp_path_factory):
    return serve(registry, "gpt2-mini", tmp_path_factory.mktemp("honest"), PROMPTS[1])


def test_an_opening_that_does_not_come_fails_naming_its_blocks_and_the_rest(honest, registry, keys):
    lease, claims, trace = honest
    agent = FromTrace(trace, lease.nonce_bytes)

    def refuses_the_second(blocks: list[int]) -> Opening | str:
        return "the agent refused: no kept trace" if agent.asked else agent(blocks)

    result = challenge(registry, keys, lease, claims, refuses_the_second, most_blocks=1)
    assert result.status is Status.FAIL
    assert result.reason == "opening of blocks [1]: the agent refused: no kept trace"
    assert (result.details["checked"], result.details["unchecked"]) == ([0], [1, 2, 3])


def test_an_opening_without_a_block_or_from_another_trace_fails(honest, registry, keys, tmp_path):
    lease, claims, trace = honest
    agent = FromTrace(trace, lease.nonce_bytes)

    def drops_block_2(blocks: list[int]) -> Opening | str:
        got = agent(blocks)
        return Opening({k: v for k, v in got.tensors.items() if k[0] != 2}, got.leaves)

    dropped = challenge(registry, keys, lease, claims, drops_block_2)
    # block 2's input is block 1's output: both blocks lack a tensor
    assert dropped.status is Status.FAIL and "got none for [1, 2]" in dropped.reason, dropped.reason
    assert dropped.details["unchecked"] == [0, 1, 2, 3]
    _, _, other = serve(registry, "gpt2-mini", tmp_path, PROMPTS[1])  # an honest trace, not this one
    swapped = challenge(registry, keys, lease, claims, FromTrace(other, lease.nonce_bytes))
    assert swapped.status is Status.FAIL and "do not rebuild the receipt's trace root" in swapped.reason


def test_a_block_whose_check_raises_fails_the_lease(honest, registry, keys, monkeypatch) -> None:
    lease, claims, trace = honest
    real = exact.check_block

    def breaks_on_block_2(model, key, block, *args, **kwargs):
        if block == 2:
            raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        return real(model, key, block, *args, **kwargs)

    monkeypatch.setattr(exact, "check_block", breaks_on_block_2)
    result = challenge(registry, keys, lease, claims, FromTrace(trace, lease.nonce_bytes))
    assert result.status is Status.FAIL
    assert result.reason.startswith("block 2: could not be checked (RuntimeError"), result.reason


def test_a_plan_that_leaves_a_block_out_fails_and_never_asks(honest, registry, keys) -> None:
    lease, claims, trace = honest
    model = registry.load("gpt2-mini")
    agent = FromTrace(trace, lease.nonce_bytes)
    found = check_every_block(
        claims, lease.nonce_bytes, model, key_of(registry, keys, "gpt2-mini"), [[0, 1], [3]], agent
    )
    assert not found.ok and found.reason.startswith("L3 plan: expected every block 0..3 once")
    assert agent.asked == []


def test_no_trace_root_fails_without_asking(honest, registry, keys) -> None:
    lease, claims, trace = honest
    agent = FromTrace(trace, lease.nonce_bytes)
    result = challenge(registry, keys, lease, claims.model_copy(update={"trace": None}), agent)
    assert result.status is Status.FAIL and "trace root" in result.reason and agent.asked == []


# -- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_id", ["gpt2-mini", "llama-small", "gpt2-mini-w8a8"])
def test_a_blocks_opening_is_the_size_the_plan_expects(model_id, registry, tmp_path) -> None:
    lease, _claims, trace = serve(registry, model_id, tmp_path, PROMPTS[0])
    model = registry.load(model_id)
    for b in range(trace.blocks):
        opened = Opening.of(trace, lease.nonce_bytes, [b]).tensors.values()
        assert sum(t.nbytes for t in opened) == bytes_per_position(model, b) * trace.positions


def test_the_plan_covers_every_block_once_within_its_caps(registry) -> None:
    model = registry.load("gpt2-mini")
    one = bytes_per_position(model, 0) * 10
    assert plan_openings(model, 10) == [[0, 1, 2, 3]]
    assert plan_openings(model, 10, most_blocks=3) == [[0, 1, 2], [3]]
    assert plan_openings(model, 10, budget=2 * one) == [[0, 1], [2, 3]]
    assert plan_openings(model, 10, budget=one // 2) == [[0], [1], [2], [3]]  # over budget: alone
