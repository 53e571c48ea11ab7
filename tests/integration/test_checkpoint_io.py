"""SafetensorsCheckpointIO set explicitly, bare weight files, and ModelCheckpoint .ckpt files."""

from __future__ import annotations

import pytest
from integration_helpers import STEPS_PER_EPOCH, data, model, same_weights, trainer, weights
from pytorch_lightning.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from lightning_saver import SafetensorsCheckpointIO, Saver
from lightning_saver.errors import CorruptCheckpointError


def test_plugin_saves_and_resumes_without_the_saver(tmp_path):
    m = model(0)
    t = trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], max_epochs=1, enable_checkpointing=False)
    t.fit(m, data())
    path = tmp_path / "state.safetensors"
    t.save_checkpoint(path)
    # plain safetensors: the weights under their own names, next to the reserved optimizer entries
    assert same_weights({k: v for k, v in load_file(path).items() if k.startswith("net.")}, weights(m))
    resumed = model(5)
    t2 = trainer(tmp_path, plugins=[SafetensorsCheckpointIO()], max_epochs=2, enable_checkpointing=False)
    t2.fit(resumed, data(), ckpt_path=str(path))
    assert t2.global_step == 2 * STEPS_PER_EPOCH


def test_weights_only_file_serves_validate(tmp_path):
    m = model(0)
    trainer(tmp_path, [Saver(dirpath=str(tmp_path), weights_only=True)], max_epochs=1).fit(m, data())
    path = tmp_path / f"model_{STEPS_PER_EPOCH}.safetensors"
    assert set(load_file(path)) == set(m.state_dict())
    fresh = model(3)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "v"))])
    t.validate(fresh, data(), ckpt_path=str(path), verbose=False)
    assert same_weights(weights(fresh), weights(m))


def test_model_checkpoint_ckpt_loads_with_weights_only_semantics(tmp_path):
    m = model(0)
    trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path)], max_epochs=1).fit(m, data())
    ckpt = tmp_path / f"epoch=0-step={STEPS_PER_EPOCH}.ckpt"
    fresh = model(3)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "v"))])
    t.validate(fresh, data(), ckpt_path=str(ckpt), verbose=False)
    assert same_weights(weights(fresh), weights(m))


def test_ckpt_with_arbitrary_objects_is_refused(tmp_path):
    import argparse

    import torch

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": argparse.Namespace(x=1)}, path)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "v"))])
    with pytest.raises(CorruptCheckpointError, match=r"evil\.ckpt: .*weights_only=True"):
        t.validate(model(0), data(), ckpt_path=str(path), verbose=False)
