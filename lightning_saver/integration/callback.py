"""The ``Saver``: the standalone saver and the Lightning checkpoint callback in one class."""

from __future__ import annotations

from pytorch_lightning.callbacks import Checkpoint

from lightning_saver.saving.saver import CheckpointSaver


class Saver(CheckpointSaver, Checkpoint):
    """TensorFlow ``train.Saver`` semantics on safetensors, usable as a Lightning callback."""
