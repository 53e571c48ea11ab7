"""How a background thread yields the CPU and the disk to training, and takes them back when waited on.

Linux applies scheduling policy, nice value and I/O priority per thread, so the async writer can run
its own thread at the lowest priority and leave the training threads alone. Elsewhere every call here
is a no-op (``setpriority`` on a thread id would renice the whole process on other systems).

* :func:`lower` (the thread itself): ``niceness`` nicer, once (unprivileged code cannot undo it, but
  a reniced thread never starves). With :data:`USE_IDLE` set: ``SCHED_IDLE`` instead -- the thread
  runs only on a core that no normal thread wants, so it never preempts a torch worker -- where this
  process may undo that later (see :func:`can_undo_idle`), and the idle I/O class (``ioprio_set``).
* :func:`raise_again` (any thread of the process, e.g. one about to wait for the writer): back to
  ``SCHED_OTHER`` and best-effort I/O. A ``SCHED_IDLE`` thread can starve behind a busy loop; whoever
  waits for it must call this first, so that a wait is never a wait on a starved thread.

Example::

    level = lower(10)                 # on the writer thread, before a job
    ...
    raise_again(level)                # on the training thread, before it blocks on that job
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
import threading
from dataclasses import dataclass

__all__ = ["USE_IDLE", "Lowered", "can_undo_idle", "lower", "raise_again"]

logger = logging.getLogger(__name__)

# Off by default: on the shared 2-core VM of issue #17 (load 2.5-3.7 from other jobs) no measurement
# could tell SCHED_IDLE from nice 10 (benchmarks/lightning_overhead.py --setups "Saver async idle"
# compares them); turn it on where a quiet machine shows that it helps.
USE_IDLE = False

_LINUX = sys.platform.startswith("linux")
_IOPRIO_WHO_PROCESS = 1  # with a thread id: that thread only
_IOPRIO_CLASS_SHIFT = 13
_IOPRIO_IDLE = 3 << _IOPRIO_CLASS_SHIFT
_IOPRIO_BEST_EFFORT = (2 << _IOPRIO_CLASS_SHIFT) | 4  # the default class and level
# the ioprio_set syscall number of this machine (None: not known here, no I/O priorities)
_SYS_IOPRIO_SET = {"x86_64": 251, "aarch64": 30, "arm64": 30}.get(os.uname().machine) if _LINUX else None


@dataclass
class Lowered:
    """What :func:`lower` did to one thread: ``how`` is ``"idle"``, ``"nice"``, ``"refused"`` (the
    system said no; not tried again) or ``""`` (nothing yet)."""

    tid: int
    how: str
    io_idle: bool = False


def _ioprio_set(tid: int, value: int) -> bool:
    if _SYS_IOPRIO_SET is None:
        return False
    return int(_libc().syscall(_SYS_IOPRIO_SET, _IOPRIO_WHO_PROCESS, tid, value)) == 0


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


_undo_idle: bool | None = None
_undo_lock = threading.Lock()


def can_undo_idle() -> bool:
    """Whether a thread of this process that went ``SCHED_IDLE`` may be put back to ``SCHED_OTHER``.

    Linux allows that only with ``CAP_SYS_NICE`` or an ``RLIMIT_NICE`` that covers the nice value,
    so it is tried once, on a throwaway thread, and remembered.
    """
    global _undo_idle
    with _undo_lock:
        if _undo_idle is None:
            _undo_idle = False
            if _LINUX and hasattr(os, "SCHED_IDLE"):
                thread = threading.Thread(target=_probe_undo, name="lightning-saver-priority-probe")
                thread.start()
                thread.join()
        return _undo_idle


def _probe_undo() -> None:
    global _undo_idle
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        _undo_idle = True
    except OSError as exc:  # EPERM: unprivileged, RLIMIT_NICE too small; this thread just ends
        logger.debug("SCHED_IDLE cannot be undone here (%s): the writer is reniced instead", exc)


def lower(niceness: int, previous: Lowered | None = None) -> Lowered:
    """Lower the calling thread's CPU and I/O priority (see the module docs); ``niceness <= 0``: keep it.

    ``previous``: what an earlier call did to this thread (after :func:`raise_again`): only what was
    undone is lowered again, so a thread is never reniced twice.
    """
    tid = threading.get_native_id()
    if niceness <= 0 or not _LINUX:
        return Lowered(tid, "")
    if previous is None or previous.tid != tid:
        previous = Lowered(tid, "")
    how = previous.how
    try:
        if how:
            pass
        elif USE_IDLE and can_undo_idle():
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            how = "idle"
        else:
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + niceness))
            how = "nice"
    except OSError as exc:  # a sandbox that forbids it: the thread keeps its priority
        logger.debug("could not lower the writer thread's priority: %s", exc)
        how = "refused"
    io_idle = previous.io_idle or (how == "idle" and _ioprio_set(tid, _IOPRIO_IDLE))
    return Lowered(tid, how, io_idle)


def raise_again(level: Lowered) -> Lowered:
    """Undo what :func:`lower` did to ``level.tid`` where that is allowed; returns the new state.

    A reniced thread stays reniced (unprivileged code cannot lower a nice value; it never starves).
    """
    how = level.how
    if how == "idle":
        try:
            os.sched_setscheduler(level.tid, os.SCHED_OTHER, os.sched_param(0))
            how = ""
        except OSError as exc:  # the thread has ended, or the permission went away
            logger.debug("could not raise the writer thread's priority: %s", exc)
    io_idle = level.io_idle and not _ioprio_set(level.tid, _IOPRIO_BEST_EFFORT)
    return Lowered(level.tid, how, io_idle)
