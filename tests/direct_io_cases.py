"""Shared cases for the two tests of O_DIRECT writing (the copying writer and the file image): the
tensors, their sizes, and the check of a written file against the ``safetensors`` library."""

from __future__ import annotations

import os

import google_crc32c
import safetensors.torch
import torch

from lightning_saver.formats import safetensors_io as sio

INFO = {"global_step": 3, "wall_time": 1.5}

# the first few KiB (header + first data bytes, written last), data across several buffers, a
# length that ends exactly on a block, a tiny file that ends inside the first block
SIZES = [[1], [3, 5000], [(3 * 4096 + 17) // 4 * 4, 7], [5 * 4096 // 4, 100_003, 1 << 16]]


def tensors_of(sizes: list[int]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(len(sizes))
    out = {f"f{i}": torch.randn(n, generator=g) for i, n in enumerate(sizes)}
    out["i8"] = torch.randint(-100, 100, (4099,), dtype=torch.int8, generator=g)  # odd length
    out["f64"] = torch.randn(33, generator=g, dtype=torch.float64)
    out["bf16"] = torch.randn(5, 3, generator=g).to(torch.bfloat16)
    out["flags"] = torch.rand(9, generator=g) > 0.5
    out["transposed"] = torch.randn(30, 70, generator=g).t()  # not contiguous: torch copies it
    out["empty"] = torch.empty(0, 5)
    out["tied"] = out["f0"]  # the same view: its bytes twice in the file, the tie in the header
    out["slice"] = out[f"f{len(sizes) - 1}"][1:]  # overlaps another key's memory
    return out


def check_against_peer(
    path: os.PathLike[str] | str, tensors: dict[str, torch.Tensor], result: sio.WriteResult
) -> None:
    """The peer library reads back every tensor; our checksums and size match the bytes."""
    peer = safetensors.torch.load_file(str(path))
    assert peer.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(peer[name], t), name
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        assert result.crcs[name] == f"{google_crc32c.value(raw) if raw else 0:08x}", name
    assert os.path.getsize(path) == result.nbytes
    sio.verify_file(path)
