import json
import struct
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import google_crc32c
import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.errors import CheckpointNotFoundError, CorruptCheckpointError, FormatVersionError
from lightning_saver.formats import safetensors_io as sio

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16,
          torch.uint32, torch.uint64, torch.complex64]


def sample(dtype, shape=(3, 4)):
    return (torch.randn(shape) * 10).to(dtype)


def as_bytes(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def same(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_dtype_round_trips_and_the_peer_reads_it(tmp_path, dtype):
    tensors = {"t": sample(dtype), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 3))}
    path = tmp_path / "f.safetensors"
    sio.save_file(tensors, path)
    peer = safetensors.torch.load_file(str(path))
    ours = sio.load_file(path)
    for k, v in tensors.items():
        assert same(peer[k], v), k
        assert same(ours[k], v), k


def test_layouts_non_contiguous_channels_last(tmp_path):
    base = torch.randn(2, 3, 4, 5)
    tensors = {"t": base.transpose(0, 3), "cl": base.to(memory_format=torch.channels_last),
               "sliced": base[:, 1, ::2], "expanded": torch.randn(3, 1).expand(3, 4)}
    sio.save_file(tensors, tmp_path / "f.safetensors")
    peer = safetensors.torch.load_file(str(tmp_path / "f.safetensors"))
    for k, v in tensors.items():
        assert torch.equal(peer[k], v), k


def test_data_bytes_match_the_peer_writer(tmp_path):
    tensors = {"b": torch.randn(3), "a": torch.arange(5, dtype=torch.int16), "c": torch.randn(2).double(),
               "flag": torch.tensor([True, False])}
    sio.save_file(tensors, tmp_path / "ours.safetensors")
    safetensors.torch.save_file(tensors, str(tmp_path / "peer.safetensors"))

    def data_of(p):
        raw = p.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        return header, raw[8 + n:]

    ours, peer = data_of(tmp_path / "ours.safetensors"), data_of(tmp_path / "peer.safetensors")
    assert ours == peer  # same tensor entries (offsets included) and the very same data bytes


def test_files_of_the_peer_load_without_checksums(tmp_path):
    t = {"w": torch.randn(4, 4)}
    safetensors.torch.save_file(t, str(tmp_path / "p.safetensors"), metadata={"k": "v"})
    assert torch.equal(sio.load_file(tmp_path / "p.safetensors")["w"], t["w"])
    assert sio.read_metadata(tmp_path / "p.safetensors") == {"k": "v"}
    info = sio.read_index(tmp_path / "p.safetensors")["w"]
    assert (info.dtype, info.shape, info.nbytes) == ("F32", (4, 4), 64)


def test_tied_keys_are_stored_in_full_and_loaded_as_one_tensor(tmp_path):
    w = torch.randn(5, 3)
    sio.save_file({"embed": w, "head": w, "other": w.clone()}, tmp_path / "f.safetensors")
    assert sio.read_info(tmp_path / "f.safetensors")["aliases"] == {"head": "embed"}
    out = sio.load_file(tmp_path / "f.safetensors")
    assert out["head"] is out["embed"] and out["other"] is not out["embed"]
    assert torch.equal(safetensors.torch.load_file(str(tmp_path / "f.safetensors"))["head"], w)


def test_reserved_metadata_key_is_refused(tmp_path):
    with pytest.raises(ValueError, match="metadata key 'lightning_saver' is reserved"):
        sio.save_file({"a": torch.ones(1)}, tmp_path / "f.safetensors", metadata={"lightning_saver": "x"})
    with pytest.raises(TypeError, match="metadata entry 'n'.*str to str, found str -> int"):
        sio.save_file({"a": torch.ones(1)}, tmp_path / "f.safetensors", metadata={"n": 3})


def test_non_tensors_and_unsupported_dtypes_are_refused(tmp_path):
    with pytest.raises(TypeError, match="tensor 'a': expected a torch.Tensor, found list"):
        sio.save_file({"a": [1.0]}, tmp_path / "f.safetensors")
    with pytest.raises(TypeError, match="tensor 'c': dtype torch.complex128 cannot be stored"):
        sio.save_file({"c": torch.zeros(1, dtype=torch.complex128)}, tmp_path / "f.safetensors")


def flip_byte(path, offset_from_end):
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_a_changed_byte_is_refused_naming_file_and_tensor(tmp_path):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a.weight": torch.zeros(100), "b.weight": torch.ones(10, dtype=torch.int8)}, path)
    flip_byte(path, 1)  # the last byte belongs to the int8 tensor, stored last
    msg = r"f\.safetensors: checksum mismatch in tensor 'b.weight'"
    with pytest.raises(CorruptCheckpointError, match=msg):
        sio.load_file(path)
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor 'b.weight'"):
        sio.verify_file(path)
    assert sio.load_file(path, verify=False)["b.weight"][-1] == -2  # verify=False skips the check


def test_truncated_file_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.zeros(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    msg = r"f\.safetensors.*truncated: the header describes 400 bytes"
    with pytest.raises(CorruptCheckpointError, match=msg):
        sio.load_file(path)
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(CorruptCheckpointError, match="has 5 bytes, fewer than the 8-byte header"):
        sio.read_header(path)


def test_pickled_checkpoint_and_text_are_refused_without_unpickling(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, ckpt)
    msg = r"model\.ckpt: not a valid safetensors.*zip archive.*never unpickles"
    with pytest.raises(CorruptCheckpointError, match=msg):
        sio.load_file(ckpt)
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a tensor file at all\n" * 3)
    with pytest.raises(CorruptCheckpointError, match=r"notes\.txt: not a valid safetensors checkpoint"):
        sio.load_file(text)


def test_missing_file_names_the_path(tmp_path):
    msg = r"checkpoint file not found: .*nope\.safetensors"
    with pytest.raises(CheckpointNotFoundError, match=msg) as err:
        sio.load_file(tmp_path / "nope.safetensors")
    assert isinstance(err.value, FileNotFoundError)


def test_newer_format_version_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    info = json.dumps({"format_version": 99})
    safetensors.torch.save_file({"a": torch.ones(1)}, str(path), metadata={"lightning_saver": info})
    with pytest.raises(FormatVersionError, match="format version 99.*reads up to 1; upgrade lightning_saver"):
        sio.load_file(path)


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "variable_file_95.safetensors"


def golden_tensors():
    emb = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    return {"x": torch.tensor(5.0), "embed.weight": emb, "head.weight": emb,
            "h": torch.tensor([1.5, -2.0]).bfloat16(), "flag": torch.tensor([True, False, True])}


def split_file(raw):
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    ours = json.loads(header["__metadata__"].pop("lightning_saver"))
    ours.pop("versions")
    return header, ours, raw[8 + n:]


def test_golden_file_reads_back_and_is_written_the_same_way(tmp_path):
    loaded = sio.load_file(GOLDEN)
    assert loaded["x"].item() == 5.0
    assert loaded["embed.weight"].tolist() == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert loaded["head.weight"] is loaded["embed.weight"]
    assert loaded["h"].dtype == torch.bfloat16 and loaded["h"].float().tolist() == [1.5, -2.0]
    assert loaded["flag"].tolist() == [True, False, True]
    peer = safetensors.torch.load_file(str(GOLDEN))
    assert peer["x"].item() == 5.0 and torch.equal(peer["head.weight"], peer["embed.weight"])
    info = sio.read_info(GOLDEN)
    assert (info["global_step"], info["wall_time"]) == (95, 1764072000.0)

    # the same tensors written today give the same bytes (library versions aside)
    sio.save_file(golden_tensors(), tmp_path / "new.safetensors",
                  info={"global_step": 95, "wall_time": 1764072000.0})
    assert split_file((tmp_path / "new.safetensors").read_bytes()) == split_file(GOLDEN.read_bytes())


def test_stored_checksums_agree_with_google_crc32c_on_the_file_bytes():
    raw = GOLDEN.read_bytes()
    header = sio.read_header(GOLDEN)
    for name, t in header.tensors.items():
        region = raw[header.data_start + t.offset: header.data_start + t.offset + t.nbytes]
        assert t.crc32c == f"{google_crc32c.value(region):08x}", name


def test_a_sync_save_adds_no_whole_file_buffer(tmp_path):
    script = textwrap.dedent(
        """
        import resource, sys, torch
        from lightning_saver.formats.safetensors_io import save_file
        tensors = {f"w{i}": torch.rand(8 << 20) for i in range(4)}  # 128 MiB
        tensors["t"] = torch.rand(1024, 4096).t()                   # 16 MiB, non-contiguous
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        save_file(tensors, sys.argv[1])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024)
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "big.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    extra_mib = int(out.stdout)
    assert extra_mib <= 24, f"a save of 144 MiB raised peak memory by {extra_mib} MiB"
    assert (tmp_path / "big.safetensors").stat().st_size > 144 << 20


def test_multi_chunk_tensors_are_checksummed_like_google_crc32c(tmp_path):
    # 9 MiB and 5 MiB: several I/O chunks, checksummed on the helper thread while written
    tensors = {"big": torch.rand(9 << 18), "odd": torch.rand(5 << 18).to(torch.float16)[::2]}
    path = tmp_path / "big.safetensors"
    result = sio.save_file(tensors, path)
    for name, t in tensors.items():
        expected = google_crc32c.value(t.contiguous().numpy().tobytes())
        assert result.crcs[name] == f"{expected:08x}", name
    out = sio.load_file(path)
    assert torch.equal(out["big"], tensors["big"]) and torch.equal(out["odd"], tensors["odd"])
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor 'big'"):
        sio.load_file(path)


def test_checksums_run_in_the_native_crc32c_library():
    from lightning_saver.formats import checksum

    assert google_crc32c.implementation == "c"
    assert checksum.NATIVE, "the ctypes path to libcrc32c is not active: checksums would copy every tensor"
    t = torch.rand(1000)
    assert checksum.tensor_crc32c(t) == google_crc32c.value(t.numpy().tobytes())


@st.composite
def tensor_dicts(draw):
    out = {}
    for i in range(draw(st.integers(1, 6))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 5), max_size=3)))
        t = sample(dtype, shape)
        if t.dim() >= 2 and draw(st.booleans()):
            t = t.transpose(0, 1)  # non-contiguous
        out[f"t{i}.{dtype}".replace("torch.", "")] = t
        if t.numel() and draw(st.booleans()):
            out[f"tied{i}"] = t
    return out


@settings(max_examples=40, deadline=None)
@given(tensors=tensor_dicts())
def test_any_tensors_round_trip_through_us_and_the_peer(tensors):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "f.safetensors"
        sio.save_file(tensors, path)
        peer = safetensors.torch.load_file(str(path))
        ours = sio.load_file(path)
        assert peer.keys() == ours.keys() == tensors.keys()
        for k, v in tensors.items():
            assert same(peer[k], v) and same(ours[k], v), k
        for k in tensors:
            if k.startswith("tied"):
                owner = next(n for n in tensors if tensors[n] is tensors[k])
                assert ours[k] is ours[owner]
        sio.verify_file(path)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9])
def test_one_tensor_read_by_two_threads_reports_a_changed_byte_anywhere(tmp_path, where):
    # 40 MiB: read_into cuts it between the caller and the helper thread and combines the CRCs
    tensors = {"small": torch.rand(100), "huge": torch.rand(10 << 20)}
    path = tmp_path / "one.safetensors"
    sio.save_file(tensors, path)
    out = sio.load_file(path)
    assert torch.equal(out["huge"], tensors["huge"]) and torch.equal(out["small"], tensors["small"])
    header = sio.read_header(path)
    info = header.tensors["huge"]
    raw = bytearray(path.read_bytes())
    raw[header.data_start + info.offset + int(info.nbytes * where)] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"one\.safetensors: checksum mismatch in tensor 'huge'"):
        sio.load_file(path)
    assert torch.equal(sio.load_file(path, verify=False)["small"], tensors["small"])


def test_tensors_split_between_threads_keep_their_own_checksums(tmp_path):
    tensors = {f"t{i}": torch.rand(2 << 20) * i for i in range(5)}  # 8 MiB each, shared by two threads
    path = tmp_path / "five.safetensors"
    sio.save_file(tensors, path)
    targets = {name: torch.empty_like(t) for name, t in tensors.items()}
    sio.read_into(sio.read_header(path), targets)
    assert all(torch.equal(targets[n], tensors[n]) for n in tensors)
    header = sio.read_header(path)
    info = header.tensors["t3"]
    raw = bytearray(path.read_bytes())
    raw[header.data_start + info.offset + info.nbytes - 1] ^= 0x80
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match="checksum mismatch in tensor 't3'"):
        sio.read_into(sio.read_header(path), targets)
