"""Smoke test: the save/load benchmark runs end to end at tiny size and ends with its JSON line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_save_load_benchmark_quick_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "save_load.py"), "--quick", "--reps", "2",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["benchmark"] == "save_load" and result["reps"] == 2
    for row in ("raw write + fsync", "raw write + write-behind + fsync", "Saver.save (sync)",
                "torch.save + fsync", "Saver.save (async) blocking",
                "Saver.restore (verify)", "torch.load(mmap) + load_state_dict"):
        assert result["median_s"][row] > 0, row
        assert any(line.startswith(row) for line in lines), f"{row} missing from the table"
    assert result["ratio_vs_raw_write"]["raw write + fsync"] == 1.0
    targets = {"sync_save_le_1.15x_raw", "sync_save_le_1.05x_raw", "async_blocking_le_10pct_sync",
               "verified_restore_le_torch_mmap"}
    assert set(result["targets"]) == targets | {"paired_" + t for t in targets}
    assert result["paired_ratio"]["raw write + fsync"] == 1.0
    assert result["paired_ratio"]["torch.load(mmap) + load_state_dict"] == 1.0
    assert result["sync_over_raw_write_behind_paired"] > 0
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone


def test_async_save_cpu_benchmark_quick_run(tmp_path):
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "async_save_cpu.py"), "--saves", "2", "--width", "64",
         "--depth", "2", "--defer", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["benchmark"] == "async_save_cpu" and result["saves"] == 2 and result["defer"]
    assert result["writer_cpu_ms"] > 0 and result["background_ms"] > 0
    assert result["machine"]["cpu"] and list(tmp_path.iterdir()) == []  # its files are cleaned up
