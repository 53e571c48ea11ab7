"""The demo task of the README's main job: scikit-learn's bundled digits, a small classifier.

``DigitsDataModule`` and ``DigitsClassifier`` are built on the Lightning package the CLI uses
(``pytorch_lightning`` when installed); ``lightning_saver.demo.unified`` has the same two on
``lightning.pytorch`` (``import lightning as L``).
"""

from lightning_saver.demo.data import datamodule_class
from lightning_saver.demo.model import classifier_class
from lightning_saver.integration.cli import cli_package

DigitsDataModule = datamodule_class(cli_package())
DigitsClassifier = classifier_class(cli_package())

__all__ = ["DigitsDataModule", "DigitsClassifier", "datamodule_class", "classifier_class"]
