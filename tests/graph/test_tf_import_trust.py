"""Issue #12 on graph import: a crafted graph cannot make import allocate without bound, take
quadratic time, or recurse without end; errors name the node and the size."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.framework import function_pb2, tensor_pb2, types_pb2
from tensorflow.core.protobuf import meta_graph_pb2

from lightning_saver import import_meta_graph
from lightning_saver.errors import GraphImportError


def _meta():
    meta = meta_graph_pb2.MetaGraphDef()
    return meta, meta.graph_def


def _const(graph, name, values, shape, dtype=types_pb2.DT_INT32):
    node = graph.node.add(name=name, op="Const")
    node.attr["dtype"].type = dtype
    proto = tensor_pb2.TensorProto(dtype=dtype)
    for d in shape:
        proto.tensor_shape.dim.add(size=d)
    (proto.int_val if dtype == types_pb2.DT_INT32 else proto.float_val).extend(values)
    node.attr["value"].tensor.CopyFrom(proto)
    return name


def _op(graph, name, op, inputs, **types):
    node = graph.node.add(name=name, op=op)
    node.input.extend(inputs)
    for key, value in types.items():
        node.attr[key].type = value
    return name


def _bounded(fn):
    tracemalloc.start()
    start = time.perf_counter()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 64 << 20 and time.perf_counter() - start < 10


def test_a_huge_const_from_one_value_is_refused():
    meta, g = _meta()
    _const(g, "big", [1.0], [2**31], dtype=types_pb2.DT_FLOAT)
    graph = import_meta_graph(meta.SerializeToString())

    def run():
        with pytest.raises(GraphImportError, match=r"tensor big.*\[2147483648\] would allocate 8589934592"):
            graph.run("big:0")

    _bounded(run)


@pytest.mark.parametrize("op", ["Fill", "Range", "Tile", "OneHot"])
def test_folding_a_huge_tensor_is_refused_naming_the_node(op):
    meta, g = _meta()
    i32 = types_pb2.DT_INT32
    if op == "Fill":
        _op(g, "out", "Fill", [_const(g, "dims", [1 << 20, 1 << 20], [2]), _const(g, "v", [7], [])], T=i32)
    elif op == "Range":
        _op(g, "out", "Range", [_const(g, "a", [0], []), _const(g, "b", [2**31 - 1], []),
                                _const(g, "d", [1], [])], Tidx=i32)
    elif op == "Tile":
        _op(g, "out", "Tile", [_const(g, "x", [1, 2], [2]), _const(g, "m", [1 << 30], [1])], T=i32)
    else:
        node = _op(g, "out", "OneHot", [_const(g, "i", [0] * 4, [4]), _const(g, "depth", [1 << 30], []),
                                        _const(g, "on", [1], []), _const(g, "off", [0], [])], T=i32)
        g.node[-1].attr["axis"].i = -1
        assert node
    graph = import_meta_graph(meta.SerializeToString())

    def run():
        with pytest.raises(GraphImportError, match=rf"node 'out' \({op}\).*above the cap"):
            graph.run("out:0")

    _bounded(run)


def _chain_seconds(n: int) -> float:
    meta, g = _meta()
    _op(g, "x", "Placeholder", [], dtype=types_pb2.DT_FLOAT)
    prev = "x"
    for i in range(n):
        prev = _op(g, f"n{i}", "Neg", [prev], T=types_pb2.DT_FLOAT)
    data = meta.SerializeToString()
    start = time.perf_counter()
    out = import_meta_graph(data).run(f"{prev}:0", {"x:0": np.ones(2, np.float32)})
    assert out.tolist() == ([1.0, 1.0] if n % 2 == 0 else [-1.0, -1.0])
    return time.perf_counter() - start


def test_import_and_run_are_linear_in_the_graph_size():
    # a plan-sized set was built for every node: 4x the nodes took ~24x the time (20,000 nodes: 49 s)
    small = min(_chain_seconds(3000) for _ in range(2))
    large = min(_chain_seconds(12000) for _ in range(2))
    assert large < 10 * small, f"3,000 nodes {small:.2f} s, 12,000 nodes {large:.2f} s"


def test_a_recursive_function_is_refused():
    meta, g = _meta()
    fdef = function_pb2.FunctionDef()
    fdef.signature.name = "f"
    fdef.signature.input_arg.add(name="a", type=types_pb2.DT_FLOAT)
    fdef.signature.output_arg.add(name="out", type=types_pb2.DT_FLOAT)
    call = fdef.node_def.add(name="again", op="PartitionedCall")
    call.input.append("a")
    call.attr["f"].func.name = "f"
    call.attr["Tin"].list.type.append(types_pb2.DT_FLOAT)
    call.attr["Tout"].list.type.append(types_pb2.DT_FLOAT)
    fdef.ret["out"] = "again:output:0"
    g.library.function.append(fdef)
    _op(g, "x", "Placeholder", [], dtype=types_pb2.DT_FLOAT)
    top = _op(g, "y", "PartitionedCall", ["x"])
    g.node[-1].attr["f"].func.name = "f"
    g.node[-1].attr["Tin"].list.type.append(types_pb2.DT_FLOAT)
    g.node[-1].attr["Tout"].list.type.append(types_pb2.DT_FLOAT)
    graph = import_meta_graph(meta.SerializeToString())
    with pytest.raises(GraphImportError, match="function 'f' calls itself"):
        graph.run(f"{top}:0", {"x:0": np.ones(2, np.float32)})


def test_fetching_an_output_index_past_the_end_is_our_error():
    with tf.Graph().as_default() as g:
        tf.identity(tf.constant([1.5, 2.5]) * 2.0, name="y")
        data = tf.compat.v1.train.export_meta_graph(graph=g).SerializeToString()
    graph = import_meta_graph(data)
    with pytest.raises(GraphImportError, match="y:99999999999 does not exist"):
        graph.run("y:99999999999")
