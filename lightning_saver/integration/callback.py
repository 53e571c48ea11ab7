"""The ``Saver``: the standalone saver and the Lightning checkpoint callback in one class.

Standalone it is :class:`~lightning_saver.saving.saver.CheckpointSaver` (TensorFlow ``train.Saver``
semantics). Put in ``Trainer(callbacks=[...])`` it saves the whole training state every
``every_n_train_steps`` / ``every_n_epochs`` / ``train_time_interval`` as
``<dirpath>/<filename>_<global_step>.safetensors``, rotating with the saver's policy. The hooks only
decide *when*; what is kept is the saver's business (``saving/``), how a state becomes a file is the
codec's (``formats/state_codec.py``).
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.strategies import DDPStrategy, SingleDeviceStrategy
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.rank_zero import rank_zero_warn

from lightning_saver.formats.state_codec import encode_state
from lightning_saver.integration import resume, rng_state, sharded
from lightning_saver.integration.checkpoint_io import SafetensorsCheckpointIO
from lightning_saver.saving.deferred_copy import step_only_names
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint
from lightning_saver.storage import is_url

# a child of Lightning's logger, so the one line per save shows wherever Lightning's own messages do
log = logging.getLogger("pytorch_lightning.lightning_saver")

# the entry of the Lightning checkpoint dict holding what Lightning itself does not save
EXTRA_KEY = "lightning_saver"


class Saver(CheckpointSaver, Checkpoint):
    """TensorFlow ``train.Saver`` semantics on safetensors, usable as a Lightning callback.

    Args:
        max_to_keep: keep the newest N checkpoints (``None``/``0``: all).
        keep_every_n_hours: also keep one checkpoint per N hours of wall time, forever.
        async_save: write in the background; training blocks only for a CPU snapshot.
        overlap_copy: with ``async_save``, copy the parameters and optimizer state while the next
            forward and backward run; the next optimizer step waits for the copy
            (``on_before_optimizer_step``, and a step pre-hook on every optimizer under manual
            optimization). Other tensors (buffers, loop state) are copied before the hook returns.
            ``False``: the whole copy blocks the hook, as ``CheckpointSaver.save`` does.
        verify: check checksums when restoring.
        save_top_k: also keep the best k checkpoints by ``monitor``.
        mode: ``"min"`` or ``"max"``, how ``monitor`` ranks checkpoints.
        dirpath: directory of the checkpoints; by default ``<logger dir or default_root_dir>/checkpoints``,
            as ``ModelCheckpoint`` does.
        filename: file prefix; files are ``<filename>_<global_step>.safetensors``.
        monitor: logged metric ranking checkpoints for ``save_top_k``.
        every_n_train_steps: save every N optimizer steps.
        every_n_epochs: save at the end of every N-th training epoch (default 1 when no other
            schedule is given).
        train_time_interval: save when this much training time passed (``timedelta`` or seconds).
        save_on_train_end: save when training ends, unless that step is already saved.
        weights_only: save the module's weights alone (a plain safetensors file).
        allow_pickle: store values with no JSON form pickled (and load them) instead of raising.
        export_onnx: at the end of training, export the module (``example_input_array``) to ONNX.
        export_meta_graph: at the end of training, export a TensorFlow MetaGraph + checkpoint.
        storage_options: fsspec options for a URL ``dirpath`` (``s3://bucket/run/ckpts``):
            ``endpoint_url``, ``key``, ``secret``... Access is checked at set-up, before training.

    Example:
        >>> trainer = pl.Trainer(callbacks=[Saver(max_to_keep=5, every_n_train_steps=100)])  # doctest: +SKIP
        >>> trainer.fit(model, ckpt_path="last")  # doctest: +SKIP
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        *,
        async_save: bool = False,
        overlap_copy: bool = True,
        verify: bool = True,
        save_top_k: int | None = None,
        mode: str = "min",
        dirpath: str | None = None,
        filename: str = "model",
        monitor: str | None = None,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        train_time_interval: timedelta | float | None = None,
        save_on_train_end: bool = True,
        weights_only: bool = False,
        allow_pickle: bool = False,
        export_onnx: bool = False,
        export_meta_graph: bool = False,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        CheckpointSaver.__init__(self, max_to_keep, keep_every_n_hours, async_save=async_save, verify=verify,
                                 save_top_k=save_top_k, mode=mode, storage_options=storage_options)
        if isinstance(train_time_interval, timedelta):
            train_time_interval = train_time_interval.total_seconds()
        if every_n_train_steps is None and every_n_epochs is None and train_time_interval is None:
            every_n_epochs = 1
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self._dirpath_given = dirpath is not None
        self.filename = filename
        self.monitor = monitor
        self.every_n_train_steps = every_n_train_steps or None
        self.every_n_epochs = every_n_epochs or None
        self.train_time_interval = train_time_interval
        self.save_on_train_end = save_on_train_end
        self.weights_only = weights_only
        self.allow_pickle = allow_pickle
        self.export_onnx = export_onnx
        self.export_meta_graph = export_meta_graph
        self.last_saved_step: int | None = None
        self._train_seconds = 0.0  # training time at the last save, carried across resumes
        self._time_at_save = 0.0
        self._timer_start = time.monotonic()
        self._pending_rng: list[dict[str, Any]] | None = None
        self.mode = mode
        self._scores: dict[str, float] = {}  # path -> monitored value, for best_model_path
        self.blocked_seconds = 0.0  # total time the training loop spent in save_trainer
        self.overlap_copy = overlap_copy
        self._step_hooks: list[Any] = []
        resume.install()

    # ------------------------------------------------------------------ Lightning state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(dirpath=self.dirpath if self._dirpath_given else None,
                                        filename=self.filename)

    @property
    def best_model_path(self) -> str:
        """The best kept checkpoint by ``monitor`` (the newest without one); ``ckpt_path="best"`` uses it."""
        scored = {p: m for p, m in self._scores.items() if is_url(p) or os.path.exists(p)}
        if scored:
            pick = min if self.mode == "min" else max
            return pick(scored, key=scored.__getitem__)
        return self.last_checkpoints[-1] if self.last_checkpoints else ""

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.dirpath, "last_saved_step": self.last_saved_step,
                "train_seconds": self._elapsed(), "last_checkpoints": list(self.last_checkpoints)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_saved_step = state_dict.get("last_saved_step")
        self._train_seconds = float(state_dict.get("train_seconds", 0.0))
        self._time_at_save = self._train_seconds  # the resumed-from checkpoint was the last save
        self._timer_start = time.monotonic()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if sharded.is_sharded_strategy(trainer.strategy):
            sharded.install(trainer.strategy, verify=self.verify, allow_pickle=self.allow_pickle)
        elif not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            rank_zero_warn(
                f"Saver: {type(trainer.strategy).__name__} loads checkpoints itself, bypassing the "
                "CheckpointIO plugin, so it cannot resume from the Saver's .safetensors files, and sharded "
                "state dicts are refused when saving. Tested strategies: single device, DDP and "
                "ModelParallelStrategy (FSDP2, sharded sets). DeepSpeed is not supported."
            )
        _install_checkpoint_io(trainer, verify=self.verify, allow_pickle=self.allow_pickle,
                               storage_options=self.storage_options)
        self.dirpath = trainer.strategy.broadcast(self.resolve_dirpath(trainer))
        if is_url(self.dirpath) and trainer.is_global_zero:
            self.check_access(self.dirpath)  # credentials and bucket now, not at the first save

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.ckpt_path:
            self.protect(str(trainer.ckpt_path))
        extra = checkpoint.get(EXTRA_KEY) or {}
        if trainer.state.fn != TrainerFn.FITTING or "rng" not in extra:
            return
        if extra.get("at_epoch_end"):
            # before the train dataloader's iterator is created, as in the uninterrupted run
            rng_state.restore(extra["rng"], trainer.global_rank)
        else:
            # mid-epoch: the iterator is re-created on resume; restore after it, before the first step
            self._pending_rng = extra["rng"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._timer_start = time.monotonic()
        if not pl_module.automatic_optimization:
            # a raw optimizer's step skips on_before_optimizer_step; under automatic optimization the
            # pre-hook would fire before the closure's forward and backward, so it is not used there
            self._step_hooks = [self.guard_optimizer(opt) for opt in trainer.optimizers]
        if self._pending_rng is not None:
            rng_state.restore(self._pending_rng, trainer.global_rank)
            self._pending_rng = None

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        self.wait_snapshot()  # the step changes what an overlapped snapshot copy still reads

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        n = self.every_n_train_steps
        due = bool(n) and step > 0 and step % n == 0  # type: ignore[operator]
        if self.train_time_interval is not None:
            time_due = self._elapsed() - self._time_at_save >= self.train_time_interval
            due = due or trainer.strategy.broadcast(time_due)
        if due and step != self.last_saved_step:
            self.save_trainer(trainer, at_epoch_end=False)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.every_n_epochs and (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.save_trainer(trainer, at_epoch_end=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.wait_snapshot()
        self._remove_step_hooks()
        if self.save_on_train_end and trainer.global_step != self.last_saved_step:
            at_end = trainer.fit_loop.epoch_loop._num_ready_batches_reached()
            self.save_trainer(trainer, at_epoch_end=at_end)
        if (self.export_onnx or self.export_meta_graph) and trainer.is_global_zero:
            self._export(trainer, pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        self.wait()

    def _remove_step_hooks(self) -> None:
        for handle in self._step_hooks:
            handle.remove()
        self._step_hooks = []

    # ------------------------------------------------------------------ saving

    def save_trainer(self, trainer: pl.Trainer, *, at_epoch_end: bool) -> str | None:
        """Save the trainer's whole state now (rank 0 writes, every rank takes part); returns the path.

        ``at_epoch_end`` says whether the loops stand at an epoch boundary, which decides when a
        resume restores the RNG states.
        """
        if getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking:
            return None
        start = time.perf_counter()
        step = trainer.global_step
        self.last_saved_step = step
        self._time_at_save = self._elapsed()
        if self.weights_only:
            state: dict[str, Any] | None = None
            weights = trainer.strategy.lightning_module_state_dict()
        else:
            state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        rng = rng_state.capture_all_ranks()
        path = None
        # DDP: rank 0 writes one file; ModelParallelStrategy: every rank writes its shard of a set
        shards = sharded.is_sharded_strategy(trainer.strategy)
        if trainer.is_global_zero or shards:
            if state is not None:
                state[EXTRA_KEY] = {"rng": rng, "at_epoch_end": at_epoch_end, "versions": _versions()}
                encoded = encode_state(state, allow_pickle=self.allow_pickle, sharded=shards)
                tensors, metadata = encoded.tensors, encoded.metadata
            else:
                tensors, metadata = weights, None
            path = self._save_logged(trainer, tensors, metadata, step, start)
        trainer.strategy.barrier("Saver.save_trainer")
        self.blocked_seconds += time.perf_counter() - start
        return path

    def _save_logged(self, trainer: pl.Trainer, tensors: Any, metadata: dict[str, str] | None,
                     step: int, start: float) -> str:
        assert self.dirpath is not None  # set in setup()
        metric = _metric(trainer, self.monitor)
        defer = step_only_names(tensors, trainer.optimizers) if self.async_save and self.overlap_copy else ()
        path = self.save(tensors, _join(self.dirpath, self.filename), global_step=step,
                         metadata=metadata, metric=metric, defer_copy=defer)
        # blocked: from collecting the state to the return of save() (a snapshot, when async)
        blocked = time.perf_counter() - start
        if metric is not None:
            self._scores[path] = metric
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        log.info("Saver: %s (%.1f MB) step %d, caller blocked %.1f ms%s", path, nbytes / 1e6, step,
                 blocked * 1e3, " (async write)" if self.async_save else "")
        return path

    def _elapsed(self) -> float:
        return self._train_seconds + (time.monotonic() - self._timer_start)

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_saver.graph.export_hooks import export_graphs  # heavy: ONNX / TF protos

        assert self.dirpath is not None
        example = pl_module.example_input_array
        if example is None:
            raise ValueError("Saver(export_onnx/export_meta_graph=True) needs the LightningModule's "
                             "example_input_array; set it in the module's __init__")
        # the graph also goes to TensorBoard when the run logs there and a TF graph is built anyway
        tensorboard = self.export_meta_graph and isinstance(trainer.logger, TensorBoardLogger)
        log_dir = trainer.log_dir if tensorboard else None
        paths = export_graphs(pl_module, example, self.dirpath, onnx=self.export_onnx,
                              meta_graph=self.export_meta_graph, log_dir=log_dir)
        log.info("Saver: exported %s", ", ".join(paths))

    # ------------------------------------------------------------------ directories

    def resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """The checkpoint directory: ``dirpath`` if given, else where ``ModelCheckpoint`` would write."""
        if self._dirpath_given:
            return str(self.dirpath)
        if trainer.loggers:
            logger = trainer.loggers[0]
            save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
            version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
            return os.path.join(str(save_dir), str(logger.name), version, "checkpoints")
        return os.path.join(str(trainer.default_root_dir), "checkpoints")

    def find_last_checkpoint(self, trainer: pl.Trainer) -> str | None:
        """The newest checkpoint this Saver wrote for this run's configuration, for ``ckpt_path="last"``.

        With the default ``dirpath`` each run gets a new logger version directory, so the previous
        runs' version directories are searched as well.
        """
        directories = [self.resolve_dirpath(trainer)]
        if not self._dirpath_given and trainer.loggers:
            parent = os.path.dirname(os.path.dirname(directories[0]))
            if os.path.isdir(parent):
                directories += [os.path.join(parent, d, "checkpoints") for d in sorted(os.listdir(parent))]
        # verified: a corrupt newest checkpoint is skipped (a warning names it) for the newest valid one
        latest = (latest_checkpoint(d, self.filename, verify=True, storage_options=self.storage_options)
                  for d in directories if is_url(d) or os.path.isdir(d))
        found = [p for p in latest if p]
        if len(found) <= 1:
            return found[0] if found else None
        return max(found, key=os.path.getmtime)


def _install_checkpoint_io(trainer: pl.Trainer, *, verify: bool, allow_pickle: bool,
                           storage_options: dict[str, Any]) -> None:
    io = trainer.strategy.checkpoint_io
    if not isinstance(io, SafetensorsCheckpointIO):
        io = SafetensorsCheckpointIO(io, verify=verify, allow_pickle=allow_pickle)
        trainer.strategy.checkpoint_io = io
    io.module = trainer.lightning_module
    if storage_options:
        io.storage_options = dict(storage_options)


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)


def _metric(trainer: pl.Trainer, monitor: str | None) -> float | None:
    if monitor is None:
        return None
    value = trainer.callback_metrics.get(monitor)
    return None if value is None else float(value)


def _versions() -> dict[str, str]:
    import torch

    from lightning_saver import __version__

    return {"lightning_saver": __version__, "torch": torch.__version__, "pytorch_lightning": pl.__version__}
