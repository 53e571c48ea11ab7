"""Fork server for the kill test: pay the torch import once, then fork one saving loop per request.

Protocol, one line each way (stdin -> stdout)::

    run <directory> <max_to_keep> <async 0|1> <steps, -1 = forever>
    pid <pid>            the forked child saves in a loop; the test SIGKILLs it whenever it likes
    exit <status>        sent once the child is gone and reaped (so its pid is free, not a zombie)

Each child builds a fresh saver (which cleans up what an earlier killed child left), resumes at the
latest checkpoint's step + 1, and saves ``tensors_for(step)``, whose every value derives from the
step, so a reader can tell a checkpoint that holds another step's bytes.
"""

from __future__ import annotations

import os
import re
import sys

import torch

from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint

STEP = re.compile(r"ckpt_(\d+)\.safetensors$")


def tensors_for(step: int) -> dict[str, torch.Tensor]:
    """Small tensors whose values all derive from ``step`` (several dtypes, a tie)."""
    w = torch.arange(4096, dtype=torch.float32) * 0.5 + step
    return {
        "step": torch.tensor(step, dtype=torch.int64),
        "w": w,
        "w_tied": w,
        "b": torch.full((333,), step % 251, dtype=torch.uint8),
        "h": (torch.arange(64, dtype=torch.float64) - step).reshape(8, 8),
    }


def step_of(path: str) -> int:
    match = STEP.search(path)
    if match is None:
        raise ValueError(f"not a kill-test checkpoint name: {path}")
    return int(match.group(1))


def save_loop(directory: str, max_to_keep: int, use_async: bool, steps: int) -> None:
    saver = CheckpointSaver(max_to_keep=max_to_keep, async_save=use_async)
    latest = latest_checkpoint(directory)
    step = 0 if latest is None else step_of(latest) + 1
    prefix = os.path.join(directory, "ckpt")
    done = 0
    while steps < 0 or done < steps:
        saver.save(tensors_for(step), prefix, global_step=step)
        step += 1
        done += 1
    saver.wait()


def serve() -> None:
    torch.set_num_threads(1)  # no intra-op pool to inherit across fork
    for line in sys.stdin:
        parts = line.split()
        if not parts:
            continue
        if parts[0] != "run" or len(parts) != 5:
            print(f"error bad request {line.strip()!r}", flush=True)
            continue
        directory, keep, use_async, steps = parts[1], int(parts[2]), parts[3] == "1", int(parts[4])
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                save_loop(directory, keep, use_async, steps)
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 1
            finally:
                sys.stderr.flush()
                os._exit(code)  # skip the parent's atexit hooks and buffers
        print(f"pid {pid}", flush=True)
        _, status = os.waitpid(pid, 0)
        print(f"exit {status}", flush=True)


if __name__ == "__main__":
    serve()
