"""Smoke test: benchmarks/lightning_overhead.py --quick runs all four set-ups and ends with a JSON line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "lightning_overhead.py"


def test_quick_benchmark_prints_table_and_json(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("bench_lightning_overhead", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[0] == "set-up"
    assert [line.split()[0] for line in lines[1:5]] == ["none", "ModelCheckpoint", "Saver", "Saver"]
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "lightning_overhead" and summary["quick"]
    assert set(summary["seconds"]) == {"none", "ModelCheckpoint", "Saver sync", "Saver async"}
    assert all(s > 0 for s in summary["seconds"].values())
    blocked = summary["blocked_in_saves_seconds"]
    assert blocked["none"] == 0
    assert all(blocked[s] > 0 for s in ("ModelCheckpoint", "Saver sync", "Saver async"))
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up its checkpoints
