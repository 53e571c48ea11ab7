"""Smoke test: benchmarks/tf_import.py --quick runs, checks outputs against TF, ends with a JSON line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tf_graphs import tf_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tf_import.py"


def test_quick_benchmark_prints_table_and_json(capsys):
    tf_module()
    spec = importlib.util.spec_from_file_location("bench_tf_import", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["model", "batch", "TF"]
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "tf_import" and summary["quick"]
    cases = {(r["model"], r["batch"]) for r in summary["rows"]}
    assert cases == {("mlp", 1), ("mlp", 4), ("cnn", 1), ("cnn", 4)}
    assert all(r["tf_ms"] > 0 and r["run_ms"] > 0 and r["module_ms"] > 0 for r in summary["rows"])
