"""The GPU-time auction (economics.auction.clear): ranking, capacity prefix, uniform price, reserve."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maxwell_poi.economics.auction import SealedBid, clear


def bid(key: int, price: int, energy: float = 1.0, at: float = 0.0) -> SealedBid:
    return SealedBid(key=key, price_micro_per_j=price, energy_j=energy, submitted_at=at)


def test_ranks_by_price_then_submission_time_then_key() -> None:
    bids = [
        bid(1, 50, at=3.0),
        bid(2, 80, at=5.0),
        bid(3, 50, at=1.0),  # same price as 1, earlier: ranks before it
        bid(4, 80, at=5.0),  # same price and time as 2: the lower key first
        bid(5, 90, at=9.0),
    ]
    out = clear(bids, capacity_j=100.0, reserve_micro_per_j=1)
    assert out.winners == (5, 2, 4, 3, 1)
    assert out.losers == ()


def test_winners_are_the_prefix_that_fits_and_the_first_misfit_ends_the_round() -> None:
    bids = [bid(1, 100, 4.0, at=0), bid(2, 90, 4.0, at=1), bid(3, 80, 4.0, at=2), bid(4, 70, 1.0, at=3)]
    out = clear(bids, capacity_j=10.0, reserve_micro_per_j=1)
    # bid 4 would fit the 2 J left, but bid 3 did not fit first: the round ends there (a prefix)
    assert out.winners == (1, 2)
    assert out.losers == (3, 4)
    assert out.used_j == pytest.approx(8.0)
    assert out.capacity_j == 10.0


def test_exact_fit_wins() -> None:
    out = clear([bid(1, 10, 5.0), bid(2, 9, 5.0, at=1)], capacity_j=10.0, reserve_micro_per_j=1)
    assert out.winners == (1, 2)
    assert out.used_j == 10.0


def test_uniform_price_is_the_first_losers_price() -> None:
    bids = [bid(1, 100, 6.0, at=0), bid(2, 70, 6.0, at=1), bid(3, 40, 6.0, at=2)]
    out = clear(bids, capacity_j=6.0, reserve_micro_per_j=5)
    assert out.winners == (1,)
    assert out.price_micro_per_j == 70  # the highest price that did not win, not the winner's 100


def test_price_is_the_reserve_when_nothing_lost() -> None:
    out = clear([bid(1, 100), bid(2, 70, at=1)], capacity_j=50.0, reserve_micro_per_j=25)
    assert out.winners == (1, 2)
    assert out.losers == ()
    assert out.price_micro_per_j == 25


def test_no_winner_pays_more_than_its_bid() -> None:
    bids = [bid(k, p, 1.0, at=k) for k, p in enumerate([30, 30, 29, 28, 90, 10])]
    out = clear(bids, capacity_j=3.0, reserve_micro_per_j=2)
    prices = {b.key: b.price_micro_per_j for b in bids}
    assert out.winners == (4, 0, 1)
    assert out.price_micro_per_j == 29
    assert all(prices[k] >= out.price_micro_per_j for k in out.winners)


def test_below_reserve_bids_are_listed_and_never_win() -> None:
    bids = [bid(1, 5, 1.0), bid(2, 50, 1.0, at=1), bid(3, 19, 0.0, at=2), bid(4, 20, 1.0, at=3)]
    out = clear(bids, capacity_j=1000.0, reserve_micro_per_j=20)
    assert set(out.below_reserve) == {1, 3}
    assert out.winners == (2, 4)  # 4 bids exactly the reserve: eligible
    assert not set(out.below_reserve) & set(out.winners + out.losers)
    assert out.price_micro_per_j == 20
    assert out.as_dict()["below_reserve"] == list(out.below_reserve)


def test_below_reserve_loser_does_not_set_the_price() -> None:
    # only bid 2 is eligible and wins; bid 1 is below the reserve, so it is not the "first loser"
    out = clear([bid(1, 9, 1.0), bid(2, 50, 1.0, at=1)], capacity_j=1.0, reserve_micro_per_j=10)
    assert out.winners == (2,)
    assert out.price_micro_per_j == 10


def test_zero_capacity_wins_nothing_and_keeps_every_bid_open() -> None:
    out = clear([bid(1, 50, 1.0), bid(2, 40, 2.0, at=1)], capacity_j=0.0, reserve_micro_per_j=1)
    assert out.winners == ()
    assert out.losers == (1, 2)
    assert out.used_j == 0.0


@pytest.mark.parametrize("capacity", [-1.0, -1e-9, math.nan])
def test_refuses_a_negative_or_nan_capacity(capacity: float) -> None:
    with pytest.raises(ValueError, match="capacity_j: expected a number >= 0"):
        clear([bid(1, 10)], capacity_j=capacity, reserve_micro_per_j=1)


@pytest.mark.parametrize("reserve", [0, -5])
def test_refuses_a_reserve_below_one(reserve: int) -> None:
    with pytest.raises(ValueError, match="reserve_micro_per_j: expected >= 1"):
        clear([bid(1, 10)], capacity_j=10.0, reserve_micro_per_j=reserve)


BIDS = st.lists(
    st.tuples(
        st.integers(min_value=1, max_value=200),  # price
        st.floats(min_value=0.0, max_value=50.0, allow_nan=False),  # energy
        st.floats(min_value=0.0, max_value=1e6, allow_nan=False),  # submitted_at
    ),
    max_size=30,
)


@settings(max_examples=300, deadline=None)
@given(
    raw=BIDS,
    capacity=st.floats(min_value=0.0, max_value=500.0, allow_nan=False),
    reserve=st.integers(min_value=1, max_value=120),
)
def test_clearing_properties(raw: list[tuple[int, float, float]], capacity: float, reserve: int) -> None:
    bids = [bid(k, p, e, t) for k, (p, e, t) in enumerate(raw)]
    by_key = {b.key: b for b in bids}
    out = clear(bids, capacity, reserve)
    # a partition of all bids
    parts = [out.winners, out.losers, out.below_reserve]
    assert sorted(k for part in parts for k in part) == sorted(by_key)
    # capacity respected, and used_j is the winners' energy
    assert out.used_j <= capacity
    assert out.used_j == pytest.approx(sum(by_key[k].energy_j for k in out.winners))
    # uniform price: never above a winner's bid, never below the reserve
    assert out.price_micro_per_j >= reserve
    assert all(by_key[k].price_micro_per_j >= out.price_micro_per_j for k in out.winners)
    assert all(by_key[k].price_micro_per_j < reserve for k in out.below_reserve)
    assert all(by_key[k].price_micro_per_j >= reserve for k in out.winners + out.losers)
    # the winners are a prefix of the ranking: every winner ranks ahead of every loser
    rank = {k: (-by_key[k].price_micro_per_j, by_key[k].submitted_at, k) for k in by_key}
    if out.winners and out.losers:
        assert max(rank[k] for k in out.winners) < min(rank[k] for k in out.losers)
        assert out.price_micro_per_j == max(reserve, by_key[out.losers[0]].price_micro_per_j)
        # the round ended on a bid that did not fit
        assert out.used_j + by_key[out.losers[0]].energy_j > capacity
    if not out.losers:
        assert out.price_micro_per_j == reserve
