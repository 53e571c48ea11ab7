"""Sharded checkpoints (sets) on S3 (moto): every rank uploads its shard as a complete object, rank 0
commits the index and the state object, rotation deletes whole sets, restores read ranged requests.

A real 2-process gloo job with FSDP2 (``sharded_s3_run.py``); ``memory://`` is per process, so S3 only.
The failing upload is a real refusal (HTTP 403) by a proxy in front of the server, for rank 1's shard.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch

from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint

SCRIPT = Path(__file__).with_name("sharded_s3_run.py")


def test_a_set_on_s3_saves_rotates_restores_reshards_and_survives_a_failing_rank(s3, fault_proxy, tmp_path):
    faults = fault_proxy.inject(method="PUT", path_contains="model_4-00001-of-00002", mode="403",
                                fail_numbers=set(range(1, 99)))
    url = s3.url("run")
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), url, fault_proxy.endpoint, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    final = f"{url}/model_3.safetensors.index.json"
    assert [r["paths"][-1] for r in reports] == [final, final]
    assert [r["same_world_differs"] for r in reports] == [[], []]
    assert [r["async_differs"] for r in reports] == [[], []]

    # rank 1's upload was refused: the save failed on BOTH ranks, naming rank 1, and step 3 stays latest
    assert faults.failed >= 1
    for report in reports:
        assert report["failed"] is not None, report
        assert "rank 1 of 2" in report["failed"]["message"], report["failed"]
        assert report["latest_after_failure"] == final
    # max_to_keep=2 deleted step 1's whole set; nothing of the failed step 4 is left under any name
    listing = sorted(p.rsplit("/", 1)[1] for p in s3.fs().ls(url, refresh=True) if not p.endswith("/async"))
    assert listing == [
        "lightning_saver_state.json",
        "model_2-00000-of-00002.safetensors", "model_2-00001-of-00002.safetensors",
        "model_2.safetensors.index.json",
        "model_3-00000-of-00002.safetensors", "model_3-00001-of-00002.safetensors",
        "model_3.safetensors.index.json",
    ], listing

    # 2 -> 1: this process alone gathers the full tensors from both shards by ranged reads
    ref = safetensors.torch.load_file(tmp_path / "ref.safetensors")
    assert latest_checkpoint(url, storage_options=s3.options, verify=True) == final
    got: dict[str, torch.Tensor] = {}
    CheckpointSaver(storage_options=s3.options).restore(got, final)
    assert sorted(got) == sorted(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref), [k for k in ref if not torch.equal(got[k], ref[k])]
