"""The Saver's behaviour on a local folder, memory:// and a real S3 server (moto), same tests."""

from __future__ import annotations

import pytest
import torch

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load, read_metadata
from lightning_saver.saving.state_file import STATE_NAME
from lightning_saver.storage import storage_for


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(x, y) for x, y in pairs)


def test_names_rotation_across_restarts_and_bit_identical_restore(place):
    store = storage_for(place.root, place.options)
    model = _model()
    saver = CheckpointSaver(max_to_keep=2, storage_options=place.options)
    for step in (1, 2, 3):
        path = saver.save(model, place.path("variable_file"), global_step=step)
    assert path == place.path("variable_file_3.safetensors")
    assert store.listdir(place.root) == [STATE_NAME] + [f"variable_file_{s}.safetensors" for s in (2, 3)]

    again = CheckpointSaver(max_to_keep=2, storage_options=place.options)  # a new process, same directory
    again.save(_model(1), place.path("variable_file"), global_step=4)
    assert store.listdir(place.root) == [STATE_NAME] + [f"variable_file_{s}.safetensors" for s in (3, 4)]
    latest = latest_checkpoint(place.root, storage_options=place.options)
    assert latest == place.path("variable_file_4.safetensors")

    target = _model(7)
    again.restore(target, place.path("variable_file_3"))  # extension left off, as TF users write it
    assert _same(target, model)
    loaded = load(place.path("variable_file_4.safetensors"), storage_options=place.options)
    assert torch.equal(loaded["0.weight"], _model(1).state_dict()["0.weight"])
    meta = read_metadata(place.path("variable_file_4.safetensors"), storage_options=place.options)
    assert '"global_step": 4' in meta["lightning_saver"]


def test_async_saves_are_durable_after_wait(place):
    store = storage_for(place.root, place.options)
    saver = CheckpointSaver(max_to_keep=3, async_save=True, storage_options=place.options)
    model = _model()
    for step in range(1, 6):
        with torch.no_grad():
            model[0].weight.fill_(float(step))
        saver.save(model, place.path("m"), global_step=step)
    saver.wait()
    assert store.listdir(place.root) == [STATE_NAME] + [f"m_{s}.safetensors" for s in (3, 4, 5)]
    got = load(place.path("m_5.safetensors"), storage_options=place.options)
    assert torch.all(got["0.weight"] == 5.0)
    saver.close()


def test_corruption_is_refused_and_latest_falls_back(place):
    store = storage_for(place.root, place.options)
    saver = CheckpointSaver(max_to_keep=5, storage_options=place.options)
    for step in (1, 2):
        saver.save({"w": torch.arange(1000, dtype=torch.float32) * step}, place.path("m"), global_step=step)
    newest = place.path("m_2.safetensors")
    data = bytearray(store.read_bytes(newest))
    data[-3] ^= 0xFF  # one flipped bit pattern in the last tensor's bytes
    store.write_bytes(newest, bytes(data))
    with pytest.raises(CorruptCheckpointError, match=r"m_2\.safetensors.*checksum mismatch in tensor 'w'"):
        saver.restore({"w": torch.zeros(1000)}, newest)
    assert latest_checkpoint(place.root, storage_options=place.options) == newest
    valid = latest_checkpoint(place.root, verify=True, storage_options=place.options)
    assert valid == place.path("m_1.safetensors")


def test_latest_without_a_state_file_scans_the_directory(place):
    store = storage_for(place.root, place.options)
    saver = CheckpointSaver(max_to_keep=5, storage_options=place.options)
    for step in (3, 10, 7):
        saver.save({"w": torch.ones(2)}, place.path("m"), global_step=step)
    store.delete(store.join(place.root, STATE_NAME))
    assert latest_checkpoint(place.root, storage_options=place.options) == place.path("m_7.safetensors")
    assert latest_checkpoint(place.path("nothing-here"),
                             storage_options=place.options) is None
