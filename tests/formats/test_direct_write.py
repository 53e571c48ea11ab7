"""The async writer's O_DIRECT path (``formats/direct_write.py``): the file holds exactly the bytes
of a buffered write (compared byte for byte, read by the peer ``safetensors``, checksums against
google-crc32c on the raw bytes), it really is written with O_DIRECT where the file system allows it,
and it falls back to buffered writes of the same bytes where O_DIRECT is refused (by ``fcntl``, or
by a write), with the C copy+CRC and with its pure-Python fallback."""

from __future__ import annotations

import os
import time

import pytest
import torch
from direct_io_cases import INFO, SIZES, check_against_peer, tensors_of

from lightning_saver.formats import direct_write, memcopy
from lightning_saver.formats import safetensors_io as sio
from lightning_saver.formats.safetensors_writer import Layout


def write(tmp_path, tensors, name, direct):
    path = tmp_path / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        result = sio.write_to_fd(tensors, fd, info=INFO, direct=direct)
    finally:
        os.close(fd)
    return path, result


@pytest.fixture
def small_buffer(monkeypatch):
    monkeypatch.setattr(direct_write, "BUFFER", 3 * direct_write.ALIGN)  # many O_DIRECT writes


@pytest.mark.parametrize("one_pass", [True, False], ids=["C copy+crc", "memmove+google-crc32c"])
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: f"{len(s)}-tensors-{sum(s)}")
def test_direct_file_is_byte_for_byte_the_buffered_file(tmp_path, monkeypatch, small_buffer, direct_flags,
                                                        sizes, one_pass):
    if one_pass and not memcopy.ONE_PASS:
        pytest.skip("the optional C extension _copy_crc is not built here, or this CPU lacks SSE4.2")
    if not one_pass:
        monkeypatch.setattr(memcopy, "_copy_crc", None)
    tensors = tensors_of(sizes)
    buffered, expected = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    assert direct_flags == []  # the buffered path does not go through direct_write
    direct, got = write(tmp_path, tensors, "direct.safetensors", direct=True)
    assert direct.read_bytes() == buffered.read_bytes()
    assert got == expected
    check_against_peer(direct, tensors, got)
    assert direct_flags and all(direct_flags), "the file system here takes O_DIRECT: every write used it"


def test_a_large_file_goes_in_full_buffers_then_an_aligned_tail(tmp_path, direct_flags):
    tensors = {"big": torch.randn((direct_write.BUFFER * 2 + 12_345) // 4), "small": torch.randn(11)}
    buffered, expected = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    direct, got = write(tmp_path, tensors, "direct.safetensors", direct=True)
    assert direct.read_bytes() == buffered.read_bytes() and got == expected
    check_against_peer(direct, tensors, got)
    assert len(direct_flags) == 4 and all(direct_flags)  # two full buffers, the tail, the head


def test_refused_by_fcntl_the_same_bytes_are_written_buffered(tmp_path, no_direct_fs, direct_flags):
    tensors = tensors_of(SIZES[2])
    buffered, expected = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    direct, got = write(tmp_path, tensors, "direct.safetensors", direct=True)
    assert direct.read_bytes() == buffered.read_bytes() and got == expected
    assert direct_flags == []  # the buffered path wrote it


def test_refused_by_a_write_the_rest_is_written_buffered(tmp_path, small_buffer, refused_direct):
    tensors = tensors_of(SIZES[3])
    buffered, expected = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    direct, got = write(tmp_path, tensors, "direct.safetensors", direct=True)
    assert direct.read_bytes() == buffered.read_bytes() and got == expected
    assert refused_direct[0] and not any(refused_direct[1:])  # one refusal, then buffered to the end
    check_against_peer(direct, tensors, got)


def test_short_writes_are_resumed(tmp_path, monkeypatch, small_buffer):
    real = os.pwrite

    def one_block(fd, data, offset):  # the kernel may write less than asked
        return real(fd, memoryview(data)[: direct_write.ALIGN], offset)

    monkeypatch.setattr(direct_write, "_pwrite", one_block)
    tensors = tensors_of(SIZES[3])
    buffered, _ = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    direct, got = write(tmp_path, tensors, "direct.safetensors", direct=True)
    assert direct.read_bytes() == buffered.read_bytes()
    check_against_peer(direct, tensors, got)


def test_switched_off_it_writes_buffered(tmp_path, monkeypatch, direct_flags):
    monkeypatch.setattr(direct_write, "ENABLED", False)
    tensors = tensors_of(SIZES[1])
    path, result = write(tmp_path, tensors, "off.safetensors", direct=True)
    assert direct_flags == []
    check_against_peer(path, tensors, result)


def test_a_tensor_that_changed_size_is_refused(tmp_path):
    tensors = tensors_of(SIZES[1])
    layout = Layout(tensors)
    tensors["f1"] = torch.randn(17)
    fd = os.open(tmp_path / "x", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(ValueError, match="'f1' has 68 bytes, the file's layout planned 20000"):
            sio.write_to_fd(tensors, fd, info=INFO, layout=layout, direct=True)
    finally:
        os.close(fd)


def test_a_child_forked_while_the_buffer_pool_was_locked_still_writes(tmp_path):
    tensors = tensors_of(SIZES[1])
    buffered, _ = write(tmp_path, tensors, "buffered.safetensors", direct=False)
    with direct_write._pool_lock:  # as if the parent's writer thread held it at the fork
        pid = os.fork()
        if pid == 0:  # the child: write and leave at once, whatever happens
            code = 1
            try:
                direct, _ = write(tmp_path, tensors, "child.safetensors", direct=True)
                code = 0 if direct.read_bytes() == buffered.read_bytes() else 2
            finally:
                os._exit(code)
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung on the buffer pool's lock")
    assert os.waitstatus_to_exitcode(done[1]) == 0
