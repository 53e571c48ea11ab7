"""A small MLP classifier for the 8x8 digits, with dropout (so exact resume needs the RNG states).

``DigitsModel`` holds the code; :func:`classifier_class` makes it a ``LightningModule`` of either
Lightning package (``lightning_saver.demo.DigitsClassifier`` is the CLI's package's).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from lightning_saver.integration import compat


class DigitsModel:
    """``64 -> hidden -> 10`` with ReLU and dropout, trained with Adam and a step LR schedule.

    Args:
        hidden: width of the hidden layer.
        dropout: dropout probability after the hidden layer.
        lr: Adam learning rate.
        lr_step: epochs between learning-rate halvings.

    Example:
        >>> DigitsClassifier(hidden=16)(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """

    def __init__(self, hidden: int = 64, dropout: float = 0.2, lr: float = 1e-2, lr_step: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, 10))
        self.example_input_array = torch.zeros(1, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _loss_acc(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss_acc(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log_dict({"val_loss": loss, "val_acc": acc}, prog_bar=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss_acc(batch)
        self.log_dict({"test_loss": loss, "test_acc": acc})

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(-1)

    def configure_optimizers(self):  # noqa: ANN201 - Lightning's union of return shapes
        optimizer = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.hparams.lr_step, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}


@functools.cache
def classifier_class(package: str) -> type:
    """``DigitsClassifier``: :class:`DigitsModel` as a ``LightningModule`` of ``package``."""
    return type("DigitsClassifier", (DigitsModel, compat.module(package).LightningModule),
                {"__module__": "lightning_saver.demo", "__qualname__": "DigitsClassifier",
                 "__doc__": DigitsModel.__doc__})
