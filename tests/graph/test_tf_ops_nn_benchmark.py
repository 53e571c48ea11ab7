"""Smoke test: benchmarks/tf_import_nn_ops.py --quick runs, checks each op against TF, ends with JSON."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tf_graphs import tf_module

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tf_import_nn_ops.py"


def test_quick_benchmark_prints_table_and_json(capsys):
    tf_module()
    spec = importlib.util.spec_from_file_location("bench_tf_import_nn_ops", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:3] == ["case", "TF", "ms"]
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "tf_import_nn_ops" and summary["quick"]
    cases = [r["case"] for r in summary["rows"]]
    assert len(cases) == len(set(cases)) == len(lines) - 2
    assert any(c.startswith("Conv2D") for c in cases) and any(c.startswith("StridedSlice") for c in cases)
    assert all(r["tf_ms"] > 0 and r["ours_ms"] > 0 for r in summary["rows"])
