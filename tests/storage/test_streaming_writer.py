"""The streaming safetensors writer (header first, for sinks without a descriptor) writes the same
bytes as the in-place writer, and ``safetensors`` itself reads them."""

from __future__ import annotations

import io
import os

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from lightning_saver.formats import safetensors_io

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool]


class _AppendOnly:
    """A sink that only appends, like an upload stream."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def write(self, data) -> int:
        return self.buf.write(bytes(data))

    def fileno(self) -> None:
        return None


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=0,
                max_size=5), st.booleans())
def test_stream_equals_in_place_bytes(tmp_path_factory, specs, transpose):
    torch.manual_seed(0)
    tensors = {}
    for i, (dtype, shape) in enumerate(specs):
        t = (torch.randn(shape) * 10).to(dtype)
        if transpose and t.dim() >= 2:
            t = t.transpose(0, 1)  # non-contiguous: copied one at a time
        tensors[f"t{i}"] = t
    info = {"global_step": 3, "wall_time": 1.5}
    sink = _AppendOnly()
    streamed = safetensors_io.write_to_sink(tensors, sink, metadata={"a": "b"}, info=info)
    path = os.path.join(tmp_path_factory.mktemp("w"), "x.safetensors")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        in_place = safetensors_io.write_to_fd(tensors, fd, metadata={"a": "b"}, info=info)
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        expected = f.read()
    # the versions entry is identical within one process, so the files are byte-identical
    assert sink.buf.getvalue() == expected
    assert streamed == in_place
    loaded = st_load(sink.buf.getvalue())  # the reference reader
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t.contiguous())
