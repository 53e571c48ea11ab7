"""Smoke test: benchmarks/tf_read.py --quick runs ours and TF in processes of their own, one JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "tf_read.py"


def test_quick_run_reads_with_every_method_in_its_own_process(tmp_path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "tf_read" and result["bytes"] == 8 * 2**20
    methods = {"ours", "ours mmap", "TF"}
    assert set(result["wall_s"]) == methods and all(v > 0 for v in result["wall_s"].values())
    assert result["paired_wall_over_tf"]["TF"] == 1.0
    assert result["machine"]["kernel"] and result["machine"]["cpu"]
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone
