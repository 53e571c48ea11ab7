"""Shape converters against real TensorFlow raw ops, compared exactly (values, shapes and dtypes)."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # a pinned test dependency: imported, never skipped
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import import table

RNG = np.random.default_rng(99)


def arange(*shape: int, dtype: type = np.float32) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)


def i32(*values: int) -> np.ndarray:
    return np.array(values, np.int32)


def s32(value: int) -> np.ndarray:
    return np.array(value, np.int32)


def ours(op: str, inputs: list, attrs: dict | None = None):
    tensors = [torch.from_numpy(a.copy()) if isinstance(a, np.ndarray) else a for a in inputs]
    return table.call(op, tensors, attrs or {})


def assert_same(got, expected) -> None:
    if isinstance(expected, (list, tuple)):
        assert isinstance(got, tuple) and len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert_same(g, e)
        return
    expected = expected.numpy()
    got = got.detach().numpy()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)


X = arange(2, 3, 4)


# (op, TF raw-op kwargs, our inputs in NodeDef order, our attrs)
CASES = [
    ("Reshape", {"tensor": X, "shape": i32(4, -1)}, [X, i32(4, -1)], {}),
    ("Reshape", {"tensor": X, "shape": i32(-1)}, [X, i32(-1)], {}),
    ("Reshape", {"tensor": arange(1), "shape": i32()}, [arange(1), i32()], {}),
    ("Transpose", {"x": X, "perm": i32(2, 0, 1)}, [X, i32(2, 0, 1)], {}),
    ("Transpose", {"x": X, "perm": np.array([1, 0, 2], np.int64)}, [X, np.array([1, 0, 2], np.int64)], {}),
    ("ConcatV2", {"values": [X, X + 1], "axis": s32(1)}, [X, X + 1, s32(1)], {}),
    ("ConcatV2", {"values": [X, X[:, :, :1]], "axis": s32(-1)}, [X, X[:, :, :1], s32(-1)], {}),
    ("Concat", {"concat_dim": s32(0), "values": [X, X]}, [s32(0), X, X], {}),
    ("Pack", {"values": [X, X * 2, X * 3], "axis": 1}, [X, X * 2, X * 3], {"axis": 1}),
    ("Pack", {"values": [X, X], "axis": -1}, [X, X], {"axis": -1}),
    ("Pack", {"values": [i32(1), i32(2)], "axis": 0}, [i32(1), i32(2)], {}),
    ("Unpack", {"value": X, "num": 3, "axis": 1}, [X], {"num": 3, "axis": 1}),
    ("Unpack", {"value": X, "num": 4, "axis": -1}, [X], {"num": 4, "axis": -1}),
    ("Split", {"axis": s32(2), "value": X, "num_split": 2}, [s32(2), X], {"num_split": 2}),
    ("Split", {"axis": s32(-2), "value": X, "num_split": 3}, [s32(-2), X], {"num_split": 3}),
    ("SplitV", {"value": X, "size_splits": i32(1, -1, 1), "axis": s32(2), "num_split": 3},
     [X, i32(1, -1, 1), s32(2)], {"num_split": 3}),
    ("SplitV", {"value": X, "size_splits": np.array([2, 1], np.int64), "axis": s32(-2), "num_split": 2},
     [X, np.array([2, 1], np.int64), s32(-2)], {"num_split": 2}),
    ("Squeeze", {"input": arange(1, 3, 1, 2), "axis": []}, [arange(1, 3, 1, 2)], {}),
    ("Squeeze", {"input": arange(1, 3, 1, 2), "axis": [-2]}, [arange(1, 3, 1, 2)], {"squeeze_dims": [-2]}),
    ("Squeeze", {"input": arange(1, 3, 1, 1), "axis": [0, 3]}, [arange(1, 3, 1, 1)],
     {"squeeze_dims": [0, 3]}),
    ("ExpandDims", {"input": X, "axis": s32(0)}, [X, s32(0)], {}),
    ("ExpandDims", {"input": X, "axis": s32(-1)}, [X, s32(-1)], {}),
    ("ExpandDims", {"input": X, "axis": np.int64(2)}, [X, np.array(2, np.int64)], {}),
    ("Slice", {"input": X, "begin": i32(1, 0, 1), "size": i32(1, -1, 2)},
     [X, i32(1, 0, 1), i32(1, -1, 2)], {}),
    ("Slice", {"input": X, "begin": i32(0, 2, 0), "size": i32(-1, 0, 4)},
     [X, i32(0, 2, 0), i32(-1, 0, 4)], {}),
    ("Pad", {"input": X, "paddings": i32(0, 1, 2, 0, 1, 1).reshape(3, 2)},
     [X, i32(0, 1, 2, 0, 1, 1).reshape(3, 2)], {}),
    ("Pad", {"input": X.astype(np.int32), "paddings": np.array([[1, 1], [0, 0], [0, 3]], np.int64)},
     [X.astype(np.int32), np.array([[1, 1], [0, 0], [0, 3]], np.int64)], {}),
    ("PadV2", {"input": X, "paddings": i32(1, 0, 0, 2, 1, 0).reshape(3, 2),
               "constant_values": np.float32(-7)},
     [X, i32(1, 0, 0, 2, 1, 0).reshape(3, 2), np.array(-7, np.float32)], {}),
    ("Tile", {"input": X, "multiples": i32(2, 1, 3)}, [X, i32(2, 1, 3)], {}),
    ("Tile", {"input": i32(1, 2), "multiples": i32(0)}, [i32(1, 2), i32(0)], {}),
    ("BroadcastTo", {"input": arange(3, 1), "shape": i32(2, 3, 4)}, [arange(3, 1), i32(2, 3, 4)], {}),
    ("Shape", {"input": X}, [X], {}),
    ("Shape", {"input": X, "out_type": tf.int64}, [X], {"out_type": torch.int64}),
    ("ShapeN", {"input": [X, arange(5)]}, [X, arange(5)], {}),
    ("Size", {"input": X}, [X], {}),
    ("Size", {"input": arange(0, 3), "out_type": tf.int64}, [arange(0, 3)], {"out_type": torch.int64}),
    ("Rank", {"input": X}, [X], {}),
    ("Rank", {"input": np.float32(3)}, [np.array(3, np.float32)], {}),
]


@pytest.mark.parametrize(("op", "tf_kwargs", "inputs", "attrs"), CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_shape_op_matches_tensorflow(op, tf_kwargs, inputs, attrs):
    assert_same(ours(op, inputs, attrs), getattr(tf.raw_ops, op)(**tf_kwargs))


@pytest.mark.parametrize("mode", ["REFLECT", "SYMMETRIC"])
@pytest.mark.parametrize("paddings", [
    [[0, 0], [2, 1], [0, 3]], [[1, 1], [0, 0], [3, 2]], [[0, 1], [1, 0], [0, 0]],
])
def test_mirror_pad(mode, paddings):
    if mode == "REFLECT":
        paddings = [[min(b, n - 1), min(a, n - 1)] for (b, a), n in zip(paddings, X.shape, strict=True)]
    p = np.array(paddings, np.int32)
    expected = tf.raw_ops.MirrorPad(input=X, paddings=p, mode=mode)
    assert_same(ours("MirrorPad", [X, p], {"mode": mode}), expected)


def test_mirror_pad_too_wide_names_the_dimension():
    with pytest.raises(GraphImportError, match=r"MirrorPad: padding \(2, 0\) of dimension 0 exceeds 1"):
        ours("MirrorPad", [X, i32(2, 0, 0, 0, 0, 0).reshape(3, 2)], {"mode": "REFLECT"})


def test_bad_split_and_squeeze_are_named():
    with pytest.raises(GraphImportError, match="Split: dimension 2 of size 4 does not split into 3"):
        ours("Split", [s32(2), X], {"num_split": 3})
    with pytest.raises(GraphImportError, match="SplitV: size_splits \\[1, 1\\] do not add up"):
        ours("SplitV", [X, i32(1, 1), s32(2)], {"num_split": 2})
    with pytest.raises(GraphImportError, match="Squeeze: dimension 1 of shape \\[2, 3, 4\\] has size 3"):
        ours("Squeeze", [X], {"squeeze_dims": [1]})


STRIDED_CASES = [
    # begin, end, strides, masks
    ((1,), (2,), (1,), {}),
    ((0, 1), (2, 3), (1, 1), {}),
    ((-1,), (0,), (1,), {"shrink_axis_mask": 1}),
    ((0, 0, 0), (0, 0, 0), (-1, -1, -1), {"begin_mask": 7, "end_mask": 7}),
    ((0, 2), (0, 0), (1, -1), {"begin_mask": 1, "end_mask": 1}),
    ((0, 1), (0, 0), (1, 1), {"ellipsis_mask": 1, "end_mask": 2}),
    ((0, 0, 1), (0, 0, 3), (1, 1, 1), {"new_axis_mask": 2, "begin_mask": 1, "end_mask": 1}),
    ((0, 0), (0, 0), (1, 1), {"ellipsis_mask": 1, "new_axis_mask": 2}),
    ((1, 0, -1), (2, 0, -5), (1, 1, -2), {"ellipsis_mask": 2, "shrink_axis_mask": 1}),
    ((5, -10), (-10, 10), (-2, 3), {}),
]


@pytest.mark.parametrize(("begin", "end", "strides", "masks"), STRIDED_CASES)
def test_strided_slice(begin, end, strides, masks):
    args = [X, i32(*begin), i32(*end), i32(*strides)]
    expected = tf.raw_ops.StridedSlice(input=X, begin=args[1], end=args[2], strides=args[3], **masks)
    assert_same(ours("StridedSlice", args, masks), expected)


@st.composite
def strided_specs(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=4))
    length = draw(st.integers(1, len(shape) + 1))
    ints = st.lists(st.integers(-7, 7), min_size=length, max_size=length)
    strides = draw(st.lists(st.sampled_from([-3, -2, -1, 1, 2, 3]), min_size=length, max_size=length))
    bits = st.integers(0, 2**length - 1)
    ellipsis = draw(st.sampled_from([0] + [1 << i for i in range(length)]))
    masks = {"begin_mask": draw(bits), "end_mask": draw(bits), "ellipsis_mask": ellipsis,
             "new_axis_mask": draw(bits), "shrink_axis_mask": draw(bits)}
    return shape, draw(ints), draw(ints), strides, masks


@settings(max_examples=200, deadline=None)
@given(strided_specs())
def test_strided_slice_property(spec):
    """Any spec TF accepts gives TF's result exactly; one TF refuses is refused with our error."""
    shape, begin, end, strides, masks = spec
    x = arange(*shape, dtype=np.int32)
    args = [x, i32(*begin), i32(*end), i32(*strides)]
    try:
        expected = tf.raw_ops.StridedSlice(input=x, begin=args[1], end=args[2], strides=args[3], **masks)
    except tf.errors.InvalidArgumentError:
        with pytest.raises(GraphImportError, match="StridedSlice"):
            ours("StridedSlice", args, masks)
        return
    assert_same(ours("StridedSlice", args, masks), expected)


GRAD_CASES = [
    ("StridedSlice", {"input": arange(3, 4, 5), "begin": i32(2, 0, 1), "end": i32(0, 0, 5),
                      "strides": i32(-1, 2, 2)}, {"end_mask": 1}),
    ("MirrorPad", {"input": arange(3, 4), "paddings": i32(1, 2, 3, 0).reshape(2, 2)}, {"mode": "SYMMETRIC"}),
    ("Tile", {"input": arange(2, 3), "multiples": i32(2, 2)}, {}),
    ("Transpose", {"x": arange(2, 3, 4), "perm": i32(1, 2, 0)}, {}),
    ("PadV2", {"input": arange(2, 3), "paddings": i32(1, 0, 0, 2).reshape(2, 2),
               "constant_values": np.float32(1.5)}, {}),
    ("SpaceToBatchND", {"input": arange(1, 3, 4, 2), "block_shape": i32(2, 2),
                        "paddings": np.array([[1, 0], [0, 0]], np.int32)}, {}),
    ("DepthToSpace", {"input": arange(1, 2, 3, 8)}, {"block_size": 2}),
]


@pytest.mark.parametrize(("op", "args", "attrs"), GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_gradients_match_tensorflow(op, args, attrs):
    """The converters stay differentiable: gradients agree with TF's, and inputs are never written."""
    first = next(iter(args))
    data = args[first]
    source = torch.from_numpy(data.copy()).requires_grad_(True)
    out = table.call(op, [source] + [torch.from_numpy(np.asarray(v)) for k, v in args.items() if k != first],
                     attrs)
    weights = RNG.standard_normal(tuple(out.shape)).astype(np.float32)
    (out * torch.from_numpy(weights)).sum().backward()
    watched = tf.constant(data)
    with tf.GradientTape() as tape:
        tape.watch(watched)
        result = getattr(tf.raw_ops, op)(**{**args, first: watched}, **attrs)
        loss = tf.reduce_sum(result * weights)
    np.testing.assert_allclose(source.grad.numpy(), tape.gradient(loss, watched).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(source.detach().numpy(), data)


SPACE_BATCH_CASES = [
    # input shape, block_shape, paddings (crops for the inverse)
    ((1, 4, 4, 2), [2, 2], [[0, 0], [0, 0]]),
    ((2, 5, 3, 1), [2, 3], [[1, 0], [0, 3]]),
    ((1, 6, 2), [3], [[2, 1]]),
    ((2, 4, 6, 2, 3), [2, 2], [[2, 2], [0, 2]]),
]


@pytest.mark.parametrize(("shape", "block", "pads"), SPACE_BATCH_CASES)
def test_space_to_batch_nd_and_back(shape, block, pads):
    x = arange(*shape)
    block, pads = i32(*block), np.array(pads, np.int32)
    expected = tf.raw_ops.SpaceToBatchND(input=x, block_shape=block, paddings=pads)
    assert_same(ours("SpaceToBatchND", [x, block, pads]), expected)
    back = tf.raw_ops.BatchToSpaceND(input=expected.numpy(), block_shape=block, crops=pads)
    assert_same(ours("BatchToSpaceND", [expected.numpy(), block, pads]), back)


def test_batch_to_space_nd_with_uneven_crops():
    x, block, crops = arange(8, 2, 3, 1), i32(2, 4), np.array([[1, 2], [3, 0]], np.int32)
    expected = tf.raw_ops.BatchToSpaceND(input=x, block_shape=block, crops=crops)
    assert_same(ours("BatchToSpaceND", [x, block, crops]), expected)


@pytest.mark.parametrize("data_format", ["NHWC", "NCHW"])
@pytest.mark.parametrize(("op", "shape", "block_size"), [
    ("DepthToSpace", (2, 3, 2, 8), 2), ("DepthToSpace", (1, 2, 2, 9), 3),
    ("SpaceToDepth", (2, 4, 6, 3), 2), ("SpaceToDepth", (1, 3, 6, 2), 3),
])
def test_depth_space(op, shape, block_size, data_format):
    """TF's CPU kernels take NHWC only: the NCHW case transposes around ours."""
    x = arange(*shape)
    expected = getattr(tf.raw_ops, op)(input=x, block_size=block_size)
    if data_format == "NHWC":
        assert_same(ours(op, [x], {"block_size": block_size}), expected)
    else:
        got = ours(op, [x.transpose(0, 3, 1, 2)], {"block_size": block_size, "data_format": "NCHW"})
        assert_same(got.permute(0, 2, 3, 1), expected)


@pytest.mark.parametrize("axis", [[0], [-1], [0, 2], []])
def test_reverse_v2(axis):
    expected = tf.raw_ops.ReverseV2(tensor=X, axis=np.array(axis, np.int32))
    assert_same(ours("ReverseV2", [X, np.array(axis, np.int32)]), expected)


@pytest.mark.parametrize("dtype", [np.bool_, np.int64, np.uint8, np.float16, np.float64])
def test_shape_ops_keep_every_dtype(dtype):
    x = (arange(2, 3, 4) % 3).astype(dtype)
    paddings = i32(1, 0, 0, 2, 1, 1).reshape(3, 2)
    cases = [
        ("Pad", {"input": x, "paddings": paddings}, [x, paddings], {}),
        ("PadV2", {"input": x, "paddings": paddings, "constant_values": np.array(1, dtype)},
         [x, paddings, np.array(1, dtype)], {}),
        ("MirrorPad", {"input": x, "paddings": paddings, "mode": "SYMMETRIC"}, [x, paddings],
         {"mode": "SYMMETRIC"}),
        ("Tile", {"input": x, "multiples": i32(1, 2, 2)}, [x, i32(1, 2, 2)], {}),
        ("ConcatV2", {"values": [x, x], "axis": s32(0)}, [x, x, s32(0)], {}),
        ("Transpose", {"x": x, "perm": i32(2, 0, 1)}, [x, i32(2, 0, 1)], {}),
        ("ReverseV2", {"tensor": x, "axis": i32(1)}, [x, i32(1)], {}),
        ("StridedSlice", {"input": x, "begin": i32(0, 2), "end": i32(0, 0), "strides": i32(1, -1),
                          "begin_mask": 1, "end_mask": 3}, [x, i32(0, 2), i32(0, 0), i32(1, -1)],
         {"begin_mask": 1, "end_mask": 3}),
        ("BroadcastTo", {"input": x[:1], "shape": i32(2, 2, 3, 4)}, [x[:1], i32(2, 2, 3, 4)], {}),
    ]
    for op, tf_kwargs, inputs, attrs in cases:
        assert_same(ours(op, inputs, attrs), getattr(tf.raw_ops, op)(**tf_kwargs))


TF1_SHAPE_GRAPHS = {
    "slicing_sugar": lambda tf, x: [x[..., ::-1, tf.newaxis, 1], x[1:, :-1:2, 0], x[-1],
                                    x[:, None, 2:, ::-2]],
    "split_unstack": lambda tf, x: [*tf.split(x, [1, -1, 2], axis=-1), *tf.split(x, 2, axis=0),
                                    *tf.unstack(x, axis=1)],
    "stack_concat": lambda tf, x: [tf.stack([x, x], axis=-1), tf.concat([x, x * 2], -2)],
    "squeeze_expand": lambda tf, x: [tf.squeeze(x[:, :1], [1]), tf.expand_dims(x, -2), tf.squeeze(x[:1, :1])],
    "slice_tile_transpose": lambda tf, x: [tf.slice(x, [0, 1, 0, 0], [-1, 2, -1, 3]),
                                           tf.tile(x, [1, 2, 1, 2]), tf.transpose(x, [3, 1, 0, 2])],
    "pads": lambda tf, x: [tf.pad(x, [[0, 0], [1, 2], [2, 1], [0, 0]], "REFLECT"),
                           tf.pad(x, [[1, 0], [0, 0], [3, 3], [0, 1]], "SYMMETRIC"),
                           tf.pad(x, [[0, 1], [1, 0], [0, 0], [2, 2]], constant_values=2.5)],
    "blocks": lambda tf, x: [tf.nn.space_to_depth(x[:, :2, :4], 2),
                             tf.nn.depth_to_space(tf.tile(x, [1, 1, 1, 4]), 2),
                             tf.space_to_batch_nd(x, [1, 2], [[0, 1], [1, 1]]), tf.reverse(x, [1, -1])],
}


@pytest.mark.parametrize("name", list(TF1_SHAPE_GRAPHS))
def test_tf1_graphs_through_the_importer(tmp_path, name):
    """The same ops written by TF1's Python API: attrs come from real NodeDefs, run by session.run."""
    from tf_graphs import check_one_op

    check_one_op(tmp_path, TF1_SHAPE_GRAPHS[name], {"x": arange(2, 3, 4, 5)})


def test_dynamic_shapes_through_the_importer(tmp_path):
    """Shape -> StridedSlice -> Pack -> Reshape chains, as Flatten and friends write with a None batch."""
    from tf_graphs import build_tf_graph

    from lightning_saver import import_meta_graph

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [None, None, 4], name="x")
        shape = tf.shape(x)
        tf.reshape(x, [shape[0], -1], name="flat")
        tf.identity(tf.size(x), name="n_elements")
        tf.identity(tf.rank(x), name="n_dims")
        tf.broadcast_to(x[:, :1], tf.shape(x), name="broadcast")
        tf.identity(tf.shape(x, out_type=tf.int64)[1:], name="tail")

    fetches = ["flat:0", "n_elements:0", "n_dims:0", "broadcast:0", "tail:0"]
    for batch in [arange(2, 3, 4), arange(5, 1, 4)]:
        made = build_tf_graph(tmp_path, build, fetches, {"x:0": batch}, save=False)
        graph = import_meta_graph(made.meta)
        for got, expected in zip(graph.run(fetches, {"x:0": batch}), made.expected, strict=True):
            np.testing.assert_array_equal(got, expected)
            assert np.asarray(got).dtype == np.asarray(expected).dtype


@pytest.mark.parametrize(("shape", "lower", "upper"), [
    ((4, 5), -1, 0), ((4, 5), 0, -1), ((2, 3, 5, 4), 1, 2),
    ((3, 3), -1, -1), ((6, 2), 0, 0), ((1, 4, 4), 2, 0),
])
def test_matrix_band_part(shape, lower, upper):
    x = arange(*shape) + 1
    args = [x, np.array(lower, np.int64), np.array(upper, np.int64)]
    expected = tf.raw_ops.MatrixBandPart(input=x, num_lower=args[1], num_upper=args[2])
    assert_same(ours("MatrixBandPart", args), expected)
