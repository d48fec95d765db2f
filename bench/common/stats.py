"""Statistics shared by the error-rate benchmarks (reliability.py, detection_floor.py).

- Clopper–Pearson (exact binomial) bounds: `upper95`, `lower95` (one-sided) and `ci95` (two-sided);
- `rate_block(k, n)`: the JSON block every rate is reported in;
- `trials_for_zero_failures(rate)`: how many trials, all passing, bound a rate at 95 %;
- `roc(negatives, positives)`: ROC curve and AUC of a score (higher = more suspicious);
- `smallest_caught(rates)`: the smallest change level whose catch rate reaches the bar.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import beta

CONFIDENCE = 0.95
CATCH_BAR = 0.95  # a level counts as "caught" when at least this fraction of its trials is


def _check(k: int, n: int) -> None:
    if n < 0 or k < 0 or k > n:
        raise ValueError(f"expected 0 <= k <= n, got k={k}, n={n}")


def upper95(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson upper bound on the rate after k events in n trials."""
    _check(k, n)
    if n == 0 or k == n:
        return 1.0
    return float(beta.ppf(confidence, k + 1, n - k))


def lower95(k: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper–Pearson lower bound on the rate after k events in n trials."""
    _check(k, n)
    if n == 0 or k == 0:
        return 0.0
    return float(beta.ppf(1 - confidence, k, n - k + 1))


def ci95(k: int, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Two-sided Clopper–Pearson interval [lo, hi] (each tail (1 - confidence) / 2)."""
    _check(k, n)
    tail = (1 - confidence) / 2
    lo = 0.0 if n == 0 or k == 0 else float(beta.ppf(tail, k, n - k + 1))
    hi = 1.0 if n == 0 or k == n else float(beta.ppf(1 - tail, k + 1, n - k))
    return [lo, hi]


def rate_block(k: int, n: int, what: str = "caught") -> dict:
    """{trials, <what>, rate, lower95, upper95, ci95}: the shape every reported rate takes."""
    _check(k, n)
    return {
        "trials": n,
        what: k,
        "rate": k / n if n else None,
        "lower95": lower95(k, n),
        "upper95": upper95(k, n),
        "ci95": ci95(k, n),
    }


def trials_for_zero_failures(rate: float, confidence: float = CONFIDENCE) -> int:
    """Smallest n such that n trials without a single failure bound the failure rate at or below
    `rate` (one-sided Clopper–Pearson): (1 - rate)^n <= 1 - confidence. The same n makes n/n
    successes give a lower bound >= 1 - rate on the success rate."""
    if not 0 < rate < 1:
        raise ValueError(f"expected a rate in (0, 1), got {rate}")
    n = math.ceil(math.log(1 - confidence) / math.log(1 - rate))
    while n > 1 and upper95(0, n - 1, confidence) <= rate:  # guard against rounding in the log
        n -= 1
    while upper95(0, n, confidence) > rate:
        n += 1
    return n


def roc(negatives: Sequence[float], positives: Sequence[float]) -> dict:
    """ROC of one score (higher = more suspicious; honest runs are the negatives).
    Returns AUC (ties count half), the curve, and the best TPR with no honest run flagged."""
    from sklearn.metrics import roc_auc_score, roc_curve

    neg = np.asarray(negatives, dtype=float)
    pos = np.asarray(positives, dtype=float)
    if len(neg) == 0 or len(pos) == 0:
        return {"auc": None, "negatives": len(neg), "positives": len(pos), "fpr": [], "tpr": []}
    # non-finite scores (a NaN from a broken fingerprint) are the most suspicious value there is
    neg = np.nan_to_num(neg, nan=np.inf)
    pos = np.nan_to_num(pos, nan=np.inf)
    top = max(np.max(neg[np.isfinite(neg)], initial=0.0), np.max(pos[np.isfinite(pos)], initial=0.0))
    neg = np.where(np.isposinf(neg), 2 * top + 1, neg)
    pos = np.where(np.isposinf(pos), 2 * top + 1, pos)
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    s = np.r_[neg, pos]
    fpr, tpr, _ = roc_curve(y, s)
    return {
        "auc": float(roc_auc_score(y, s)),
        "negatives": len(neg),
        "positives": len(pos),
        "tpr_at_zero_fpr": float(tpr[fpr == 0].max()),
        "fpr": fpr.tolist(),
        "tpr": tpr.tolist(),
    }


def smallest_caught(rates: Mapping[float, float | None], bar: float = CATCH_BAR) -> float | None:
    """The smallest level (e.g. relative weight perturbation) whose catch rate is >= `bar`;
    None when no level reaches it. Levels without a rate (no trials) are ignored."""
    caught = [level for level, rate in rates.items() if rate is not None and rate >= bar]
    return min(caught) if caught else None
