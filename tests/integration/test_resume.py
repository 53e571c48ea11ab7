"""Exact resume with real Trainers: from a file, from "last", mid-epoch, and rotation across a resume."""

from __future__ import annotations

import os

import pytest
from integration_helpers import STEPS_PER_EPOCH, StepRecorder, data, model, same_weights, trainer, weights
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_saver import Saver


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 epochs in one go: the reference every resumed run must reproduce bit for bit."""
    root = tmp_path_factory.mktemp("full")
    recorder = StepRecorder()
    m = model(0)
    trainer(root, [Saver(dirpath=str(root / "ckpt")), recorder]).fit(m, data())
    return weights(m), recorder.steps


def checkpoints(directory) -> set[str]:
    return {p for p in os.listdir(directory) if p.endswith(".safetensors")}


def interrupted(root, **saver_kwargs):
    """The same run stopped after 2 epochs (same seed, same data)."""
    m = model(0)
    t = trainer(root, [Saver(dirpath=str(root / "ckpt"), **saver_kwargs)], max_epochs=2)
    t.fit(m, data())
    return t


def test_resume_from_file_at_epoch_boundary_is_bit_identical(tmp_path, uninterrupted):
    interrupted(tmp_path)
    path = tmp_path / "ckpt" / f"model_{2 * STEPS_PER_EPOCH}.safetensors"
    assert path.exists()
    resumed = model(1234)  # other seed: other init, other RNG; the checkpoint must restore all of it
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "ckpt"))])
    t.fit(resumed, data(), ckpt_path=str(path))
    assert t.global_step == 4 * STEPS_PER_EPOCH
    assert same_weights(weights(resumed), uninterrupted[0])


def test_resume_from_last_is_bit_identical(tmp_path, uninterrupted):
    interrupted(tmp_path)
    resumed = model(99)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "ckpt"))])
    t.fit(resumed, data(), ckpt_path="last")
    assert t.ckpt_path == str(tmp_path / "ckpt" / f"model_{2 * STEPS_PER_EPOCH}.safetensors")
    assert same_weights(weights(resumed), uninterrupted[0])


def test_lightning_alone_diverges_without_rng_states(tmp_path, uninterrupted):
    """The peer: ModelCheckpoint's .ckpt has no RNG states, so the same resume gives other weights.

    Loading it through the Saver's CheckpointIO also shows that .ckpt files still load
    (with torch's weights_only unpickler).
    """
    m = model(0)
    trainer(tmp_path, [ModelCheckpoint(dirpath=tmp_path / "mc", save_top_k=-1)], max_epochs=2).fit(m, data())
    ckpt = tmp_path / "mc" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt"
    resumed = model(1234)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "ckpt"))])
    t.fit(resumed, data(), ckpt_path=str(ckpt))
    assert t.global_step == 4 * STEPS_PER_EPOCH
    assert not same_weights(weights(resumed), uninterrupted[0])


def stop_at_step_13_and_resume_from_10(tmp_path, resumable):
    first = StepRecorder()
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5,
                                 save_on_train_end=False), first], max_steps=13)
    t.fit(model(0), data(resumable))
    assert checkpoints(tmp_path / "ckpt") == {"model_5.safetensors", "model_10.safetensors"}
    second = StepRecorder()
    resumed = model(7)
    t = trainer(tmp_path, [Saver(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5), second])
    t.fit(resumed, data(resumable), ckpt_path=str(tmp_path / "ckpt" / "model_10.safetensors"))
    assert t.global_step == 4 * STEPS_PER_EPOCH
    return [s for s in first.steps if s[0] < 10] + second.steps, weights(resumed)


def test_mid_epoch_resume_with_a_resumable_loader_is_bit_identical(tmp_path, uninterrupted):
    steps, resumed = stop_at_step_13_and_resume_from_10(tmp_path, resumable=True)
    assert steps == uninterrupted[1]
    assert same_weights(resumed, uninterrupted[0])


def test_mid_epoch_resume_with_a_plain_loader_continues_at_the_right_step(tmp_path, uninterrupted):
    # a plain DataLoader cannot skip what it served: the rest of the epoch draws a new shuffle, but
    # each global step still runs exactly once, in the same epoch and batch position
    steps, _ = stop_at_step_13_and_resume_from_10(tmp_path, resumable=False)
    assert steps == uninterrupted[1]


def test_rotation_across_a_resume_keeps_the_resumed_from_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    t = trainer(tmp_path, [Saver(dirpath=str(ckpt), max_to_keep=2, every_n_train_steps=3,
                                 save_on_train_end=False)], max_steps=12)
    t.fit(model(0), data())
    assert checkpoints(ckpt) == {"model_12.safetensors", "model_9.safetensors"}
    saver = Saver(dirpath=str(ckpt), max_to_keep=2, every_n_train_steps=3, save_on_train_end=False)
    t = trainer(tmp_path, [saver], max_steps=21)
    t.fit(model(0), data(), ckpt_path=str(ckpt / "model_9.safetensors"))
    # the newest two of this run, plus the file it resumed from, which rotation must never delete
    assert checkpoints(ckpt) == {"model_18.safetensors", "model_21.safetensors", "model_9.safetensors"}
    assert [os.path.basename(p) for p in saver.last_checkpoints][-2:] == ["model_18.safetensors",
                                                                          "model_21.safetensors"]
