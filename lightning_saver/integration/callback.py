"""The ``Saver``'s Lightning hooks, for either Lightning package.

``Saver`` (``saver.py``) holds the options; in a Lightning program it is bound (``compat.py``) to
:class:`SaverHooks` and each imported package's ``Checkpoint``. Put in ``Trainer(callbacks=[...])``
it saves the whole training state every ``every_n_train_steps`` / ``every_n_epochs`` /
``train_time_interval`` as ``<dirpath>/<filename>_<global_step>.safetensors``, rotating with the
saver's policy. The hooks only decide *when*; what is kept is the saver's business (``saving/``),
how a state becomes a file is the codec's (``formats/state_codec.py``). What they need from
Lightning is looked up in the package of the trainer that calls them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import TYPE_CHECKING, Any

from lightning_saver.formats.state_codec import encode_state
from lightning_saver.integration import compat, loading, resume, rng_state, sharded, trainer_facts
from lightning_saver.integration.saver import render_filename
from lightning_saver.saving import state_file
from lightning_saver.saving.deferred_copy import step_only_names
from lightning_saver.saving.names import DEFAULT_EXT, Series
from lightning_saver.saving.saver import latest_checkpoint
from lightning_saver.storage import is_url

if TYPE_CHECKING:
    import pytorch_lightning as pl

__all__ = ["SaverHooks", "bound_saver_class", "EXTRA_KEY"]

# the entry of the Lightning checkpoint dict holding what Lightning itself does not save
EXTRA_KEY = "lightning_saver"


def _checkpoint_bases(package: str) -> tuple[type, ...]:
    return (compat.module(package, "callbacks").Checkpoint,)


def bound_saver_class(plain: type, packages: tuple[str, ...]) -> type:
    """``plain`` (a ``Saver`` class) with the hooks and the ``Checkpoint`` base of each package."""
    for package in packages:
        resume.install(package)
        loading.install(package)
    return compat.bind(plain, SaverHooks, _checkpoint_bases, packages)


class SaverHooks:
    """The Lightning side of the ``Saver``; see the module docs. Mixed into a bound ``Saver`` only."""

    # set on the bound class by compat.bind; the attributes below come from Saver / CheckpointSaver
    _plain: type
    _bound_packages: tuple[str, ...]
    dirpath: str | None
    _dirpath_given: bool
    filename: str
    last_checkpoints: list[str]
    _scores: dict[str, float]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # the bound class is not importable by name: rebuild it from the plain class and the packages
        return (compat.rebuild, (_bound_for_pickle, self._plain, self._bound_packages), self.__getstate__())

    # ------------------------------------------------------------------ Lightning state

    @property
    def state_key(self) -> str:
        return self._generate_state_key(  # type: ignore[attr-defined]
            dirpath=self.dirpath if self._dirpath_given else None, filename=self.filename)

    def state_dict(self) -> dict[str, Any]:
        s: Any = self
        return {"dirpath": s.dirpath, "last_saved_step": s.last_saved_step, "train_seconds": s._elapsed(),
                "last_checkpoints": list(s.last_checkpoints), "last_model_path": s.last_model_path}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        s: Any = self
        s.last_saved_step = state_dict.get("last_saved_step")
        s.last_model_path = state_dict.get("last_model_path", "")
        s._train_seconds = float(state_dict.get("train_seconds", 0.0))
        s._time_at_save = s._train_seconds  # the resumed-from checkpoint was the last save
        s._timer_start = time.monotonic()

    # ------------------------------------------------------------------ hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        s: Any = self
        lib = compat.module(compat.package_of(trainer), "strategies")
        if sharded.is_sharded_strategy(trainer.strategy):
            sharded.install(trainer.strategy, verify=s.verify, allow_pickle=s.allow_pickle)
        elif not isinstance(trainer.strategy, (lib.SingleDeviceStrategy, lib.DDPStrategy)):
            compat.module(compat.package_of(trainer), "utilities.rank_zero").rank_zero_warn(
                f"Saver: {type(trainer.strategy).__name__} loads checkpoints itself, bypassing the "
                "CheckpointIO plugin, so it cannot resume from the Saver's .safetensors files, and sharded "
                "state dicts are refused when saving. Tested strategies: single device, DDP and "
                "ModelParallelStrategy (FSDP2, sharded sets). DeepSpeed is not supported."
            )
        trainer_facts.install_checkpoint_io(trainer, verify=s.verify, allow_pickle=s.allow_pickle,
                               storage_options=s.storage_options)
        s.dirpath = trainer.strategy.broadcast(self.resolve_dirpath(trainer))
        if is_url(s.dirpath) and trainer.is_global_zero:
            s.check_access(s.dirpath)  # credentials and bucket now, not at the first save
        self._seed_scores()

    def _seed_scores(self) -> None:
        """The monitored values of the files kept in ``dirpath`` (a resumed run), from the state file."""
        s: Any = self
        if is_url(s.dirpath):
            return
        whole = state_file.load_state(s.dirpath)
        series = whole.series.get(state_file.series_key(self._own_series())) if whole else None
        for record in series.checkpoints if series else []:
            if record.metric is not None:
                s._scores.setdefault(os.path.join(s.dirpath, record.name), record.metric)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        s: Any = self
        if trainer.ckpt_path:
            s.protect(str(trainer.ckpt_path))
        extra = checkpoint.get(EXTRA_KEY) or {}
        if trainer.state.fn != "fit" or "rng" not in extra:
            return
        if extra.get("at_epoch_end"):
            # before the train dataloader's iterator is created, as in the uninterrupted run
            rng_state.restore(extra["rng"], trainer.global_rank)
        else:
            # mid-epoch: the iterator is re-created on resume; restore after it, before the first step
            s._pending_rng = extra["rng"]

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s: Any = self
        s._timer_start = time.monotonic()
        if not pl_module.automatic_optimization:
            # a raw optimizer's step skips on_before_optimizer_step; under automatic optimization the
            # pre-hook would fire before the closure's forward and backward, so it is not used there
            s._step_hooks = [s.guard_optimizer(opt) for opt in trainer.optimizers]
        if s._pending_rng is not None:
            rng_state.restore(s._pending_rng, trainer.global_rank)
            s._pending_rng = None
        self._in_batch = False
        self._interrupted = False
        self._exception_saved = False
        self._install_sigint(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._in_batch = True

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Any) -> None:
        s: Any = self
        s.wait_snapshot()  # the step changes what an overlapped snapshot copy still reads

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        s: Any = self
        self._in_batch = False
        step = trainer.global_step
        n = s.every_n_train_steps
        due = bool(n) and step > 0 and step % n == 0
        if s.train_time_interval is not None:
            time_due = s._elapsed() - s._time_at_save >= s.train_time_interval
            due = due or trainer.strategy.broadcast(time_due)
        if due and step != s.last_saved_step:
            self.save_trainer(trainer, at_epoch_end=False)
        if getattr(self, "_interrupted", False):
            # Ctrl-C arrived during this step: the step is complete now, save it, then stop as asked
            self._save_on_exception(trainer)
            raise KeyboardInterrupt

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s: Any = self
        if s.every_n_epochs and (trainer.current_epoch + 1) % s.every_n_epochs == 0:
            self.save_trainer(trainer, at_epoch_end=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        s: Any = self
        self._restore_sigint()
        s.wait_snapshot()
        self._remove_step_hooks()
        if s.save_on_train_end and trainer.global_step != s.last_saved_step:
            self.save_trainer(trainer, at_epoch_end=trainer_facts.at_epoch_end(trainer))
        if trainer.is_global_zero and s.last_checkpoints:
            self._announce_kept(trainer)
        if (s.export_onnx or s.export_meta_graph) and trainer.is_global_zero:
            self._export(trainer, pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._restore_sigint()
        stop = compat.module(compat.package_of(trainer), "utilities.exceptions").SIGTERMException
        if isinstance(exception, (KeyboardInterrupt, stop)) and trainer.state.fn == "fit":
            self._save_on_exception(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_sigint()
        self._remove_step_hooks()
        s: Any = self
        s.wait()

    def _remove_step_hooks(self) -> None:
        s: Any = self
        for handle in s._step_hooks:
            handle.remove()
        s._step_hooks = []

    # ------------------------------------------------------------------ stopping

    def _install_sigint(self, trainer: pl.Trainer) -> None:
        """Ctrl-C during a step lets the step finish, saves it, then stops; a second Ctrl-C stops at once.

        Only in the main thread of a single-process run (DDP ranks would stop at different steps;
        SIGTERM, which Lightning synchronises across ranks, is handled in ``on_exception``).
        """
        s: Any = self
        self._previous_sigint: Any = None
        self._sigint_handler: Any = None
        if (not s.save_on_exception or trainer.world_size > 1
                or threading.current_thread() is not threading.main_thread()
                or signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGINT, previous)
            if not self._in_batch:
                raise KeyboardInterrupt
            self._interrupted = True
            trainer_facts.log_of(trainer).warning(
                "Saver: interrupted; saving step %d when it completes (Ctrl-C again to stop now)",
                trainer.global_step + 1)

        self._previous_sigint, self._sigint_handler = previous, on_sigint
        signal.signal(signal.SIGINT, on_sigint)

    def _restore_sigint(self) -> None:
        """Put the previous Ctrl-C handler back, unless someone (Lightning's shutdown) replaced ours."""
        handler = getattr(self, "_sigint_handler", None)
        if (handler is not None and threading.current_thread() is threading.main_thread()
                and signal.getsignal(signal.SIGINT) is handler):
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = self._sigint_handler = None

    def _save_on_exception(self, trainer: pl.Trainer) -> None:
        """Save the current step, durably, if the loops stand between steps and it is not saved yet."""
        s: Any = self
        if not s.save_on_exception or getattr(self, "_in_batch", False) or getattr(self, "_exception_saved",
                                                                                     False):
            return
        self._exception_saved = True
        if trainer.global_step != s.last_saved_step and trainer.global_step > 0:
            self.save_trainer(trainer, at_epoch_end=trainer_facts.at_epoch_end(trainer))
        s.wait()

    # ------------------------------------------------------------------ saving

    def save_trainer(self, trainer: pl.Trainer, *, at_epoch_end: bool) -> str | None:
        """Save the trainer's whole state now (rank 0 writes, every rank takes part); returns the path.

        ``at_epoch_end`` says whether the loops stand at an epoch boundary, which decides when a
        resume restores the RNG states.
        """
        s: Any = self
        if getattr(trainer, "fast_dev_run", False) or trainer.sanity_checking:
            return None
        start = time.perf_counter()
        step = trainer.global_step
        s.last_saved_step = step
        s._time_at_save = s._elapsed()
        if s.weights_only:
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
                state[EXTRA_KEY] = {"rng": rng, "at_epoch_end": at_epoch_end,
                                    "versions": trainer_facts.versions(trainer)}
                encoded = encode_state(state, allow_pickle=s.allow_pickle, sharded=shards)
                tensors, metadata = encoded.tensors, encoded.metadata
            else:
                tensors, metadata = weights, None
            path = self._save_logged(trainer, tensors, metadata, step, start)
        trainer.strategy.barrier("Saver.save_trainer")
        s.blocked_seconds += time.perf_counter() - start
        return path

    def _own_series(self) -> Series:
        s: Any = self
        directory = (s.dirpath or "").rstrip("/") if is_url(s.dirpath or "") else s.dirpath or ""
        return Series(directory, s.series_prefix, DEFAULT_EXT)

    def _save_logged(self, trainer: pl.Trainer, tensors: Any, metadata: dict[str, str] | None,
                     step: int, start: float) -> str:
        s: Any = self
        assert s.dirpath is not None  # set in setup()
        metric = trainer_facts.metric(trainer, s.monitor)
        prefix = s.filename
        if s.template_fields:
            values = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": step}
            prefix = render_filename(s.filename, values, auto_insert_metric_name=s.auto_insert_metric_name)
        defer = step_only_names(tensors, trainer.optimizers) if s.async_save and s.overlap_copy else ()
        # the extension spelled out: a rendered "val_loss=0.52" is not one
        path = s.save(tensors, _join(s.dirpath, prefix + DEFAULT_EXT), global_step=step,
                      metadata=metadata, metric=metric, series=self._own_series(), defer_copy=defer)
        # blocked: from collecting the state to the return of save() (a snapshot, when async)
        blocked = time.perf_counter() - start
        s.current_score = None if metric is None else _tensor(metric)
        if metric is not None:
            s._scores[path] = metric
        if s.save_last and not is_url(path):  # an object store has no links
            s.last_model_path = self._link_last(path)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        trainer_facts.announce(trainer, "Saver: %s (%.1f MB) step %d, caller blocked %.1f ms%s", path,
                               nbytes / 1e6, step, blocked * 1e3, " (async write)" if s.async_save else "")
        return path

    def _announce_kept(self, trainer: pl.Trainer) -> None:
        """One line at the end of training: which kept file is the best (by ``monitor``) and the latest."""
        s: Any = self
        s.wait()
        latest = s.last_checkpoints[-1]
        line = (f"Saver: kept {len(s.last_checkpoints)} checkpoint(s) in {s.dirpath}; "
                f"latest {os.path.basename(latest)}")
        if s.monitor and s._kept_scores():
            best, score = s._kept_scores()[0]
            line += f", best by {s.monitor} ({s.mode}) {os.path.basename(best)} ({s.monitor}={score:.4g})"
        trainer_facts.announce(trainer, "%s", line)

    def _link_last(self, path: str) -> str:
        """Point ``<dirpath>/last.safetensors`` at ``path``: a relative symbolic link, replaced atomically;
        where links are refused, a hard link, else a copy (after the write completes)."""
        s: Any = self
        last = os.path.join(os.path.dirname(path), s.CHECKPOINT_NAME_LAST + s.FILE_EXTENSION)
        temp = os.path.join(os.path.dirname(path), f".{os.path.basename(last)}.{os.getpid()}.link")
        try:
            if os.path.lexists(temp):
                os.remove(temp)
            os.symlink(os.path.basename(path), temp)
        except OSError:
            import shutil

            s.wait()  # a hard link or a copy needs the finished file
            try:
                os.link(path, temp)
            except OSError:
                shutil.copyfile(path, temp)
        os.replace(temp, last)
        return last

    def _elapsed(self) -> float:
        s: Any = self
        return float(s._train_seconds + (time.monotonic() - s._timer_start))

    def _export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_saver.graph.export_hooks import export_graphs  # heavy: ONNX / TF protos

        s: Any = self
        assert s.dirpath is not None
        example = pl_module.example_input_array
        if example is None:
            raise ValueError("Saver(export_onnx/export_meta_graph=True) needs the LightningModule's "
                             "example_input_array; set it in the module's __init__")
        # the graph also goes to TensorBoard when the run logs there and a TF graph is built anyway
        board = compat.module(compat.package_of(trainer), "loggers").TensorBoardLogger
        tensorboard = s.export_meta_graph and isinstance(trainer.logger, board)
        log_dir = trainer.log_dir if tensorboard else None
        paths = export_graphs(pl_module, example, s.dirpath, onnx=s.export_onnx,
                              meta_graph=s.export_meta_graph, log_dir=log_dir)
        trainer_facts.announce(trainer, "Saver: exported %s", ", ".join(paths))

    # ------------------------------------------------------------------ directories

    def resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """The checkpoint directory: ``dirpath`` if given, else where ``ModelCheckpoint`` would write."""
        if self._dirpath_given:
            return str(self.dirpath)
        return trainer_facts.default_dirpath(trainer)

    def find_last_checkpoint(self, trainer: pl.Trainer) -> str | None:
        """The newest checkpoint this Saver wrote for this run's configuration, for ``ckpt_path="last"``.

        With the default ``dirpath`` each run gets a new logger version directory, so the previous
        runs' version directories are searched as well.
        """
        s: Any = self
        directories = [self.resolve_dirpath(trainer)]
        if not self._dirpath_given and trainer.loggers:
            parent = os.path.dirname(os.path.dirname(directories[0]))
            if os.path.isdir(parent):
                directories += [os.path.join(parent, d, "checkpoints") for d in sorted(os.listdir(parent))]
        # verified: a corrupt newest checkpoint is skipped (a warning names it) for the newest valid one
        latest = (latest_checkpoint(d, s.series_prefix, verify=True, storage_options=s.storage_options)
                  for d in directories if is_url(d) or os.path.isdir(d))
        found = [p for p in latest if p]
        if len(found) <= 1:
            return found[0] if found else None
        return max(found, key=os.path.getmtime)


def _bound_for_pickle(plain: type, packages: tuple[str, ...]) -> type:
    return bound_saver_class(plain, packages)


def _join(directory: str, name: str) -> str:
    return f"{directory.rstrip('/')}/{name}" if is_url(directory) else os.path.join(directory, name)


def _tensor(value: float) -> Any:
    import torch

    return torch.tensor(value)
