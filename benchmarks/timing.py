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


def machine() -> dict[str, Any]:
    """Where a number was measured, for every benchmark's JSON line: numbers from different machines
    must never be mixed. CPU model, kernel, logical CPUs, and the load averages at the time."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "kernel": f"{platform.system()} {platform.release()}", "cpus": os.cpu_count(),
            "loadavg": load}
