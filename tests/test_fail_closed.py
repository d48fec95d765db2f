"""Fail closed (issue 22 item 4): a layer the tier requires that could not measure leaves the verdict
at most `warning`, naming what was missing; only measured passes affirm. And bids for a node are
priced with the profile of the hardware class that node signed into its pull.

The layers run for real (L1, L2) on synthetic evidence (tests/test_physics.py's builder); L0 is a
stand-in that opens the receipt, so these tests are about the policy and the verdict rule."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_physics import DEVICE, TOKENS, appraisal

from maxwell_poi.economics.energy import expected_energy_j
from maxwell_poi.economics.tiers import TIERS
from maxwell_poi.protocol.keys import AgentKey
from maxwell_poi.protocol.lease import GenerateJob
from maxwell_poi.protocol.receipt import open_receipt
from maxwell_poi.protocol.result import LayerName, LayerResult, Status, Verdict, verdict_of
from maxwell_poi.registry.profiles import Profile, ProfileStore, Stats
from maxwell_poi.service import ControlPlane, ServiceConfig
from maxwell_poi.service.market import HOLD_FACTOR
from maxwell_poi.service.schema import LeaseRow, NodeRow
from maxwell_poi.service.wire import BidBody, Deposit, EnrollAgent, EnrollNode, PullBody
from maxwell_poi.verifier.appraisal import Appraisal
from maxwell_poi.verifier.boundary import BoundaryLayer
from maxwell_poi.verifier.policy import Verifier
from maxwell_poi.verifier.thermodynamic import ThermodynamicLayer

L0, L1, L2 = LayerName.INTEGRITY, LayerName.THERMODYNAMIC, LayerName.BOUNDARY


class OpeningGate:
    """Stand-in L0: opens the receipt (as L0 does when it passes) and passes."""

    name = L0

    def appraise(self, ctx: Appraisal) -> LayerResult:
        ctx.receipt = open_receipt(ctx.raw, 1 << 20)
        return LayerResult(L0, Status.PASS, "stand-in gate")


def profile(device: str, cpu_per_token: float, model: str = "gpt2-micro") -> Profile:
    return Profile(
        device,
        model,
        4,
        16,
        interval_s=Stats.of([0.030, 0.031, 0.029, 0.032]),
        decode_cpu_s_per_token=Stats.of([cpu_per_token * f for f in (1.0, 1.04, 0.98, 1.02)]),
        decode_cores_busy=Stats.of([1.7, 1.8, 1.6, 1.7]),
        peak_rss_mb=Stats.of([900, 910, 905, 920]),
        peak_flops_per_s=1e11,
        peak_flops_per_cpu_s=6e10,
        measured_at=time.time(),
        threads=[1, 2],
    )


@pytest.fixture()
def profiled(tmp_path: Path) -> ProfileStore:
    store = ProfileStore(tmp_path / "profiles.json")
    store.put(profile(DEVICE, 0.05))
    return store


@pytest.fixture()
def empty(tmp_path: Path) -> ProfileStore:
    return ProfileStore(tmp_path / "none.json")


def verify(registry, store: ProfileStore, layers=(L1, L2), ctx: Appraisal | None = None, **kw):  # noqa: ANN001, ANN201
    ctx = ctx or appraisal(TOKENS)
    built = {L1: ThermodynamicLayer(registry, store), L2: BoundaryLayer(store)}
    verifier = Verifier(OpeningGate(), [built[name] for name in layers], **kw)
    return verifier.appraise(ctx.lease, ctx.raw, ctx.evidence)


def test_l1_without_a_profile_is_a_warning_naming_the_missing_profile(registry, empty) -> None:
    result = verify(registry, empty, layers=(L1,))
    assert result.layer(L1).status is Status.NOT_MEASURED
    assert result.verdict is Verdict.WARNING
    assert result.reason.startswith(f"L1-thermodynamic not measured: no profile for gpt2-micro on {DEVICE}")
    assert "poi profile gpt2-micro" in result.reason


def test_l2_without_a_profile_is_a_warning_not_a_pass(registry, empty) -> None:
    result = verify(registry, empty, layers=(L2,))
    assert result.layer(L2).status is Status.NOT_MEASURED
    assert result.verdict is Verdict.WARNING
    assert f"L2-boundary not measured: timing: no profile for gpt2-micro on {DEVICE}" in result.reason


def test_the_same_leases_with_a_profile_are_affirmed(registry, profiled, empty) -> None:
    ctx = appraisal(TOKENS)
    without = verify(registry, empty, ctx=ctx)
    assert without.verdict is Verdict.WARNING
    assert {r.layer for r in without.layers if r.status is Status.NOT_MEASURED} == {L1, L2}
    with_profile = verify(registry, profiled, ctx=ctx)
    assert with_profile.verdict is Verdict.AFFIRMING, with_profile.reason
    assert [r.status for r in with_profile.layers] == [Status.PASS] * 3


def test_a_cheat_without_a_profile_is_still_contraindicated_by_the_layer_that_measured(
    registry, empty
) -> None:
    streamed = list(TOKENS)
    streamed[3] += 1  # the receipt claims other tokens than Maxwell saw stream by
    result = verify(registry, empty, ctx=appraisal(TOKENS, stream=streamed))
    assert result.verdict is Verdict.CONTRAINDICATED
    assert result.caught_by == [L2] and "at positions [3]" in result.layer(L2).reason
    assert result.layer(L1).status is Status.NOT_MEASURED  # said, not hidden behind the failure
    assert "L1-thermodynamic not measured: no profile" in result.reason


def test_a_layer_the_tier_does_not_require_may_skip_without_lowering_the_verdict(registry, empty) -> None:
    result = verify(registry, empty, required=(L0, L2), ctx=appraisal(TOKENS, stream=list(TOKENS)))
    assert result.layer(L1).status is Status.SKIPPED
    assert result.layer(L1).reason.startswith("not required here; could not measure: no profile")
    assert result.layer(L2).status is Status.NOT_MEASURED  # still required: still a warning
    assert result.verdict is Verdict.WARNING
    only_gate = verify(registry, empty, required=(L0,))
    assert only_gate.verdict is Verdict.AFFIRMING, only_gate.reason
    with pytest.raises(ValueError, match="required: expected layers of this stack"):
        verify(registry, empty, layers=(L1,), required=(L0, L2))


def test_no_evidence_leaves_the_default_stack_at_warning(registry, empty) -> None:
    ctx = appraisal(TOKENS)
    verifier = Verifier(OpeningGate(), [ThermodynamicLayer(registry, empty), BoundaryLayer(empty)])
    result = verifier.appraise(ctx.lease, ctx.raw, None)
    assert result.verdict is Verdict.WARNING
    assert "L1-thermodynamic not measured: no Maxwell-side evidence" in result.reason
    assert "L2-boundary not measured: no Maxwell-side evidence" in result.reason


def test_nothing_measured_affirms_nothing() -> None:
    skipped = [LayerResult(L0, Status.SKIPPED, "x"), LayerResult(L1, Status.SKIPPED, "y")]
    assert verdict_of(skipped) is Verdict.WARNING
    assert verdict_of([LayerResult(L0, Status.PASS, "ok"), *skipped]) is Verdict.AFFIRMING


# -- bids priced with the node's own profile --------------------------------------------------------


@pytest.fixture()
def plane(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ControlPlane]:
    monkeypatch.setenv("POI_HOME", str(tmp_path / "home"))
    store = ProfileStore(tmp_path / "home" / "profiles.json")
    store.put(profile("cpu:slow-class:2cores|resident", 0.08))
    store.put(profile("cpu:fast-class:64cores|resident", 0.01))
    config = ServiceConfig.from_env(db=str(tmp_path / "cp.sqlite"), admin_token="t", reserve_micro_per_j=20)
    cp = ControlPlane(config, profiles=store)
    yield cp
    cp.close()


def test_the_service_requires_l0_l1_and_l2_at_every_tier(plane: ControlPlane) -> None:
    for tier, layers in TIERS.items():
        assert {"L0-integrity", "L1-thermodynamic", "L2-boundary"} <= set(layers), tier
    assert plane.intake.verifier.required >= {L0, L1, L2}


def test_two_nodes_of_different_classes_price_bids_with_their_own_profiles(plane: ControlPlane) -> None:
    cp = plane
    job = GenerateJob(prompt="hi there", max_new_tokens=16)
    cp.enroll_agent(EnrollAgent(agent_id="alice", public_key=AgentKey.generate().public_hex, command=[]))
    cp.deposit(Deposit(agent_id="alice", amount_micro=100_000_000, key="d"))
    nodes = {
        "slow": "cpu:slow-class:2cores",
        "fast": "cpu:fast-class:64cores",
        "bare": "cpu:unprofiled:8cores",
    }
    for node_id in nodes:
        cp.enroll_node(EnrollNode(node_id=node_id, public_key=AgentKey.generate().public_hex))
    bid = {"model_id": "gpt2-micro", "job": job.model_dump(), "price_micro_per_j": 100, "stake_micro": 0}
    won = {}
    for i, (node_id, device_class) in enumerate(nodes.items()):
        cp.market.place_bid("alice", BidBody.model_validate({**bid, "bid_id": f"b{i}"}))
        body = PullBody(headroom_j=1e6, agents=["alice"], max_leases=1, device_class=device_class)
        (pulled,) = cp.market.pull(node_id, body)
        won[node_id] = pulled.lease.lease_id
    bids = {b["lease_id"]: b for b in cp.market.bids_of("alice", 10, 0)}
    with cp.ledger.session() as session:
        assert {n: session.get(NodeRow, n).device_class for n in nodes} == nodes  # stored from the pull
        leases = {n: session.get(LeaseRow, won[n]) for n in nodes}
        holds = {n: (row.hold_micro, row.price_micro_per_j) for n, row in leases.items()}
    slow, fast, bare = (bids[won[n]] for n in ("slow", "fast", "bare"))
    watts = cp.config.watts_per_core
    for view, node_id in ((slow, "slow"), (fast, "fast")):
        mine = cp.profiles.get("gpt2-micro", f"{nodes[node_id]}|resident")
        assert view["expected_j"] == pytest.approx(expected_energy_j(job, mine, watts), rel=1e-6)
        assert f"priced with the profile of gpt2-micro on {nodes[node_id]}" in view["reason"]
        hold, price = holds[node_id]
        assert abs(hold - view["expected_j"] * HOLD_FACTOR * price) <= 1  # held at this node's price
    assert slow["expected_j"] > 4 * fast["expected_j"]  # 80 vs 10 CPU-ms per token
    assert holds["slow"][0] > 4 * holds["fast"][0]
    assert bare["expected_j"] == pytest.approx(expected_energy_j(job, None, watts), rel=1e-6)
    assert (
        f"no profile for gpt2-micro on {nodes['bare']}: priced with the fallback estimate" in bare["reason"]
    )


def test_a_node_that_signs_no_class_gets_bids_priced_as_placed_and_told_so(plane: ControlPlane) -> None:
    cp = plane
    cp.enroll_agent(EnrollAgent(agent_id="bob", public_key=AgentKey.generate().public_hex, command=[]))
    cp.deposit(Deposit(agent_id="bob", amount_micro=100_000_000, key="d"))
    cp.enroll_node(EnrollNode(node_id="old", public_key=AgentKey.generate().public_hex))
    job = GenerateJob(prompt="hi there", max_new_tokens=8)
    placed, _ = cp.market.place_bid(
        "bob",
        BidBody.model_validate(
            {"bid_id": "b", "model_id": "gpt2-micro", "job": job.model_dump(), "price_micro_per_j": 100}
            | {"stake_micro": 0}
        ),
    )
    (pulled,) = cp.market.pull("old", PullBody(headroom_j=1e6, agents=["bob"], max_leases=1))
    (view,) = cp.market.bids_of("bob", 10, 0)
    assert view["lease_id"] == pulled.lease.lease_id
    assert view["expected_j"] == placed["expected_j"]
    assert "the node signed no hardware class into its pull: priced as placed" in view["reason"]
