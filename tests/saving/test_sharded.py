"""Sharded checkpoints (sets) of FSDP2 models on CPU gloo jobs: commit, resharding, failures.

Real ``torch.distributed`` jobs (``sharded_run.py``, spawned), small models; the reference tensors are
each job's own gathered ``full_tensor()`` values, written with the ``safetensors`` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lightning_saver.saving import names, sharded
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint

SCRIPT = Path(__file__).with_name("sharded_run.py")


def run(root: Path, mode: str, world: int) -> list[dict]:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), str(root), mode, str(world)], env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((root / f"{mode}_rank{r}.json").read_text()) for r in range(world)]


def one_process_set(root: Path) -> dict[str, torch.Tensor]:
    """A set written by one process without torch.distributed (plain tensors), and its reference."""
    torch.manual_seed(5)
    state = {"0.weight": torch.randn(10, 6), "0.bias": torch.randn(10), "2.weight": torch.randn(3, 10),
             "2.bias": torch.randn(3)}
    for fqn in list(state):
        state[f"optim/{fqn}/exp_avg"] = torch.randn_like(state[fqn])
        state[f"optim/{fqn}/exp_avg_sq"] = torch.rand_like(state[fqn])
        state[f"optim/{fqn}/step"] = torch.tensor(7.0)
    (root / "one").mkdir()
    series = names.series_of(root / "one" / "model")
    sharded.save_set(state, series, 7, info={"global_step": 7, "wall_time": 1.0})
    safetensors.torch.save_file(state, root / "one_ref.safetensors")
    return state


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = tmp_path_factory.mktemp("sets")
    one_process_set(root)
    return root, run(root, "write", 2)


def test_every_rank_writes_one_plain_safetensors_shard_and_rank0_commits_the_index(written):
    root, reports = written
    final = str(root / "sets" / "model_3.safetensors.index.json")
    assert [r["paths"][-1] for r in reports] == [final, final]
    # max_to_keep=2 deleted step 1's whole set
    assert reports[0]["listing"] == [
        "lightning_saver_state.json",
        "model_2-00000-of-00002.safetensors", "model_2-00001-of-00002.safetensors",
        "model_2.safetensors.index.json",
        "model_3-00000-of-00002.safetensors", "model_3-00001-of-00002.safetensors",
        "model_3.safetensors.index.json",
    ]
    # each shard is a plain safetensors file holding that rank's rows under the tensors' own names
    ref = safetensors.torch.load_file(root / "ref.safetensors")
    shards = [safetensors.torch.load_file(root / "sets" / f"model_3-0000{r}-of-00002.safetensors")
              for r in (0, 1)]
    assert torch.equal(torch.cat([shards[0]["0.weight"], shards[1]["0.weight"]]), ref["0.weight"])
    assert shards[0]["2.weight"].shape == (2, 10) and shards[1]["2.weight"].shape == (1, 10)
    state = json.loads((root / "sets" / "lightning_saver_state.json").read_text())
    assert state["latest"] == "model_3.safetensors.index.json"
    assert latest_checkpoint(root / "sets", verify=True) == final


def test_restore_at_the_same_world_size_and_from_one_process(written):
    _, reports = written
    assert [r["same_world_differs"] for r in reports] == [[], []]
    assert [r["one_to_two_differs"] for r in reports] == [[], []]


def test_async_save_per_rank_writes_the_snapshot(written):
    _, reports = written
    assert [r["async_differs"] for r in reports] == [[], []]


def test_full_disk_on_one_rank_fails_the_save_on_every_rank(written):
    root, reports = written
    for report in reports:
        failure = report["disk_full"]
        assert failure is not None, "the save with a full disk on rank 1 did not fail"
        assert "failed on rank 1 of 2" in failure["message"]
        assert failure["filename"].endswith("model_4-00001-of-00002.safetensors")
        assert report["latest_after_failure"].endswith("model_3.safetensors.index.json")
        assert not [n for n in report["listing_after_failure"] if n.startswith("model_4")]


def test_restore_two_process_set_into_a_plain_module_and_a_mapping(written):
    root, _ = written
    ref = safetensors.torch.load_file(root / "ref.safetensors")
    path = latest_checkpoint(root / "sets")
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    result = CheckpointSaver().restore(model, path, strict=False)
    assert sorted(result.unexpected_keys) == sorted(k for k in ref if k.startswith("optim/"))
    for key, value in model.state_dict().items():
        assert torch.equal(value, ref[key]), key
    everything: dict[str, torch.Tensor] = {}
    CheckpointSaver().restore(everything, path)
    assert sorted(everything) == sorted(ref) and all(torch.equal(everything[k], ref[k]) for k in ref)


def test_two_process_set_resumes_on_three(written):
    root, _ = written
    reports = run(root, "read", 3)
    assert [r["differs"] for r in reports] == [[], [], []]
    # 10 rows over 3 ranks: 4 + 4 + 2
    assert [r["local_shapes"]["0.weight"] for r in reports] == [[4, 6], [4, 6], [2, 6]]
    for report in reports:
        assert report["damaged"] is not None, "a damaged shard was restored without an error"
        assert "model_3-00000-of-00002.safetensors" in report["damaged"]
        assert "checksum mismatch in tensor '0.weight'" in report["damaged"]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_killing_one_rank_mid_save_leaves_the_previous_set_latest(tmp_path):
    import random

    victim = random.choice([0, 1])  # one round per run keeps the suite short; CI runs vary the rank
    import signal
    import time

    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    procs = [subprocess.Popen([sys.executable, str(SCRIPT), str(tmp_path), "loop"],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True) for r in (0, 1)]
    import threading

    # a job that never gets going (a port taken, a hang) must not hang the suite: kill it after 180 s
    watchdog = threading.Timer(180, lambda: [p.kill() for p in procs])
    watchdog.start()
    try:
        # wait for two committed saves, time them, then kill the victim at a random instant of a save
        assert procs[0].stdout is not None
        first = procs[0].stdout.readline()
        t0 = time.monotonic()
        second = procs[0].stdout.readline()
        assert first.startswith("saved") and second.startswith("saved"), (first, second)
        time.sleep(random.uniform(0, 2 * (time.monotonic() - t0)))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=30)
    finally:
        watchdog.cancel()
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    committed = int(second.split()[1])
    latest = latest_checkpoint(tmp_path, verify=True)
    assert latest is not None
    step = int(os.path.basename(latest).split("_")[1].split(".")[0])
    assert step >= committed
    index = sharded.verify_set(latest)  # every shard is the one the index committed, checksums hold
    assert index.world_size == 2
    assert set(sharded.load_set(latest)) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    # the next run's rank 0 removes what the killed save left, and nothing committed
    sharded.remove_orphans(str(tmp_path))
    from lightning_saver.saving import commit

    commit.remove_stale_temps(str(tmp_path))
    left = sorted(os.listdir(tmp_path))
    indexes = {n for n in left if n.endswith(names.INDEX_SUFFIX)}
    for name in left:
        parsed = names.parse_shard_name(name)
        assert name in indexes or name == "lightning_saver_state.json" or (
            parsed is not None and parsed[0] + names.INDEX_SUFFIX in indexes), left


def test_clean_up_removes_only_uncommitted_shards_of_its_own_series(tmp_path):
    import shutil

    state = {"w": torch.ones(2, 2)}
    committed = sharded.save_set(state, names.series_of(tmp_path / "model"), 1,
                                 info={"global_step": 1, "wall_time": 1.0})
    shard = tmp_path / "model_1-00000-of-00001.safetensors"
    shutil.copy(shard, tmp_path / "model_2-00000-of-00001.safetensors")   # killed before its index
    shutil.copy(shard, tmp_path / "other_5-00000-of-00001.safetensors")   # another run, mid-save
    safetensors.torch.save_file(state, tmp_path / "model-00001-of-00002.safetensors")  # not ours
    removed = sharded.remove_orphans(str(tmp_path), names.series_of(tmp_path / "model"))
    assert [os.path.basename(p) for p in removed] == ["model_2-00000-of-00001.safetensors"]
    assert sorted(os.listdir(tmp_path)) == [
        "model-00001-of-00002.safetensors", "model_1-00000-of-00001.safetensors",
        "model_1.safetensors.index.json", "other_5-00000-of-00001.safetensors"]
    # deleting a set takes the index first, then its shards, and nothing else
    sharded.delete_set(committed)
    assert sorted(os.listdir(tmp_path)) == ["model-00001-of-00002.safetensors",
                                            "other_5-00000-of-00001.safetensors"]
