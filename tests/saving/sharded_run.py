"""Run by test_sharded.py as a script: a gloo job whose ranks hold an FSDP2 (``fully_shard``) model.

Usage: python sharded_run.py ROOT MODE WORLD
  write  (2 ranks) train 2 Adam steps; save steps 1..3 (max_to_keep=2) as sets; restore the latest into a
         fresh sharded model; restore the 1-process set ROOT/one/ (1 -> 2); a save whose rank 1 hits a full
         disk (RLIMIT_FSIZE); rank 0 writes the gathered reference tensors to ROOT/ref.safetensors
  read   (3 ranks) restore the 2-process set into a model sharded over 3 ranks (2 -> 3)
  loop   (torchrun-style env: RANK, WORLD_SIZE, MASTER_PORT) save forever, for the kill test
Each rank of write/read writes ROOT/<mode>_rank<R>.json.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
import warnings

import safetensors.torch
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from lightning_saver.errors import DiskFullError
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint

warnings.filterwarnings("ignore")


def build(world: int, width: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 3))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def state_of(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and optimizer moments, flat (the standalone API takes a mapping of tensors)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    out = dict(get_model_state_dict(model))
    for fqn, moments in get_optimizer_state_dict(model, optimizer)["state"].items():
        for key, value in moments.items():
            out[f"optim/{fqn}/{key}"] = value
    return out


def gathered(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone().contiguous()
            for k, v in state.items()}


def trained(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build(world)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    torch.manual_seed(1 + dist.get_rank())
    for _ in range(2):
        model(torch.randn(4, 6)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def fresh(world: int) -> tuple[nn.Module, torch.optim.Optimizer, dict[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = build(world, width=10)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    _init_optim_state(optimizer)
    return model, optimizer, state_of(model, optimizer)


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Keys whose values differ (or are missing on one side)."""
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not torch.equal(a[k], b[k]))


def write(rank: int, root: str, world: int) -> dict:
    model, optimizer = trained(world)
    saver = CheckpointSaver(max_to_keep=2)
    state = state_of(model, optimizer)
    ref = gathered(state)
    paths = [saver.save(state, os.path.join(root, "sets", "model"), global_step=s) for s in (1, 2, 3)]
    if rank == 0:
        safetensors.torch.save_file(ref, os.path.join(root, "ref.safetensors"))
    report: dict = {"paths": paths, "listing": sorted(os.listdir(os.path.join(root, "sets")))}

    # the same world size: restore into a fresh sharded model and its optimizer
    _, _, target = fresh(world)
    saver.restore(target, paths[-1])
    report["same_world_differs"] = equal(gathered(target), ref)

    # 1 -> 2: the parent wrote a 1-process set of an unsharded state
    one = latest_checkpoint(os.path.join(root, "one"))
    _, _, target = fresh(world)
    saver.restore(target, one)
    one_ref = safetensors.torch.load_file(os.path.join(root, "one_ref.safetensors"))
    report["one_to_two_differs"] = equal(gathered(target), one_ref)

    # async: each rank snapshots its pieces and writes in the background; weights changed right after
    # save() returns do not reach the files
    background = CheckpointSaver(max_to_keep=None, async_save=True)
    pending = background.save(state, os.path.join(root, "async", "model"), global_step=5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    background.wait()
    background.close()
    _, _, target = fresh(world)
    saver.restore(target, pending)
    report["async_differs"] = equal(gathered(target), ref)

    # a full disk on rank 1 fails the save on every rank; the previous set stays the latest
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    if rank == 1:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, hard))
    try:
        saver.save(state, os.path.join(root, "sets", "model"), global_step=4)
        report["disk_full"] = None
    except DiskFullError as exc:
        report["disk_full"] = {"message": str(exc), "errno": exc.errno, "filename": exc.filename}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    dist.barrier()
    report["latest_after_failure"] = latest_checkpoint(os.path.join(root, "sets"))
    report["listing_after_failure"] = sorted(os.listdir(os.path.join(root, "sets")))
    return report


def read(rank: int, root: str, world: int) -> dict:
    path = latest_checkpoint(os.path.join(root, "sets"))
    _, _, target = fresh(world)
    CheckpointSaver().restore(target, path)
    ref = safetensors.torch.load_file(os.path.join(root, "ref.safetensors"))
    local = {k: list(v.to_local().shape) for k, v in target.items() if isinstance(v, DTensor)}
    report = {"path": path, "differs": equal(gathered(target), ref), "local_shapes": local}

    # a flipped byte in row 4 of rank 0's piece: rank 0 reads rows 0-3 of that piece, rank 1 row 4;
    # the whole piece's checksum is checked by both, and the error reaches every rank
    import shutil

    from lightning_saver.errors import CorruptCheckpointError
    from lightning_saver.formats.safetensors_header import read_header

    damaged = os.path.join(root, f"damaged_{world}")
    if dist.get_rank() == 0:
        shutil.copytree(os.path.dirname(path), damaged)
        shard = os.path.join(damaged, os.path.basename(path).split(".")[0] + "-00000-of-00002.safetensors")
        header = read_header(shard)
        with open(shard, "r+b") as f:
            f.seek(header.data_start + header.tensors["0.weight"].offset + 4 * 6 * 4 + 1)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    dist.barrier()
    try:
        CheckpointSaver().restore(target, os.path.join(damaged, os.path.basename(path)))
        report["damaged"] = None
    except CorruptCheckpointError as exc:
        report["damaged"] = str(exc)
    return report


def worker(rank: int, root: str, mode: str, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    report = {"write": write, "read": read}[mode](rank, root, world)
    with open(os.path.join(root, f"{mode}_rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()
    # torch's teardown at interpreter exit (the rendezvous store's threads) sometimes aborts with
    # "terminate called without an active exception" after all our work is done and reported:
    # leave without running C++ static destructors (seen about 1 run in 5 on the 2-core CI box)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def loop() -> None:
    """Save forever (the parent kills a rank at a random moment); print each committed step."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root = sys.argv[1]
    model = build(world, width=1 << 17)  # 3.5 MiB of weights: a save takes a while
    saver = CheckpointSaver(max_to_keep=2)
    step = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    while True:
        step += 1
        saver.save(model, os.path.join(root, "model"), global_step=step)
        print(f"saved {step}", flush=True)


if __name__ == "__main__":
    if sys.argv[2] == "loop":
        loop()
    else:
        import socket

        root, mode, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, args=(root, mode, world, port), nprocs=world)
