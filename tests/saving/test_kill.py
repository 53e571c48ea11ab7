"""SIGKILL a process that saves in a loop, at random moments, dozens of times; nothing may be lost.

A fork server (``kill_child.py``) imports torch once and forks a fresh saving loop per round, so
each round costs milliseconds, not an interpreter start. After every kill we check, from the files
alone: the latest checkpoint loads (checksums verified) and holds exactly its own step's values; no
more than ``max_to_keep`` checkpoints are recorded; the latest step never goes backwards. Every few
rounds a restarted saver runs to completion and must have removed the leftovers and continued the
step count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from lightning_saver.saving.saver import latest_checkpoint, load

HERE = Path(__file__).resolve().parent
# the child script is loaded by path: it must not depend on how pytest sets up sys.path
_spec = importlib.util.spec_from_file_location("_kill_child", HERE / "kill_child.py")
assert _spec is not None and _spec.loader is not None
kill_child = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kill_child)
step_of, tensors_for = kill_child.step_of, kill_child.tensors_for
ROOT = HERE.parents[1]
KEEP = 3
ROUNDS = 36
CKPT = re.compile(r"^ckpt_(\d+)\.safetensors$")
TEMP = re.compile(r"^\..*\.tmp$")


class ForkServer:
    def __init__(self, log: Path) -> None:
        self.log = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "kill_child.py")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT,
        )

    def _reply(self, word: str) -> int:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        assert line and line[0] == word, f"fork server said {line!r}"
        return int(line[1])

    def start(self, directory: Path, use_async: bool, steps: int = -1) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"run {directory} {KEEP} {int(use_async)} {steps}\n")
        self.proc.stdin.flush()
        return self._reply("pid")

    def reaped(self) -> int:
        return self._reply("exit")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.log.close()


def _on_disk(directory: Path) -> tuple[list[int], list[str]]:
    names = os.listdir(directory) if directory.exists() else []
    steps = sorted(int(m.group(1)) for n in names if (m := CKPT.match(n)))
    return steps, [n for n in names if TEMP.match(n)]


def _recorded(directory: Path) -> list[str]:
    state = directory / "lightning_saver_state.json"
    if not state.exists():
        return []
    doc = json.loads(state.read_text())
    return [c["name"] for s in doc["series"].values() for c in s["checkpoints"]]


def _check_holds_own_step(path: str) -> int:
    step = step_of(path)
    loaded = load(path)  # checksums verified
    expected = tensors_for(step)
    assert set(loaded) == set(expected), path
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), f"{path}: {name} does not hold step {step}'s values"
    return step


def _check_after_kill(directory: Path, previous: int) -> int:
    recorded = _recorded(directory)
    assert len(recorded) <= KEEP, f"{len(recorded)} checkpoints recorded: {recorded}"
    latest = latest_checkpoint(directory)
    if latest is None:
        assert previous < 0 and not recorded, "a committed checkpoint was lost"
        return previous
    step = _check_holds_own_step(latest)
    assert step >= previous, f"latest went back from step {previous} to {step}"
    recorded_steps = sorted(step_of(n) for n in recorded)
    steps, _ = _on_disk(directory)
    for extra in sorted(set(steps) - set(recorded_steps)):
        # a kill can leave files nobody records (yet): ones rotation dropped from the state file but
        # had not deleted, and the next step's file renamed into place before the state file update
        # (before the very first state file exists, latest_checkpoint finds that file by scanning)
        oldest = recorded_steps[0] if recorded_steps else step
        assert extra < oldest or extra in (step, step + 1), f"stray file for step {extra}: {steps}"
    for s in steps:  # renamed into place only when complete: every file holds its own step
        _check_holds_own_step(str(directory / f"ckpt_{s}.safetensors"))
    return step


def _check_restart(server: ForkServer, directory: Path, previous: int) -> int:
    server.start(directory, use_async=False, steps=2)
    assert server.reaped() == 0, "the restarted saver failed; see the fork server log"
    steps, temps = _on_disk(directory)
    assert temps == [], f"leftover temporary files: {temps}"
    state = (directory / "lightning_saver_state.json").read_text()
    assert len(steps) <= KEEP and len(_recorded(directory)) <= KEEP, f"on disk {steps}, state file:\n{state}"
    latest = latest_checkpoint(directory)
    assert latest is not None
    step = _check_holds_own_step(latest)
    assert step == previous + 2, f"restart did not continue the step count: {previous} -> {step}"
    assert steps == list(range(step - len(steps) + 1, step + 1)), steps
    return step


def test_sigkill_at_random_moments_never_loses_or_corrupts_a_checkpoint(tmp_path):
    directory = tmp_path / "ckpts"
    directory.mkdir()
    server = ForkServer(tmp_path / "fork_server.log")
    rng = random.Random(1234)
    previous = -1
    killed_mid_run = 0
    start = time.monotonic()
    try:
        for round_ in range(ROUNDS):
            pid = server.start(directory, use_async=round_ % 2 == 1)
            time.sleep(rng.uniform(0.0, 0.12))
            os.kill(pid, signal.SIGKILL)
            status = server.reaped()
            if not os.WIFSIGNALED(status):
                log = (tmp_path / "fork_server.log").read_text()
                raise AssertionError(f"the saving loop ended by itself ({status}): {log}")
            killed_mid_run += bool(_on_disk(directory)[1])
            previous = _check_after_kill(directory, previous)
            if round_ % 6 == 5:
                previous = _check_restart(server, directory, previous)
    finally:
        server.close()
    elapsed = time.monotonic() - start
    print(f"{ROUNDS} kills, {killed_mid_run} mid-write (temp file left), latest {previous}, {elapsed:.1f} s")
    assert killed_mid_run > 0, "no kill landed inside a write; the test proves little"
    assert previous >= ROUNDS // 6 * 2 + 5, f"too few saves happened between kills (latest step {previous})"
    assert elapsed < 60, f"the kill test took {elapsed:.0f} s"
