"""The demo's classes on ``lightning.pytorch`` (``import lightning as L``), for configs of that package:
``class_path: lightning_saver.demo.unified.DigitsClassifier``."""

from lightning_saver.demo.data import datamodule_class
from lightning_saver.demo.model import classifier_class

DigitsDataModule = datamodule_class("lightning.pytorch")
DigitsClassifier = classifier_class("lightning.pytorch")
DigitsDataModule.__module__ = DigitsClassifier.__module__ = __name__

__all__ = ["DigitsDataModule", "DigitsClassifier"]
