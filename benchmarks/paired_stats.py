"""Paired differences: their median, a distribution-free confidence interval, and a verdict.

Used by ``lightning_overhead.py`` (imported as ``paired_stats``: scripts run from this folder). The
interval is the order-statistic one for a median: with ``n`` differences sorted, ``[x_(k), x_(n-k+1)]``
covers the true median with probability ``1 - 2 * P(Binomial(n, 1/2) <= k - 1)``, whatever the
distribution (no normality, no resampling). A target is **met** when the whole interval lies at or
below it, **missed** when the whole interval lies above it, and **unresolved** otherwise (the
interval straddles it: the noise is larger than the margin, or there are too few pairs).

Example::

    >>> median_ci([0.1, 0.3, 0.2, 0.4, 0.0, 0.25, 0.15, 0.35, 0.05, 0.3])["ci"]
    [0.05, 0.35]
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any


def _binomial_cdf(k: int, n: int) -> float:
    """P(Binomial(n, 1/2) <= k)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / 2**n if k >= 0 else 0.0


def median_ci(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Median of ``values`` and the narrowest order-statistic interval with coverage >= ``level``.

    With too few values for ``level`` (n <= 5 at 95%), the interval is [min, max] and ``confidence``
    says what it really covers (n=3: 0.75).
    """
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise ValueError("median_ci: no values")
    k = 1  # widest: [min, max]
    while k + 1 <= (n + 1) // 2 and 1 - 2 * _binomial_cdf(k, n) >= level:
        k += 1
    confidence = 1 - 2 * _binomial_cdf(k - 1, n)
    return {"median": statistics.median(xs), "ci": [xs[k - 1], xs[n - k]], "confidence": round(confidence, 4),
            "n": n}


def verdict(estimate: dict[str, Any], target: float, level: float = 0.9) -> str:
    """``met`` (interval at or below ``target``), ``missed`` (above it), else ``unresolved`` (also when
    the interval of :func:`median_ci` covers less than ``level``: too few values to say)."""
    low, high = estimate["ci"]
    if estimate["confidence"] < level:
        return "unresolved"
    if high <= target:
        return "met"
    if low > target:
        return "missed"
    return "unresolved"
