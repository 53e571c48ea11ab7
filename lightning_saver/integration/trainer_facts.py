"""What the Saver's hooks read from (or put in) a Lightning trainer, for either Lightning package.

Small helpers of ``callback.py``: the logger and progress-bar line, whether an epoch ended, the
monitored metric, the recorded versions, the default checkpoint directory, and installing our
``CheckpointIO``.

Example::

    announce(trainer, "saved %s", path)
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from lightning_saver.integration import compat
from lightning_saver.integration.checkpoint_io import SafetensorsIO, checkpoint_io_for

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["log_of", "at_epoch_end", "announce", "install_checkpoint_io", "metric", "versions",
           "default_dirpath"]


def default_dirpath(trainer: pl.Trainer) -> str:
    """Where ``ModelCheckpoint`` would write for ``trainer``: the first logger's version directory's
    ``checkpoints``, else ``<default_root_dir>/checkpoints``."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
        return os.path.join(str(save_dir), str(logger.name), version, "checkpoints")
    return os.path.join(str(trainer.default_root_dir), "checkpoints")


def log_of(trainer: pl.Trainer) -> logging.Logger:
    """The logger of the Saver's messages for ``trainer``."""
    # a child of Lightning's logger, so the one line per save shows wherever Lightning's own messages do
    return logging.getLogger(f"{compat.package_of(trainer)}.lightning_saver")


def at_epoch_end(trainer: pl.Trainer) -> bool:
    """Whether the training epoch's last batch has run."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


def announce(trainer: pl.Trainer, message: str, *args: Any) -> None:
    """One line through the progress bar when it shows (so it never lands on the bar's line), else the log."""
    bar = trainer.progress_bar_callback
    if bar is not None and getattr(bar, "is_enabled", False) and trainer.is_global_zero:
        bar.print(message % args)
        log_of(trainer).debug(message, *args)
    else:
        log_of(trainer).info(message, *args)


def install_checkpoint_io(trainer: pl.Trainer, *, verify: bool, allow_pickle: bool,
                          storage_options: dict[str, Any]) -> None:
    """Put our ``CheckpointIO`` (safetensors) in the trainer's strategy, bound to its module."""
    io = trainer.strategy.checkpoint_io
    if not isinstance(io, SafetensorsIO):
        io = checkpoint_io_for(compat.package_of(trainer))(io, verify=verify, allow_pickle=allow_pickle)
        trainer.strategy.checkpoint_io = io
    io.module = trainer.lightning_module
    if storage_options:
        io.storage_options = dict(storage_options)


def metric(trainer: pl.Trainer, monitor: str | None) -> float | None:
    """The monitored value the trainer logged, or ``None``."""
    if monitor is None:
        return None
    value = trainer.callback_metrics.get(monitor)
    return None if value is None else float(value)


def versions(trainer: pl.Trainer) -> dict[str, str]:
    """The versions recorded with a checkpoint: ours, torch's and the Lightning package's."""
    import torch

    from lightning_saver import __version__

    package = compat.package_of(trainer)
    return {"lightning_saver": __version__, "torch": torch.__version__,
            package.split(".")[0]: compat.module(package).__version__}
