"""Deferred snapshot copies: save() returns before the copy, the optimizer's step waits for it."""

from __future__ import annotations

import os
import sys
import threading

import pytest
import safetensors.torch
import torch
from torch import nn

from lightning_saver.saving import deferred_copy
from lightning_saver.saving.async_writer import AsyncWriter
from lightning_saver.saving.deferred_copy import DeferredCopy, step_only_names
from lightning_saver.saving.saver import CheckpointSaver

HELPER = "lightning_saver_crc"  # the name of the shared helper thread (formats/checksum.py)


class _HeldCopy:
    """Holds the writer thread before it starts a deferred copy, until released."""

    def __init__(self, monkeypatch) -> None:
        self.release = threading.Event()
        original = DeferredCopy.complete

        def held(copy: DeferredCopy) -> None:
            assert self.release.wait(10), "the test never released the writer"
            original(copy)

        monkeypatch.setattr(DeferredCopy, "complete", held)


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.BatchNorm1d(64), nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    _step(model, opt)
    return model, opt


def _step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model(torch.randn(8, 64)).square().mean().backward()
    opt.step()
    opt.zero_grad()


def _state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in model.state_dict().items()}
    for i, state in opt.state_dict()["state"].items():
        tensors.update({f"opt/{i}/{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return tensors


def _clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded-control"])
def test_a_step_right_after_save_waits_for_the_copy(tmp_path, monkeypatch, guarded):
    model, opt = _trained()
    saver = CheckpointSaver(max_to_keep=None, async_save=True)
    if guarded:
        saver.guard_optimizer(opt)
    held = _HeldCopy(monkeypatch)
    tensors = _state(model, opt)
    before = _clone(tensors)
    defer = step_only_names(tensors, [opt])  # the forward in _step changes BatchNorm's buffers
    path = saver.save(tensors, tmp_path / "m", global_step=1, defer_copy=defer)
    _step(model, opt)  # changes parameters and Adam's moments in place, at once
    held.release.set()
    saver.wait()
    on_disk = safetensors.torch.load_file(path)
    same = all(torch.equal(on_disk[k], before[k]) for k in before)
    # guarded: the step ran the copy itself before changing anything; the control shows that
    # without the guard the held writer copies the stepped values, so this test can fail
    assert same is guarded
    saver.close()


def test_tensors_not_named_for_deferring_are_copied_before_save_returns(tmp_path, monkeypatch):
    model, opt = _trained()
    saver = CheckpointSaver(max_to_keep=None, async_save=True)
    held = _HeldCopy(monkeypatch)
    tensors = _state(model, opt)
    defer = step_only_names(tensors, [opt])
    assert "1.running_mean" not in defer and "1.num_batches_tracked" not in defer
    before = _clone(tensors)
    path = saver.save(tensors, tmp_path / "m", global_step=1, defer_copy=defer)
    model(torch.randn(8, 64))  # a forward pass: BatchNorm's running statistics change in place
    assert not torch.equal(model[1].running_mean, before["1.running_mean"])
    saver.wait_snapshot()  # what a step would do
    held.release.set()
    saver.wait()
    on_disk = safetensors.torch.load_file(path)
    assert all(torch.equal(on_disk[k], before[k]) for k in before)
    saver.close()


def test_step_only_names_are_parameters_and_optimizer_state():
    model, opt = _trained()
    tensors = _state(model, opt)
    names = step_only_names(tensors, [opt])
    params = {k for k, _ in model.named_parameters()}
    moments = {k for k in tensors if k.startswith("opt/")}
    assert names == params | moments
    frozen = nn.Linear(2, 2)  # a parameter no optimizer holds is copied at once
    assert step_only_names({"f": frozen.weight}, [opt]) == set()


def test_every_piece_runs_once_whoever_takes_it():
    runs: list[int] = []
    copy = DeferredCopy([lambda i=i: runs.append(i) for i in range(50)])
    threads = [threading.Thread(target=copy.wait) for _ in range(4)]
    threads.append(threading.Thread(target=copy.complete))
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(runs) == list(range(50)) and copy.done


def test_a_waiting_thread_takes_the_pieces_a_slow_writer_has_not_reached():
    slow_started, release = threading.Event(), threading.Event()
    ran_by: dict[int, str] = {}

    def piece(i: int) -> None:
        ran_by[i] = threading.current_thread().name
        if i == 0:
            slow_started.set()
            assert release.wait(5)

    copy = DeferredCopy([lambda i=i: piece(i) for i in range(6)])
    writer = threading.Thread(target=copy.complete, name="writer")
    writer.start()
    assert slow_started.wait(5)  # the writer is stuck in piece 0
    waiter = threading.Thread(target=copy.wait, name="trainer")
    waiter.start()
    waiter.join(0.5)
    # the trainer copied pieces 1-5 (itself and the helper thread beside it) and now waits only for
    # the piece in progress
    assert {i: ran_by.get(i) in ("trainer", HELPER) for i in range(1, 6)} == dict.fromkeys(range(1, 6), True)
    assert waiter.is_alive() and not copy.done
    release.set()
    waiter.join(5)
    writer.join(5)
    assert copy.done and ran_by[0] == "writer"


def test_a_waiting_thread_copies_with_the_helper_thread_beside_it():
    # at the optimizer's fence torch's threads are idle: the copy left is shared by two threads
    both = threading.Barrier(2, timeout=5)  # broken (an error) unless two threads copy at once
    ran_by: list[str] = []

    def piece(i: int) -> None:
        if i < 2:
            both.wait()
        ran_by.append(threading.current_thread().name)

    copy = DeferredCopy([lambda i=i: piece(i) for i in range(8)])
    waiter = threading.Thread(target=copy.wait, name="trainer")
    waiter.start()
    waiter.join(10)
    assert copy.done and copy._error is None
    assert len(ran_by) == 8 and {"trainer", HELPER} <= set(ran_by)


def test_the_writer_thread_runs_nicer_than_the_process():
    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread nice values are a Linux feature")
    writer = AsyncWriter()
    seen: list[int] = []
    ran = threading.Event()

    def job() -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        ran.set()

    writer.submit(job)
    # a job that someone already waits on when the writer takes it runs at the caller's priority
    # (AsyncWriter._run): wait on the job itself, so that this one was taken with nobody waiting
    assert ran.wait(10)
    writer.wait()
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert seen == [min(19, base + 10)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == base  # the caller is untouched
    writer.close()


def test_a_failed_copy_fails_the_save_not_the_step():
    def broken() -> None:
        raise OSError("copy failed")

    copy = DeferredCopy([broken])
    copy.wait()  # the training loop goes on
    with pytest.raises(OSError, match="copy failed"):
        copy.complete()  # the save's job reports it


def test_writer_makes_deferred_copies_before_the_job_and_reuses_the_arena():
    writer = AsyncWriter()
    w = torch.arange(1 << 20, dtype=torch.float32)
    seen: list[float] = []
    for step in range(3):
        w.fill_(float(step))
        frozen = writer.snapshot({"w": w}, defer=True)
        writer.submit(lambda frozen=frozen: seen.append(float(frozen["w"][-1])))
        writer.wait_snapshot()
        w.fill_(-1.0)
        writer.wait()
        del frozen  # as a saver's job does: then the next snapshot reuses the arena
    assert seen == [0.0, 1.0, 2.0]
    assert len(writer._arenas) == 1
    writer.close()


def test_a_deferred_copy_no_job_took_is_made_by_the_next_snapshot():
    writer = AsyncWriter()
    a = torch.ones(1000)
    first = writer.snapshot({"a": a}, defer=True)  # no submit: e.g. the caller failed in between
    second = writer.snapshot({"b": torch.zeros(10)})
    assert torch.equal(first["a"], torch.ones(1000)) and torch.equal(second["b"], torch.zeros(10))
    writer.close()


def test_a_deferred_copy_keeps_its_source_and_destination_alive(monkeypatch):
    writer = AsyncWriter()
    source = torch.full((1 << 16,), 7.0)
    writer.snapshot({"a": source}, defer=True)  # the snapshot itself is dropped at once
    del source  # and so is the only other reference to the source
    import gc

    gc.collect()
    fence = writer._fence
    assert fence is not None and not fence.done
    writer.wait_snapshot()  # copies between memory that is still alive (no crash, no garbage)
    assert fence.done and fence._keep_alive is None and fence._pieces == []  # released once copied
    writer.close()


def test_device_copies_start_on_a_side_stream_where_a_gpu_exists():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here: the side-stream device-to-host path is exercised on GPU machines")
    src = torch.randn(1 << 20, device="cuda")
    dst = torch.empty(src.shape, pin_memory=True)
    copy = DeferredCopy([], deferred_copy.start_device_copies([(dst, src)]))
    copy.wait()  # the current stream now waits for the copy; the CPU does not
    src.add_(1.0)  # queued after the copy on the current stream
    copy.complete()
    assert torch.equal(dst, (src - 1.0).cpu())
