"""The async snapshot as the file's image (``saving/snapshot_image.py``, ``formats/file_image.py``,
``direct_write.write_image``): the file holds exactly the bytes of a buffered write of the original
tensors (compared byte for byte, read by the peer ``safetensors``, checksums against google-crc32c
on the raw bytes), with copies made now or deferred, in one piece or many, on one thread or two,
with the C copy+CRC and its pure-Python fallback; it is written with O_DIRECT where the file
system allows it and buffered where not; a header that needs less room is padded, one that needs
more falls back to writing the tensors; the image is reused across saves."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from direct_io_cases import INFO, SIZES, check_against_peer, tensors_of

from lightning_saver.formats import direct_write, memcopy
from lightning_saver.formats import safetensors_io as sio
from lightning_saver.formats.file_image import ImagePlan
from lightning_saver.formats.safetensors_writer import Layout
from lightning_saver.saving import snapshot_arena
from lightning_saver.saving.async_writer import AsyncWriter
from lightning_saver.saving.saver import CheckpointSaver
from lightning_saver.saving.snapshot_image import snapshot_image

DEFERS = {"now": (), "all deferred": True, "some deferred": ("f0", "i8", "transposed", "slice")}


def buffered_bytes(tmp_path, tensors, info=INFO) -> bytes:
    path = tmp_path / "buffered.safetensors"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        sio.write_to_fd(tensors, fd, info=info)
    finally:
        os.close(fd)
    return path.read_bytes()


def header_len(tensors, info=INFO) -> int:
    layout = Layout(tensors)
    return sio.planned_nbytes(tensors, info=info, layout=layout) - layout.data_nbytes


def take(nbytes: int, pinned: bool) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)


def image_of(tensors, defer=(), reserve: int | None = None, run_deferred: str = "complete"):
    layout = Layout(tensors)
    image, deferred = snapshot_image(tensors, ImagePlan(layout, reserve or header_len(tensors)), take, defer)
    if deferred is not None:
        getattr(deferred, run_deferred)()
    return image


def write_image(tmp_path, image, name="image.safetensors", info=INFO):
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        result = sio.write_image(image, fd, info=info)
    finally:
        os.close(fd)
    return path, result


@pytest.fixture(params=["C copy+crc", "memmove+google-crc32c"])
def copier(request, monkeypatch):
    if request.param == "C copy+crc" and not memcopy.ONE_PASS:
        pytest.skip("the optional C extension _copy_crc is not built here, or this CPU lacks SSE4.2")
    if request.param != "C copy+crc":
        monkeypatch.setattr(memcopy, "_copy_crc", None)
    return request.param


@pytest.mark.parametrize("defer", DEFERS.values(), ids=DEFERS.keys())
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}-tensors-{sum(s)}")
def test_the_image_is_byte_for_byte_the_buffered_file(tmp_path, monkeypatch, direct_flags, copier, sizes,
                                                      defer):
    monkeypatch.setattr(memcopy, "PIECE", 4096 + 8)  # tensors in several pieces, checksums joined
    monkeypatch.setattr(memcopy, "TWO_THREADS_MIN", 1)  # the copies made now: both threads
    tensors = tensors_of(sizes)
    expected = buffered_bytes(tmp_path, tensors)
    image = image_of(tensors, defer)
    assert direct_flags == []  # nothing written before the job
    path, result = write_image(tmp_path, image)
    assert path.read_bytes() == expected
    check_against_peer(path, tensors, result)
    assert direct_flags and all(direct_flags), "the file system here takes O_DIRECT: every write used it"
    views = image.tensors
    assert list(views) == list(tensors)
    assert all(torch.equal(views[k], tensors[k]) for k in tensors)


def test_deferred_pieces_taken_by_a_training_thread_at_the_fence(tmp_path, monkeypatch, copier):
    monkeypatch.setattr(memcopy, "PIECE", 4096)
    tensors = tensors_of(SIZES[3])
    expected = buffered_bytes(tmp_path, tensors)
    image = image_of(tensors, True, run_deferred="wait")  # this thread and the helper copy
    path, _ = write_image(tmp_path, image)
    assert path.read_bytes() == expected


def test_the_snapshot_holds_the_values_of_save_time(tmp_path):
    tensors = tensors_of(SIZES[1])
    expected = buffered_bytes(tmp_path, tensors)
    layout = Layout(tensors)
    image, deferred = snapshot_image(tensors, ImagePlan(layout, header_len(tensors)), take, ("f1",))
    assert deferred is not None
    deferred.wait()  # the fence before the step
    with torch.no_grad():
        for t in tensors.values():
            if t.dtype.is_floating_point:
                t.add_(1.0)  # the step: in place, after the fence
    path, _ = write_image(tmp_path, image)
    assert path.read_bytes() == expected


def test_large_images_go_in_chunks_then_an_aligned_tail(tmp_path, monkeypatch, direct_flags):
    monkeypatch.setattr(direct_write, "IMAGE_CHUNK", 2 * direct_write.ALIGN)
    tensors = {"big": torch.randn((5 * direct_write.ALIGN + 12_345) // 4), "small": torch.randn(11)}
    expected = buffered_bytes(tmp_path, tensors)
    path, result = write_image(tmp_path, image_of(tensors))
    assert path.read_bytes() == expected
    check_against_peer(path, tensors, result)
    size = result.nbytes
    assert len(direct_flags) == -(-size // (2 * direct_write.ALIGN)) and all(direct_flags)


def test_refused_by_fcntl_the_image_is_written_buffered(tmp_path, no_direct_fs, direct_flags):
    tensors = tensors_of(SIZES[2])
    expected = buffered_bytes(tmp_path, tensors)
    path, result = write_image(tmp_path, image_of(tensors))
    assert path.read_bytes() == expected
    assert direct_flags and not any(direct_flags)
    check_against_peer(path, tensors, result)


def test_refused_by_a_write_the_rest_is_written_buffered(tmp_path, monkeypatch, refused_direct):
    monkeypatch.setattr(direct_write, "IMAGE_CHUNK", direct_write.ALIGN)
    tensors = tensors_of(SIZES[3])
    expected = buffered_bytes(tmp_path, tensors)
    path, result = write_image(tmp_path, image_of(tensors))
    assert path.read_bytes() == expected
    assert refused_direct[0] and not any(refused_direct[1:])  # one refusal, then buffered to the end
    check_against_peer(path, tensors, result)


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    real = os.pwrite

    def one_block(fd, data, offset):  # the kernel may write less than asked
        return real(fd, memoryview(data)[: direct_write.ALIGN], offset)

    monkeypatch.setattr(direct_write, "_pwrite", one_block)
    tensors = tensors_of(SIZES[3])
    expected = buffered_bytes(tmp_path, tensors)
    path, _ = write_image(tmp_path, image_of(tensors))
    assert path.read_bytes() == expected


def test_a_header_shorter_than_its_room_is_padded_with_spaces(tmp_path):
    tensors = tensors_of(SIZES[1])
    room = header_len(tensors) + 24
    path, result = write_image(tmp_path, image_of(tensors, reserve=room))
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    assert length == room - 8 and data[8:room].endswith(b" " * 24)
    json.loads(data[8:room])  # still one JSON document
    check_against_peer(path, tensors, result)


def test_a_header_longer_than_its_room_writes_the_tensors_instead(tmp_path):
    tensors = tensors_of(SIZES[2])
    longer = dict(INFO, directory_id="an id longer than the one planned")
    image = image_of(tensors)  # room for INFO's header only
    path = tmp_path / "fallback.safetensors"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        assert sio.write_image(image, fd, info=longer) is None  # nothing written: the caller's turn
        from lightning_saver.saving import writing

        result = writing.write_safetensors(image.tensors, None, longer, _FdSink(fd), layout=Layout(tensors),
                                           direct=True, image=image)
    finally:
        os.close(fd)
    assert path.read_bytes() == buffered_bytes(tmp_path, tensors, info=longer)
    check_against_peer(path, tensors, result)


class _FdSink:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


def test_an_async_save_writes_the_image_and_the_sync_saves_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr("lightning_saver.saving.saver.time.time", lambda: 1234.5)
    images: list[int] = []
    real = direct_write.write_image

    def spy(fd, address, nbytes, **kwargs):
        images.append(address)
        return real(fd, address, nbytes, **kwargs)

    monkeypatch.setattr(direct_write, "write_image", spy)
    tensors = tensors_of(SIZES[3])
    sync = CheckpointSaver(max_to_keep=None).save(tensors, tmp_path / "s", global_step=1)
    saver = CheckpointSaver(max_to_keep=None, async_save=True)
    paths = [saver.save(tensors, tmp_path / "a", global_step=step, defer_copy=True) for step in (1, 1, 2)]
    saver.wait()
    assert len(images) == 3 and len(set(images)) == 1, "every save wrote the one reused image"
    with open(sync, "rb") as f:
        assert open(paths[0], "rb").read() == f.read()  # same step, time and directory: same bytes
    assert len(saver._writer._arenas) == 1
    saver.close()


def test_the_image_memory_is_reused_only_when_no_view_of_it_is_alive():
    arenas: list[snapshot_arena.Arena] = []
    tensors = tensors_of(SIZES[1])
    plan = ImagePlan(Layout(tensors), header_len(tensors))

    def take_arena(n, pinned):
        return snapshot_arena.take_arena(arenas, n, pinned)

    first, _ = snapshot_image(tensors, plan, take_arena)
    address = first.address
    (first_arena,) = arenas  # holding the Arena object is not a view: it stays free to take
    kept = first.tensors["f1"]
    del first
    second, _ = snapshot_image(tensors, plan, take_arena)
    assert second.address != address  # a view of the first image is still alive
    del kept, second
    third, _ = snapshot_image(tensors, plan, take_arena)
    # the first arena itself is taken again (not a new one the allocator happened to place at the
    # same address), and the second, free too, is dropped: memory stays one snapshot
    assert third.address == address and len(arenas) == 1 and arenas[0] is first_arena


def test_a_writer_snapshot_image_waits_and_defers_like_a_snapshot(tmp_path):
    tensors = tensors_of(SIZES[2])
    writer = AsyncWriter()
    image = writer.snapshot_image(tensors, ImagePlan(Layout(tensors), header_len(tensors)), defer=True)
    done: list[bytes] = []
    writer.submit(lambda: done.append(write_image(tmp_path, image)[0].read_bytes()))
    writer.wait()
    assert done == [buffered_bytes(tmp_path, tensors)]
    writer.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the pinned image and its "
                    "side-stream copies are exercised on GPU machines")
@pytest.mark.parametrize("defer", [(), True], ids=["now", "deferred"])
def test_cuda_tensors_are_copied_into_a_pinned_image(tmp_path, defer):
    cpu = tensors_of(SIZES[3])
    tensors = {k: v.cuda() for k, v in cpu.items()}
    tensors["tied"] = tensors["f0"]
    layout = Layout(tensors)
    image, deferred = snapshot_image(tensors, ImagePlan(layout, header_len(tensors)), take, defer)
    if deferred is not None:
        deferred.wait()
        deferred.complete()
    assert image.buffer.is_pinned()
    path, result = write_image(tmp_path, image)
    assert path.read_bytes() == buffered_bytes(tmp_path, cpu)
    check_against_peer(path, cpu, result)
