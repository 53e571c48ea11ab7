"""Smoke test: benchmarks/tf_import_nn_ops.py --quick runs, checks each op against TF, ends with JSON."""

from __future__ import annotations

from bench_smoke import run_quick


def test_quick_benchmark_prints_table_and_json(capsys):
    lines, summary = run_quick("tf_import_nn_ops.py", capsys)
    assert lines[0].split()[:3] == ["case", "TF", "ms"]
    assert summary["benchmark"] == "tf_import_nn_ops" and summary["quick"]
    cases = [r["case"] for r in summary["rows"]]
    assert len(cases) == len(set(cases)) == len(lines) - 2
    assert any(c.startswith("Conv2D") for c in cases) and any(c.startswith("StridedSlice") for c in cases)
    assert all(r["tf_ms"] > 0 and r["ours_ms"] > 0 for r in summary["rows"])
