"""The one timing loop the benchmark scripts share (imported as ``timing``: scripts run from this folder)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any


def median_seconds(fn: Callable[[], Any], repeats: int, *, min_time: float = 0.0, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over at least ``repeats`` calls and ``min_time`` seconds.

    ``warmup`` untimed calls come first; the loop stops at 50x ``repeats`` calls whatever ``min_time`` says.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50 * repeats:
            break
    return statistics.median(times)
