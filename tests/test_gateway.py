"""The OpenAI-compatible gateway end to end, with the official `openai` client, unchanged, against a
real server on loopback (uvicorn), a node long-polling it and REAL resident agents running the
trained poi-lm: verified completions streamed and not, bad requests refused with reasons, and
cheaters cut off mid-stream — by the running pace check, by the streaming audit alone, and one only
the same-class tolerance catches (the node measured the agent on this host: issue 24 item 4) — with
the requester not charged and the cheater's stake slashed. Every lease here is high tier, so tokens
are delivered verified by default (item 5): honest completions report 0 unverified tokens, a cut
cheater too; asked for `immediate` delivery, a completion reports its count."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.orm import Session

from maxwell_poi.demo.gateway import (
    DEMO_TOKENS,
    GatewayStack,
    ensure_profile,
    gateway_lines,
    maxwell_of,
    run_gateway_demo,
)
from maxwell_poi.gateway.timeline import STAGES
from maxwell_poi.observer.host import numerics_class, this_device
from maxwell_poi.protocol.lease import Lease
from maxwell_poi.protocol.receipt import max_receipt_bytes, open_receipt
from maxwell_poi.service.schema import CompletionRow, LeaseRow, OfferRow, ReceiptRow
from maxwell_poi.verifier.ear import verify_ear

MODEL = "poi-lm"
TOKENS = 24  # more than one streaming-audit block (16): a cut before the end is mid-stream
ASK = 10
STAKE = 100_000


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayStack]:
    tmp = tmp_path_factory.mktemp("gateway")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POI_HOME", str(tmp / "home"))
        mp.setenv("OMP_NUM_THREADS", "1")  # see test_service_flow: idle OpenMP threads inflate CPU-s
        ensure_profile(MODEL, TOKENS)
        with GatewayStack(tmp / "work") as stack:
            stack.honest_agent("alice", MODEL, ask=ASK)
            yield stack


def ear_public_key(gw: GatewayStack) -> Ed25519PublicKey:
    """As a requester would: the JWK Maxwell publishes at /v1/ear-key."""
    jwk = httpx.get(f"{gw.url}/v1/ear-key").json()
    return Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="))


def completion_row(gw: GatewayStack, lease_id: str) -> CompletionRow:
    with Session(gw.control.ledger.engine) as session:
        row = session.get(CompletionRow, lease_id)
    assert row is not None
    return row


def receipt_text(gw: GatewayStack, lease_id: str) -> str:
    """The text of the tokens the agent signed for, from the receipt intake stored."""
    with Session(gw.control.ledger.engine) as session:
        raw = session.get(ReceiptRow, lease_id).receipt
        lease = Lease.from_json(session.get(LeaseRow, lease_id).lease_json)
    hidden = gw.control.registry.reference(MODEL).hidden
    opened = open_receipt(raw, max_receipt_bytes(lease, hidden))
    return gw.control.registry.decode(MODEL, opened.claims.tokens())


def test_models_are_the_registered_generation_models(gw: GatewayStack) -> None:
    ids = {m.id for m in gw.client().models.list()}
    assert MODEL in ids and "minilm-l6-v2" not in ids  # an embedding model is not a completion model
    with pytest.raises(openai.NotFoundError):
        gw.client().models.retrieve("no-such-model")


def test_a_completion_comes_back_verified_and_the_requester_pays_for_it(gw: GatewayStack) -> None:
    before = gw.balances()
    r = gw.client().completions.create(model=MODEL, prompt="The history of the river", max_tokens=TOKENS)
    m = maxwell_of(r)
    assert m["verdict"] == "affirming", m.get("reason")
    assert r.usage.completion_tokens == TOKENS and r.choices[0].text
    layers = {d["layer"]: d for d in m["layers"]}
    assert layers["L4-audit"]["status"] == "pass" and "as they arrived" in layers["L4-audit"]["reason"]
    assert layers["L1-thermodynamic"]["status"] == layers["L2-boundary"]["status"] == "pass"
    claims = verify_ear(m["ear"], ear_public_key(gw))  # Maxwell's signed statement of the same appraisal
    assert claims["submods"][f"lease/{m['lease_id']}"]["ear.status"] == "affirming"
    assert r.choices[0].text == receipt_text(gw, m["lease_id"])  # what was returned is what was signed
    after = gw.balances()
    charge = ASK * TOKENS
    assert m["charged_micro"] == charge
    assert before["requester:alice-app"] - after["requester:alice-app"] == charge
    assert after["requester-escrow:alice-app"] == 0  # the hold's rest went back
    energy = after["maxwell:energy"] - before["maxwell:energy"]
    assert after["wallet:alice"] - before["wallet:alice"] == charge - energy  # paid, less its energy
    # where its time went: every stage reached, in order, none longer than the whole
    timing = m["timing_ms"]
    assert list(timing) == [*(name for name, _, _ in STAGES), "total"], timing
    assert all(v >= 0 for v in timing.values())
    assert sum(v for k, v in timing.items() if k != "total") == pytest.approx(timing["total"], abs=0.1)


def _stream(gw: GatewayStack, **extra: object) -> tuple[str, dict]:
    chat = [{"role": "user", "content": "Tell me about rivers."}]
    stream = gw.client().chat.completions.create(
        model=MODEL, messages=chat, max_tokens=TOKENS, stream=True, **extra
    )
    chunks = list(stream)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), maxwell_of(chunks[-1])


def test_high_tier_completions_are_delivered_verified_and_report_zero_unverified(gw: GatewayStack) -> None:
    text, m = _stream(gw)
    assert m["verdict"] == "affirming" and text == receipt_text(gw, m["lease_id"])
    assert m["delivery"] == "verified" and m["unverified_tokens"] == 0, m
    whole = maxwell_of(gw.client().completions.create(model=MODEL, prompt="Stones", max_tokens=TOKENS))
    assert whole["delivery"] == "verified" and whole["unverified_tokens"] == 0, whole


def test_immediate_delivery_is_asked_for_and_reports_its_count(gw: GatewayStack) -> None:
    text, m = _stream(gw, extra_body={"delivery": "immediate"})
    assert m["verdict"] == "affirming" and text == receipt_text(gw, m["lease_id"])
    assert m["delivery"] == "immediate" and isinstance(m["unverified_tokens"], int)
    assert 0 <= m["unverified_tokens"] <= TOKENS, m


def test_verified_delivery_sends_a_cheater_nothing_unverified_before_the_cut(gw: GatewayStack) -> None:
    """Output tampering streamed at the middle position: under verified delivery the requester gets
    at most the blocks before it, all verified; the cut carries the count (0)."""
    gw.cheater("otto", "output_tampering", ["--positions", "middle", "--stream-forged"], MODEL, ask=ASK // 2)
    message, got, m = _cut_off(gw, "otto")
    assert "streaming audit: token choice" in message, message
    assert m["delivery"] == "verified" and m["unverified_tokens"] == 0, m
    assert m["cut_after_tokens"] < TOKENS and got <= TOKENS // 2


def test_a_streamed_chat_carries_its_verdict_in_the_last_chunk(gw: GatewayStack) -> None:
    stream = gw.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about rivers."}],
        max_tokens=TOKENS,
        stream=True,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    m = maxwell_of(chunks[-1])
    assert m["verdict"] == "affirming", m.get("reason")
    assert chunks[-1].choices[0].finish_reason == "length"
    assert len(chunks) > 3  # the text came in pieces as the node saw it, not in one block at the end
    assert text == receipt_text(gw, m["lease_id"])


def test_bad_requests_are_refused_with_reasons_and_cost_nothing(gw: GatewayStack) -> None:
    before = gw.balances()["requester:alice-app"]
    with pytest.raises(openai.AuthenticationError):
        gw.client(api_key="poi-wrong").completions.create(model=MODEL, prompt="hi", max_tokens=2)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        gw.client().completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="stop"):
        gw.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, stop=["\n"])
    with pytest.raises(openai.UnprocessableEntityError):
        gw.client().completions.create(model=MODEL, prompt="hi", max_tokens=2, n=2)
    with pytest.raises(openai.BadRequestError, match="embedding"):
        gw.client().completions.create(model="minilm-l6-v2", prompt="hi", max_tokens=2)
    raw = httpx.post(
        f"{gw.url}/v1/chat/completions",
        content=b"{not json",
        headers={"authorization": f"Bearer {gw.api_key}", "content-type": "application/json"},
    )
    assert raw.status_code == 422 and "error" in raw.json()
    assert gw.balances()["requester:alice-app"] == before


def _cut_off(gw: GatewayStack, name: str) -> tuple[str, int, dict]:
    """A streamed chat served by `name` (the lowest ask): (the error message, tokens the client got,
    the error's maxwell object)."""
    stream = gw.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me about rivers."}],
        max_tokens=TOKENS,
        stream=True,
    )
    got = 0
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            got += 1 if chunk.choices and chunk.choices[0].delta.content else 0
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == "lease_cut", body
    return str(caught.value), got, body["maxwell"]


@pytest.mark.parametrize(
    ("name", "module", "args", "caught_by"),
    [
        # honest tokens, fingerprints ~7e-4 off: inside the cross-class set, outside the same-class
        # set the node's measurement (this host, the verifier's class) calls for
        ("nina", "nudged_fingerprints", [], ("streaming audit: fingerprint chunk",)),
        # a small model decodes, fast: the running pace check or the streaming audit's first block
        # (both judge at the 8th token) ends it
        ("mallory", "cheap_draft", ["--draft", "poi-lm-draft"], ("running pace", "streaming audit: token")),
        # same architecture and pace, other weights: only the streaming audit can tell (the prompt's
        # fingerprint chunk, streamed before the first token, already fails)
        (
            "trudy",
            "substitute_model",
            ["--substitute", "poi-lm-init"],
            ("streaming audit: fingerprint chunk",),
        ),
    ],
)
def test_a_cheater_is_cut_off_mid_stream(gw: GatewayStack, name, module, args, caught_by) -> None:
    gw.cheater(name, module, args, MODEL, ask=ASK // 2)
    before = gw.balances()
    message, got, m = _cut_off(gw, name)
    assert any(why in message for why in caught_by), message
    assert got < TOKENS  # mid-stream: the requester did not get the whole answer
    assert m["verdict"] == "contraindicated" and m["stake"] == "slashed"
    audit = next(d for d in m["layers"] if d["layer"] == "L4-audit")
    assert audit["status"] == "fail" and "cut off mid-stream" in audit["reason"]
    here = f"{numerics_class(this_device())} -> {numerics_class(this_device())}"
    assert m["tolerance"] == {"set": "same-class", "class_pair": here, "reason": m["tolerance"]["reason"]}, m
    if "streaming audit" in message:
        assert f"[same-class tolerance, {here}]" in message
    assert m["delivery"] == "verified" and m["unverified_tokens"] == 0  # high tier: verified delivery
    after = gw.balances()
    assert after["requester:alice-app"] == before["requester:alice-app"]  # not charged
    assert after["requester-escrow:alice-app"] == 0
    assert after["maxwell:slashed"] - before["maxwell:slashed"] == STAKE
    assert completion_row(gw, m["lease_id"]).status == "cut"
    with Session(gw.control.ledger.engine) as session:
        assert session.get(OfferRow, (name, MODEL)) is None  # it serves nothing more until it offers again
    # the next request goes to the honest agent again
    r = gw.client().completions.create(model=MODEL, prompt="Water flows", max_tokens=4)
    assert maxwell_of(r)["verdict"] == "affirming"


def test_a_requester_reads_the_verdict_of_its_own_completions_only(gw: GatewayStack, tmp_path: Path) -> None:
    r = gw.client().completions.create(model=MODEL, prompt="Stones", max_tokens=4)
    lease_id = maxwell_of(r)["lease_id"]
    mine = httpx.get(
        f"{gw.url}/v1/maxwell/completions/{lease_id}", headers={"authorization": f"Bearer {gw.api_key}"}
    )
    assert mine.status_code == 200 and mine.json()["verdict"] == "affirming"
    other = gw.admin.request(
        "POST", "/v1/admin/requesters", {"requester_id": "bob-app", "deposit_micro": 1000}, auth="admin"
    )
    theirs = httpx.get(
        f"{gw.url}/v1/maxwell/completions/{lease_id}", headers={"authorization": f"Bearer {other['api_key']}"}
    )
    assert theirs.status_code == 403, json.dumps(theirs.json())
    # bob's 1000 micro cannot cover a hold of TOKENS x the price: refused before any lease is issued
    with pytest.raises(openai.APIStatusError) as caught:
        gw.client(api_key=other["api_key"]).completions.create(model=MODEL, prompt="hi", max_tokens=200)
    assert caught.value.status_code == 402


def test_the_demo_ends_with_a_verified_chat_and_a_cheater_cut_off(gw: GatewayStack, tmp_path: Path) -> None:
    """`poi demo`'s ending (demo_gateway.run_gateway_demo), on a stack of its own."""
    summary = run_gateway_demo(tmp_path / "demo")
    assert summary["honest"]["maxwell"]["verdict"] == "affirming" and summary["honest"]["text"]
    cheater = summary["cheater"]
    assert cheater["cut"] and cheater["maxwell"]["cut_after_tokens"] < DEMO_TOKENS
    assert cheater["requester_charged_micro"] == 0 and cheater["stake_slashed_micro"] > 0
    lines = gateway_lines(summary)
    assert any("cut off mid-stream" in line for line in lines)


def test_the_dashboard_lists_paid_and_cut_completions(gw: GatewayStack) -> None:
    data = gw.admin.request("GET", "/v1/admin/dashboard", auth="admin", params={"limit": 100})
    statuses = {c["status"] for c in data["completions"]}
    assert {"paid", "cut"} <= statuses, statuses
    cut = next(c for c in data["completions"] if c["status"] == "cut")
    assert cut["charge_micro"] == 0 and "cut off mid-stream" in cut["reason"]


def test_metrics_count_completions_by_outcome(gw: GatewayStack) -> None:
    text = httpx.get(f"{gw.url}/metrics").text
    paid = [
        line for line in text.splitlines() if line.startswith('poi_gateway_completions_total{outcome="paid"}')
    ]
    cut = [
        line for line in text.splitlines() if line.startswith('poi_gateway_completions_total{outcome="cut"}')
    ]
    assert paid and float(paid[0].split()[-1]) >= 3, paid
    assert cut and float(cut[0].split()[-1]) >= 2, cut
    assert "poi_gateway_streaming" in text
