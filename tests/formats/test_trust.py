"""Crafted and damaged files (issue #12): reading never runs code, never returns wrong data silently,
and never allocates more than the file's bytes justify. Each test crafts the file an attacker or a bad
disk would produce and fails on the code before the fix."""

from __future__ import annotations

import json
import struct
import sys
import time
import tracemalloc

import numpy as np
import pytest
import safetensors.torch
import tensorflow as tf
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tensorflow.core.protobuf import tensor_bundle_pb2

from lightning_saver.cli import main as cli_main
from lightning_saver.errors import CorruptCheckpointError, LightningSaverError, StateMismatchError
from lightning_saver.formats import safetensors_io as sio
from lightning_saver.formats import sstable
from lightning_saver.formats.state_codec import STATE_KEY, decode_state, encode_state
from lightning_saver.tf import read_checkpoint

v1 = tf.compat.v1


def rewrite_header(path, edit):
    """Apply ``edit(header_dict)`` to a safetensors file's JSON header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


def edit_ours(edit):
    def apply(header):
        ours = json.loads(header["__metadata__"]["lightning_saver"])
        edit(ours)
        header["__metadata__"]["lightning_saver"] = json.dumps(ours)

    return apply


# ---------------------------------------------------------------- 1. decoding never imports


def test_enum_of_a_module_not_imported_is_refused_without_importing_it(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "ls_trust_evil_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\nimport enum\nclass E(enum.Enum):\n    A = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    doc = {"version": 1, "state": {"fn": {"$enum": ["ls_trust_evil_mod", "E", "A"]}}}
    with pytest.raises(CorruptCheckpointError, match=r"crafted\.safetensors.*state\['fn'\].*not imported"):
        decode_state({}, {STATE_KEY: json.dumps(doc)}, source="crafted.safetensors")
    assert not marker.exists() and "ls_trust_evil_mod" not in sys.modules


def test_enum_lookup_does_not_go_through_a_module_getattr_hook():
    # torch.__getattr__ imports submodules lazily; an enum path must not reach it
    doc = {"version": 1, "state": {"x": {"$enum": ["torch", "_no_such_submodule.E", "A"]}}}
    with pytest.raises(CorruptCheckpointError, match="is not an enum class"):
        decode_state({}, {STATE_KEY: json.dumps(doc)}, source="f")


def test_an_enum_of_an_imported_module_still_decodes():
    import http

    out = encode_state({"status": http.HTTPStatus.OK})
    assert decode_state(out.tensors, out.metadata)["status"] is http.HTTPStatus.OK


def test_cli_class_path_from_a_file_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nclass M: pass\n"
    (tmp_path / "ls_trust_evil_model.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from lightning_saver.integration.cli import _imported_class_path

    with pytest.raises(CorruptCheckpointError, match=r"c\.safetensors: hyper_parameters\._class_path"):
        _imported_class_path("ls_trust_evil_model.M", "c.safetensors")
    assert not marker.exists()
    assert _imported_class_path("torch.nn.Linear", "c.safetensors") == "torch.nn.Linear"


@pytest.mark.parametrize("hparams", [
    {"class_path": "ls_trust_evil_nested.M", "init_args": {}},  # the model's own, without _class_path
    {"hidden": 8, "backbone": {"class_path": "ls_trust_evil_nested.M"}},  # a subclass-typed argument
    {"layers": [{"class_path": "ls_trust_evil_nested.M"}]},
])
def test_cli_every_class_path_in_stored_hparams_is_checked(tmp_path, monkeypatch, hparams):
    """jsonargparse imports any ``class_path`` it parses, not only the ``_class_path`` Lightning stores."""
    marker = tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('x')\nclass M: pass\n"
    (tmp_path / "ls_trust_evil_nested.py").write_text(code)
    monkeypatch.syspath_prepend(str(tmp_path))
    from lightning_saver.integration import cli

    with pytest.raises(CorruptCheckpointError, match=r"c\.safetensors: hyper_parameters\..*class_path "
                                                       r"'ls_trust_evil_nested\.M' is not a class"):
        cli._check_class_paths(hparams, "c.safetensors", "hyper_parameters")
    assert not marker.exists()
    cli._check_class_paths({"net": {"class_path": "torch.nn.Linear"}}, "c.safetensors", "hyper_parameters")


# ---------------------------------------------------------------- 2. sizes checked before allocating


@pytest.mark.parametrize(
    "spec",
    [
        {"dtype": "<U200000000", "shape": [2], "data": ""},  # 1.6 GB of str from a few bytes
        {"dtype": "<f8", "shape": [2**40], "data": "AAAAAAAAAAA="},
        {"dtype": "<f8", "shape": [True, 1], "data": "AAAAAAAAAAA="},
        {"dtype": "V1000000000", "shape": [1], "data": ""},
        {"dtype": "O", "shape": [1], "data": ""},
        {"dtype": "<f4", "shape": [4], "tensor": "w"},  # the tensor holds 1 element, not 4
    ],
)
def test_ndarray_sizes_are_checked_against_the_bytes_present(spec):
    doc = {"version": 1, "state": {"a": {"$ndarray": spec}}}
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors: malformed training state"):
            decode_state({"w": torch.zeros(1)}, {STATE_KEY: json.dumps(doc)}, source="f.safetensors")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20 and time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "state",
    [
        {"a": {"$tuple": 5}},
        {"a": {"$dict": [[[1], 2]]}},  # an unhashable key
        {"a": {"$dtype": "__getattr__"}},
        {"a": {"$path": ["os.system", "x"]}},
        {"a": {"$npscalar": ["<f8", "AAAA"]}},
        {"a": {"$tensor": "missing"}},
        {"a": {"$weights": 3}},
        {"a": {"$bytes": 17}},
        {"a": {"$float": "12"}},
        {"a": json.loads("[" * 300 + "]" * 300)},
    ],
)
def test_malformed_state_raises_our_error_naming_the_file(state):
    with pytest.raises(CorruptCheckpointError, match=r"^f\.safetensors: "):
        decode_state({}, {STATE_KEY: json.dumps({"version": 1, "state": state})}, source="f.safetensors")


@pytest.mark.parametrize("text", ["[" * 100000, '{"version": true, "state": {}}', '{"version": -1}', "7"])
def test_malformed_state_document(text):
    with pytest.raises(CorruptCheckpointError, match=r"^f: "):
        decode_state({}, {STATE_KEY: text}, source="f")


# ---------------------------------------------------------------- 6. read_into checks its targets


def test_read_into_refuses_a_too_small_target(tmp_path):
    path = tmp_path / "f.safetensors"
    sio.save_file({"w": torch.arange(1 << 16, dtype=torch.float64)}, path)
    header = sio.read_header(path)
    for bad in (torch.zeros(4, dtype=torch.float64), torch.zeros(1 << 16, dtype=torch.float32)):
        with pytest.raises(StateMismatchError, match=r"f\.safetensors: .*'w': the file holds F64 \[65536\]"):
            sio.read_into(header, {"w": bad})
    with pytest.raises(StateMismatchError, match="'nope' is not in the file"):
        sio.read_into(header, {"nope": torch.zeros(1)})


# ---------------------------------------------------------------- 7. aliases are checked


def test_an_edited_alias_is_refused_not_returned(tmp_path):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.ones(3), "b": torch.full((3,), 2.0)}, path)
    rewrite_header(path, edit_ours(lambda ours: ours.update(aliases={"b": "a"})))
    for verify in (True, False):
        with pytest.raises(CorruptCheckpointError, match=r"'b' is recorded as an alias of 'a', but its"):
            sio.load_file(path, verify=verify)
    # through restore too, into a model with tied weights
    from lightning_saver.saving.saver import CheckpointSaver

    target = {"a": torch.zeros(3)}
    target["b"] = target["a"]
    with pytest.raises(CorruptCheckpointError, match="alias"):
        CheckpointSaver().restore(target, path)


def test_an_alias_of_another_shape_or_a_missing_tensor_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.ones(3), "b": torch.ones(2)}, path)
    good = path.read_bytes()
    for aliases, msg in [({"b": "a"}, "cannot share the tensor"), ({"b": "zz"}, "does not name two"),
                         ([1], "not a name -> name map")]:
        path.write_bytes(good)
        rewrite_header(path, edit_ours(lambda ours, a=aliases: ours.update(aliases=a)))
        with pytest.raises(CorruptCheckpointError, match=msg):
            sio.read_header(path)


def test_genuine_tied_weights_still_come_back_as_one_tensor(tmp_path):
    path = tmp_path / "f.safetensors"
    w = torch.randn(4, 4)
    sio.save_file({"enc": w, "dec": w}, path)
    out = sio.load_file(path)
    assert out["enc"] is out["dec"] and torch.equal(out["enc"], w)


# ---------------------------------------------------------------- 8. every tensor carries a checksum


def test_a_removed_checksum_entry_is_corruption(tmp_path, capsys):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.ones(3), "b": torch.ones(3)}, path)
    rewrite_header(path, edit_ours(lambda ours: ours["checksum"]["tensors"].pop("b")))
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # b is the last tensor
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors: .*tensor 'b' has no checksum"):
        sio.load_file(path)
    assert cli_main(["inspect", "--verify", str(path)]) == 1
    assert "all checksums verified" not in capsys.readouterr().out


@pytest.mark.parametrize(
    "checksum", ["crc", {"tensors": "x"}, {"tensors": {"a": 5}}, {"tensors": {"a": "zz"}}]
)
def test_a_malformed_checksum_table_is_corruption(tmp_path, checksum):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.ones(3)}, path)
    rewrite_header(path, edit_ours(lambda ours: ours.update(checksum=checksum)))
    with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors"):
        sio.read_header(path)


# ---------------------------------------------------------------- 15. header field validation


@pytest.mark.parametrize("shape", [[True, 2], [2**70, 0], [-1, 0]])
def test_impossible_shapes_are_refused(tmp_path, shape):
    path = tmp_path / "f.safetensors"
    safetensors.torch.save_file({"a": torch.ones(0)}, str(path))
    rewrite_header(path, lambda h: h["a"].update(shape=shape))
    with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors.*invalid shape"):
        sio.read_header(path)


@pytest.mark.parametrize("version", [-1, 0, True, "1", 1.0])
def test_a_bad_format_version_is_refused(tmp_path, version):
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.ones(1)}, path)
    rewrite_header(path, edit_ours(lambda ours: ours.update(format_version=version)))
    with pytest.raises(CorruptCheckpointError, match="no valid format_version"):
        sio.read_header(path)


def test_a_deeply_nested_header_is_our_error(tmp_path):
    path = tmp_path / "f.safetensors"
    text = b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}"
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text)
    with pytest.raises(CorruptCheckpointError, match=r"f\.safetensors"):
        sio.read_header(path)


def test_inspect_on_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not a checkpoint\n")
    assert cli_main(["inspect", str(path)]) == 1
    err = capsys.readouterr().err
    assert "notes.txt: not a valid safetensors checkpoint" in err and ".index" not in err


# ---------------------------------------------------------------- 9. TF partitioned slices must tile


def test_overlapping_tf_slices_are_refused(tmp_path):
    graph = tf.Graph()
    with graph.as_default():
        v1.get_variable("emb", [10, 4], partitioner=v1.fixed_size_partitioner(3))
        saver = v1.train.Saver()
        with v1.Session() as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, str(tmp_path / "part"))
    assert read_checkpoint(prefix)["emb"].shape == (10, 4)
    items = []
    for key, value in sstable.read_table((tmp_path / "part.index").read_bytes()):
        if key == b"emb":  # list the middle slice twice, drop the last: the sizes still add up
            entry = tensor_bundle_pb2.BundleEntryProto.FromString(value)
            assert len(entry.slices) == 3
            entry.slices[2].CopyFrom(entry.slices[1])
            value = entry.SerializeToString()
        items.append((key, value))
    (tmp_path / "bad.index").write_bytes(sstable.build_table(items))
    (tmp_path / "bad.data-00000-of-00001").write_bytes((tmp_path / "part.data-00000-of-00001").read_bytes())
    with pytest.raises(CorruptCheckpointError, match="tensor 'emb': the slice at .* overlaps another slice"):
        read_checkpoint(tmp_path / "bad")


def test_every_error_is_ours(tmp_path):
    # a quick census over many single-byte flips of a real file: nothing but our errors escapes
    path = tmp_path / "f.safetensors"
    sio.save_file({"a": torch.arange(6.0), "b": torch.ones(2, dtype=torch.int64)}, path,
                  info={"global_step": 3})
    good = path.read_bytes()
    rng = np.random.default_rng(0)
    for pos in rng.integers(0, len(good), 150):
        raw = bytearray(good)
        raw[pos] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(raw))
        try:
            sio.load_file(path)
        except LightningSaverError:
            pass


# ---------------------------------------------------------------- 5. the TF index footer comes first


def test_a_huge_sparse_index_is_refused_from_its_footer(tmp_path):
    index = tmp_path / "big.index"
    with open(index, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of holes: no magic number at the end
    (tmp_path / "big.data-00000-of-00001").write_bytes(b"")
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CorruptCheckpointError, match=r"big\.index: wrong magic number"):
            read_checkpoint(tmp_path / "big")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20 and time.perf_counter() - start < 2


# ---------------------------------------------------------------- fuzzing: only our errors come out

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=20,
)


def _valid_file() -> bytes:
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f.safetensors")
        state = encode_state({"state_dict": {"a": torch.arange(4.0)}, "epoch": 3, "betas": (0.9, 0.99),
                              "arr": np.arange(3)})
        sio.save_file(state.tensors, path, metadata=state.metadata, info={"global_step": 3})
        with open(path, "rb") as f:
            return f.read()


_VALID = _valid_file()


def _read_all(tmp_path, raw: bytes) -> None:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(raw)
    try:
        header = sio.read_header(path)
        sio.load_file(path)
        if STATE_KEY in header.metadata:
            decode_state(sio.load_file(path), header.metadata, source=str(path))
    except LightningSaverError:
        pass


def _header_file(doc) -> bytes:
    text = json.dumps(doc).encode()
    return struct.pack("<Q", len(text)) + text


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=200) | _json.map(_header_file) | st.builds(
    lambda doc, body: _header_file({"__metadata__": {"lightning_saver": json.dumps(doc)}}) + body,
    _json, st.binary(max_size=16)))
def test_fuzz_the_safetensors_header_reader(tmp_path, raw):
    _read_all(tmp_path, raw)


@settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1,
                      max_size=4), cut=st.integers(0, len(_VALID)))
def test_fuzz_mutations_of_a_valid_file(tmp_path, edits, cut):
    raw = bytearray(_VALID)
    for pos, value in edits:
        raw[pos] = value
    _read_all(tmp_path, bytes(raw[:cut] if cut % 3 == 0 else raw))


@settings(max_examples=300, deadline=2000)
@given(state=_json)
def test_fuzz_the_training_state_decoder(state):
    for doc in ({"version": 1, "state": state}, {"version": 1, "state": {"k": state}}, state):
        try:
            decode_state({"w": torch.zeros(2)}, {STATE_KEY: json.dumps(doc)}, source="f")
        except LightningSaverError:
            pass


def test_export_of_a_state_without_weights_is_our_error(tmp_path, capsys):
    path = tmp_path / "s.safetensors"
    state = encode_state({"epoch": 3})
    sio.save_file(state.tensors, path, metadata=state.metadata)
    code = cli_main(["export", "--checkpoint", str(path), "--model-class", "torch.nn.Linear", "--init-args",
                     '{"in_features": 2, "out_features": 1}', "--onnx", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and "s.safetensors: its training state has no state_dict" in err
