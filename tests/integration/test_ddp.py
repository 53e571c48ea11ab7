"""A 2-process DDP fit on CPU (gloo) and its bit-identical resume from "last", with real Trainers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("ddp_run.py")
STEPS_PER_EPOCH = 5  # 280 training samples, half per rank, batches of 32


def run(root: Path, mode: str) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), mode], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def reports(root: Path, tag: str) -> list[dict]:
    return [json.loads((root / f"{tag}_rank{r}.json").read_text()) for r in (0, 1)]


def test_ddp_fit_and_resume_from_last_is_bit_identical(tmp_path):
    run(tmp_path, "fit")
    full, first = reports(tmp_path, "full"), reports(tmp_path, "fit")
    assert [r["global_step"] for r in first] == [2 * STEPS_PER_EPOCH] * 2
    assert first[0]["weights"] == first[1]["weights"]
    # only global rank 0 writes; rank 1 waited at the barrier
    saved = [os.path.basename(p) for p in first[0]["saved_here"]]
    assert saved == ["model_5.safetensors", "model_10.safetensors"]
    assert first[1]["saved_here"] == []

    run(tmp_path, "resume")
    resumed = reports(tmp_path, "resume")
    last = str(tmp_path / "ckpt" / "model_10.safetensors")
    assert [r["ckpt_path"] for r in resumed] == [last, last]  # "last" resolved on every rank
    assert [r["global_step"] for r in resumed] == [3 * STEPS_PER_EPOCH] * 2
    # each rank restored its own RNG states: the same weights as 3 epochs in one go
    assert [r["weights"] for r in resumed] == [r["weights"] for r in full]
    kept = sorted(p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".safetensors"))
    assert kept == ["model_10.safetensors", "model_15.safetensors"]
