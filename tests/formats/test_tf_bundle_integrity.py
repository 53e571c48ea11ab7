"""Damaged data files, lazy reading, bad input to the writer, atomic writes (no TensorFlow needed:
the format itself is checked against TF in test_tf_bundle.py and the golden files)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_saver.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    EncodingError,
    StateMismatchError,
)
from lightning_saver.formats import tf_bundle
from lightning_saver.tf import list_checkpoint, read_checkpoint, write_checkpoint


def _write(tmp_path: Path) -> tuple[str, dict[str, np.ndarray]]:
    tensors = {
        "a/kernel": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b/strings": np.array([b"one", b"three"], dtype=object),
        "c/step": np.array(9, np.int64),
    }
    return write_checkpoint(tmp_path / "ck", tensors), tensors


def _flip(path: str, offset: int) -> None:
    raw = bytearray(Path(path).read_bytes())
    raw[offset] ^= 0x40
    Path(path).write_bytes(bytes(raw))


def test_damaged_tensor_names_file_and_tensor(tmp_path):
    prefix, _ = _write(tmp_path)
    _flip(prefix + ".data-00000-of-00001", 5)  # inside a/kernel
    with pytest.raises(
        CorruptCheckpointError, match=r"ck\.data-00000-of-00001: checksum mismatch for tensor 'a/kernel'"
    ):
        read_checkpoint(prefix)
    assert read_checkpoint(prefix, verify=False)["a/kernel"].shape == (3, 4)
    assert read_checkpoint(prefix, names=["c/step"])["c/step"] == 9  # the damage is elsewhere


@pytest.mark.parametrize("offset, message", [(48, "string lengths"), (56, "string bytes")])
def test_damaged_string_tensor(tmp_path, offset, message):
    prefix, _ = _write(tmp_path)
    _flip(prefix + ".data-00000-of-00001", offset)  # b/strings starts at 48: lengths, crc, then bytes
    with pytest.raises(CorruptCheckpointError, match=rf"tensor 'b/strings'.*({message}|add up)"):
        read_checkpoint(prefix, names=["b/strings"])


def test_truncated_data_file(tmp_path):
    prefix, _ = _write(tmp_path)
    data = Path(prefix + ".data-00000-of-00001")
    data.write_bytes(data.read_bytes()[:50])
    with pytest.raises(
        CorruptCheckpointError,
        match=r"tensor 'b/strings' needs bytes 48..62 but the file has 50; the data file is truncated",
    ):
        read_checkpoint(prefix)


def test_missing_files(tmp_path):
    with pytest.raises(
        CheckpointNotFoundError, match=r"nope\.index does not exist; pass the checkpoint prefix"
    ):
        read_checkpoint(tmp_path / "nope")
    prefix, _ = _write(tmp_path)
    os.remove(prefix + ".data-00000-of-00001")
    with pytest.raises(CheckpointNotFoundError, match="is missing"):
        read_checkpoint(prefix)
    with pytest.raises(CheckpointNotFoundError, match="without a TensorFlow 'checkpoint' file"):
        read_checkpoint(tmp_path)


def test_prefix_index_and_unknown_name(tmp_path):
    prefix, tensors = _write(tmp_path)
    assert list(read_checkpoint(prefix + ".index")) == sorted(tensors)
    assert list(read_checkpoint(prefix + ".data-00000-of-00001")) == sorted(tensors)
    with pytest.raises(StateMismatchError, match=r"'missing' \(the checkpoint has 3: a/kernel"):
        read_checkpoint(prefix, names=["missing"])
    with pytest.raises(ValueError, match="framework must be 'torch' or 'numpy'"):
        read_checkpoint(prefix, framework="jax")


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar in /proc/self/io")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_reading_one_tensor_reads_only_its_bytes(tmp_path):
    big = {f"big_{i}": np.full((1024, 1024), i, np.float32) for i in range(8)}  # 32 MiB
    prefix = write_checkpoint(tmp_path / "big", {**big, "small": np.arange(3, dtype=np.int16)})
    before = _bytes_read()
    got = read_checkpoint(prefix, names=["small"])
    read = _bytes_read() - before
    assert got["small"].tolist() == [0, 1, 2]
    assert read < 200_000, f"read {read} bytes to load a 6-byte tensor"
    before = _bytes_read()
    assert read_checkpoint(prefix, names=["big_3"])["big_3"][0, 0] == 3
    assert _bytes_read() - before < 4 * 2**20 + 200_000


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc/self/status")
def test_mmap_touches_only_the_requested_tensor(tmp_path):
    big = {f"big_{i}": np.full((1024, 1024), i, np.float32) for i in range(8)}  # 32 MiB
    prefix = write_checkpoint(tmp_path / "big", big)
    before = _rss()
    got = read_checkpoint(prefix, names=["big_5"], mmap=True)  # the crc check touches its 4 MiB
    assert got["big_5"][-1, -1] == 5
    grown = _rss() - before
    assert grown < 12 * 2**20, f"mapped {grown} resident bytes to read one 4 MiB tensor of 32 MiB"


@pytest.mark.parametrize(
    "value, error, message",
    [
        ([1.0, 2.0], EncodingError, r"tensor 'x': expected a torch.Tensor or numpy.ndarray, found list"),
        (np.array([object()], dtype=object), EncodingError, "may hold only bytes or str, found object"),
        (np.zeros(2, np.dtype("datetime64[s]")), EncodingError, "numpy dtype datetime64.* has no TensorFlow"),
        (
            torch.zeros(2, dtype=torch.float8_e4m3fnuz),
            EncodingError,
            "torch.float8_e4m3fnuz has no TensorFlow",
        ),
    ],
)
def test_writer_refuses_bad_values_and_keeps_the_old_checkpoint(tmp_path, value, error, message):
    prefix, tensors = _write(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(error, match=message):
        write_checkpoint(prefix, {"a/kernel": np.zeros(2), "x": value})
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert read_checkpoint(prefix)["c/step"] == 9


def test_writer_refuses_names_and_metadata(tmp_path):
    with pytest.raises(ValueError, match="tensor names must be non-empty strings, got ''"):
        write_checkpoint(tmp_path / "n", {"": np.zeros(1)})
    with pytest.raises(ValueError, match=r"cannot store metadata \(\['k'\]\); use a safetensors file"):
        tf_bundle.save_file({"a": np.zeros(1)}, tmp_path / "n", metadata={"k": "v"})


def test_overwrite_replaces_and_leaves_no_temp_files(tmp_path):
    prefix, _ = _write(tmp_path)
    write_checkpoint(prefix, {"only": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.data-00000-of-00001", "ck.index"]
    assert list(list_checkpoint(prefix)) == ["only"]


def test_big_endian_and_strided_numpy_inputs(tmp_path):
    tensors = {
        "be": np.arange(4, dtype=">i4"),
        "strided": np.arange(20, dtype=np.float64).reshape(4, 5)[:, ::2],
    }
    got = read_checkpoint(write_checkpoint(tmp_path / "s", tensors))
    np.testing.assert_array_equal(got["be"], tensors["be"])
    assert got["be"].dtype == np.int32
    np.testing.assert_array_equal(got["strided"], tensors["strided"])


def test_metadata_and_index_verbs(tmp_path):
    prefix, _ = _write(tmp_path)
    assert tf_bundle.read_metadata(prefix) == {
        "format": "tensorflow-v2-checkpoint",
        "num_shards": "1",
        "version": "1",
        "min_consumer": "0",
    }
    info = tf_bundle.read_index(prefix)
    assert info["a/kernel"] == ("float32", (3, 4), 48)
    assert tf_bundle.load_file(prefix)["a/kernel"].dtype == torch.float32


def test_mmap_reads_are_verified_writable_and_never_reach_the_file(tmp_path):
    prefix, tensors = _write(tmp_path)
    data = Path(prefix + ".data-00000-of-00001")
    before = data.read_bytes()
    got = read_checkpoint(prefix, mmap=True)
    assert got["b/strings"].tolist() == [b"one", b"three"] and got["c/step"] == 9
    got["a/kernel"][0, 0] = 123.0  # copy-on-write: the array is ours to change
    as_torch = read_checkpoint(prefix, mmap=True, framework="torch")["a/kernel"]
    as_torch += 1
    assert data.read_bytes() == before
    np.testing.assert_array_equal(read_checkpoint(prefix)["a/kernel"], tensors["a/kernel"])
    _flip(str(data), 5)
    with pytest.raises(CorruptCheckpointError, match=r"checksum mismatch for tensor 'a/kernel'"):
        read_checkpoint(prefix, mmap=True)


def test_mmap_of_an_empty_data_file(tmp_path):
    prefix = write_checkpoint(tmp_path / "e", {"nothing": np.zeros((0, 4), np.float32)})
    assert read_checkpoint(prefix, mmap=True)["nothing"].shape == (0, 4)


@pytest.mark.parametrize("verify", [True, False])
def test_chunked_reads_check_every_chunk(tmp_path, verify):
    tensors = {f"t{i}": np.full(300_000 + i, i, np.float32) for i in range(4)}
    prefix = write_checkpoint(tmp_path / "ck", tensors)
    data = prefix + ".data-00000-of-00001"
    assert all(np.array_equal(v, tensors[k]) for k, v in read_checkpoint(prefix).items())
    offset = 2 * 4 * 300_000 + 4 + (1 << 20) + 17  # t2, second 1 MiB chunk
    _flip(data, offset)
    if verify:
        with pytest.raises(
            CorruptCheckpointError,
            match=rf"ck\.data-00000-of-00001: checksum mismatch for tensor 't2' \(offset {2 * 1_200_000 + 4}",
        ):
            read_checkpoint(prefix)
    else:
        got = read_checkpoint(prefix, verify=False)
        at = offset - 2_400_004
        assert got["t2"].view(np.uint8)[at] != tensors["t2"].view(np.uint8)[at]
        assert np.array_equal(got["t3"], tensors["t3"])
