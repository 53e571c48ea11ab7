"""The sync save's commit: three fsyncs (the checkpoint's bytes, the state file's bytes, then the
directory once, after both renames), and what a reader finds when a crash loses the checkpoint's
rename but keeps the state file's (a file system that may reorder the two; docs/durability.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load
from lightning_saver.saving.state_file import STATE_NAME, load_state
from lightning_saver.storage import local

W = {"w": torch.arange(6.0)}


def test_a_save_fsyncs_the_file_the_state_file_then_the_directory_after_both_renames(
        tmp_path, monkeypatch):
    CheckpointSaver(max_to_keep=2).save(W, str(tmp_path / "m"), global_step=0)  # the state file exists
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        is_directory = os.path.samestat(st, os.stat(tmp_path))
        events.append("fsync directory" if is_directory else f"fsync file of {st.st_size} bytes")
        real_fsync(fd)

    def replace(src, dst):
        events.append(f"rename to {os.path.basename(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(local.os, "fsync", fsync)
    monkeypatch.setattr(local.os, "replace", replace)
    saver = CheckpointSaver(max_to_keep=2)
    path = saver.save(W, str(tmp_path / "m"), global_step=1)
    state_size = os.path.getsize(tmp_path / STATE_NAME)
    assert events == [
        f"fsync file of {os.path.getsize(path)} bytes",
        "rename to m_1.safetensors",
        f"fsync file of {state_size} bytes",
        f"rename to {STATE_NAME}",
        "fsync directory",
    ]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_lost_rename_of_the_newest_checkpoint_falls_back_to_the_one_before(tmp_path):
    saver = CheckpointSaver(max_to_keep=3)
    for step in (1, 2, 3):
        saver.save({"w": torch.full((4,), float(step))}, str(tmp_path / "m"), global_step=step)
    # the power cut kept the state file's rename (it lists m_3) but lost m_3's: the bytes are left
    # under the dead writer's temporary name
    lost = tmp_path / "m_3.safetensors"
    os.rename(lost, tmp_path / f".m_3.safetensors.{_dead_pid()}.0badf00d.tmp")
    assert load_state(str(tmp_path)).latest == "m_3.safetensors"

    newest = latest_checkpoint(str(tmp_path), verify=True)
    assert newest == str(tmp_path / "m_2.safetensors")
    assert torch.equal(load(newest)["w"], torch.full((4,), 2.0))

    resumed = CheckpointSaver(max_to_keep=3)  # a new process resumes and saves on
    resumed.save({"w": torch.full((4,), 4.0)}, str(tmp_path / "m"), global_step=4)
    resumed.wait()
    names = sorted(n for n in os.listdir(tmp_path))
    assert names == ["lightning_saver_state.json", "m_1.safetensors", "m_2.safetensors", "m_4.safetensors"]
    records = [r.name for r in load_state(str(tmp_path)).series["m_{step}.safetensors"].checkpoints]
    assert records == ["m_1.safetensors", "m_2.safetensors", "m_4.safetensors"]
    assert latest_checkpoint(str(tmp_path), verify=True) == str(tmp_path / "m_4.safetensors")
