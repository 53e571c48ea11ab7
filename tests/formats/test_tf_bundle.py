"""TF V2 checkpoints against real TensorFlow: TF writes, we read bit-exact; we write, TF reads bit-exact."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import tensorflow as tf  # a pinned test dependency: imported, never skipped
import torch
from tf_peer import tf_save

from lightning_saver.errors import CorruptCheckpointError
from lightning_saver.formats import memcopy, tf_shard
from lightning_saver.tf import list_checkpoint, read_checkpoint, write_checkpoint

RNG = np.random.default_rng(0)


def _sample(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == np.bool_:
        return RNG.integers(0, 2, shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return RNG.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    if np.issubdtype(dtype, np.complexfloating):
        return (RNG.standard_normal(shape) + 1j * RNG.standard_normal(shape)).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


NUMERIC = [
    np.float16,
    np.float32,
    np.float64,
    ml_dtypes.bfloat16,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.bool_,
    np.complex64,
    np.complex128,
    ml_dtypes.float8_e5m2,
    ml_dtypes.float8_e4m3fn,
]
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (2, 1, 3, 2)]


def _all_tensors() -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for dtype in NUMERIC:
        for shape in SHAPES:
            out[f"{np.dtype(dtype).name}/{'x'.join(map(str, shape)) or 'scalar'}"] = _sample(
                np.dtype(dtype), shape
            )
    out["strings/vector"] = np.array([b"ab", b"", b"\x00\xff", "é".encode()], dtype=object)
    out["strings/scalar"] = np.array(b"hello", dtype=object)
    out["strings/empty"] = np.zeros((0, 2), dtype=object)
    out["strings/long"] = np.array([b"x" * 300, b"y" * 70000], dtype=object)
    return out


def _same(ours: np.ndarray, theirs: np.ndarray) -> None:
    theirs = np.asarray(theirs)
    assert ours.shape == theirs.shape
    if ours.dtype == object:
        assert [bytes(x) for x in ours.reshape(-1)] == [bytes(x) for x in theirs.reshape(-1)]
    else:
        assert ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
        assert ours.tobytes() == theirs.tobytes()


def test_tf_writes_every_dtype_we_read_bit_exact(tmp_path):
    tensors = _all_tensors()
    prefix = str(tmp_path / "model.ckpt")
    tf_save(tf, prefix, tensors)
    got = read_checkpoint(prefix)
    assert list(got) == sorted(tensors)
    for name, value in tensors.items():
        _same(got[name], value)
    as_torch = read_checkpoint(prefix, framework="torch")
    assert as_torch["bfloat16/2x3"].dtype == torch.bfloat16
    assert as_torch["bfloat16/2x3"].view(torch.int16).numpy().tobytes() == tensors["bfloat16/2x3"].tobytes()
    assert torch.equal(as_torch["complex128/2x3"], torch.from_numpy(tensors["complex128/2x3"]))


def test_we_write_every_dtype_tf_reads_bit_exact(tmp_path):
    tensors = _all_tensors()
    prefix = write_checkpoint(str(tmp_path / "ours"), tensors)
    reader = tf.train.load_checkpoint(prefix)
    assert set(reader.get_variable_to_shape_map()) == set(tensors)
    for name, value in tensors.items():
        _same(np.asarray(reader.get_tensor(name), dtype=object if value.dtype == object else None), value)


def test_we_write_byte_identical_files_to_tf(tmp_path):
    tensors = _all_tensors()
    tf_save(tf, str(tmp_path / "theirs"), tensors)
    write_checkpoint(str(tmp_path / "ours"), tensors)
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"ours{suffix}").read_bytes() == (tmp_path / f"theirs{suffix}").read_bytes()


def test_torch_tensors_in_tf_reads_them(tmp_path):
    tensors = {
        "dense/kernel": torch.randn(4, 3),
        "dense/bias": torch.arange(3, dtype=torch.float64),
        "bf16": torch.randn(2, 5, dtype=torch.bfloat16),
        "mask": torch.tensor([True, False]),
        "transposed": torch.randn(3, 4).t(),  # non-contiguous input
        "step": torch.tensor(7, dtype=torch.int64),
        "u16": torch.from_numpy(np.array([0, 1, 65535], np.uint16)),
    }
    prefix = write_checkpoint(tmp_path / "t", tensors)
    reader = tf.train.load_checkpoint(prefix)
    for name, value in tensors.items():
        theirs = reader.get_tensor(name)
        if value.dtype == torch.bfloat16:
            assert np.asarray(theirs).view(np.int16).tobytes() == value.view(torch.int16).numpy().tobytes()
        else:
            np.testing.assert_array_equal(theirs, value.numpy())
    back = read_checkpoint(prefix, framework="torch")
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value)


def test_list_checkpoint_matches_tf_shape_and_dtype_maps(tmp_path):
    tensors = _all_tensors()
    prefix = str(tmp_path / "m")
    tf_save(tf, prefix, tensors)
    reader = tf.train.load_checkpoint(prefix)
    shapes, dtypes = reader.get_variable_to_shape_map(), reader.get_variable_to_dtype_map()
    info = list_checkpoint(prefix)
    for name in tensors:
        assert info[name].shape == tuple(shapes[name])
        assert info[name].dtype == ("string" if dtypes[name] == tf.string else dtypes[name].name)


def test_byte_identical_when_the_index_spans_several_blocks(tmp_path):
    # > 256 KiB of entries: several data blocks, index separators and restart points as TF makes them
    names = [f"{i:05d}/" + RNG.bytes(24).hex() for i in range(7000)]  # random names defeat prefix compression
    tensors = {name: np.array(i, np.int32) for i, name in enumerate(names)}
    tf_save(tf, str(tmp_path / "theirs"), tensors)
    write_checkpoint(str(tmp_path / "ours"), tensors)
    theirs = (tmp_path / "theirs.index").read_bytes()
    assert len(theirs) > 1.5 * 262144
    assert (tmp_path / "ours.index").read_bytes() == theirs
    assert read_checkpoint(tmp_path / "theirs", names=[names[-1]])[names[-1]] == 6999


@pytest.mark.parametrize("path", ["one-pass", "preadv"])
def test_big_checkpoint_read_in_chunks_matches_tf(tmp_path, monkeypatch, path):
    # tensors over and under the 4 MiB large-tensor size, read in 1 MiB chunks off the chunk grid, on
    # the one-pass path (populated pieces, copy + CRC in C) and on the prefaulted preadv fallback
    copied: list[str] = []
    original = tf_shard.ShardReader._copy_mapped

    def spy(self, entry):
        result = original(self, entry)
        copied.append("mapped" if result is not None else "fallback")
        return result

    monkeypatch.setattr(tf_shard.ShardReader, "_copy_mapped", spy)
    if path == "preadv":
        monkeypatch.setattr(tf_shard, "_populate_works", False)
    tensors = {
        "a/kernel": RNG.standard_normal((1000, 1311)).astype(np.float32),
        "b/bias": RNG.standard_normal(7).astype(np.float64),
        "c/kernel": RNG.standard_normal((3, 1_000_003)).astype(np.float32),
        "d/names": np.array([b"x", b"yz"], dtype=object),
        "e/kernel": RNG.integers(0, 255, 2_500_001, dtype=np.uint8),
    }
    prefix = str(tmp_path / "big")
    tf_save(tf, prefix, tensors)
    ours = read_checkpoint(prefix)
    theirs = tf.train.load_checkpoint(prefix)
    assert list(ours) == sorted(tensors)
    for name in tensors:
        expected = theirs.get_tensor(name)
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape
        if name == "d/names":
            assert list(ours[name]) == list(expected)
        else:
            assert ours[name].tobytes() == expected.tobytes()
    one_pass = memcopy.ONE_PASS and path == "one-pass" and bool(tf_shard._populate_works)
    if path == "preadv" or not memcopy.ONE_PASS:
        assert copied == []
    else:  # a and c are over 4 MiB; a kernel without MADV_POPULATE_* falls back at the first
        assert copied == (["mapped"] * 2 if one_pass else ["fallback"])
    if one_pass:
        # the CRC computed in the same pass as the copy catches a damaged byte in a large tensor
        data = tmp_path / "big.data-00000-of-00001"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch for tensor 'c/kernel'"):
            read_checkpoint(prefix)
