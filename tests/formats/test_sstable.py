"""The index file: golden bytes (written by real TensorFlow once, committed), table-level checks, and a
fuzz test showing that damaged or random index bytes only ever raise our own errors."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_saver.errors import CorruptCheckpointError, LightningSaverError
from lightning_saver.formats import sstable, tf_bundle, tf_wire
from lightning_saver.tf import read_checkpoint, write_checkpoint

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tf_bundle_tiny"


def _golden_tensors() -> dict[str, np.ndarray]:
    # the exact values tests/golden/tf_bundle_tiny.* were written from, by tf.raw_ops.SaveV2 in this order
    return {
        "dense/kernel": np.arange(6, dtype=np.float32).reshape(2, 3),
        "dense/bias": np.array([0.5, -1.0], np.float32),
        "global_step": np.array(42, np.int64),
        "names": np.array([b"ab", b""], dtype=object),
        "empty": np.zeros((0, 2), np.float64),
    }


def test_we_write_the_golden_bytes(tmp_path):
    write_checkpoint(tmp_path / "tiny", _golden_tensors())
    for suffix in (".index", ".data-00000-of-00001"):
        assert (tmp_path / f"tiny{suffix}").read_bytes() == Path(f"{GOLDEN}{suffix}").read_bytes(), suffix


def test_golden_constants():
    index = Path(f"{GOLDEN}.index").read_bytes()
    assert index[-8:] == bytes.fromhex("57fb808b247547db")  # magic 0xdb4775248b80fb57, little-endian
    # footer: metaindex handle (157, 8), index handle (170, 15) as varints, zero padding to 40 bytes
    assert index[-48:-8] == bytes([0x9D, 0x01, 0x08, 0xAA, 0x01, 0x0F]).ljust(40, b"\0")
    assert (
        170 + 15 + 5 == len(index) - 48
    )  # the index block and its 5-byte trailer end where the footer starts
    assert index[157:170] == bytes.fromhex("0000000001000000") + index[165:170]  # empty metaindex block
    # first entry: shared 0, key "", 6-byte header: num_shards 1, version { producer 1 }
    assert index[:9] == bytes([0, 0, 6, 0x08, 1, 0x1A, 2, 0x08, 1])
    items = sstable.read_table(index, source="golden")
    assert [k for k, _ in items] == [b"", b"dense/bias", b"dense/kernel", b"empty", b"global_step", b"names"]
    entry = tf_wire.decode_entry(dict(items)[b"names"])
    assert (entry.dtype, entry.shape, entry.offset, entry.size) == (
        7,
        (2,),
        40,
        8,
    )  # after kernel 24, bias 8, step 8 bytes


def test_golden_reads_back():
    got = read_checkpoint(GOLDEN)
    for name, value in _golden_tensors().items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype
        if value.dtype == object:
            assert got[name].tolist() == value.tolist()
        else:
            assert got[name].tobytes() == value.tobytes()


def test_multi_block_table_round_trip():
    items = [(f"layer_{i:05d}/kernel".encode(), bytes([i % 251]) * 40) for i in range(3000)]
    table = sstable.build_table(items, block_size=4096)
    assert sstable.read_table(table) == items
    with pytest.raises(ValueError, match="strictly increasing"):
        sstable.build_table([(b"b", b""), (b"a", b"")])


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:30], "too short for a table"),
        (lambda b: b[:-1], "wrong magic number"),
        (lambda b: b[:-8] + b"\0" * 8, "wrong magic number"),
        (lambda b: b[:12] + bytes([b[12] ^ 1]) + b[13:], "checksum mismatch in data block at offset 0"),
        (lambda b: b[60:], "runs past the end of the file|checksum mismatch"),
    ],
    ids=["truncated", "cut-magic", "zero-magic", "flipped-bit", "head-cut"],
)
def test_damaged_index_names_file_and_problem(tmp_path, mutate, message):
    path = tmp_path / "bad.index"
    path.write_bytes(mutate(Path(f"{GOLDEN}.index").read_bytes()))
    with pytest.raises(CorruptCheckpointError, match=rf"bad\.index: .*({message})"):
        read_checkpoint(tmp_path / "bad")


def test_garbage_varint_in_an_entry_is_a_clear_error(tmp_path):
    header = tf_wire.encode_header(tf_wire.BundleHeader())
    (tmp_path / "v.index").write_bytes(sstable.build_table([(b"", header), (b"w", b"\x08" + b"\xff" * 20)]))
    with pytest.raises(
        CorruptCheckpointError, match=r"v\.index: entry for tensor 'w': varint .* longer than 10"
    ):
        read_checkpoint(tmp_path / "v")


def _load_all(path: Path) -> None:
    try:
        tf_bundle.load_file(path, framework="numpy")
    except LightningSaverError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=400))
def test_fuzz_random_bytes(tmp_path, data):
    (tmp_path / "r.index").write_bytes(data)
    _load_all(tmp_path / "r")
    for parse in (tf_wire.decode_entry, tf_wire.decode_header):
        try:
            parse(data)
        except CorruptCheckpointError:
            pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.integers(0, 300),
)
def test_fuzz_mutated_golden_index(tmp_path, edits, cut):
    raw = bytearray(Path(f"{GOLDEN}.index").read_bytes())
    for pos, byte in edits:
        raw[pos % len(raw)] = byte
    prefix = tmp_path / "m"
    (tmp_path / "m.index").write_bytes(bytes(raw[: len(raw) - cut % 60]))
    (tmp_path / "m.data-00000-of-00001").write_bytes(Path(f"{GOLDEN}.data-00000-of-00001").read_bytes())
    _load_all(prefix)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    entries=st.dictionaries(
        st.one_of(st.binary(min_size=1, max_size=12), st.binary(max_size=12).map(lambda b: b"\x00" + b)),
        st.binary(max_size=40),
        min_size=1,
        max_size=5,
    ),
    header=st.binary(max_size=20),
    data=st.binary(max_size=64),
)
def test_fuzz_entries_behind_valid_checksums(tmp_path, entries, header, data):
    # block crcs are right here, so the protobuf, shape, dtype, offset, slice-key and string parsers
    # are what is fuzzed
    items = [(b"", header)] + sorted(entries.items())
    (tmp_path / "e.index").write_bytes(sstable.build_table(items))
    (tmp_path / "e.data-00000-of-00001").write_bytes(data)
    _load_all(tmp_path / "e")


@settings(max_examples=300, deadline=None)
@given(
    dims=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=6),
    dtype=st.integers(-5, 130),
    offset=st.integers(0, 2**63 - 1),
    size=st.integers(0, 2**63 - 1),
    strings=st.binary(max_size=30),
)
def test_fuzz_well_formed_but_wrong_entries(tmp_path_factory, dims, dtype, offset, size, strings):
    # plausible protobufs with absurd numbers: huge shapes and sizes must not allocate, only raise
    tmp = tmp_path_factory.mktemp("w")
    entry = tf_wire.encode_entry(tf_wire.BundleEntry(dtype, tuple(dims), 0, offset, size, 1))
    header = tf_wire.encode_header(tf_wire.BundleHeader())
    (tmp / "w.index").write_bytes(sstable.build_table([(b"", header), (b"x", entry)]))
    (tmp / "w.data-00000-of-00001").write_bytes(strings + struct.pack("<I", 0))
    _load_all(tmp / "w")


@settings(max_examples=300, deadline=None)
@given(
    dims=st.lists(st.integers(0, 6), min_size=1, max_size=3),
    slices=st.lists(st.lists(st.tuples(st.integers(-2, 8), st.integers(-2, 8)), max_size=3), max_size=3),
    parts=st.lists(st.lists(st.integers(-1, 7), max_size=3), max_size=3),
    dtype=st.sampled_from([1, 2, 7, 10, 20]),
)
def test_fuzz_partitioned_entries(tmp_path_factory, dims, slices, parts, dtype):
    # a partitioned variable whose slice list and slice entries disagree in every way
    tmp = tmp_path_factory.mktemp("p")
    full = b"\x08" + bytes([dtype]) + _shape_field(dims)
    for extents in slices:
        body = b"".join(_len_field(1, _varint_field(1, s) + _varint_field(2, n)) for s, n in extents)
        full += _len_field(7, body)
    items = [(b"", tf_wire.encode_header(tf_wire.BundleHeader())), (b"v", full)]
    for i, shape in enumerate(parts):
        entry = tf_wire.BundleEntry(dtype, tuple(shape), 0, 0, 4 * max(1, abs(sum(shape))), 1)
        items.append((b"\x00v\x00\x01\x01" + bytes([len(shape), 0x80 + i]), tf_wire.encode_entry(entry)))
    (tmp / "p.index").write_bytes(sstable.build_table(sorted(items)))
    (tmp / "p.data-00000-of-00001").write_bytes(bytes(64))
    _load_all(tmp / "p")


def _varint_field(number: int, value: int) -> bytes:
    return tf_wire.encode_varint(number << 3) + tf_wire.encode_varint(value)


def _len_field(number: int, payload: bytes) -> bytes:
    return tf_wire.encode_varint(number << 3 | 2) + tf_wire.encode_varint(len(payload)) + payload


def _shape_field(dims: list[int]) -> bytes:
    return _len_field(2, b"".join(_len_field(2, _varint_field(1, d)) for d in dims))
