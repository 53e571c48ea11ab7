"""The training-state codec: any encodable tree comes back equal, with its exact types."""

from __future__ import annotations

import http
import json
import math
import pathlib
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lightning_saver.errors import EncodingError, FormatVersionError
from lightning_saver.formats.state_codec import (
    RESERVED_PREFIX,
    STATE_KEY,
    decode_state,
    encode_state,
)


def same(a, b) -> bool:
    """Equality that also checks types, tensor dtypes and NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.nan_to_num(0.5), b.nan_to_num(0.5))
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return a == b


def round_trip(state, tmp_path=None, **kwargs):
    encoded = encode_state(state, **kwargs)
    tensors, metadata = encoded.tensors, encoded.metadata
    if tmp_path is not None:  # through a real safetensors file, as the Saver writes it
        path = tmp_path / "state.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        tensors = load_file(str(path))
    return decode_state(tensors, metadata, allow_pickle=kwargs.get("allow_pickle", False))


dtypes = st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool])


def _tensor(shape, dtype, seed):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 9).to(dtype)


tensors = st.builds(
    _tensor,
    st.lists(st.integers(0, 3), max_size=3), dtypes, st.integers(0, 2**31),
)
np_scalars = st.one_of(
    st.floats(width=32).map(np.float32), st.integers(-(2**63), 2**63 - 1).map(np.int64),
    st.booleans().map(np.bool_),
)
np_arrays = st.builds(lambda n, s: np.random.default_rng(s).integers(0, 2**32, size=n, dtype=np.uint32),
                      st.integers(0, 700), st.integers(0, 2**31))
leaves = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=8),
    tensors, np_scalars, np_arrays,
    st.sampled_from([torch.float16, torch.int8, torch.bfloat16, torch.device("cpu")]),
    st.sampled_from([http.HTTPStatus.OK, re.RegexFlag.IGNORECASE]),
    st.text(max_size=6).map(pathlib.PurePosixPath),
    st.lists(st.integers(0, 9), max_size=3).map(torch.Size),
)
keys = st.one_of(
    st.text(max_size=6), st.integers(-5, 5), st.sampled_from(["$tuple", "$x", "a/b", "state_dict"])
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
    ),
    max_leaves=20,
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=6), trees, max_size=5))
def test_any_tree_round_trips(state):
    assert same(round_trip(state), state)


@settings(max_examples=25, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=6), tensors, max_size=4), trees)
def test_round_trip_through_a_safetensors_file(tmp_path_factory, weights, extra):
    state = {"state_dict": weights, "extra": extra}
    assert same(round_trip(state, tmp_path_factory.mktemp("codec")), state)


def test_weights_keep_their_names_and_other_tensors_are_prefixed():
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    encoded = encode_state({"state_dict": model.state_dict(), "optimizer_states": [opt.state_dict()]})
    assert {"weight", "bias"} <= set(encoded.tensors)
    others = set(encoded.tensors) - {"weight", "bias"}
    assert others and all(name.startswith(RESERVED_PREFIX) for name in others)
    assert f"{RESERVED_PREFIX}optimizer_states/0/state/0/exp_avg" in others
    back = decode_state(encoded.tensors, encoded.metadata)
    assert back["optimizer_states"][0]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert same(back["optimizer_states"][0]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_rng_states_round_trip_and_reproduce_draws():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    back = round_trip(state)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.set_rng_state(back["torch"])
    np.random.set_state(back["numpy"])
    random.setstate(back["python"])
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_large_numpy_array_becomes_a_tensor():
    array = np.arange(100_000, dtype=np.float64)
    encoded = encode_state({"a": array})
    assert [n for n in encoded.tensors if n.startswith(RESERVED_PREFIX)]
    assert same(decode_state(encoded.tensors, encoded.metadata)["a"], array)


def test_unencodable_value_names_key_path_and_type():
    class Opaque:
        pass

    state = {"callbacks": {"MyCallback": {"stats": [1, Opaque()]}}}
    with pytest.raises(EncodingError, match=r"state\['callbacks'\]\['MyCallback'\]\['stats'\]\[1\].*Opaque"):
        encode_state(state)


def test_module_in_hyper_parameters_gets_a_hint():
    with pytest.raises(EncodingError, match=r"state\['hyper_parameters'\]\['backbone'\] of type "
                       r"torch\.nn\.modules\.linear\.Linear.*save_hyperparameters\(ignore="):
        encode_state({"hyper_parameters": {"backbone": torch.nn.Linear(1, 1)}})


def test_pickle_escape_needs_opt_in_on_both_sides():
    state = {"odd": complex(1, 2)}
    with pytest.raises(EncodingError, match="allow_pickle=True"):
        encode_state(state)
    encoded = encode_state(state, allow_pickle=True)
    with pytest.raises(EncodingError, match=r"state\['odd'\] \(type complex\) was stored pickled"):
        decode_state(encoded.tensors, encoded.metadata, source="f.safetensors")
    assert decode_state(encoded.tensors, encoded.metadata, allow_pickle=True) == state


def test_reserved_weight_name_is_refused():
    with pytest.raises(EncodingError, match="reserved prefix"):
        encode_state({"state_dict": {f"{RESERVED_PREFIX}w": torch.zeros(1)}})


def test_newer_state_version_is_refused():
    encoded = encode_state({"epoch": 1})
    document = json.loads(encoded.metadata[STATE_KEY])
    document["version"] += 1
    with pytest.raises(FormatVersionError, match=r"ckpt.safetensors: .*version 2 is newer.*upgrade"):
        decode_state({}, {STATE_KEY: json.dumps(document)}, source="ckpt.safetensors")


def test_shared_tensor_is_stored_once():
    t = torch.ones(3)
    encoded = encode_state({"a": [t, t], "b": {"c": t}})
    assert len(encoded.tensors) == 1


def test_header_text_is_pinned_for_scalar_runs_counters_and_enums():
    # the exact JSON, written by hand from the tag rules in state_codec's docstring: runs of plain
    # scalars (Python's RNG state, the loops' counters) are stored as they are, while an IntEnum in a
    # list, a float, a nested tuple or a "$" key still takes its tag
    state = {
        "loops": {"total": {"ready": 3, "completed": 2}, "flags": [True, None, "a", 7]},
        "rng": (3, (1, 2, 3), None),
        "codes": [http.HTTPStatus.OK, 1],
        "betas": (0.9, 0.999),
        "odd": {"$x": 1},
    }
    expected = (
        '{"version":1,"state":{"loops":{"total":{"ready":3,"completed":2},"flags":[true,null,"a",7]},'
        '"rng":{"$tuple":[3,{"$tuple":[1,2,3]},null]},"codes":[{"$enum":["http","HTTPStatus","OK"]},1],'
        '"betas":{"$tuple":[0.9,0.999]},"odd":{"$dict":[["$x",1]]}}}'
    )
    assert encode_state(state).metadata[STATE_KEY] == expected
    assert same(decode_state({}, {STATE_KEY: expected}), state)
