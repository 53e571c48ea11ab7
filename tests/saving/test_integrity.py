"""Integrity: a changed or truncated file is refused by name; ``latest_checkpoint(verify=True)`` falls back.

Byte offsets are found by parsing the safetensors header here, by the format's definition (8-byte
little-endian header length, JSON, ``data_offsets`` relative to the end of the header), not with
our reader.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load


def _tensor_span(path: Path, name: str) -> tuple[int, int]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8 : 8 + n])[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _state(step: int) -> dict[str, torch.Tensor]:
    return {
        "encoder.weight": torch.arange(600, dtype=torch.float32).reshape(20, 30) + step,
        "encoder.bias": torch.full((20,), float(step)),
        "head.weight": torch.arange(40, dtype=torch.int64) * step,
    }


@pytest.fixture
def saved(tmp_path) -> tuple[CheckpointSaver, list[Path]]:
    saver = CheckpointSaver(max_to_keep=5)
    paths = [Path(saver.save(_state(s), str(tmp_path / "model"), global_step=s)) for s in (1, 2, 3)]
    return saver, paths


@pytest.mark.parametrize("name", ["encoder.weight", "encoder.bias", "head.weight"])
def test_a_flipped_byte_in_a_tensor_is_refused_naming_file_and_tensor(saved, name):
    saver, paths = saved
    path = paths[-1]
    begin, end = _tensor_span(path, name)
    _flip(path, (begin + end) // 2)
    assert not torch.equal(safetensors.torch.load_file(str(path))[name], _state(3)[name])  # the peer loads it
    pattern = rf"{re.escape(str(path))}.*{re.escape(name)}"
    with pytest.raises(CorruptCheckpointError, match=pattern):
        load(path)
    target = {k: torch.zeros_like(v) for k, v in _state(0).items()}
    with pytest.raises(CorruptCheckpointError, match=pattern):
        saver.restore(target, str(path))


def test_restore_into_a_module_refuses_a_flipped_byte(saved):
    saver, paths = saved
    model = nn.Module()
    model.encoder = nn.Linear(30, 20)
    model.register_buffer("head_weight", torch.zeros(40, dtype=torch.int64))
    path = Path(CheckpointSaver().save(model, str(paths[0].parent / "module"), global_step=1))
    _flip(path, _tensor_span(path, "encoder.weight")[0])
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(path))}.*encoder\.weight"):
        saver.restore(model, str(path))


def test_verify_false_skips_the_check(saved):
    _, paths = saved
    path = paths[-1]
    begin, _ = _tensor_span(path, "encoder.bias")
    _flip(path, begin)
    loaded = load(path, verify=False)
    assert not torch.equal(loaded["encoder.bias"], _state(3)["encoder.bias"])


@pytest.mark.parametrize("keep_fraction", [0.0, 0.001, 0.5, 0.999])
def test_a_truncated_file_is_refused_naming_the_file(saved, keep_fraction):
    saver, paths = saved
    path = paths[-1]
    size = path.stat().st_size
    os.truncate(path, int(size * keep_fraction))
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(path))):
        load(path)
    with pytest.raises(CorruptCheckpointError, match=re.escape(str(path))):
        saver.restore({k: torch.zeros_like(v) for k, v in _state(0).items()}, str(path))


def test_latest_checkpoint_verify_skips_a_corrupt_newest_and_warns(saved, caplog):
    _, paths = saved
    directory = paths[0].parent
    begin, _ = _tensor_span(paths[-1], "head.weight")
    _flip(paths[-1], begin + 3)
    assert latest_checkpoint(directory) == str(paths[-1])  # without verify: cheap, trusts the state file
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(directory, verify=True)
    assert found == str(paths[1])
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(str(paths[-1]) in m for m in warnings), warnings
    assert torch.equal(load(found)["encoder.bias"], _state(2)["encoder.bias"])


def test_latest_checkpoint_verify_skips_a_truncated_newest_and_an_emptied_one(saved, caplog):
    _, paths = saved
    directory = paths[0].parent
    os.truncate(paths[-1], paths[-1].stat().st_size - 1)
    os.truncate(paths[-2], 0)
    with caplog.at_level(logging.WARNING):
        found = latest_checkpoint(directory, verify=True)
    assert found == str(paths[0])
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert str(paths[-1]) in text and str(paths[-2]) in text


def test_latest_checkpoint_verify_returns_none_when_nothing_is_valid(saved, caplog):
    _, paths = saved
    for p in paths:
        _flip(p, _tensor_span(p, "encoder.weight")[0])
    with caplog.at_level(logging.WARNING):
        assert latest_checkpoint(paths[0].parent, verify=True) is None
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) >= 3


def test_a_changed_checksum_in_the_header_is_refused(saved):
    _, paths = saved
    path = paths[-1]
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    ours = json.loads(header["__metadata__"]["lightning_saver"])
    crc = ours["checksum"]["tensors"]["encoder.bias"]
    at = raw.index(crc.encode(), 8)
    raw[at : at + 8] = (f"{int(crc, 16) ^ 1:08x}").encode()
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=rf"{re.escape(str(path))}.*encoder\.bias"):
        load(path)
