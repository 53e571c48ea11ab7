"""Async saving: the background writer and snapshot on their own, then through the Saver."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

from lightning_saver.saving import writing
from lightning_saver.saving.async_writer import AsyncWriter, snapshot
from lightning_saver.saving.saver import CheckpointSaver, latest_checkpoint, load

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


def test_interpreter_exit_waits_for_pending_jobs_and_logs_their_errors(tmp_path):
    target = tmp_path / "done.txt"
    child = _run_child(
        """
        import sys, time
        from lightning_saver.saving.async_writer import AsyncWriter
        w = AsyncWriter(max_in_flight=2)
        def job():
            time.sleep(0.5)
            open(sys.argv[1], "w").write("durable")
        def bad():
            raise OSError(28, "No space left on device: ckpt_7.safetensors")
        w.submit(job)
        w.submit(bad)
        print("exiting")
        """,
        str(target),
    )
    assert child.returncode == 0, child.stderr
    assert target.read_text() == "durable"
    assert "async checkpoint save failed before exit" in child.stderr
    assert "ckpt_7.safetensors" in child.stderr


# --- through the Saver -----------------------------------------------------------------------------


class _Gate:
    """Holds every checkpoint write until released, so tests can act while a save is in flight."""

    def __init__(self, monkeypatch, fail: BaseException | None = None) -> None:
        self.release = threading.Event()
        self.started = threading.Event()
        self.fail = fail
        original = writing.write_safetensors  # the file write, whichever way (image, tensors)

        def gated(*args, **kwargs):
            self.started.set()
            assert self.release.wait(10), "the test never released the write"
            if self.fail is not None:
                raise self.fail
            return original(*args, **kwargs)

        monkeypatch.setattr(writing, "write_safetensors", gated)


def _files(*steps: int) -> list[str]:
    return ["lightning_saver_state.json"] + [f"m_{s}.safetensors" for s in steps]


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Linear(8, 4))


def test_async_save_returns_before_the_write_and_snapshots_the_parameters(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch)
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saver = CheckpointSaver(max_to_keep=3, async_save=True)
    path = saver.save(model, str(tmp_path / "m"), global_step=1)
    assert gate.started.wait(5)
    assert not Path(path).exists()  # still writing: save() did not wait for it
    with torch.no_grad():  # a training step's in-place updates, after save() returned
        for p in model.parameters():
            p.mul_(-3.0).add_(1.0)
    gate.release.set()
    saver.wait()
    loaded = load(path)
    for name, value in before.items():
        assert torch.equal(loaded[name], value), name
    assert latest_checkpoint(tmp_path) == path
    saver.close()


def test_async_error_is_raised_by_the_next_save_and_by_wait(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch, fail=OSError(errno.EIO, "Input/output error (injected)"))
    saver = CheckpointSaver(max_to_keep=3, async_save=True)
    saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=1)
    gate.release.set()
    with pytest.raises(OSError, match="injected"):
        saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=2)
    saver.wait()  # that error was reported once; nothing else pending
    assert os.listdir(tmp_path) == []  # neither save left a file behind

    saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=3)
    with pytest.raises(OSError, match="injected"):
        saver.wait()
    assert latest_checkpoint(tmp_path) is None
    gate.fail = None
    saver.save({"w": torch.full((4,), 4.0)}, str(tmp_path / "m"), global_step=4)
    saver.wait()
    assert float(load(latest_checkpoint(tmp_path))["w"][0]) == 4.0
    saver.close()


def test_async_at_most_one_save_in_flight(tmp_path, monkeypatch):
    gate = _Gate(monkeypatch)
    saver = CheckpointSaver(max_to_keep=3, async_save=True)
    saver.save({"w": torch.ones(4)}, str(tmp_path / "m"), global_step=1)
    assert gate.started.wait(5)
    second_returned = threading.Event()

    def second():
        saver.save({"w": torch.full((4,), 2.0)}, str(tmp_path / "m"), global_step=2)
        second_returned.set()

    t = threading.Thread(target=second)
    t.start()
    assert not second_returned.wait(0.3)  # waits for the first save before snapshotting
    gate.release.set()
    assert second_returned.wait(5)
    t.join()
    saver.wait()
    assert sorted(os.listdir(tmp_path)) == _files(1, 2)
    saver.close()


def test_async_rotation_deletes_only_after_the_new_checkpoint_is_durable(tmp_path, monkeypatch):
    saver = CheckpointSaver(max_to_keep=2, async_save=True)
    for step in (1, 2):
        saver.save({"w": torch.full((4,), float(step))}, str(tmp_path / "m"), global_step=step)
    saver.wait()
    seen: list[tuple[str, str | None]] = []
    original = CheckpointSaver._delete

    def spy(path: str) -> None:
        newest = latest_checkpoint(tmp_path, verify=True)  # recorded in the state file and intact
        seen.append((os.path.basename(path), None if newest is None else os.path.basename(newest)))
        original(path)

    monkeypatch.setattr(CheckpointSaver, "_delete", staticmethod(spy))
    gate = _Gate(monkeypatch)
    saver.save({"w": torch.full((4,), 3.0)}, str(tmp_path / "m"), global_step=3)
    assert gate.started.wait(5)
    time.sleep(0.05)
    assert seen == [] and (tmp_path / "m_1.safetensors").exists()  # nothing deleted while writing
    gate.release.set()
    saver.wait()
    assert seen == [("m_1.safetensors", "m_3.safetensors")]
    assert sorted(os.listdir(tmp_path)) == _files(2, 3)
    saver.close()


def test_async_saves_from_a_process_that_exits_without_wait_are_complete(tmp_path):
    child = _run_child(
        """
        import sys, torch
        from lightning_saver.saving.saver import CheckpointSaver
        saver = CheckpointSaver(max_to_keep=2, async_save=True)
        for step in range(3):
            w = torch.arange(2_000_000, dtype=torch.float32) + step  # 8 MB: the write takes a while
            saver.save({"w": w}, sys.argv[1] + "/m", global_step=step)
        print("returned")  # no wait(): interpreter exit must finish the last save
        """,
        str(tmp_path),
    )
    assert child.returncode == 0, child.stderr
    assert sorted(os.listdir(tmp_path)) == _files(1, 2)
    latest = latest_checkpoint(tmp_path, verify=True)
    assert latest == str(tmp_path / "m_2.safetensors")
    assert torch.equal(load(latest)["w"], torch.arange(2_000_000, dtype=torch.float32) + 2)


def test_without_a_storage_use_count_the_writer_never_pools(monkeypatch):
    monkeypatch.delattr(torch._C, "_storage_Use_Count")
    writer = AsyncWriter()
    state = {"w": torch.randn(64)}
    for _ in range(3):
        frozen = writer.snapshot(state)
        assert torch.equal(frozen["w"], state["w"])
        del frozen
    assert writer._arenas == []
    writer.close()


def test_snapshot_resolves_lazy_conjugate_and_negative_views():
    z = torch.complex(torch.randn(6), torch.randn(6))
    frozen = snapshot({"conj": z.conj(), "neg": z.conj().imag, "z": z})
    assert torch.equal(frozen["conj"], z.conj()) and torch.equal(frozen["neg"], z.conj().imag)
    assert not frozen["conj"].is_conj()
    assert torch.equal(frozen["z"], z)


def test_concurrent_snapshots_never_share_an_arena():
    writer = AsyncWriter(max_in_flight=4)
    state = {"w": torch.arange(100_000, dtype=torch.float32)}
    results: list[dict[str, torch.Tensor]] = []
    lock = threading.Lock()

    def take(i: int) -> None:
        frozen = writer.snapshot({"w": state["w"] + i})
        with lock:
            results.append(frozen)

    threads = [threading.Thread(target=take, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r["w"].data_ptr() for r in results}) == 4
    assert sorted(float(r["w"][0]) for r in results) == [0.0, 1.0, 2.0, 3.0]
    writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.snapshot(state)
