"""ModelParallelStrategy (FSDP2 ``fully_shard``) on 2 CPU processes with real Trainers: the Saver writes
one set per save, and a resume from "last" in new processes is bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).with_name("sharded_fit_run.py")


def run(root: Path, mode: str, *extra: str) -> None:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), mode, *extra], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def reports(root: Path, tag: str, world: int = 2) -> list[dict]:
    return [json.loads((root / f"{tag}_rank{r}.json").read_text()) for r in range(world)]


def test_model_parallel_fit_and_resume_from_last_is_bit_identical(tmp_path):
    run(tmp_path, "fit")
    full, first = reports(tmp_path, "full"), reports(tmp_path, "fit")
    epoch = full[0]["global_step"] // 3
    assert [r["global_step"] for r in first] == [2 * epoch] * 2
    listing = sorted(os.listdir(tmp_path / "ckpt"))
    assert listing == sorted([
        "lightning_saver_state.json",
        f"model_{epoch}-00000-of-00002.safetensors", f"model_{epoch}-00001-of-00002.safetensors",
        f"model_{epoch}.safetensors.index.json",
        f"model_{2 * epoch}-00000-of-00002.safetensors", f"model_{2 * epoch}-00001-of-00002.safetensors",
        f"model_{2 * epoch}.safetensors.index.json",
    ])

    run(tmp_path, "resume")
    resumed = reports(tmp_path, "resume")
    last = str(tmp_path / "ckpt" / f"model_{2 * epoch}.safetensors.index.json")
    assert [r["ckpt_path"] for r in resumed] == [last, last]  # "last" resolved on every rank
    assert [r["global_step"] for r in resumed] == [3 * epoch] * 2
    assert [r["batches_here"] for r in resumed] == [epoch, epoch]  # it went on from the set, not from 0
    # weights and Adam moments, gathered: the same as 3 epochs in one go
    assert [r["digest"] for r in resumed] == [r["digest"] for r in full]
    kept = sorted(p for p in os.listdir(tmp_path / "ckpt") if p.endswith(".index.json"))
    assert kept == sorted(f"model_{s * epoch}.safetensors.index.json" for s in (2, 3))

    # 2 -> 1: one process restores the epoch-2 set; weights and Adam's moments, gathered, are those saved
    run(tmp_path, "reshard", last)
    (alone,) = reports(tmp_path, "reshard", world=1)
    assert alone["ckpt_path"] == last and alone["batches_here"] == 0
    assert alone["digest"] == first[0]["digest"]


def test_model_parallel_checkpoint_of_one_process_resumes_on_two(tmp_path):
    run(tmp_path, "single")
    (single,) = reports(tmp_path, "single", world=1)
    (saved,) = single["saved"]  # the one epoch-end save
    assert os.path.exists(saved), saved
    assert saved.endswith(".safetensors.index.json")  # a set of one shard, not a single file
    # 1 -> 2: each rank takes its rows of every tensor; weights and Adam's moments, gathered, are those saved
    run(tmp_path, "grow", saved)
    grown = reports(tmp_path, "grow")
    assert [r["ckpt_path"] for r in grown] == [saved, saved]
    assert [r["global_step"] for r in grown] == [single["global_step"]] * 2
    assert [r["batches_here"] for r in grown] == [0, 0]
    assert [r["digest"] for r in grown] == [single["digest"]] * 2
