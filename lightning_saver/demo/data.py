"""A LightningDataModule over scikit-learn's digits (8x8 images, 10 classes), bundled: no download."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


class DigitsDataModule(pl.LightningDataModule):
    """1,797 digits split into train/val/test by a fixed seed; the train loader shuffles.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the data for validation (the test split is the same size).
        split_seed: seed of the train/val/test split (not of the shuffling, which follows the
            global torch RNG, so that a resumed run needs the saved RNG states).
        limit: keep only the first ``limit`` samples (tests use it to stay fast).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 64])
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, split_seed: int = 0,
                 limit: int | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.limit = limit
        self._splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self._splits:
            return
        from sklearn.datasets import load_digits

        images, labels = load_digits(return_X_y=True)
        x = torch.as_tensor(images, dtype=torch.float32) / 16.0
        y = torch.as_tensor(labels, dtype=torch.int64)
        if self.limit is not None:
            x, y = x[: self.limit], y[: self.limit]
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, int(len(x) * self.val_fraction))
        parts = {"val": order[:n_val], "test": order[n_val : 2 * n_val], "train": order[2 * n_val :]}
        self._splits = {name: TensorDataset(x[idx], y[idx]) for name, idx in parts.items()}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["train"], batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=self.batch_size)
