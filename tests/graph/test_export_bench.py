"""Smoke test: the export benchmark runs in --quick mode and ends with its JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_export_benchmark_quick() -> None:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, str(ROOT / "benchmarks" / "export.py"), "--quick", "--threads", "1"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["benchmark"] == "export" and result["quick"] is True
    assert result["max_abs_diff"]["tensorflow"] < 1e-4 and result["max_abs_diff"]["onnxruntime"] < 1e-4
    assert result["forward_tf_s"] > 0 and result["forward_ort_s"] > 0
