"""The node's unbilled warm-up lease never asks a question a paying lease carries (issue 24 item 3):
not the first paying lease's, not one of the registry's prompt sets, not even the published
WARM_UP_PROMPT (a requester who knows it could otherwise pre-place it) — each warm-up's question
is fresh. Checked on warm_up_lease itself and on the path a pulling node takes (RemoteNode.step)."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from maxwell_poi.node import remote as remote_mod
from maxwell_poi.node.attest import NodeKey
from maxwell_poi.node.node import Node
from maxwell_poi.node.remote import RemoteNode, warm_up_lease
from maxwell_poi.protocol.lease import EmbedJob, GenerateJob, Lease
from maxwell_poi.registry import prompts as registry_prompts
from maxwell_poi.service.wire import PullAnswer, PulledLeaseView

# an agent that answers nothing and leaves when its input closes: the node's serve is recorded, not run
WAITS = [sys.executable, "-c", "import sys; sys.stdin.read()"]


def registry_inputs() -> set[str]:
    """Every prompt or text in every list registry/prompts.py holds (a set added later included)."""
    found = {
        text
        for value in vars(registry_prompts).values()
        if isinstance(value, list | tuple)
        for text in value
        if isinstance(text, str)
    }
    assert found, "registry/prompts.py holds no prompt set"
    return found


def inputs(lease: Lease) -> list[str]:
    return [lease.job.prompt] if isinstance(lease.job, GenerateJob) else list(lease.job.texts)


def assert_fresh(warm: Lease, paying: Lease) -> None:
    """The warm-up is `paying`'s model and size, asking nothing a paying lease carries."""
    assert warm.lease_id != paying.lease_id and warm.nonce != paying.nonce
    assert (warm.agent_id, warm.model_id, warm.precision) == (
        paying.agent_id,
        paying.model_id,
        paying.precision,
    )
    assert type(warm.job) is type(paying.job)
    for text in inputs(warm):
        assert text not in inputs(paying), "the warm-up asks the paying lease's question"
        assert text not in registry_inputs(), f"the warm-up asks a registry prompt: {text!r}"
        assert text not in (remote_mod.WARM_UP_PROMPT, remote_mod.WARM_UP_TEXT), "a published question"
    assert warm.input_bytes() != paying.input_bytes()


PAYING_PROMPTS = sorted(registry_inputs()) + [remote_mod.WARM_UP_PROMPT, remote_mod.WARM_UP_TEXT]


@pytest.mark.parametrize("prompt", PAYING_PROMPTS)
def test_a_generation_warm_up_never_asks_a_paying_prompt(prompt: str) -> None:
    paying = Lease.issue(
        "alice", "gpt2-micro", GenerateJob(prompt=prompt, max_new_tokens=7), precision="bf16"
    )
    warm = warm_up_lease("alice", paying)
    assert_fresh(warm, paying)
    assert isinstance(warm.job, GenerateJob) and warm.job.max_new_tokens == 7


@pytest.mark.parametrize("text", PAYING_PROMPTS)
def test_an_embedding_warm_up_never_embeds_a_paying_text(text: str) -> None:
    paying = Lease.issue("alice", "minilm-l6-v2", EmbedJob(texts=[text, *registry_prompts.TEXTS]))
    assert_fresh(warm_up_lease("alice", paying), paying)


def test_each_warm_up_asks_a_new_question() -> None:
    """A constant, however private, can be learnt once and asked in a paying lease ever after."""
    paying = Lease.issue("alice", "gpt2-micro", GenerateJob(prompt=registry_prompts.PROMPTS[0]))
    asked = {inputs(warm_up_lease("alice", paying))[0] for _ in range(50)}
    assert len(asked) == 50


class OnePull:
    """A control plane that hands out `leases` (to run with WAITS) on the first pull, then nothing."""

    def __init__(self, leases: list[Lease]) -> None:
        self.leases = leases

    def send_pull(self, body: Any) -> PullAnswer:
        views = [
            PulledLeaseView(
                lease=lease.model_dump(), command=WAITS, tier="low", audit_probability=0.0, stream_to=None
            )
            for lease in self.leases
        ]
        self.leases = []
        return PullAnswer(node_id="n1", leases=views, challenges=[])


@pytest.mark.parametrize(
    ("model_id", "job"),
    [
        ("gpt2-micro", GenerateJob(prompt=registry_prompts.PROMPTS[0])),
        ("minilm-l6-v2", EmbedJob(texts=registry_prompts.TEXTS)),
    ],
)
def test_a_pulling_node_warms_a_new_agent_up_on_a_fresh_question(
    monkeypatch: pytest.MonkeyPatch, model_id: str, job: GenerateJob | EmbedJob
) -> None:
    """RemoteNode.step starts the agent, serves it warm_up_lease's lease alone, then the paying one;
    a second pull to the running agent warms nothing up."""
    paying = Lease.issue("alice", model_id, job)
    built: list[Lease] = []

    def spy(agent_id: str, first: Lease) -> Lease:
        built.append(warm_up_lease(agent_id, first))
        return built[-1]

    monkeypatch.setattr(remote_mod, "warm_up_lease", spy)
    served: list[list[Lease]] = []
    with Node("n1", NodeKey.generate(), None) as node:
        monkeypatch.setattr(
            node, "serve", lambda agent_id, leases, *a, **k: served.append(list(leases)) or []
        )
        remote = RemoteNode(
            client=OnePull([paying]), node=node, headroom=lambda: 1e6, device_class="cpu:test"
        )  # type: ignore[arg-type]
        remote.step()
        assert "alice" in node.agents  # the agent was started by this pull
        remote.client = OnePull([Lease.issue("alice", model_id, job)])  # type: ignore[assignment]
        remote.step()
    (warm,) = built
    assert [[lease.lease_id for lease in wave] for wave in served[:2]] == [[warm.lease_id], [paying.lease_id]]
    assert len(served) == 3 and len(served[2]) == 1 and served[2][0].lease_id != warm.lease_id
    assert_fresh(warm, paying)
