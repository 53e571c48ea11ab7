"""Background writer for async saves, and the CPU snapshot that makes them safe.

An async save is two steps: ``snapshot`` copies the tensors into CPU memory that the training loop
cannot touch, then ``submit`` hands a job that writes that copy to a background thread. Jobs run one
after another in submission order, so the commit protocol (data file, state file, then rotation)
keeps its order across saves. The snapshot and its reusable arenas live in
:mod:`lightning_saver.saving.snapshot_arena` (``snapshot`` is re-exported here).

Interface the saver relies on:

* ``AsyncWriter(max_in_flight=1)``
* ``writer.snapshot(tensors)``: first waits until fewer than ``max_in_flight`` jobs are pending
  (re-raising a failed job's error), then copies the tensors into a reusable CPU arena.
  ``snapshot(tensors, defer=names)`` leaves the copies of ``names`` (``True``: all) to the writer
  thread, which makes them before the next submitted job runs; ``writer.wait_snapshot()`` must be
  called before those tensors change (see :mod:`lightning_saver.saving.deferred_copy`).
* ``writer.snapshot_image(tensors, plan, defer=...)``: the same, into an image of the file
  (:mod:`lightning_saver.saving.snapshot_image`), which the job writes as it is.
* ``writer.submit(job)``: blocks while ``max_in_flight`` jobs are pending; re-raises a previous job's
  error first; then runs ``job`` in the background.
* ``writer.wait()``: blocks until every submitted job finished; re-raises the first unreported error.
* ``writer.close()``: ``wait()``, stop the thread, free the arenas (also run at interpreter exit).
* ``writer.cpu_seconds``: CPU time the writer thread spent in jobs, which training loses about 1:1.
* ``snapshot(tensors)``: the module-level one-off snapshot, freshly allocated every time.

Example::

    writer = AsyncWriter()
    frozen = writer.snapshot(model.state_dict())
    writer.submit(lambda: save_file(frozen, "ckpt.safetensors"))
    ...                      # training goes on, in-place updates do not reach ``frozen``
    writer.wait()            # durable now, or the writer's error is raised here
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Collection, Mapping
from functools import partial

import torch

from lightning_saver.formats import checksum
from lightning_saver.formats.file_image import FileImage, ImagePlan
from lightning_saver.saving import thread_priority
from lightning_saver.saving.deferred_copy import DeferredCopy
from lightning_saver.saving.snapshot_arena import Arena, snapshot, snapshot_deferred, take_arena
from lightning_saver.saving.snapshot_image import snapshot_image

__all__ = ["AsyncWriter", "snapshot"]

logger = logging.getLogger(__name__)

_LIVE: weakref.WeakSet[AsyncWriter] = weakref.WeakSet()


class AsyncWriter:
    """Run save jobs on one background thread, at most ``max_in_flight`` pending at a time.

    Args:
        max_in_flight: how many submitted jobs may be pending before ``snapshot``/``submit`` block.
        niceness: on Linux the writer thread runs this much nicer than the process (0: as nice),
            so that training keeps the cores: measured on 2 busy cores, training steps ran 1.9-2.2x
            slower while a writer at the process's priority saved, 1.2-1.35x with 10. Its checksums
            and copies run on the thread itself, not on the normal-priority checksum helper. With
            ``thread_priority.USE_IDLE`` it runs each job at ``SCHED_IDLE`` and idle I/O priority
            instead, and anyone who blocks on it (``wait``, the next ``snapshot``/``submit``,
            ``close``, a deferred copy's fence) raises it back first, so nothing waits on a starved
            thread (see :mod:`lightning_saver.saving.thread_priority`). A training thread that needs
            a deferred copy does the copying itself, so it never waits on the slow writer.
            A job that someone already waits on when the writer takes it is not lowered: the
            caller is blocked on it, so it runs at the caller's priority.

    Raises:
        ValueError: ``max_in_flight`` is smaller than 1.

    Example::

        writer = AsyncWriter(max_in_flight=1)
        frozen = writer.snapshot(state)
        writer.submit(lambda: write(frozen))
        writer.wait()
    """

    def __init__(self, max_in_flight: int = 1, *, niceness: int = 10) -> None:
        if max_in_flight < 1:
            raise ValueError(f"AsyncWriter: max_in_flight must be >= 1, got {max_in_flight}")
        self.max_in_flight = max_in_flight
        self.niceness = niceness
        self._cond = threading.Condition()
        self._jobs: deque[Callable[[], object]] = deque()
        self._pending = 0
        self._errors: deque[BaseException] = deque()
        self._thread: threading.Thread | None = None
        self._arenas: list[Arena] = []
        self._closed = False
        self._unsubmitted: DeferredCopy | None = None  # the last snapshot's copy, until a job takes it
        self._fence: DeferredCopy | None = None  # the last deferred copy not known to be complete
        self._level: thread_priority.Lowered | None = None  # the writer thread's priority, once lowered
        self._waiters = 0  # threads blocked on a job: while any is, the writer keeps normal priority
        self.cpu_seconds = 0.0  # CPU time the writer thread spent in jobs (what training may lose)
        _LIVE.add(self)

    # --- snapshots -------------------------------------------------------------------------------
    def snapshot(
        self, tensors: Mapping[str, torch.Tensor], *, defer: Collection[str] | bool = False
    ) -> dict[str, torch.Tensor]:
        """Wait for a free slot, then copy ``tensors`` into a reused CPU arena.

        Waiting first means the arena of the job that just finished is reused, so an async saver holds
        one snapshot of extra memory and pays no page faults after its first save. The copies stay
        valid while any tensor of them is referenced; the arena is reused only once none is.

        Args:
            tensors: name -> tensor.
            defer: names (``True``: all) whose copy may wait: the writer thread makes it before the
                next submitted job, and :meth:`wait_snapshot` must be called before they change.

        Raises:
            Exception: the error of an earlier job that nobody has seen yet.
        """
        self._acquire_slot()
        self.wait_snapshot()  # an earlier deferred copy that no job took: finish it first
        frozen, deferred = snapshot_deferred(tensors, self._take_arena, defer)
        self._hold(deferred)
        return frozen

    def snapshot_image(
        self, tensors: Mapping[str, torch.Tensor], plan: ImagePlan, *, defer: Collection[str] | bool = False
    ) -> FileImage:
        """:meth:`snapshot`, copying into a reused image of the safetensors file laid out by ``plan``
        (with the tensors' checksums), which the job then writes as it is
        (:mod:`lightning_saver.saving.snapshot_image`). Same waiting, reuse and ``defer``."""
        self._acquire_slot()
        self.wait_snapshot()
        image, deferred = snapshot_image(tensors, plan, self._take_arena, defer)
        self._hold(deferred)
        return image

    def _hold(self, deferred: DeferredCopy | None) -> None:
        if deferred is not None:
            with self._cond:
                self._unsubmitted = self._fence = deferred

    def wait_snapshot(self) -> None:
        """Return once the last snapshot's deferred copies are complete (made here if the writer has
        not started them): call it before the snapshotted tensors change. Cheap when there are none."""
        fence = self._fence
        if fence is None:
            return
        fence.wait(on_block=self._hurry)  # the writer may be copying a piece, at idle priority
        with self._cond:
            if self._fence is fence:
                self._fence = None
            if self._unsubmitted is fence:
                self._unsubmitted = None

    def _take_arena(self, nbytes: int, pinned: bool) -> torch.Tensor:
        with self._cond:
            return take_arena(self._arenas, nbytes, pinned)

    # --- jobs ------------------------------------------------------------------------------------
    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job`` for the background thread.

        Raises:
            Exception: an earlier job's unreported error (the new job is then not queued).
            RuntimeError: the writer is closed.
        """
        with self._cond:
            self._wait_for_slot()
            if self._closed:
                raise RuntimeError("AsyncWriter.submit: the writer is closed; create a new one")
            if self._unsubmitted is not None:  # the job reads the snapshot: the copy comes first
                job = partial(_copy_then, self._unsubmitted, job)
                self._unsubmitted = None
            self._jobs.append(job)
            self._pending += 1
            self._start_thread()
            self._cond.notify_all()

    def _acquire_slot(self) -> None:
        with self._cond:
            self._wait_for_slot()
            if self._closed:
                raise RuntimeError("AsyncWriter.snapshot: the writer is closed; create a new one")

    def _wait_for_slot(self) -> None:
        self._check_not_worker("submit")
        self._raise_error()
        while self._pending >= self.max_in_flight:
            self._block_on_writer()
        self._raise_error()

    def _block_on_writer(self) -> None:
        """Wait once on the condition (held), with the writer at normal priority meanwhile: a
        ``SCHED_IDLE`` writer behind a busy loop could otherwise starve while we wait for it."""
        self._waiters += 1
        try:
            self._hurry_locked()
            self._cond.wait()
        finally:
            self._waiters -= 1

    def _hurry_locked(self) -> None:
        if self._level is not None:  # raise_again undoes only what is undoable: a no-op otherwise
            self._level = thread_priority.raise_again(self._level)

    def _hurry(self) -> None:
        with self._cond:
            self._hurry_locked()

    def wait(self) -> None:
        """Block until every submitted job has finished.

        Raises:
            Exception: the first error of a job that was not reported yet (each is raised once).
        """
        self._check_not_worker("wait")
        self.wait_snapshot()
        with self._cond:
            while self._pending:
                self._block_on_writer()
            self._raise_error()

    def close(self) -> None:
        """Wait for pending jobs, then stop the thread and free the snapshot arenas. Idempotent."""
        try:
            self.wait()
        finally:
            with self._cond:
                self._closed = True
                self._arenas.clear()
                self._cond.notify_all()
            thread = self._thread
            if thread is not None and thread is not threading.current_thread():
                thread.join()

    @property
    def pending(self) -> int:
        """How many submitted jobs have not finished yet."""
        with self._cond:
            return self._pending

    def _raise_error(self) -> None:
        if self._errors:
            raise self._errors.popleft()

    def _check_not_worker(self, what: str) -> None:
        if self._thread is not None and threading.current_thread() is self._thread:
            raise RuntimeError(f"AsyncWriter.{what} called from inside a job would wait for itself")

    def _start_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            # daemon, so a forgotten writer never hangs exit; the atexit hook waits for its jobs
            self._thread = threading.Thread(target=self._run, name="lightning-saver-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        # the checksums and copies of a save run here, at this thread's priority: handed to the
        # shared helper thread they would run at normal priority, beside training
        checksum.keep_in_this_thread()
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return
                job = self._jobs.popleft()
                if not self._waiters:  # under the lock: a waiter's _hurry_locked cannot interleave
                    # lowers only what was undone since (a no-op for a reniced or refused thread)
                    self._level = thread_priority.lower(self.niceness, self._level)
            error: BaseException | None = None
            cpu = time.thread_time()
            try:
                job()
            except BaseException as exc:  # handed to the caller by wait()/submit(), never swallowed
                error = exc
            del job  # drop the snapshot now, so its arena is free for the next save
            cpu = time.thread_time() - cpu
            with self._cond:
                self.cpu_seconds += cpu
                if error is not None:
                    self._errors.append(error)
                    del error
                self._pending -= 1
                self._cond.notify_all()

    def _reset_after_fork(self) -> None:
        # the child has no writer thread; the parent still owns and finishes the pending jobs
        self._cond = threading.Condition()
        self._jobs.clear()
        self._pending = 0
        self._thread = None
        self._fence = self._unsubmitted = None
        self._level, self._waiters = None, 0


def _copy_then(copy: DeferredCopy, job: Callable[[], object]) -> object:
    copy.complete()
    return job()


def _close_all_at_exit() -> None:
    for writer in list(_LIVE):
        while True:  # close() raises one error at a time; report every one, nobody else will
            try:
                writer.close()
                break
            except Exception:
                logger.exception("lightning_saver: an async checkpoint save failed before exit")


def _reset_all_after_fork() -> None:
    for writer in list(_LIVE):
        writer._reset_after_fork()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_after_fork)
