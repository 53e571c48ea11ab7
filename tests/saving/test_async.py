"""Async saving: the background writer and snapshot on their own, then through the Saver."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_saver.saving.async_writer import AsyncWriter, snapshot

ROOT = Path(__file__).resolve().parents[2]


def _run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# --- snapshot --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [snapshot, lambda t: AsyncWriter().snapshot(t)], ids=["module", "writer"])
def test_snapshot_is_isolated_from_in_place_updates(make):
    w = torch.randn(8, 4)
    b = torch.randn(4)
    before = {"w": w.clone(), "b": b.clone()}
    frozen = make({"w": w, "b": b})
    w.add_(1.0)
    b.zero_()
    assert torch.equal(frozen["w"], before["w"])
    assert torch.equal(frozen["b"], before["b"])
    assert frozen["w"].device.type == "cpu"


def test_snapshot_keeps_tied_and_overlapping_views_aliased():
    base = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    tensors = {
        "emb": base,
        "head": base.detach(),  # a tie, as state_dict() hands it out: another object, same memory
        "rows": base[1:3],
        "t": base.t(),
    }
    frozen = snapshot(tensors)
    for name, t in tensors.items():
        assert torch.equal(frozen[name], t), name
        assert frozen[name].stride() == t.stride(), name
    assert frozen["emb"].data_ptr() == frozen["head"].data_ptr()
    assert frozen["rows"].data_ptr() == frozen["emb"].data_ptr() + 3 * 4
    assert frozen["emb"].data_ptr() != base.data_ptr()
    frozen["emb"][1, 0] = -1.0  # one memory: a write through one name shows through all of them
    assert frozen["head"][1, 0] == -1 and frozen["rows"][0, 0] == -1 and frozen["t"][0, 1] == -1
    assert base[1, 0] == 3.0


def test_snapshot_copies_disjoint_views_separately_and_densely():
    flat = torch.arange(1000, dtype=torch.float32)
    a, b = flat[:10], flat[990:]
    frozen = snapshot({"a": a, "b": b})
    assert torch.equal(frozen["a"], a) and torch.equal(frozen["b"], b)
    span = abs(frozen["b"].data_ptr() - frozen["a"].data_ptr())
    assert span < 1000  # not the 4 KB source span between them
    assert frozen["a"].untyped_storage().nbytes() < 4000


DTYPES = [
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64,
]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_snapshot_round_trips_every_dtype_and_odd_shapes(dtype):
    g = torch.Generator().manual_seed(0)
    src = (torch.randn(5, 7, generator=g) * 10).to(dtype)
    tensors = {
        "plain": src,
        "scalar": src[0, 0].clone(),
        "empty": src[:0],
        "noncontig": src[:, ::2],
        "odd": src[1:2, 1:4].clone(),  # 3 elements of a 1-byte dtype: the next block stays aligned
        "cl": torch.randn(2, 3, 4, 5, generator=g).to(dtype).to(memory_format=torch.channels_last),
    }
    frozen = snapshot(tensors)
    assert list(frozen) == list(tensors)
    for name, t in tensors.items():
        got = frozen[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name


def test_writer_reuses_its_arena_only_when_no_snapshot_tensor_is_alive():
    writer = AsyncWriter()
    state = {"w": torch.randn(256)}
    first = writer.snapshot(state)
    ptr = first["w"].data_ptr()
    kept = first["w"]
    del first
    second = writer.snapshot(state)
    assert second["w"].data_ptr() != ptr  # ``kept`` still points into the first arena
    old = kept.clone()
    state["w"].add_(1.0)
    del second
    third = writer.snapshot(state)
    assert torch.equal(kept, old)
    assert torch.equal(third["w"], state["w"])
    del kept, third
    fourth = writer.snapshot(state)
    assert fourth["w"].data_ptr() == ptr
    assert len(writer._arenas) == 1  # the spare arena is let go: memory stays one snapshot
    writer.close()


def test_writer_reuses_the_arena_of_a_finished_job():
    writer = AsyncWriter()
    state = {"w": torch.randn(1024)}
    seen: list[float] = []
    frozen = writer.snapshot(state)
    ptr = frozen["w"].data_ptr()
    writer.submit(lambda f=frozen: seen.append(float(f["w"].sum())))
    del frozen
    writer.wait()
    again = writer.snapshot(state)
    assert again["w"].data_ptr() == ptr
    writer.close()


# --- the writer ------------------------------------------------------------------------------------


def test_submit_returns_at_once_and_wait_blocks_until_done():
    writer = AsyncWriter()
    release = threading.Event()
    done: list[int] = []

    def job():
        release.wait(5)
        done.append(1)

    start = time.perf_counter()
    writer.submit(job)
    assert time.perf_counter() - start < 1.0
    assert writer.pending == 1 and not done
    threading.Timer(0.2, release.set).start()
    writer.wait()
    assert done == [1] and writer.pending == 0
    writer.close()


def test_at_most_one_in_flight_a_second_submit_waits_for_the_first():
    writer = AsyncWriter(max_in_flight=1)
    release = threading.Event()
    order: list[str] = []
    writer.submit(lambda: (release.wait(5), order.append("first")))
    second_queued = threading.Event()

    def submit_second():
        writer.submit(lambda: order.append("second"))
        second_queued.set()

    t = threading.Thread(target=submit_second)
    t.start()
    assert not second_queued.wait(0.3)  # blocked behind the first job
    release.set()
    assert second_queued.wait(5)
    t.join()
    writer.wait()
    assert order == ["first", "second"]
    writer.close()


def test_jobs_run_in_submission_order_with_a_deeper_queue():
    writer = AsyncWriter(max_in_flight=3)
    order: list[int] = []
    for i in range(10):
        writer.submit(lambda i=i: (time.sleep(0.001), order.append(i)))
    writer.wait()
    assert order == list(range(10))
    writer.close()


def test_a_job_error_is_raised_by_wait_exactly_once():
    writer = AsyncWriter()
    writer.submit(lambda: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        writer.wait()
    writer.wait()  # reported already; nothing is pending
    writer.close()


def test_a_job_error_is_raised_by_the_next_submit_and_the_new_job_is_not_run():
    writer = AsyncWriter()
    ran: list[str] = []

    def bad():
        raise ValueError("write failed for ckpt_3.safetensors")

    writer.submit(bad)
    with pytest.raises(ValueError, match="ckpt_3"):
        writer.submit(lambda: ran.append("next"))
    writer.wait()
    assert ran == []
    writer.submit(lambda: ran.append("after"))
    writer.wait()
    assert ran == ["after"]
    writer.close()


def test_a_job_error_is_raised_by_the_next_snapshot():
    writer = AsyncWriter()
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.snapshot({"w": torch.zeros(2)})
    writer.close()


def test_wait_from_inside_a_job_is_refused_instead_of_deadlocking():
    writer = AsyncWriter()
    writer.submit(writer.wait)
    with pytest.raises(RuntimeError, match="wait for itself"):
        writer.wait()
    writer.close()


def test_closed_writer_refuses_jobs_and_bad_limits_are_refused():
    writer = AsyncWriter()
    writer.close()
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(lambda: None)
    with pytest.raises(ValueError, match="max_in_flight must be >= 1, got 0"):
        AsyncWriter(max_in_flight=0)


def test_interpreter_exit_waits_for_pending_jobs(tmp_path):
    target = tmp_path / "done.txt"
    child = _run_child(
        """
        import sys, time
        from lightning_saver.saving.async_writer import AsyncWriter
        w = AsyncWriter()
        def job():
            time.sleep(0.5)
            open(sys.argv[1], "w").write("durable")
        w.submit(job)
        print("exiting")
        """,
        str(target),
    )
    assert child.returncode == 0, child.stderr
    assert target.read_text() == "durable"


def test_an_error_at_exit_is_logged_not_lost():
    child = _run_child(
        """
        from lightning_saver.saving.async_writer import AsyncWriter
        w = AsyncWriter()
        def job():
            raise OSError(28, "No space left on device: ckpt_7.safetensors")
        w.submit(job)
        """
    )
    assert "async checkpoint save failed before exit" in child.stderr
    assert "ckpt_7.safetensors" in child.stderr
