"""The demo task of the README's main job: scikit-learn's bundled digits, a small classifier."""

from lightning_saver.demo.data import DigitsDataModule
from lightning_saver.demo.model import DigitsClassifier

__all__ = ["DigitsDataModule", "DigitsClassifier"]
