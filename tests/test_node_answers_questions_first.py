"""A node answers Maxwell's L3 questions before it serves the new leases of the same pull: a
question's clock runs from when Maxwell asked it, and serving a wave can take longer than that on a
busy host (`make demo` under load slashed an honest exact-tier agent whose node served others'
leases first). The client, node and agent here are stand-ins (no control plane, no process): what
is tested is the order in which `RemoteNode.step` hands the pull's work on."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from maxwell_poi.node.remote import RemoteNode
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.service.wire import OpenChallenge, PullAnswer, PulledLeaseView


class StandInClient:
    def __init__(self, answer: PullAnswer) -> None:
        self.answer = answer

    def send_pull(self, body: Any) -> PullAnswer:
        return self.answer


def test_the_pulls_questions_are_answered_before_its_leases_are_served() -> None:
    lease = Lease.issue("agent-1", "gpt2-micro", GenerateJob(prompt="x", max_new_tokens=4))
    pulled = PulledLeaseView(
        lease=lease.model_dump(mode="json"),
        command=["true"],
        tier="low",
        audit_probability=0.0,
        stream_to=None,
    )
    question = OpenChallenge(
        challenge_id=7, lease_id="earlier", agent_id="agent-1", keys=[(0, "q")], timeout_s=30
    )
    answer = PullAnswer(node_id="n", leases=[pulled], challenges=[question])
    node = RemoteNode(
        StandInClient(answer), SimpleNamespace(agents={}), headroom=lambda: 1.0, device_class="cpu:x"
    )  # type: ignore[arg-type]
    order: list[str] = []
    node._ensure_agent = lambda *a: True  # type: ignore[method-assign]
    node._serve_wave = lambda agent, wave, to: order.append(f"wave {len(wave)}") or []  # type: ignore[method-assign]
    node._answer_challenge = lambda c: order.append(f"question {c.challenge_id}") or c  # type: ignore[method-assign]
    node.step()
    assert order == ["question 7", "wave 1"], order
