"""The async writer's thread at idle priority: lowered for its jobs, raised again for whoever waits.

Checked against the kernel itself (``sched_getscheduler``, ``getpriority``, the ``ioprio_get``
syscall), and with every core kept busy by spinning processes.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import google_crc32c
import pytest
import torch

from lightning_saver.formats import checksum
from lightning_saver.saving import thread_priority
from lightning_saver.saving.async_writer import AsyncWriter
from lightning_saver.saving.deferred_copy import DeferredCopy
from lightning_saver.saving.saver import CheckpointSaver, load

ROOT = Path(__file__).resolve().parents[2]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="per-thread scheduling policy, nice and I/O priority are Linux-only")
needs_undo = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and thread_priority.can_undo_idle()),
    reason="this process may not undo SCHED_IDLE (no CAP_SYS_NICE, RLIMIT_NICE too small)",
)


@pytest.fixture
def idle(monkeypatch):
    monkeypatch.setattr(thread_priority, "USE_IDLE", True)


def _ioprio_class(tid: int) -> int:
    number = {"x86_64": 252, "aarch64": 31}.get(os.uname().machine)
    if number is None:
        pytest.skip(f"ioprio_get's syscall number is known here for x86_64 and aarch64 only, "
                    f"not {os.uname().machine}")
    value = ctypes.CDLL(None, use_errno=True).syscall(number, 1, tid)
    assert value >= 0, os.strerror(ctypes.get_errno())
    return int(value) >> 13


def _writer_policy(writer: AsyncWriter) -> tuple[int, int]:
    """(scheduling policy, I/O class) of the writer's thread, read back from the kernel inside a job."""
    seen: list[tuple[int, int]] = []
    done = threading.Event()

    def job() -> None:
        tid = threading.get_native_id()
        seen.append((os.sched_getscheduler(0), _ioprio_class(tid)))
        done.set()

    writer.submit(job)
    assert done.wait(30)  # not writer.wait(): a thread waiting in there raises the writer
    writer.wait()
    return seen[0]


@needs_undo
def test_a_job_runs_at_idle_priority_and_the_thread_is_raised_for_a_waiter(idle):
    writer = AsyncWriter()
    started, release = threading.Event(), threading.Event()
    tids: list[int] = []

    def slow() -> None:
        tids.append(threading.get_native_id())
        started.set()
        release.wait(10)

    writer.submit(slow)
    assert started.wait(10)
    tid = tids[0]
    assert os.sched_getscheduler(tid) == os.SCHED_IDLE
    assert _ioprio_class(tid) == 3  # IOPRIO_CLASS_IDLE
    threading.Timer(0.3, release.set).start()
    writer.wait()  # blocks on the job: raises the thread first
    assert os.sched_getscheduler(tid) == os.SCHED_OTHER
    assert _ioprio_class(tid) == 2  # best effort, the default
    assert _writer_policy(writer)[0] == os.SCHED_IDLE  # the next job, nobody waiting: idle again
    writer.close()


@linux_only
@pytest.mark.parametrize("use_idle", [True, False], ids=["idle-refused", "default"])
def test_where_idle_cannot_be_undone_the_writer_is_reniced_once(monkeypatch, use_idle):
    monkeypatch.setattr(thread_priority, "USE_IDLE", use_idle)
    monkeypatch.setattr(thread_priority, "_undo_idle", False)
    writer = AsyncWriter(niceness=7)
    nice: list[int] = []
    for _ in range(3):
        ran = threading.Event()

        def job(ran: threading.Event = ran) -> None:
            nice.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
            ran.set()

        writer.submit(job)
        assert ran.wait(10)  # taken with nobody waiting (a job already waited on is not lowered)
        writer.wait()  # cannot undo a renice: the thread stays as nice
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert nice == [min(19, base + 7)] * 3
    assert _writer_policy(writer)[0] == os.SCHED_OTHER
    writer.close()


@linux_only
def test_a_refusing_system_leaves_the_priority_and_the_jobs_still_run(monkeypatch, idle):
    def refuse(*args: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    monkeypatch.setattr(os, "setpriority", refuse)
    writer = AsyncWriter()
    done: list[int] = []
    for i in range(3):
        writer.submit(lambda i=i: done.append(i))
    writer.wait()
    assert done == [0, 1, 2]
    writer.close()


def test_niceness_zero_keeps_the_writer_at_the_process_priority():
    writer = AsyncWriter(niceness=0)
    if sys.platform.startswith("linux"):
        assert _writer_policy(writer)[0] == os.SCHED_OTHER
    writer.close()


SPIN = "import time\nend = time.monotonic() + 120\nwhile time.monotonic() < end: pass\n"


@needs_undo
def test_a_save_completes_while_every_core_is_busy(tmp_path, idle):
    """Spinning processes (at this process's priority) on every core: a SCHED_IDLE writer gets a
    sliver of a core (weight 3 against 1024 for a nice-0 spinner, 15 for a nice-19 one) until a
    caller waits for it and raises it. Each save is ~20 ms of copies and checksums."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.5)
        model = torch.nn.Linear(2048, 2048)  # 16 MiB
        saver = CheckpointSaver(async_save=True, max_to_keep=2)
        start = time.monotonic()
        for step in range(3):
            with torch.no_grad():
                model.weight.fill_(float(step))
            saver.save(model, tmp_path / "m", step)  # the next save waits for the last: raised
        saver.wait()
        elapsed = time.monotonic() - start
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert elapsed < 60, f"3 async saves of 16 MiB took {elapsed:.1f} s with every core busy"
    assert torch.equal(load(tmp_path / "m_2.safetensors")["weight"], torch.full((2048, 2048), 2.0))


def test_deferred_copy_calls_on_block_before_waiting_for_a_piece_in_progress():
    entered, release = threading.Event(), threading.Event()

    def slow_piece() -> None:
        entered.set()
        release.wait(10)

    copy = DeferredCopy([slow_piece])
    worker = threading.Thread(target=copy.complete)
    worker.start()
    assert entered.wait(10)
    calls: list[bool] = []
    copy.wait(on_block=lambda: (calls.append(True), release.set()))  # would hang without the call
    worker.join(10)
    assert calls == [True] and copy.done


def test_on_block_is_not_called_when_nothing_is_left_to_wait_for():
    ran: list[int] = []
    copy = DeferredCopy([lambda: ran.append(1)])
    copy.wait(on_block=lambda: pytest.fail("nothing to wait for"))
    assert ran == [1]


def test_a_thread_that_keeps_its_work_checksums_inline_with_the_same_result():
    data = torch.randint(0, 255, (3 << 20,), dtype=torch.uint8)
    results: dict[str, object] = {}

    def in_thread() -> None:
        checksum.keep_in_this_thread()
        results["beside"] = checksum.run_beside(lambda: None)
        crc = checksum.CrcPipeline()
        for start in range(0, data.numel(), 1 << 20):
            crc.add("x", data.data_ptr() + start, 1 << 20, total=data.numel())
        results["crc"] = crc.results()["x"]

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert results["beside"] is None  # no hand-off: the caller runs it
    assert results["crc"] == google_crc32c.value(data.numpy().tobytes())
    assert checksum.run_beside(lambda: None) is not None  # other threads still use the helper


def test_work_inside_a_writer_job_is_never_handed_to_the_normal_priority_helper():
    writer = AsyncWriter()
    got: list[object] = []
    writer.submit(lambda: got.append(checksum.run_beside(lambda: None)))
    writer.wait()
    writer.close()
    assert got == [None]  # the job does it itself, at the writer's priority
