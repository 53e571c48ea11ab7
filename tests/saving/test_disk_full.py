"""A full disk mid-save: a clear DiskFullError, no partial file, earlier checkpoints and state intact.

Two real ways to run out of space, each in a subprocess so the limit cannot leak into pytest:
``RLIMIT_FSIZE`` (the kernel refuses writes past a size with EFBIG, mid-file, while ``statvfs``
still shows plenty of room) and a 1 MiB tmpfs mounted in a private mount namespace (a real ENOSPC
file system whose free space is visibly too small before we write). The tmpfs test is skipped
where unprivileged mount namespaces are not available.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Runs in the child. argv: base directory, mode ("rlimit" | "tmpfs"). For a sync and then an async
# saver, each in its own sub-directory, prints one JSON line describing what the failed save left.
CHILD = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    import torch
    from lightning_saver.errors import DiskFullError
    from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load

    def listing(directory):
        return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}

    def scenario(directory, mode, use_async):
        os.makedirs(directory)
        prefix = os.path.join(directory, "model")
        small = CheckpointSaver(max_to_keep=2)
        for step in (1, 2, 3):
            small.save({"w": torch.full((1000,), float(step))}, prefix, global_step=step)
        small.wait()  # rotation's unlinks run in the background: let them finish before the listing
        before = listing(directory)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        if mode == "rlimit":
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG from write(), not a killed process
            resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, hard))  # soft only: lifted below
        saver = CheckpointSaver(max_to_keep=2, async_save=use_async)
        big = {"w": torch.zeros(1 << 20), "b": torch.ones(10)}  # 4 MiB: over the limit / the tmpfs
        error = None
        try:
            saver.save(big, prefix, global_step=4)
            saver.wait()
        except DiskFullError as exc:
            error = exc
        if mode == "rlimit":
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        after = listing(directory)
        latest = latest_checkpoint(directory)
        return {
            "error": None if error is None else str(error),
            "errno": None if error is None else error.errno,
            "needed": None if error is None else getattr(error, "needed_bytes", None),
            "same_files": sorted(before) == sorted(after),
            "unchanged": all(before[n] == after.get(n) for n in before),
            "extra_files": sorted(set(after) - set(before)),
            "latest": None if latest is None else os.path.basename(latest),
            "latest_w0": None if latest is None else float(load(latest)["w"][0]),
            "state_kept": "lightning_saver_state.json" in after,
        }

    base, mode = sys.argv[1], sys.argv[2]
    for use_async in (False, True):
        print(json.dumps(scenario(os.path.join(base, "async" if use_async else "sync"), mode, use_async)))
    """
)


def _run(cmd: list[str], **kwargs: object) -> list[dict[str, object]]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, **kwargs)
    assert done.returncode == 0, done.stderr
    results = [json.loads(line) for line in done.stdout.strip().splitlines()[-2:]]
    assert len(results) == 2, done.stdout
    return results


def _check(result: dict[str, object]) -> None:
    assert result["error"] is not None, "the save did not fail"
    message = str(result["error"])
    needed = result["needed"]
    assert isinstance(needed, int) and needed > 4 * 2**20
    assert f"needs {needed} bytes" in message, message
    assert "model_4.safetensors" in message, message
    assert result["errno"] == 28  # ENOSPC, whatever the kernel said (EFBIG under RLIMIT_FSIZE)
    assert result["extra_files"] == [], "a partial or temporary file was left behind"
    assert result["same_files"] and result["unchanged"], "an earlier checkpoint or the state file changed"
    assert result["state_kept"]
    assert result["latest"] == "model_3.safetensors"
    assert result["latest_w0"] == 3.0


def test_disk_full_mid_save_via_rlimit_fsize_sync_and_async(tmp_path):
    for result in _run([sys.executable, "-c", CHILD, str(tmp_path), "rlimit"]):
        _check(result)
        assert "checked before writing" not in str(result["error"])  # statvfs showed room: failed mid-write


def _tmpfs_available(mount_point: Path) -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=64k none {mount_point}"],
        capture_output=True, timeout=30,
    )
    return probe.returncode == 0


def test_visibly_too_small_disk_fails_early_on_a_real_tmpfs(tmp_path):
    mount_point = tmp_path / "tmpfs"
    mount_point.mkdir()
    if not _tmpfs_available(mount_point):
        pytest.skip("cannot mount a tmpfs in a private mount namespace here: no `unshare`, or this kernel "
                    "refuses unprivileged user namespaces")
    script = (
        f"mount -t tmpfs -o size=1m none {mount_point} && "
        f"exec {sys.executable} -c \"$CHILD\" {mount_point} tmpfs"
    )
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script]
    for result in _run(cmd, env={**os.environ, "CHILD": CHILD}):
        _check(result)
        assert "free" in str(result["error"]) and "checked before writing" in str(result["error"])
