"""Smoke test: benchmarks/tf_import.py --quick runs, checks outputs against TF, ends with a JSON line."""

from __future__ import annotations

from bench_smoke import run_quick


def test_quick_benchmark_prints_table_and_json(capsys):
    lines, summary = run_quick("tf_import.py", capsys)
    assert lines[0].split()[:4] == ["model", "thr", "batch", "TF"]
    assert summary["benchmark"] == "tf_import" and summary["quick"]
    cases = {(r["model"], r["batch"]) for r in summary["rows"]}
    assert cases == {("mlp", 1), ("mlp", 4), ("cnn", 1), ("cnn", 4)}
    assert all(r["tf_ms"] > 0 and r["run_ms"] > 0 and r["module_ms"] > 0 for r in summary["rows"])
    assert all(r["threads"] == 1 and r["max_abs_err"] < 1e-4 for r in summary["rows"])
    assert summary["machine"]["cpu"] and summary["machine"]["kernel"] and len(summary["loadavg_before"]) == 3
