"""Many small tensors gathered into one ``writev`` per piece, each piece checksummed after it is
written: the file must hold exactly the bytes the peer (``safetensors``) reads and the checksums
google-crc32c computes, whatever mix of small, large, empty, non-contiguous and tied tensors, and
across short writes; both through the C writer (``_write_regions``, checksums on its second thread)
and through the Python fallback used where it is not built."""

from __future__ import annotations

import errno
import os

import google_crc32c
import pytest
import safetensors.torch
import torch

from lightning_saver.formats import checksum, tensor_stream
from lightning_saver.formats import safetensors_io as sio
from lightning_saver.formats.safetensors_writer import Layout


def mixed_tensors(n_small: int = 1500) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    dtypes = [torch.float32, torch.float16, torch.int8, torch.float64, torch.bfloat16]
    out = {f"layer{i}.w": torch.randn(i % 97 + 1, 33, generator=g).to(dtypes[i % len(dtypes)])
           for i in range(n_small)}
    out["medium"] = torch.randn(3 * tensor_stream.PIECE // 4 + 5, generator=g)  # several pieces + a tail
    out["large"] = torch.randn(2 * tensor_stream.CHUNK // 4 + 7, generator=g)  # many pieces
    out["large_transposed"] = torch.randn(1100, 1000, generator=g).t()  # copied first
    out["transposed"] = torch.randn(40, 70, generator=g).t()  # not contiguous: copied, then written
    out["empty"] = torch.empty(0, 5)
    out["tied"] = out["layer3.w"]
    return out


@pytest.fixture(params=["c", "c-one-thread", "python"])
def writer(request, monkeypatch):
    """Each test runs through the C writer (skipped where it is not built), with its checksums on a
    second thread and, as the async writer asks, on the writing thread; and the Python one."""
    if request.param.startswith("c"):
        if tensor_stream._native_crc_address() is None:
            pytest.skip("the optional C extension _write_regions is not built here, or google-crc32c "
                        "has no C implementation on this platform")
    else:
        monkeypatch.setattr(tensor_stream, "_write_regions", None)
    checksum.keep_in_this_thread(request.param == "c-one-thread")
    yield request.param
    checksum.keep_in_this_thread(False)


def test_the_c_writer_is_built_wherever_the_restore_extension_is():
    from lightning_saver.formats import memcopy

    if memcopy._copy_crc is None:
        pytest.skip("no C extensions built here: both are optional")
    assert tensor_stream._native_crc_address() is not None


def test_a_file_of_many_small_tensors_is_what_the_peer_and_google_crc32c_read(tmp_path, writer):
    tensors = mixed_tensors()
    path = tmp_path / "m.safetensors"
    result = sio.save_file(tensors, path)
    assert os.path.getsize(path) == sio.planned_nbytes(tensors) == result.nbytes
    peer = safetensors.torch.load_file(str(path))
    assert peer.keys() == tensors.keys()
    for name, t in tensors.items():
        assert torch.equal(peer[name], t), name
        raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        expected = google_crc32c.value(raw) if t.numel() else 0
        assert result.crcs[name] == f"{expected:08x}", name
    sio.verify_file(path)


def test_short_writes_are_resumed(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_stream, "_write_regions", None)  # the C loop resumes the same way
    real = os.writev

    def at_most_a_few_kib(fd, buffers):  # the kernel may write less than asked: resume mid-buffer
        first = memoryview(buffers[0]).cast("B")
        return real(fd, [first[: min(len(first), 3001)]])

    monkeypatch.setattr(tensor_stream.os, "writev", at_most_a_few_kib)
    tensors = mixed_tensors(200)
    path = tmp_path / "s.safetensors"
    sio.save_file(tensors, path)
    peer = safetensors.torch.load_file(str(path))
    assert all(torch.equal(peer[k], v) for k, v in tensors.items())


def test_a_full_file_system_is_an_oserror_with_its_errno_and_nothing_is_left_running(tmp_path, writer):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this platform (Linux has one)")
    fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            tensor_stream.write_tensors(fd, mixed_tensors(50), sorted(mixed_tensors(50)))
    finally:
        os.close(fd)
    assert info.value.errno == errno.ENOSPC


def test_the_python_writer_starts_writeback_of_what_it_wrote_every_8_mib(tmp_path, monkeypatch):
    monkeypatch.setattr(tensor_stream, "_write_regions", None)
    calls = []
    real = tensor_stream._SYNC_FILE_RANGE
    if real is None:
        pytest.skip("no sync_file_range here (not Linux)")

    def recording(fd, offset, nbytes, flags):
        calls.append((offset, nbytes, os.fstat(fd).st_size))
        return real(fd, offset, nbytes, flags)

    monkeypatch.setattr(tensor_stream, "_SYNC_FILE_RANGE", recording)
    tensors = {f"t{i}": torch.full((3 << 18,), float(i)) for i in range(10)}  # 10 x 3 MiB
    fd = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"h" * 100)  # a header first: ranges start where the tensors do
        tensor_stream.write_tensors(fd, tensors, sorted(tensors))
    finally:
        os.close(fd)
    # contiguous ranges from offset 100, each >= 8 MiB, each ending at what was written by then
    assert [c[0] for c in calls] == [100] + [c[0] + c[1] for c in calls[:-1]]
    assert all(n >= tensor_stream.WRITE_BEHIND for _, n, _ in calls)
    assert all(offset + n == size for offset, n, size in calls)
    assert calls[-1][0] + calls[-1][1] > 100 + 30 * 2**20 - tensor_stream.WRITE_BEHIND


def test_a_layout_of_other_tensors_is_refused(tmp_path, writer):
    layout = Layout({"a": torch.zeros(4)})
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ValueError, match="the names differ"):
            sio.write_to_fd({"b": torch.zeros(4)}, fd, layout=layout)
        with pytest.raises(ValueError, match=r"tensor 'a' has 20 bytes, the file's layout planned 16"):
            sio.write_to_fd({"a": torch.zeros(5)}, fd, layout=layout)
    finally:
        os.close(fd)
