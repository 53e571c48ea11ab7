"""Smoke test: the object-store benchmark runs end to end at tiny size and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_remote_benchmark_quick_run():
    script = str(ROOT / "benchmarks" / "remote.py")
    done = subprocess.run([sys.executable, script, "--size", "2", "--reps", "1"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "remote" and result["nbytes"] >= 2 << 20
    for row in ("s3fs put (same bytes)", "Saver.save -> s3://", "Lightning TorchCheckpointIO -> s3://",
                "torch.save -> fsspec file", "s3fs get (same bytes)", "load <- s3:// (verified)",
                "torch.load <- fsspec file", "load one tensor <- s3://"):
        assert result["median_s"][row] > 0, row
    assert result["paired_ratio"]["s3fs put (same bytes)"] == 1.0
    assert set(result["targets"]) == {"save_within_10pct_of_put", "save_faster_than_lightning",
                                      "one_tensor_under_5pct_of_load"}
