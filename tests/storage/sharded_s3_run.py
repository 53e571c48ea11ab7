"""Run by test_sharded_s3.py as a script: a 2-rank gloo job saving FSDP2 sets to S3 (moto).

Usage: python sharded_s3_run.py URL ENDPOINT OUTDIR
  save steps 1..3 of ``URL/model`` (max_to_keep=2), restore the latest into a fresh sharded model, an
  async save to ``URL/async/model`` restored after the weights changed, then a
  save of step 4 whose rank 1 upload the parent's fault proxy (ENDPOINT) refuses; rank 0 writes the
  gathered reference tensors to OUTDIR/ref.safetensors. Each rank writes OUTDIR/rank<R>.json.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import warnings

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "saving")]

from s3_helpers import options_for  # noqa: E402
from sharded_run import equal, fresh, gathered, state_of, trained  # noqa: E402

from lightning_saver.errors import LightningSaverError  # noqa: E402
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint  # noqa: E402

warnings.filterwarnings("ignore")


def job(rank: int, url: str, endpoint: str, out: str) -> dict:
    options = options_for(endpoint)
    model, optimizer = trained(2)
    state = state_of(model, optimizer)
    ref = gathered(state)
    if rank == 0:
        safetensors.torch.save_file(ref, os.path.join(out, "ref.safetensors"))
    saver = CheckpointSaver(max_to_keep=2, storage_options=options)
    paths = [saver.save(state, f"{url}/model", global_step=s) for s in (1, 2, 3)]
    report: dict = {"paths": paths}
    _, _, target = fresh(2)
    saver.restore(target, paths[-1])
    report["same_world_differs"] = equal(gathered(target), ref)
    # async: each rank snapshots its pieces and uploads in the background; later changes do not reach it
    background = CheckpointSaver(max_to_keep=None, async_save=True, storage_options=options)
    pending = background.save(state, f"{url}/async/model", global_step=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    background.wait()
    background.close()
    _, _, target = fresh(2)
    saver.restore(target, pending)
    report["async_differs"] = equal(gathered(target), ref)
    try:  # the proxy refuses rank 1's upload of step 4
        saver.save(state, f"{url}/model", global_step=4)
        report["failed"] = None
    except (OSError, LightningSaverError) as exc:
        report["failed"] = {"type": type(exc).__name__, "message": str(exc)}
    dist.barrier()
    report["latest_after_failure"] = latest_checkpoint(url, storage_options=options)
    return report


def worker(rank: int, url: str, endpoint: str, out: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    report = job(rank, url, endpoint, out)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    # torch's teardown at interpreter exit (the rendezvous store's threads) sometimes aborts with
    # "terminate called without an active exception" after all our work is done and reported:
    # leave without running C++ static destructors (seen about 1 run in 5 on the 2-core CI box)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    mp.spawn(worker, args=(sys.argv[1], sys.argv[2], sys.argv[3], free), nprocs=2)
