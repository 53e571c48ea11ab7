"""``CheckpointSaver``: TensorFlow ``train.Saver`` semantics on safetensors files.

Example (the seed's TensorFlow.jl session, in Python)::

    saver = CheckpointSaver(max_to_keep=5)
    for step in range(1, 101):
        ...train...
        saver.save(model, "ckpts/variable_file", global_step=step)
    # kept: ckpts/variable_file_96.safetensors ... ckpts/variable_file_100.safetensors
    saver.restore(model, latest_checkpoint("ckpts"))   # here or in a new Python process

A save writes the file with the commit protocol (``storage/``: local or object store), records it
in the directory's state file (``state_file.py``), and only then deletes what rotation drops.
The read side (``latest_checkpoint``, ``load``, ``read_metadata``, restore dispatch) lives in
``reading.py`` and the write-side helpers in ``writing.py``; both are re-exported or used here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection, Mapping
from contextlib import AbstractContextManager
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_saver.formats import safetensors_io
from lightning_saver.saving import (
    deleter,
    names,
    rotation,
    series_records,
    snapshot_image,
    state_file,
    writing,
)
from lightning_saver.saving.names import Series
from lightning_saver.saving.reading import RestoreResult, latest_checkpoint, load, read_metadata, restore_path
from lightning_saver.saving.store_io import store_of
from lightning_saver.storage import Storage, is_url, storage_for

__all__ = ["CheckpointSaver", "latest_checkpoint", "load", "read_metadata", "RestoreResult"]

log = logging.getLogger("lightning_saver")

_LOCK_TIMEOUT_S = 60.0  # another saver of the directory holds it for one state-file update


class CheckpointSaver:
    """Saves and restores checkpoints with TensorFlow ``train.Saver`` semantics (see module docs).

    Args:
        max_to_keep: keep the newest N checkpoints of each directory + prefix (None or 0: all).
        keep_every_n_hours: also keep, forever, one checkpoint per N hours of wall time.
        async_save: snapshot the tensors and write in the background (``wait()`` to block).
        verify: check checksums on restore by default.
        save_top_k: also keep the K best checkpoints by ``metric`` (-1: keep all).
        mode: ``"min"`` or ``"max"``, the better direction of ``metric``.
        storage_options: for URL paths (``s3://bucket/ckpts/model``), the fsspec options
            (``endpoint_url``, ``key``, ``secret``...); local paths need none.
        **kwargs: passed on to the next class (cooperative: the Lightning ``Saver`` uses it).
    """

    def __init__(
        self,
        max_to_keep: int | None = 5,
        keep_every_n_hours: float | None = None,
        *,
        async_save: bool = False,
        verify: bool = True,
        save_top_k: int | None = None,
        mode: str = "min",
        storage_options: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.storage_options = dict(storage_options or {})
        self._stores: dict[str, Storage] = {}
        self._policy = rotation.Policy(max_to_keep, keep_every_n_hours, save_top_k, mode)
        self.async_save = async_save
        self.verify = verify
        self._created = time.time()
        self._series: dict[Series, state_file.SeriesState] = {}
        self._cleaned: set[str] = set()
        self._protected: set[str] = set()
        self._lock = threading.RLock()
        self._writer: Any = None
        self.last_checkpoints: list[str] = []

    def __getstate__(self) -> dict[str, Any]:
        # picklable and deep-copyable (Lightning may copy callbacks): no lock, no writer thread
        state = dict(self.__dict__)
        state.pop("_lock", None)
        state["_writer"] = None
        state["_series"] = {}  # a copy rereads the state file: it did not write what this saver wrote
        state["_set_group"] = None
        state["_stores"] = {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.RLock()

    @property
    def max_to_keep(self) -> int | None:
        return self._policy.max_to_keep

    @property
    def keep_every_n_hours(self) -> float | None:
        return self._policy.keep_every_n_hours

    # ------------------------------------------------------------ saving

    def save(
        self,
        model: nn.Module | Mapping[str, torch.Tensor],
        save_path: str | os.PathLike[str],
        global_step: int | None = None,
        *,
        metadata: Mapping[str, str] | None = None,
        metric: float | None = None,
        defer_copy: bool | Collection[str] = False,
        series: Series | None = None,
    ) -> str:
        """Save the model's tensors; return the path written (or being written, when async).

        Args:
            model: an ``nn.Module`` (its ``state_dict()``) or a mapping of name -> tensor.
            save_path: directory and prefix, e.g. ``"ckpts/variable_file"``; see ``names.py``.
            global_step: appended as ``_STEP`` before the extension.
            metadata: extra str -> str entries for the file's ``__metadata__``.
            metric: the monitored value for ``save_top_k``.
            defer_copy: async only: let the snapshot copy of these tensors (``True``: all) run in the
                background after ``save()`` returns. Opt-in: until :meth:`wait_snapshot` returns, the
                tensors must not change (:meth:`guard_optimizer` makes an optimizer's step wait).
            series: rotate the file within this series instead of ``save_path``'s (a templated
                prefix, whose every save has another file name; see ``names.py``).

        Returns:
            The checkpoint path, e.g. ``"ckpts/variable_file_95.safetensors"``.

        Raises:
            DiskFullError: not enough space (nothing earlier is touched).
            TypeError / ValueError: a non-tensor value, an unsupported dtype, a reserved metadata key.

        Example:
            >>> CheckpointSaver(max_to_keep=5).save({"x": torch.tensor(5.0)}, "ckpts/variable_file", 95)
            'ckpts/variable_file_95.safetensors'
        """
        tensors = writing.tensors_of(model)
        store, save_path = self._store_of(save_path)
        step = None if global_step is None else names.check_step(global_step)
        path = names.series_of(save_path).path(step)
        series = series or names.series_of(save_path)
        info: dict[str, Any] = {"global_step": step, "wall_time": time.time()}
        if metric is not None:
            info["metric"] = float(metric)
        if writing.sharded(tensors):
            return self._save_set(tensors, series, info, metadata)
        layout = writing.Layout(tensors)  # validates early; a sync save writes with it too
        # the size the file will have: the commit adds the directory's id to the header (the
        # placeholder has the length of the id a directory is given)
        final_info = dict(info, directory_id=state_file.DIRECTORY_ID_PLACEHOLDER)
        nbytes = safetensors_io.planned_nbytes(tensors, metadata=metadata, info=final_info, layout=layout)
        store.makedirs(series.directory)
        if self.async_save:
            writer = self._get_writer()
            # the writer's snapshot first waits for the save in flight, then reuses its CPU memory:
            # one snapshot of extra memory, and no page faults after the first save
            image = None
            local = store.local_path(path) is not None  # O_DIRECT is for local files only
            if snapshot_image.ENABLED and local:
                # a local file: the snapshot is the file's image, written as it is, past the page
                # cache (O_DIRECT): one copy per save, and a tenth of the CPU of a buffered write in
                # the writer (docs/durability.md, "The writer's CPU")
                plan = writing.ImagePlan(layout, nbytes - layout.data_nbytes)
                image = writer.snapshot_image(tensors, plan, defer=defer_copy)
                frozen = image.tensors
            else:
                frozen = writer.snapshot(tensors, defer=defer_copy)
            # the snapshot has the same names, shapes, dtypes and ties: the layout is reused (~1 ms
            # of the writer's CPU per 1,000 tensors)
            job = partial(self._commit, frozen, series, path, info, metadata, nbytes, layout, direct=local,
                          image=image)
            writer.submit(job)
        else:
            self._commit(tensors, series, path, info, metadata, nbytes, layout)
        return path

    def _get_writer(self) -> Any:
        if self._writer is None:
            from lightning_saver.saving.async_writer import AsyncWriter

            self._writer = AsyncWriter(max_in_flight=1)
        return self._writer

    def _commit(
        self,
        tensors: Mapping[str, torch.Tensor],
        series: Series,
        path: str,
        info: dict[str, Any],
        metadata: Mapping[str, str] | None,
        nbytes: int,
        layout: writing.Layout | None = None,
        *,
        direct: bool = False,
        image: writing.FileImage | None = None,
    ) -> None:
        with self._lock:
            directory = series.directory
            store = self._store(directory)
            if directory not in self._cleaned:
                for temp in store.remove_incomplete(directory):
                    log.info("removed leftover temporary file %s", temp)
                self._cleaned.add(directory)
            # the state file is read, checked and rewritten under the directory's lock: a second saver
            # of the same series is detected instead of silently dropping the other's records
            with self._directory_lock(directory):
                whole = self._directory_state(directory)
                current = self._series_state(series, whole)
                info = dict(info, directory_id=whole.directory_id)
                # the rename becomes durable with the state file's directory fsync (same directory):
                # one fsync fewer per save (docs/durability.md, "The commit protocol")
                result = store.write_atomic(
                    path, partial(writing.write_safetensors, tensors, metadata, info, layout=layout,
                                  direct=direct, image=image),
                    nbytes=nbytes, sync_directory=False,
                )
                record = rotation.Record(
                    store.split(path)[1],
                    info["global_step"],
                    info["wall_time"],
                    info.get("metric"),
                    size=result.nbytes,
                    checksum=f"crc32c:{result.checksum}",
                )
                self._record(series, current, record, whole, new_file=path)

    def _record(
        self,
        series: Series,
        current: state_file.SeriesState,
        record: rotation.Record,
        whole: state_file.DirectoryState,
        new_file: str | None = None,
    ) -> None:
        """Record a durable checkpoint in the state file ``whole`` (read under the directory lock),
        then delete what rotation drops."""
        with self._lock:
            directory = series.directory
            decision = rotation.plan(
                rotation.record_save(current.checkpoints, record),
                self._policy,
                next_keep_time=current.next_keep_time,
                protected=self._protected_names(directory),
            )
            updated = state_file.SeriesState(decision.records, decision.next_keep_time)
            store = self._store(directory)
            whole.series[state_file.series_key(series)] = updated
            whole.latest = record.name
            try:
                state_file.save_state(directory, whole, store)
            except BaseException:
                # a save commits whole or not at all: the unrecorded new file goes (unless it replaced a
                # recorded one of the same name), rotation deletes nothing
                if new_file is not None and record.name not in {r.name for r in current.checkpoints}:
                    writing.remove_quietly(store, new_file)
                raise
            # only now, with the state durable, does this saver forget and delete what rotation dropped
            self._series[series] = current = updated
            writing.delete_dropped(store, directory, [r.name for r in decision.delete], self._delete)
            self.last_checkpoints = [
                store.join(directory, r.name) for r in current.checkpoints if not r.preserved
            ]

    def _directory_lock(self, directory: str) -> AbstractContextManager[None]:
        """The store's lock of the whole directory, waited for up to a minute (local: a flock of
        the directory itself; object stores: none yet)."""
        return self._store(directory).lock(directory, timeout_s=_LOCK_TIMEOUT_S)

    def _directory_state(self, directory: str) -> state_file.DirectoryState:
        return series_records.directory_state(directory, self._store(directory))

    def _series_state(self, series: Series, whole: state_file.DirectoryState) -> state_file.SeriesState:
        """This series' records, from the state file ``whole`` just read under the directory lock
        (``series_records.py`` says which files a series owns)."""
        known = whole.series.get(state_file.series_key(series))
        if series in self._series:
            series_records.check_unchanged(series, known, [r.name for r in self._series[series].checkpoints])
            return self._series[series]
        records = series_records.owned_records(series, whole, self._store(series.directory))
        hours = self._policy.keep_every_n_hours
        next_keep = (
            known.next_keep_time
            if known and known.next_keep_time is not None
            else (self._created + hours * 3600.0 if hours else None)
        )
        state = state_file.SeriesState(records, next_keep)
        self._series[series] = state
        return state

    def _protected_names(self, directory: str) -> set[str]:
        here = _absolute(directory or ".")
        return {p.rsplit("/", 1)[-1] for p in self._protected if p.rsplit("/", 1)[0] == here}

    def _store(self, directory: str) -> Storage:
        """The store of ``directory`` (one per directory, built with this saver's storage_options)."""
        if directory not in self._stores:
            self._stores[directory] = storage_for(directory, self.storage_options)
        return self._stores[directory]

    def _store_of(self, path: str | os.PathLike[str]) -> tuple[Storage, str]:
        store, text = store_of(path, self.storage_options)
        self._stores.setdefault(store.split(text)[0], store)
        return store, text

    def check_access(self, directory: str | os.PathLike[str]) -> None:
        """Fail now when ``directory`` cannot be written (credentials, bucket, permissions): called
        at set-up, before training starts, not at the first save an hour in."""
        store, text = self._store_of(directory)
        store.probe(text)

    def _save_set(self, tensors: Mapping[str, torch.Tensor], series: Series, info: dict[str, Any],
                  metadata: Mapping[str, str] | None) -> str:
        """A sharded save (``sharded.py``), called on every rank; rank 0 records the committed set."""
        from lightning_saver.saving import sharded

        store = self._store(series.directory)
        if series.directory:
            store.makedirs(series.directory)
        save = partial(sharded.save_set, series=series, step=info["global_step"], info=info,
                       metadata=metadata, on_commit=partial(self._record_set, series, info), store=store)
        if not self.async_save:
            return save(tensors)
        # each rank snapshots its own pieces and writes in the background; DCP's collectives run on
        # a group of their own, so they never interleave with training's
        writer = self._get_writer()
        frozen = sharded.snapshot(writer, tensors)
        if getattr(self, "_set_group", None) is None:
            self._set_group = sharded.new_group()
        writer.submit(partial(save, frozen, process_group=self._set_group))
        return store.join(series.directory, names.set_index_name(series, info["global_step"]))

    def _record_set(self, series: Series, info: dict[str, Any], committed: Any) -> None:
        with self._directory_lock(series.directory):
            whole = self._directory_state(series.directory)
            current = self._series_state(series, whole)
            name = self._store(series.directory).split(committed.index_path)[1]
            record = rotation.Record(name, info["global_step"],
                                     info["wall_time"], info.get("metric"), size=committed.nbytes,
                                     checksum=committed.checksum)
            self._record(series, current, record, whole)

    @staticmethod
    def _delete(path: str) -> None:
        if names.is_set_index(path):
            from lightning_saver.saving import sharded

            sharded.delete_set(path, discard=deleter.discard)
            return
        # the name goes now, the blocks in the background: unlinking 1 GiB took 0.15 s in save()
        deleter.discard(path)

    def protect(self, path: str | os.PathLike[str]) -> None:
        """Never let rotation delete ``path`` (e.g. the checkpoint this run resumed from)."""
        self._protected.add(_absolute(os.fspath(path)))

    def wait_snapshot(self) -> None:
        """Return once the last async save's deferred snapshot copy is complete (``defer_copy``);
        instant when there is none. Call it before changing the saved tensors in place."""
        if self._writer is not None:
            self._writer.wait_snapshot()

    def guard_optimizer(self, optimizer: torch.optim.Optimizer) -> Any:
        """Make every ``optimizer.step()`` first wait for a deferred snapshot copy; returns the
        hook's handle (``handle.remove()`` undoes it).

        Example:
            >>> saver.guard_optimizer(opt)  # doctest: +SKIP
            >>> saver.save(model, "ckpts/m", global_step=step, defer_copy=True)  # doctest: +SKIP
            >>> opt.step()  # waits for the copy only if it is still running  # doctest: +SKIP
        """
        return optimizer.register_step_pre_hook(lambda *_: self.wait_snapshot())

    def wait(self) -> None:
        """Block until every pending async save is durable and rotation's deletions are done;
        re-raise a background error."""
        try:
            if self._writer is not None:
                self._writer.wait()
        finally:
            deleter.wait()

    def close(self) -> None:
        """Wait for pending saves and stop the background writer."""
        try:
            if self._writer is not None:
                self._writer.close()
        finally:
            deleter.wait()

    # ------------------------------------------------------------ restoring

    def restore(
        self,
        model: Any,
        save_path: str | os.PathLike[str],
        *,
        strict: bool = True,
        verify: bool | None = None,
        dtype: torch.dtype | None = None,
        map_location: str | torch.device | None = None,
    ) -> RestoreResult:
        """Load a checkpoint into ``model`` (an ``nn.Module``, in place) or a mapping of tensors.

        Args:
            model: the target; ties between its tensors are kept.
            save_path: a path returned by ``save`` (``.safetensors`` may be left off), or the prefix of
                a TF checkpoint saved from one of our exported graphs (``saving/tf_restore.py``).
            strict: missing or unexpected keys are an error (shape/dtype differences always are).
            verify: check the checksums (default: the saver's ``verify``).
            dtype: cast the file's floating-point tensors to this dtype (e.g. an fp32 checkpoint
                into a bf16 model); without it a dtype difference is an error.
            map_location: device of the tensors created by the restore: a module on the ``meta``
                device is materialised there (CPU by default), as ``load_state_dict(assign=True)``.

        Returns:
            ``RestoreResult(missing_keys, unexpected_keys)``, both empty when strict.

        Raises:
            CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError, StateMismatchError.
        """
        self.wait()
        store, path = self._store_of(save_path)
        return restore_path(model, store, path, strict=strict,
                            verify=self.verify if verify is None else verify, dtype=dtype,
                            map_location=map_location)


def _absolute(path: str) -> str:
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)
