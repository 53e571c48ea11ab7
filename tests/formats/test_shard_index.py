"""The set index (formats/shard_index.py) and set names (saving/names.py): round trips and bad input."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightning_saver.errors import CorruptCheckpointError, FormatVersionError
from lightning_saver.formats.shard_index import Piece, ShardIndex, TensorEntry, dump_index, parse_index
from lightning_saver.saving import names


def _index(rows: list[int], cols: int = 3) -> ShardIndex:
    pieces, start = [], 0
    for i, n in enumerate(rows):
        pieces.append(Piece(i, (start, 0), (n, cols), f"{i:08x}"))
        start += n
    files = [f"m_7-{i:05d}-of-{len(rows):05d}.safetensors" for i in range(len(rows))]
    return ShardIndex(7, 1.5, len(rows), files, {"w": TensorEntry("F32", (start, cols), tuple(pieces))},
                      {"k": "v"}, {"metric": 0.5})


@given(st.lists(st.integers(0, 5), min_size=1, max_size=6))
def test_dump_parse_round_trip(rows):
    index = _index(rows)
    assert parse_index("i.json", dump_index(index)) == index


def _piece(file: int, offsets: list[int], sizes: list[int]) -> dict:
    return {"file": file, "offsets": offsets, "sizes": sizes, "crc32c": "00000000"}


def _doc(**change) -> bytes:
    doc = json.loads(dump_index(_index([2, 2])))
    doc.update(change)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(("doc", "message"), [
    (b"{not json", "not JSON"),
    (_doc(format="other"), "expected 'lightning_saver.shard_index'"),
    (_doc(files=["../evil.safetensors", "b"]), "plain file names"),
    (_doc(tensors={"w": {"dtype": "F99", "shape": [4, 3], "pieces": []}}), "unknown dtype"),
    (_doc(tensors={"w": {"dtype": "F32", "shape": [4, 3], "pieces": [_piece(0, [0, 0], [2, 3])]}}),
     "hold 6 elements, expected 12"),
    (_doc(tensors={"w": {"dtype": "F32", "shape": [4, 3], "pieces": [_piece(5, [0, 0], [4, 3])]}}),
     "file 5 is not one of the 2"),
    (_doc(tensors={"w": {"dtype": "F32", "shape": [4, 3], "pieces": [_piece(0, [2, 0], [4, 3])]}}),
     "exceed the shape [4, 3]"),
])
def test_bad_index_is_an_error_naming_file_and_field(doc, message):
    with pytest.raises(CorruptCheckpointError, match="i.json") as info:
        parse_index("i.json", doc)
    assert message in str(info.value)


def test_newer_version_is_refused():
    with pytest.raises(FormatVersionError, match="upgrade"):
        parse_index("i.json", _doc(version=99))


@given(st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), st.integers(0, 10**9),
       st.integers(1, 99999).flatmap(lambda w: st.tuples(st.integers(0, w - 1), st.just(w))))
def test_shard_names_parse_back_and_never_look_like_a_step(prefix, step, rank_world):
    rank, world = rank_world
    series = names.Series("d", prefix, ".safetensors")
    shard = names.shard_name(series, step, rank, world)
    index = names.set_index_name(series, step)
    assert names.parse_shard_name(shard) == (series.name(step), rank, world)
    assert names.set_stem(index) == series.name(step) and names.is_set_index(index)
    # neither file is taken for a single-file checkpoint of the series
    assert series.parse(shard) is None and series.parse(index) is None
    assert series.parse(names.set_stem(index)) == step
