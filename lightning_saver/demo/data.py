"""A LightningDataModule over scikit-learn's digits (8x8 images, 10 classes), bundled: no download.

Its train loader is *resumable*: Lightning saves its ``state_dict()`` (this epoch's shuffling seed
and how many samples it served) in the loop state, so a run resumed mid-epoch continues with the
same permutation at the next sample instead of starting a fresh shuffle.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from lightning_saver.integration import compat


class ResumableRandomSampler(Sampler[int]):
    """A random permutation per epoch, like ``RandomSampler``, that can resume mid-epoch.

    Each epoch's seed is drawn from the global torch RNG when iteration starts (as ``RandomSampler``
    does), so runs stay reproducible through ``seed_everything`` and the saved RNG states.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.seed: int | None = None
        self.served = 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return self.size

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            self.seed, start = self._resume
            self._resume = None
        else:
            self.seed, start = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed)).tolist()
        for i in range(start, self.size):
            self.served = i + 1
            yield order[i]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "served": self.served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # an epoch that was fully served starts afresh
        if state.get("seed") is not None and 0 < state["served"] < self.size:
            self._resume = (int(state["seed"]), int(state["served"]))


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose sampler's position Lightning saves and restores (``_Stateful``).

    Under DDP Lightning swaps in a ``DistributedSampler``, which has no position to save: the
    state is then empty and a mid-epoch resume starts the epoch's remaining steps afresh.
    """

    def state_dict(self) -> dict[str, Any]:
        save = getattr(self.sampler, "state_dict", None)
        return save() if callable(save) else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load = getattr(self.sampler, "load_state_dict", None)
        if callable(load) and state:
            load(state)


class DigitsData:
    """1,797 digits split into train/val/test by a fixed seed; the train loader shuffles.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the data for validation (the test split is the same size).
        split_seed: seed of the train/val/test split (not of the shuffling, which follows the
            global torch RNG, so that a resumed run needs the saved RNG states).
        resumable: shuffle with :class:`ResumableRandomSampler`, so mid-epoch resumes are exact;
            ``False`` gives a plain ``DataLoader(shuffle=True)``.
        limit: keep only the first ``limit`` samples (tests use it to stay fast).

    Example:
        >>> dm = DigitsDataModule(batch_size=32)
        >>> dm.setup("fit")
        >>> next(iter(dm.train_dataloader()))[0].shape
        torch.Size([32, 64])
    """

    def __init__(self, batch_size: int = 64, val_fraction: float = 0.15, split_seed: int = 0,
                 limit: int | None = None, resumable: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.limit = limit
        self.resumable = resumable
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
        train = self._splits["train"]
        if not self.resumable:
            return DataLoader(train, batch_size=self.batch_size, shuffle=True)
        sampler = ResumableRandomSampler(len(train))
        return ResumableDataLoader(train, batch_size=self.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["val"], batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=self.batch_size)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self._splits["test"], batch_size=self.batch_size)


@functools.cache
def datamodule_class(package: str) -> type:
    """``DigitsDataModule``: :class:`DigitsData` as a ``LightningDataModule`` of ``package``."""
    return type("DigitsDataModule", (DigitsData, compat.module(package).LightningDataModule),
                {"__module__": "lightning_saver.demo", "__qualname__": "DigitsDataModule",
                 "__doc__": DigitsData.__doc__})
