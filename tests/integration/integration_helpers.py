"""Small real-Trainer set-ups shared by the integration tests (kept tiny: 2 CPU cores, shared)."""

from __future__ import annotations

import warnings

import pytorch_lightning as pl
import torch

from lightning_saver.demo import DigitsClassifier, DigitsDataModule

# 400 samples -> 280 train -> 9 batches of 32 per epoch
LIMIT, BATCH = 400, 32
STEPS_PER_EPOCH = 9

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\).*")


def data(resumable: bool = True) -> DigitsDataModule:
    return DigitsDataModule(batch_size=BATCH, limit=LIMIT, resumable=resumable)


def model(seed: int, **kwargs) -> DigitsClassifier:
    pl.seed_everything(seed, verbose=False)
    kwargs.setdefault("hidden", 32)
    kwargs.setdefault("lr_step", 1)
    return DigitsClassifier(**kwargs)


def trainer(root, callbacks=(), **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 4)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("limit_val_batches", 2)
    kwargs.setdefault("num_sanity_val_steps", 1)
    return pl.Trainer(
        default_root_dir=str(root), accelerator="cpu", devices=1, callbacks=list(callbacks),
        enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class StepRecorder(pl.Callback):
    """Records (global_step, epoch, batch_idx) of every training step that runs."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append((trainer.global_step, trainer.current_epoch, batch_idx))


class Kit:
    """One Lightning package's Trainer, demo model and data, for tests run on both packages."""

    def __init__(self, package: str) -> None:
        import importlib

        from lightning_saver.demo import classifier_class, datamodule_class

        self.package = package
        self.pl = importlib.import_module(package)
        self.Classifier = classifier_class(package)
        self.DataModule = datamodule_class(package)

    def model(self, seed: int, **kwargs):
        self.pl.seed_everything(seed, verbose=False)
        kwargs.setdefault("hidden", 32)
        kwargs.setdefault("lr_step", 1)
        return self.Classifier(**kwargs)

    def data(self, resumable: bool = True, **kwargs):
        return self.DataModule(batch_size=BATCH, limit=LIMIT, resumable=resumable, **kwargs)

    def trainer(self, root, callbacks=(), **kwargs):
        kwargs.setdefault("max_epochs", 1)
        kwargs.setdefault("logger", False)
        kwargs.setdefault("limit_val_batches", 2)
        kwargs.setdefault("num_sanity_val_steps", 0)
        kwargs.setdefault("enable_progress_bar", False)
        return self.pl.Trainer(
            default_root_dir=str(root), accelerator="cpu", devices=1, callbacks=list(callbacks),
            enable_model_summary=False, **kwargs,
        )
