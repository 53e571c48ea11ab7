"""The one-pass copy + CRC-32C extension, against google-crc32c, and the restore paths built on it."""

import ctypes
import os
import platform
import shutil
import sysconfig
import types

import google_crc32c
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import memcopy, parallel_read
from lightning_saver.formats import safetensors_io as sio

native = memcopy._copy_crc
needs_native = pytest.mark.skipif(
    native is None or not native.AVAILABLE, reason="the C extension is not built or the CPU lacks SSE4.2"
)


def test_the_extension_is_built_wherever_it_can_be():
    # the install is allowed to go on without it; on x86-64 with a compiler and headers it must not
    headers = os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
    if platform.machine() not in ("x86_64", "AMD64") or not shutil.which("cc") or not headers:
        pytest.skip("no x86-64 compiler and Python headers here: the extension is optional")
    assert native is not None, "lightning_saver.formats._copy_crc was not compiled by the install"
    assert native.AVAILABLE


def _copy(data: bytes, src_skew: int, dst_skew: int, crc: int, nontemporal: bool) -> tuple[bytes, int]:
    src = ctypes.create_string_buffer(data, len(data) + 8)
    n = len(data) - src_skew
    dst = ctypes.create_string_buffer(n + 16)
    ctypes.memset(dst, 0xA5, n + 16)
    got = native.copy_crc32c(ctypes.addressof(dst) + dst_skew, ctypes.addressof(src) + src_skew, n, crc,
                             nontemporal)
    raw = dst.raw
    assert raw[:dst_skew] == b"\xa5" * dst_skew and raw[dst_skew + n:] == b"\xa5" * (16 - dst_skew)
    return raw[dst_skew:dst_skew + n], got


# lengths around the 24 KiB three-lane block, where the lane joining happens
LENGTHS = st.one_of(st.integers(0, 64), st.integers(3 * 8192 - 16, 3 * 8192 + 16), st.integers(0, 80_000))


@needs_native
@settings(max_examples=120, deadline=None)
@given(n=LENGTHS, seed=st.integers(0, 2**32 - 1), src_skew=st.integers(0, 7), dst_skew=st.integers(0, 7),
       crc=st.integers(0, 2**32 - 1), nontemporal=st.booleans())
def test_copy_crc32c_copies_and_matches_google_crc32c(n, seed, src_skew, dst_skew, crc, nontemporal):
    data = torch.randint(0, 256, (n + src_skew,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    copied, got = _copy(data, src_skew, dst_skew, crc, nontemporal)
    assert copied == data[src_skew:]
    assert got == google_crc32c.extend(crc, data[src_skew:])


@needs_native
@settings(max_examples=80, deadline=None)
@given(n=LENGTHS, seed=st.integers(0, 2**32 - 1), skew=st.integers(0, 7), crc=st.integers(0, 2**32 - 1))
def test_crc32c_alone_matches_google_crc32c_and_reads_only(n, seed, skew, crc):
    data = torch.randint(0, 256, (n + skew,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed)).numpy().tobytes()
    src = ctypes.create_string_buffer(data, len(data))
    assert native.crc32c(ctypes.addressof(src) + skew, n, crc) == google_crc32c.extend(crc, data[skew:])
    assert src.raw[: len(data)] == data


@needs_native
def test_copy_crc32c_refuses_a_negative_length():
    with pytest.raises(ValueError, match="nbytes must be >= 0, found -1"):
        native.copy_crc32c(0, 0, -1)
    with pytest.raises(ValueError, match="crc32c: nbytes must be >= 0, found -2"):
        native.crc32c(0, -2)


@pytest.fixture(params=["one pass, streaming stores", "one pass, cached stores", "pread"])
def reader(request, monkeypatch):
    """Each way read_into can go, on small files: units of 64 KiB so both threads get a share."""
    monkeypatch.setattr(parallel_read, "_UNIT", 64 << 10)
    monkeypatch.setattr(parallel_read, "_SPLIT_MIN", 128 << 10)
    if request.param == "pread":
        monkeypatch.setattr(parallel_read, "_ONE_PASS", False)
    elif not memcopy.ONE_PASS:
        pytest.skip("the optional C extension _copy_crc is not built here, or this CPU lacks SSE4.2")
    else:
        monkeypatch.setattr(parallel_read, "_NONTEMPORAL_MIN", 0 if "streaming" in request.param else 1 << 62)
    return request.param


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "emb": torch.rand(300, 257, generator=g),  # crosses several 64 KiB units
        "odd": torch.randint(0, 100, (12_345,), dtype=torch.int8, generator=g),  # ends off an 8-byte word
        "bias": torch.rand(7, generator=g).double(),
        "empty": torch.zeros(0),
    }


@pytest.mark.parametrize("tensor", ["emb", "odd", "bias"])
def test_every_read_path_loads_exactly_and_names_a_changed_tensor(tmp_path, reader, tensor):
    tensors = _tensors()
    path = tmp_path / "m.safetensors"
    sio.save_file(tensors, path)
    out = sio.load_file(path)
    assert all(torch.equal(out[k], v) for k, v in tensors.items())
    header = sio.read_header(path)
    info = header.tensors[tensor]
    raw = bytearray(path.read_bytes())
    raw[header.data_start + info.offset + info.nbytes * 2 // 3] ^= 0x10
    path.write_bytes(bytes(raw))
    msg = rf"m\.safetensors: checksum mismatch in tensor '{tensor}'"
    with pytest.raises(CorruptCheckpointError, match=msg):
        sio.load_file(path)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    sio.read_into(sio.read_header(path), targets, verify=False)
    others = [k for k in tensors if k != tensor]
    assert all(torch.equal(targets[k], tensors[k]) for k in others)
    assert not torch.equal(targets[tensor], tensors[tensor])


def test_a_file_cut_short_after_its_header_was_read_is_refused(tmp_path, reader):
    tensors = _tensors()
    path = tmp_path / "cut.safetensors"
    sio.save_file(tensors, path)
    header = sio.read_header(path)  # as a restore does, before it opens the file for the data
    os.truncate(path, path.stat().st_size - 100)
    targets = {k: torch.empty_like(v) for k, v in tensors.items()}
    with pytest.raises(CorruptCheckpointError, match=r"cut\.safetensors: the file is truncated"):
        sio.read_into(header, targets)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 50_000), min_size=1, max_size=6), seed=st.integers(0, 2**16))
def test_copy_regions_copies_every_region_exactly(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    sources = [torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for n in sizes]
    targets = [torch.zeros(n + 8, dtype=torch.uint8) for n in sizes]  # 8 guard bytes after each
    regions = [(t.data_ptr(), s.data_ptr(), s.numel()) for s, t in zip(sources, targets, strict=True)]
    with pytest.MonkeyPatch.context() as mp:  # small pieces, shared by both threads
        mp.setattr(memcopy, "PIECE", 4096 + 8)
        mp.setattr(memcopy, "BIG_PIECE", 3 * (4096 + 8))
        mp.setattr(memcopy, "TWO_THREADS_MIN", 0)
        memcopy.copy_regions(regions)
    for s, t in zip(sources, targets, strict=True):
        assert torch.equal(t[: s.numel()], s) and not t[s.numel():].any()


def test_copy_crc32c_without_the_extension_gives_the_same_answer(monkeypatch):
    data = torch.randint(0, 256, (100_003,), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    monkeypatch.setattr(memcopy, "_copy_crc", None)
    out = torch.empty_like(data)
    crc = memcopy.copy_crc32c(out.data_ptr(), data.data_ptr(), data.numel(), crc=7)
    assert torch.equal(out, data) and crc == google_crc32c.extend(7, data.numpy().tobytes())
    assert memcopy.crc32c(data.data_ptr(), data.numel(), crc=7) == crc


def test_crc32c_with_an_extension_built_before_it_uses_google_crc32c(monkeypatch):
    # an in-place build older than crc32c (a checkout that has not rebuilt it) must still checksum
    data = torch.randint(0, 256, (5_001,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(memcopy, "_copy_crc", types.SimpleNamespace(AVAILABLE=True))
    expected = google_crc32c.extend(3, data.numpy().tobytes())
    assert memcopy.crc32c(data.data_ptr(), data.numel(), crc=3) == expected


def test_without_the_extension_a_negative_length_is_refused_as_in_c(monkeypatch):
    # the fallback must not memmove SIZE_MAX bytes nor return a crc for a length it never read
    monkeypatch.setattr(memcopy, "_copy_crc", None)
    with pytest.raises(ValueError, match="crc32c: nbytes must be >= 0, found -2"):
        memcopy.crc32c(0, -2, crc=5)
    with pytest.raises(ValueError, match="copy_crc32c: nbytes must be >= 0, found -1"):
        memcopy.copy_crc32c(0, 0, -1)
