"""Deterrence and tiers: cheating must lose money in expectation at the chosen audit probability,
tiers follow value and are never silently lowered when the node is hot."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maxwell_poi.economics import Tier, TierPolicy, audit_probability

money = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)


@given(reward=money, stake=money, saved=money, colluding=st.floats(min_value=0.0, max_value=0.9))
def test_a_deterred_lease_makes_cheating_lose_money_in_expectation(reward, stake, saved, colluding):
    d = audit_probability(reward=reward, stake=stake, cost_saved=saved, colluding=colluding)
    assert 0.0 <= d.probability <= 1.0
    if d.deterred and saved > 0:
        assert d.probability * (1 - colluding) * (reward + stake) > saved  # the inequality, strictly
    if not d.deterred:
        assert d.probability == 1.0 and "stake" in d.reason


def test_the_margin_is_on_top_of_the_bare_equilibrium():
    d = audit_probability(reward=1.0, stake=9.0, cost_saved=0.5, margin=0.5)
    assert d.bare == pytest.approx(0.05) and d.probability == pytest.approx(0.075)
    assert d.expected_loss_if_cheating == pytest.approx(0.075 * 10 - 0.5)


def test_too_little_at_stake_says_how_much_stake_would_deter():
    d = audit_probability(reward=1.0, stake=0.0, cost_saved=3.0)
    assert not d.deterred and d.probability == 1.0 and "at least 2" in d.reason


@pytest.mark.parametrize("bad", [{"reward": -1.0}, {"stake": math.nan}, {"colluding": 1.0}])
def test_nonsense_inputs_are_refused_with_what_was_expected(bad):
    args = {"reward": 1.0, "stake": 1.0, "cost_saved": 1.0, **bad}
    with pytest.raises(ValueError, match="expected"):
        audit_probability(**args)


POLICY = TierPolicy(medium_from_value=0.01, high_from_value=1.0)
LEASE = dict(stake=1.0, lease_energy_j=100.0, price_per_j=0.0001)


@pytest.mark.parametrize(("value", "tier"), [(0.001, Tier.LOW), (0.1, Tier.MEDIUM), (5.0, Tier.HIGH)])
def test_value_picks_the_least_tier(value, tier):
    choice = POLICY.choose(value=value, headroom_j=150.0, **LEASE)
    assert choice.tier is tier and not choice.deferred
    # medium: the deterrence probability, (1 + margin) x saving / (value + stake), written out here
    saving = LEASE["lease_energy_j"] * LEASE["price_per_j"]
    medium = (1 + POLICY.margin) * saving / (value + LEASE["stake"])
    expected = {Tier.LOW: 0.0, Tier.HIGH: 1.0, Tier.MEDIUM: medium}[tier]
    assert choice.audit_probability == pytest.approx(expected, rel=1e-9)


def test_medium_lottery_deters_and_falls_as_the_stake_rises():
    """The medium tier is the only one the deterrence formula decides: its p must make cheating lose
    money (p x (value + stake) > saving) and fall as more is at stake, never sit at 0 or 1."""
    saving = LEASE["lease_energy_j"] * LEASE["price_per_j"]
    ps = []
    for stake in (0.5, 1.0, 4.0):
        choice = POLICY.choose(value=0.1, headroom_j=150.0, **{**LEASE, "stake": stake})
        assert choice.tier is Tier.MEDIUM and 0 < choice.audit_probability < 1
        assert choice.audit_probability * (0.1 + stake) > saving, choice.reason
        ps.append(choice.audit_probability)
    assert ps[0] > ps[1] > ps[2]


def test_spare_headroom_lifts_a_low_lease_to_the_audit_lottery():
    choice = POLICY.choose(value=0.001, headroom_j=10_000.0, **LEASE)
    assert choice.tier is Tier.MEDIUM and "lifts" in choice.reason and choice.audit_probability > 0


def test_a_hot_node_defers_rather_than_verifying_less():
    choice = POLICY.choose(value=5.0, headroom_j=102.0, **LEASE)  # lease 100 J + audit ~6 J
    assert choice.deferred and choice.tier is Tier.HIGH and "deferred" in choice.reason


def test_poi_policy_explain_prints_every_tier_and_the_choice():
    import json

    from typer.testing import CliRunner

    from maxwell_poi.cli import app

    result = CliRunner().invoke(
        app, ["policy", "explain", "--model", "gpt2-micro", "--value", "0.05", "--stake", "0.5", "--json"]
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data["tiers"]) == {"low", "medium", "high", "exact"} and data["chosen"]["tier"] == "medium"
    assert 0 < data["tiers"]["medium"]["audit_probability"] < 1 and "estimate" in data["lease_energy_basis"]
    bad = CliRunner().invoke(app, ["policy", "explain", "--model", "gpt2-micro", "--value", "-1"])
    assert bad.exit_code == 2 and "expected a number >= 0" in bad.stderr
