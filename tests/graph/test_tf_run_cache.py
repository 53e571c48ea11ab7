"""graph.run's per-signature caches (calls.py) and generated plan code (runner.py) against real TensorFlow.

Each test runs the same sequence of calls in a TF session and through ``import_meta_graph``: fetch
sets and feed keys that change between calls, an intermediate tensor fed, a variable assigned or
restored between calls; every result must match TensorFlow's for that call.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from tf_graphs import assert_same, tf_module

from lightning_saver import import_meta_graph

RNG = np.random.default_rng(11)
X = RNG.normal(size=(5, 4)).astype(np.float32)
X2 = RNG.normal(size=(2, 4)).astype(np.float32)
H = RNG.normal(size=(3, 6)).astype(np.float32)


def _build(tf):
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 4], name="x")
    w = v1.get_variable("w", initializer=RNG.normal(size=(4, 6)).astype(np.float32), use_resource=False)
    v = v1.get_variable("v", initializer=RNG.normal(size=(6, 2)).astype(np.float32), use_resource=True)
    h = tf.nn.relu(tf.matmul(x, w), name="h")
    y = tf.add(tf.nn.relu(h * 2.0 - 0.5), 1.0, name="y")
    tf.matmul(y, v, name="z")
    split = tf.split(h, [2, 4], axis=1, name="parts")  # a multi-output op, its second output fetched
    tf.identity(split[1] * 3.0, name="second")
    tf.group(v1.assign(w, w * -1.5), name="flip_w")
    tf.group(v1.assign(v, v + 1.0), name="bump_v")
    return v1.train.Saver()


# (fetches, feed) in order; flip_w and bump_v are groups run for their effect (fetched: None)
CALLS = [
    ("y:0", {"x:0": X}),
    ("y:0", {"h:0": H}),                   # the same fetch, an intermediate tensor fed
    (["h:0", "y:0"], {"x:0": X}),          # the fetch set changes
    ("z:0", {"h:0": H}),
    (["second:0", "z:0"], {"x:0": X2}),    # another batch size, a multi-output op's output 1
    ("y:0", {"x:0": X}),                   # a signature seen before
    ("flip_w", None),                      # a variable assigned between calls
    ("y:0", {"x:0": X}),
    (("z:0", "h:0"), {"x:0": X}),
    ("bump_v", None),                      # a resource variable assigned
    ({"z": "z:0", "s": ["second:0"]}, {"x:0": X2}),  # a dict of fetches (not cached)
    ("z:0", {"h:0": H}),
]


def _tf_sequence(tf, directory):
    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default():
        saver = _build(tf)
        with v1.Session(graph=graph) as sess:
            sess.run(v1.global_variables_initializer())
            prefix = saver.save(sess, os.path.join(directory, "m.ckpt"), write_meta_graph=False)
            meta = os.path.join(directory, "m.meta")
            v1.train.export_meta_graph(filename=meta, graph=graph, saver_def=saver.as_saver_def())
            expected = [sess.run(fetches, feed) for fetches, feed in CALLS]
    return meta, prefix, expected


def _same(ours, theirs):
    if isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs)
        for key in theirs:
            _same(ours[key], theirs[key])
    elif isinstance(theirs, (list, tuple)):
        assert type(ours) is type(theirs) and len(ours) == len(theirs)
        for a, b in zip(ours, theirs, strict=True):
            _same(a, b)
    elif theirs is None:
        assert ours is None
    else:
        assert_same(ours, theirs)


def test_changing_fetches_feeds_and_variables_match_tensorflow(tmp_path):
    tf = tf_module()
    meta, prefix, expected = _tf_sequence(tf, str(tmp_path))
    graph = import_meta_graph(meta)
    graph.restore(prefix)
    for (fetches, feed), theirs in zip(CALLS, expected, strict=True):
        _same(graph.run(fetches, feed), theirs)
    # restoring puts the saved values back: the cached calls see them
    graph.restore(prefix)
    for (fetches, feed), theirs in zip(CALLS[:6], expected[:6], strict=True):
        _same(graph.run(fetches, feed), theirs)
    tensor = graph.get_tensor_by_name("x:0")
    _same(graph.run(graph.get_tensor_by_name("y"), {tensor: X}), expected[0])  # Tensor keys, same values


def test_errors_from_cached_runs_name_the_node(tmp_path):
    tf = tf_module()
    meta, prefix, expected = _tf_sequence(tf, str(tmp_path))
    graph = import_meta_graph(meta)
    graph.restore(prefix)
    _same(graph.run("z:0", {"h:0": H}), expected[3])
    for _ in range(2):  # the same signature, cached after the first failure too
        with pytest.raises(RuntimeError) as info:
            graph.run("z:0", {"h:0": H[:, :5]})  # y is [3, 5]: z's MatMul with v [6, 2] fails
        assert "while running TensorFlow node 'z' (MatMul)" in getattr(info.value, "__notes__", [])
    _same(graph.run("z:0", {"h:0": H}), expected[3])
