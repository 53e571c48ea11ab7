"""Smoke test: benchmarks/lightning_overhead.py --quick runs all five set-ups and ends with a JSON line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lightning_overhead.py"
SETUPS = {"none", "ModelCheckpoint", "Saver sync", "Saver async", "Saver async blocking"}


def test_quick_benchmark_prints_table_and_json(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lightning_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "set-up"
    assert [line.split()[0] for line in lines[1:6]] == ["none", "ModelCheckpoint", "Saver", "Saver", "Saver"]
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "lightning_overhead" and summary["quick"]
    assert set(summary["seconds"]) == SETUPS and set(summary["stall_seconds"]) == SETUPS
    assert all(s > 0 for s in summary["seconds"].values())
    assert all(s > 0 for s in summary["loop_seconds"].values())
    assert summary["stall_seconds"]["none"] == 0  # each stall is paired with the none run
    blocked = summary["blocked_in_saves_seconds"]
    assert blocked["none"] == 0
    assert all(blocked[s] > 0 for s in SETUPS - {"none"})
    assert set(summary["targets"]) == {"async_stall_le_5pct_of_model_checkpoint",
                                       "async_stall_lt_0.2pct_of_run"}
    where = summary["machine"]
    assert where["cpu"] and where["kernel"] and len(where["loadavg"]) == 3
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up its checkpoints
