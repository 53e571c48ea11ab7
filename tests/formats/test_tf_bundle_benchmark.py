"""Smoke test: benchmarks/tf_checkpoint.py --quick runs and ends in one JSON line with every number."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import tensorflow  # noqa: F401 - the benchmark needs it; a pinned test dependency, never skipped

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tf_checkpoint.py"


def test_quick_benchmark_prints_table_and_json(capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("tf_checkpoint_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "read: ours read_checkpoint (all)" in "\n".join(lines)
    result = json.loads(lines[-1])
    assert result["benchmark"] == "tf_checkpoint" and result["bytes"] == 8 * 2**20
    assert result["ours_read_s"] > 0 and result["read_speedup_vs_tf"] > 0
    assert list(tmp_path.iterdir()) == []  # the scratch directory was removed
