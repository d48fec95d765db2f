"""Verified before delivered (issue 24, item 5), in process: a gateway lease's tokens relayed one at
a time, the requester's queue read after every relay as the response would read it, and each
token's verification looked at when it is read. Under `verified` delivery no token is read before
the streaming audit verified it — an honest answer arrives whole with 0 unverified, a cheat is cut
with 0 unverified and nothing from its first bad token on; under `immediate` delivery (today's) the
same reader gets tokens ahead of their block's check, and the count says how many. The server's
default is `verified` for the high tier and `immediate` for the others; a verified delivery is
always audited. (End to end through the `openai` client: tests/test_gateway.py.)"""

from __future__ import annotations

import queue
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from inproc_gateway import REQUESTER, plane, relay

from maxwell_poi.economics.tiers import Tier
from maxwell_poi.gateway.delivery import BY_TIER, Delivery, DeliveryPolicy, SentCount
from maxwell_poi.gateway.gateway import AUDIT_BLOCK, Gateway
from maxwell_poi.gateway.live import EventKind, LiveLease
from maxwell_poi.gateway.openai_wire import CompletionRequest
from maxwell_poi.observer.host import this_device
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob, Lease
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.protocol.result import Status
from maxwell_poi.prover.sdk import Prover
from maxwell_poi.registry.models import Registry

MODEL, TOKENS, BAD = "gpt2-micro", 24, 10  # BAD: the position a cheat changes (inside the 2nd block)


@dataclass
class Reader:
    """The requester's side: reads the queue like the response does, counting as routes.py does."""

    live: LiveLease
    receipt: bytes = b""
    got: list[int] = field(default_factory=list)
    sent: SentCount = field(default_factory=SentCount)
    cut: str = ""

    def read(self, _i: int = 0) -> None:
        while True:
            try:
                event = self.live.events.get_nowait()
            except queue.Empty:
                return
            if event.kind == EventKind.CUT:
                self.cut = event.reason
                return
            verified = self.live.verified  # what the route snapshots before it writes the chunk
            self.got += event.tokens
            self.sent.sent(len(self.got), verified)


def run(
    gw: Gateway, registry: Registry, prover: Prover, *, delivery: Delivery | None, tamper: bool
) -> Reader:
    request = CompletionRequest(
        model=MODEL, prompt="The history of the river", max_tokens=TOKENS, delivery=delivery
    )
    started = gw.start(REQUESTER, request, audited=True)
    receipt = prover.run(started.lease)
    reader = Reader(started.live, receipt)
    tokens = None
    if tamper:  # one token changed mid-answer, streamed as if computed (output tampering)
        tokens = list(open_receipt(receipt, 1 << 24).claims.tokens())
        tokens[BAD] = (tokens[BAD] + 1) % registry.reference(MODEL).vocab
    relay(gw, registry, started.lease, receipt, tokens=tokens, after_each=reader.read)
    reader.read()
    return reader


@pytest.fixture(scope="module")
def key() -> AgentKey:
    return AgentKey.generate()


@pytest.fixture(scope="module")
def prover(key: AgentKey, registry: Registry) -> Prover:
    return Prover(key, registry)


@pytest.fixture()
def gw(tmp_path: Path, registry: Registry, key: AgentKey):
    with plane(tmp_path, registry, key, MODEL, device_class=this_device()) as gateway:
        yield gateway


def test_verified_delivery_hands_over_an_honest_answer_whole_with_zero_unverified(
    gw, registry, prover
) -> None:
    r = run(gw, registry, prover, delivery=Delivery.VERIFIED, tamper=False)
    assert not r.cut and len(r.got) == TOKENS and r.sent.unverified == 0
    assert r.live.delivery is Delivery.VERIFIED and r.live.audit is not None
    result = gw.audited(r.live.lease.lease_id, r.receipt)  # what intake records
    assert result is not None and result.status is Status.PASS, result.reason
    assert result.details["delivery"] == "verified" and result.details["released_tokens"] == TOKENS


def test_verified_delivery_cuts_a_cheat_with_zero_unverified_and_nothing_past_its_block(
    gw, registry, prover
) -> None:
    r = run(gw, registry, prover, delivery=Delivery.VERIFIED, tamper=True)
    assert r.cut and "token choice" in r.cut and f"position {BAD}" in r.cut
    assert r.sent.unverified == 0
    assert len(r.got) == (BAD // AUDIT_BLOCK) * AUDIT_BLOCK  # the blocks before the bad one, verified
    assert r.live.audit_result(None).status is Status.FAIL


def test_immediate_delivery_reads_tokens_ahead_of_their_check_and_counts_them(gw, registry, prover) -> None:
    r = run(gw, registry, prover, delivery=Delivery.IMMEDIATE, tamper=True)
    assert r.cut and f"position {BAD}" in r.cut
    assert len(r.got) > BAD  # the changed token itself reached the requester before the cut
    # each block's tokens but its last go out before the block is fed: all of the bad block so far
    # and 7 of the first
    assert r.sent.unverified == (AUDIT_BLOCK - 1) + (len(r.got) - AUDIT_BLOCK) > 0
    honest = run(gw, registry, prover, delivery=Delivery.IMMEDIATE, tamper=False)
    assert not honest.cut and len(honest.got) == TOKENS
    assert honest.sent.unverified == (TOKENS // AUDIT_BLOCK) * (AUDIT_BLOCK - 1)


def test_the_server_default_is_verified_for_the_high_tier_only() -> None:
    policy = DeliveryPolicy(BY_TIER)
    assert policy.for_lease(None, Tier.HIGH) is Delivery.VERIFIED
    for tier in (Tier.LOW, Tier.MEDIUM, Tier.EXACT):
        assert policy.for_lease(None, tier) is Delivery.IMMEDIATE
    assert policy.for_lease(Delivery.IMMEDIATE, Tier.HIGH) is Delivery.IMMEDIATE  # the request decides
    assert DeliveryPolicy("verified").for_lease(None, Tier.LOW) is Delivery.VERIFIED
    with pytest.raises(ValueError, match="POI_SERVE_GATEWAY_DELIVERY"):
        DeliveryPolicy("sometimes")


def test_a_verified_delivery_is_audited_whatever_the_tier_drew(tmp_path, registry, key) -> None:
    with plane(
        tmp_path, registry, key, MODEL, device_class=this_device(), delivery=BY_TIER, low_tier=True
    ) as gw:
        plain = gw.start(REQUESTER, CompletionRequest(model=MODEL, prompt="Rivers", max_tokens=4))
        assert plain.delivery is Delivery.IMMEDIATE and plain.live.audit is None  # low tier: no lottery
        gw.forget(plain.lease.lease_id)
        asked = CompletionRequest(model=MODEL, prompt="Rivers", max_tokens=4, delivery=Delivery.VERIFIED)
        verified = gw.start(REQUESTER, asked)
        assert verified.delivery is Delivery.VERIFIED and verified.live.audit is not None


def test_a_verified_lease_without_an_audit_is_refused() -> None:
    lease = Lease.issue("agent-1", MODEL, GenerateJob(prompt="Rivers", max_new_tokens=4))
    with pytest.raises(ValueError, match="needs the streaming audit"):
        LiveLease(lease, None, None, delivery=Delivery.VERIFIED)


def test_sent_count_counts_only_tokens_past_what_was_verified_when_sent() -> None:
    s = SentCount()
    s.sent(3, 0)
    s.sent(8, 8)  # tokens 3..7 went out verified
    s.sent(12, 8)
    s.sent(12, 12)  # nothing new went out
    assert (s.delivered, s.unverified) == (12, 7)
