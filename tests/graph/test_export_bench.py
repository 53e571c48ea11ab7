"""Smoke test: the export benchmark runs in --quick mode (every runtime in its own process) and ends
with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_export_benchmark_quick() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(ROOT / "benchmarks" / "export.py"), "--quick", "--threads", "1",
               "--models", "resnet18"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "export" and result["quick"] is True
    (row,) = result["results"]
    assert row["model"] == "resnet18" and row["threads"] == 1
    for runtime in ("tensorflow", "tensorflow_frozen", "onnxruntime"):
        assert row["max_abs_diff"][runtime] < 1e-4, runtime
        assert row["median_s"][runtime] > 0 and row["paired_ratios"][f"{runtime}_vs_torch"] > 0
    assert row["paired_ratios"]["variables_vs_frozen"] > 0


def test_tf_op_profile_quick() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(ROOT / "benchmarks" / "tf_op_profile.py"), "--quick"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "tf_op_profile" and result["quick"] is True
    (row,) = result["results"]
    assert row["batch"] == 2 and row["threads"] == 1
    for graph in ("model", "frozen"):
        convs = {op: ms for op, ms in row[graph]["ops_ms"].items() if "Conv2D" in op}
        assert convs and all(ms > 0 for ms in convs.values()), (graph, row[graph]["ops_ms"])
    # the frozen graph's filters are constants: TensorFlow caches them, nothing reorders them per run
    assert "reorder (weights)" not in row["frozen"]["primitives_ms"]
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") != "0":  # oneDNN on: the variable graph reorders
        assert row["model"]["primitives_ms"]["reorder (weights)"] > 0
