"""bench/common/stats.py: Clopper–Pearson bounds, ROC summaries, the smallest level caught."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from bench.common import stats as _stats


def test_zero_of_3000_bounds_the_rate_at_a_tenth_of_a_percent():
    assert _stats.upper95(0, 3000) == pytest.approx(0.000998, abs=5e-7)
    assert _stats.upper95(0, 3000) == pytest.approx(1 - 0.05 ** (1 / 3000), rel=1e-9)


def test_all_caught_lower_bound_is_the_closed_form():
    # n/n successes: lower = 0.05^(1/n); 50/50 cannot show 99.9 %
    assert _stats.lower95(50, 50) == pytest.approx(0.05 ** (1 / 50), rel=1e-9)
    assert _stats.lower95(50, 50) < 0.95


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (3, 50), (25, 50), (49, 50), (50, 50), (7, 3000)])
def test_one_sided_bounds_match_scipy_exact(k, n):
    upper = binomtest(k, n, alternative="less").proportion_ci(0.95, method="exact").high
    lower = binomtest(k, n, alternative="greater").proportion_ci(0.95, method="exact").low
    assert _stats.upper95(k, n) == pytest.approx(upper, rel=1e-9, abs=1e-12)
    assert _stats.lower95(k, n) == pytest.approx(lower, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (3, 200), (199, 200)])
def test_two_sided_interval_matches_scipy_exact(k, n):
    ci = binomtest(k, n).proportion_ci(0.95, method="exact")
    lo, hi = _stats.ci95(k, n)
    assert lo == pytest.approx(ci.low, rel=1e-9, abs=1e-12)
    assert hi == pytest.approx(ci.high, rel=1e-9, abs=1e-12)
    assert lo <= k / n <= hi


def test_bounds_reject_impossible_counts():
    with pytest.raises(ValueError):
        _stats.upper95(5, 3)
    with pytest.raises(ValueError):
        _stats.lower95(-1, 3)


def test_rate_block_shape():
    b = _stats.rate_block(48, 50)
    assert b["trials"] == 50 and b["caught"] == 48 and b["rate"] == 0.96
    assert b["ci95"][0] < b["lower95"] < 0.96 < b["upper95"] < b["ci95"][1]


def test_trials_for_zero_failures():
    n = _stats.trials_for_zero_failures(0.001)
    assert n == 2995
    assert _stats.upper95(0, n) <= 0.001 < _stats.upper95(0, n - 1)
    assert _stats.lower95(n, n) >= 0.999


def test_roc_separated_reversed_and_tied():
    assert _stats.roc([0, 0, 0.1], [0.5, 1.0])["auc"] == 1.0
    assert _stats.roc([0.5, 1.0], [0, 0.1])["auc"] == 0.0
    tied = _stats.roc([0.0] * 4, [0.0] * 3)
    assert tied["auc"] == 0.5 and tied["tpr_at_zero_fpr"] == 0.0
    partial = _stats.roc([0.0, 0.2], [0.1, 0.3])
    assert partial["auc"] == 0.75 and partial["tpr_at_zero_fpr"] == 0.5


def test_roc_treats_nan_as_most_suspicious():
    assert _stats.roc([0.0, 0.1], [float("nan"), 0.5])["auc"] == 1.0


def test_smallest_caught():
    rates = {0.01: 1.0, 0.003: 0.97, 0.001: 0.5, 0.0003: 0.0}
    assert _stats.smallest_caught(rates) == 0.003
    assert _stats.smallest_caught(rates, bar=0.99) == 0.01
    assert _stats.smallest_caught({0.01: 0.9, 0.001: None}) is None
