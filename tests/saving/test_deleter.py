"""Rotation's delete happens after the commit, off the caller's path, and stays safe under a kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import torch

from lightning_saver.saving import deleter
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load
from lightning_saver.saving.state_file import STATE_NAME


def _visible(directory) -> list[str]:
    return sorted(p for p in os.listdir(directory) if not p.startswith("."))


def test_sync_save_returns_while_the_unlink_is_still_running(tmp_path, monkeypatch):
    held, release = threading.Event(), threading.Event()
    unlinked: list[str] = []

    def slow_unlink(path: str) -> None:
        held.set()
        release.wait(10)
        os.remove(path)
        unlinked.append(path)

    monkeypatch.setattr(deleter, "_unlink", slow_unlink)
    saver = CheckpointSaver(max_to_keep=1)
    saver.save({"w": torch.zeros(4)}, str(tmp_path / "m"), global_step=1)
    saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=2)  # returns with the unlink held
    assert held.wait(5)
    # the dropped name is gone at once; its bytes wait under a hidden temporary name of this process
    assert _visible(tmp_path) == sorted(["m_2.safetensors", STATE_NAME])
    hidden = [p for p in os.listdir(tmp_path) if p.startswith(".")]
    assert len(hidden) == 1 and hidden[0].startswith(f".m_1.safetensors.{os.getpid()}.") and not unlinked
    release.set()
    saver.wait()  # waits for the deleter too
    assert len(unlinked) == 1 and sorted(os.listdir(tmp_path)) == sorted(["m_2.safetensors", STATE_NAME])
    assert torch.equal(load(str(tmp_path / "m_2.safetensors"))["w"], torch.ones(4))


def test_delete_happens_only_after_the_state_file_is_durable(tmp_path, monkeypatch):
    saver = CheckpointSaver(max_to_keep=1)
    saver.save({"w": torch.zeros(4)}, str(tmp_path / "m"), global_step=1)
    seen: list[str | None] = []
    original = deleter.discard

    def spy(path: str) -> None:
        newest = latest_checkpoint(tmp_path, verify=True)
        seen.append(None if newest is None else os.path.basename(newest))
        original(path)

    monkeypatch.setattr(deleter, "discard", spy)
    saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=2)
    saver.wait()
    assert seen == ["m_2.safetensors"]  # the new checkpoint was recorded and intact before the delete


def test_a_kill_before_the_unlink_leaves_a_temp_file_the_next_saver_removes(tmp_path):
    script = textwrap.dedent(
        """
        import sys, threading, torch
        from lightning_saver.saving import deleter
        from lightning_saver.saving.saver import CheckpointSaver
        deleter._unlink = lambda path: threading.Event().wait()  # the unlink never finishes
        saver = CheckpointSaver(max_to_keep=1)
        for step in (1, 2):
            saver.save({"w": torch.full((1000,), float(step))}, sys.argv[1] + "/m", global_step=step)
        print("saved", flush=True)
        threading.Event().wait()
        """
    )
    child = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "saved"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    leftovers = [p for p in os.listdir(tmp_path) if p.startswith(".m_1.safetensors.")]
    assert len(leftovers) == 1 and _visible(tmp_path) == sorted(["m_2.safetensors", STATE_NAME])
    saver = CheckpointSaver(max_to_keep=1)
    saver.save({"w": torch.full((1000,), 3.0)}, str(tmp_path / "m"), global_step=3)
    saver.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(["m_3.safetensors", STATE_NAME])  # the leftover is gone


def test_discard_of_a_missing_file_is_quiet(tmp_path):
    deleter.discard(str(tmp_path / "gone.safetensors"))
    deleter.wait()
    assert os.listdir(tmp_path) == []
