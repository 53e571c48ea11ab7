"""Smoke test: benchmarks/lightning_overhead.py --quick runs every set-up and ends with a JSON line;
and the statistics it reports its verdicts with."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPT = BENCH / "lightning_overhead.py"
SETUPS = {"none", "ModelCheckpoint", "Saver sync", "Saver async", "Saver async blocking", "Saver async idle",
          "Saver async buffered", "copy+CRC floor", "CRC floor", "state dump floor", "write floor",
          "Saver async two copies"}
FLOORS = ("copy+CRC floor", "CRC floor", "state dump floor", "write floor")
TARGETS = {"async_stall_le_5pct_of_model_checkpoint", "async_stall_lt_0.2pct_of_run"}


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_benchmark_prints_table_and_json(capsys, tmp_path):
    module = _module("bench_lightning_overhead", SCRIPT)
    assert module.main(["--quick", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "set-up"
    # the last three columns, in the order the rows print them
    assert "window CI in hooks s fence s writer CPU s" in " ".join(lines[0].split())
    rows = [line.split()[0] for line in lines[1:13]]
    floors = ["copy+CRC", "CRC", "state", "write"]
    assert rows == ["none", "ModelCheckpoint"] + ["Saver"] * 5 + floors + ["Saver"]
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "lightning_overhead" and summary["quick"]
    assert set(summary["seconds"]) == SETUPS and set(summary["stall_seconds"]) == SETUPS
    assert all(s > 0 for s in summary["seconds"].values())
    assert all(s > 0 for s in summary["loop_seconds"].values())
    assert summary["stall_seconds"]["none"] == 0  # each stall is paired with a none run
    assert set(summary["stall_ci"]) == set(summary["window_stall_ci"]) == SETUPS - {"none"}
    blocked = summary["blocked_in_saves_seconds"]
    assert blocked["none"] == 0
    assert all(blocked[s] > 0 for s in SETUPS - {"none"})
    fence = summary["fence_seconds"]  # only a Saver has a fence; the sync one never waits there
    assert set(fence) == SETUPS and all(fence[s] == 0 for s in ("none", "ModelCheckpoint", *FLOORS))
    writer_cpu = summary["writer_cpu_seconds"]  # only the async set-ups have a writer thread
    assert all(writer_cpu[s] > 0 for s in SETUPS if s.startswith("Saver async") or s == "write floor")
    assert all(writer_cpu[s] == 0 for s in ("none", "ModelCheckpoint", "Saver sync", *FLOORS[:3]))
    # one pair per set-up: no interval can claim anything, so no target may be called met or missed
    # (the ModelCheckpoint target exists for a measure only where ModelCheckpoint's stall came out > 0)
    assert set(summary["targets"]) <= TARGETS and "async_stall_lt_0.2pct_of_run" in summary["targets"]
    assert set(summary["targets"]["async_stall_lt_0.2pct_of_run"]) == {"loop", "window"}
    for target in summary["targets"].values():
        assert {v["verdict"] for v in target.values()} == {"unresolved"}
    assert summary["window_steps"] == 4 and summary["window_saves"] == 2  # saves after steps 4 and 8
    assert all(len(p) == 4 for p in summary["after_save_excess_ms"].values())
    where = summary["machine"]
    assert where["cpu"] and where["kernel"] and len(where["loadavg"]) == 3
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up its checkpoints


@pytest.fixture(scope="module")
def stats():
    sys.path.insert(0, str(BENCH))
    try:
        yield _module("paired_stats", BENCH / "paired_stats.py")
    finally:
        sys.path.remove(str(BENCH))


# coverage of [x_(k), x_(n-k+1)] is 1 - 2 * P(Binomial(n, 1/2) <= k - 1), from the binomial table:
# n=10, k=2: 1 - 2 * 11/1024 = 0.9785; n=20, k=6: 1 - 2 * 0.02069 = 0.9586; n=5, k=1: 1 - 2/32 = 0.9375
@pytest.mark.parametrize(("n", "low", "high", "confidence"), [
    (10, 1, 8, 0.9785), (20, 5, 14, 0.9586), (5, 0, 4, 0.9375), (1, 0, 0, 0.0),
])
def test_median_interval_is_the_order_statistic_one(stats, n, low, high, confidence):
    values = [float(v) for v in range(n)][::-1]  # any order
    got = stats.median_ci(values)
    assert got["ci"] == [float(low), float(high)]
    assert got["confidence"] == pytest.approx(confidence, abs=1e-4)
    assert got["n"] == n


def test_verdicts(stats):
    ten = {"ci": [0.01, 0.03], "confidence": 0.9785}
    assert stats.verdict(ten, 0.05) == "met"
    assert stats.verdict(ten, 0.005) == "missed"
    assert stats.verdict(ten, 0.02) == "unresolved"  # the interval straddles the threshold
    assert stats.verdict({"ci": [0.01, 0.03], "confidence": 0.75}, 0.05) == "unresolved"  # too few pairs
