"""import_meta_graph against real TensorFlow: API, pruning, variables of both kinds, renamed keys, errors."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tf_graphs import assert_same, build_tf_graph, tf_module, unremapped_config

from lightning_saver import import_meta_graph
from lightning_saver.errors import (
    CheckpointNotFoundError,
    GraphImportError,
    StateMismatchError,
    UnsupportedOpError,
)

tf_module()
RNG = np.random.default_rng(7)
X = RNG.normal(size=(5, 4)).astype(np.float32)
LABELS = RNG.integers(0, 3, size=5)


def _dense(tf, x, units, name, resource):
    v1 = tf.compat.v1
    with v1.variable_scope(name):
        w = v1.get_variable("kernel", [x.shape[-1], units], use_resource=resource,
                            initializer=v1.glorot_uniform_initializer(seed=1))
        b = v1.get_variable("bias", [units], use_resource=resource, initializer=v1.zeros_initializer())
    return tf.nn.bias_add(tf.matmul(x, w), b)


def _mlp(resource):
    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        labels = v1.placeholder(tf.int64, [None], name="labels")
        logits = tf.identity(_dense(tf, tf.nn.relu(_dense(tf, x, 8, "l1", resource)), 3, "l2", resource),
                             name="logits")
        tf.nn.softmax(logits, name="probs")
        loss = v1.losses.sparse_softmax_cross_entropy(labels, logits)
        v1.train.AdamOptimizer(0.05).minimize(loss, name="train_op")

    def train(tf, sess):
        for _ in range(3):
            sess.run("train_op", {"x:0": X, "labels:0": LABELS})

    return build, train


@pytest.fixture(scope="module", params=[False, True], ids=["ref", "resource"])
def mlp(request, tmp_path_factory):
    build, train = _mlp(request.param)
    directory = tmp_path_factory.mktemp("mlp")
    return build_tf_graph(directory, build, ["logits:0", "probs:0"], {"x:0": X}, train=train)


def test_seed_constant_plus_one(tmp_path):
    def build(tf):
        tf.identity(tf.constant(1) + 1, name="y")

    made = build_tf_graph(tmp_path, build, ["y:0"])
    graph = import_meta_graph(made.meta)
    y = graph.get_tensor_by_name("y")
    assert y.name == "y:0" and graph.get_tensor_by_name("y:0") == y
    got = graph.run(y)
    assert got == 2 and type(got) is type(made.expected[0])  # a numpy int32 scalar, like session.run
    assert graph.run("y") == 2


@pytest.mark.parametrize("resource", [False, True], ids=["ref", "resource"])
def test_saved_variable_restores(tmp_path, resource):
    def build(tf):
        x = tf.compat.v1.get_variable("x", initializer=1.0, use_resource=resource)
        tf.compat.v1.assign(x, 5.0, name="set_x")

    made = build_tf_graph(tmp_path, build, ["x:0"] if not resource else ["x/Read/ReadVariableOp:0"],
                          train=lambda tf, sess: sess.run("set_x"))
    assert made.variables["x"] == 5.0
    graph = import_meta_graph(made.meta)
    assert graph.run("x:0") == 1.0  # not restored yet: its initializer runs
    assert graph.restore(made.ckpt) == ["x"]
    assert graph.run("x:0") == made.variables["x"] == 5.0


def test_fetch_structures(mlp):
    graph = import_meta_graph(mlp.meta)
    graph.restore(mlp.ckpt)
    pair = collections.namedtuple("pair", "a b")
    fetches = {"l": "logits:0", "rest": ("probs:0", pair("logits:0", graph.get_tensor_by_name("probs")))}
    got = graph.run(fetches, feed_dict={graph.get_tensor_by_name("x"): X})
    assert isinstance(got, dict) and isinstance(got["rest"], tuple) and isinstance(got["rest"][1], pair)
    assert_same(got["l"], mlp.expected[0])
    assert_same(got["rest"][1].b, mlp.expected[1])
    assert isinstance(graph.run(["logits:0"], {"x:0": X}), list)


def test_training_ops_are_pruned(mlp):
    graph = import_meta_graph(mlp.meta)
    ops = {graph.meta_graph_def.graph_def.node[i].op for i in range(len(graph.meta_graph_def.graph_def.node))}
    assert {"SaveV2", "RestoreV2"} <= ops and ops & {"ApplyAdam", "ResourceApplyAdam"}
    assert graph.restore(mlp.ckpt)  # the Adam slots are restored too
    logits, probs = graph.run(["logits:0", "probs:0"], {"x:0": X})
    assert_same(logits, mlp.expected[0])
    assert_same(probs, mlp.expected[1])
    # the first op without a converter on the training path is a gradient op
    message = r"no converter for op '\w+' at node 'gradients/\S+', which feeds"
    with pytest.raises(UnsupportedOpError, match=message):
        graph.run("train_op", {"x:0": X, "labels:0": LABELS})


def test_checkpoint_keys_from_restore_subgraph(mlp):
    graph = import_meta_graph(mlp.meta)
    assert graph.variables["l1/kernel"].trainable and not graph.variables["l1/kernel/Adam"].trainable
    assert all(v.checkpoint_key == name for name, v in graph.variables.items())


@pytest.mark.parametrize("resource", [False, True], ids=["ref", "resource"])
def test_saver_renamed_keys_and_unsaved_variable(tmp_path, resource):
    def build(tf):
        v1 = tf.compat.v1
        start = np.arange(6, dtype=np.float32).reshape(2, 3)
        w = v1.get_variable("w", initializer=start, use_resource=resource)
        u = v1.get_variable("unsaved", initializer=np.full(3, 0.5, np.float32), use_resource=resource)
        tf.identity(tf.reduce_sum(w, 0) * u, name="y")
        v1.assign(w, w * 3.0, name="triple")

    made = build_tf_graph(tmp_path, build, ["y:0"], train=lambda tf, sess: sess.run("triple"),
                          saver_var_list=lambda tf: {"renamed/weights": tf.compat.v1.global_variables()[0]})
    graph = import_meta_graph(made.meta)
    assert graph.variables["w"].checkpoint_key == "renamed/weights"
    assert graph.variables["unsaved"].checkpoint_key == "unsaved"
    assert graph.restore(made.ckpt) == ["w"]
    assert_same(graph.run("y:0"), made.expected[0])  # 'unsaved' comes from its initializer
    message = r"no value for variable\(s\) unsaved \(checkpoint keys unsaved\)"
    with pytest.raises(StateMismatchError, match=message):
        graph.restore(made.ckpt, strict=True)


def test_uninitialized_variable_error_names_it(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        v = v1.get_variable("v", [3, 3], initializer=v1.orthogonal_initializer(seed=3), use_resource=False)
        tf.identity(v * 2.0, name="y")

    made = build_tf_graph(tmp_path, build, ["y:0"], save=False)
    graph = import_meta_graph(made.meta)
    with pytest.raises(GraphImportError, match=r"variable 'v' has no value: it was not restored, and its "
                                               r"initializer v/Initializer/\S+ could not run \(Unsupported"):
        graph.run("y:0")


def test_control_dependencies_run_assignments(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        counter = v1.get_variable("counter", initializer=1.0, use_resource=False)
        bump = v1.assign_add(counter, 2.0)
        with tf.control_dependencies([bump]):
            tf.identity(counter * 10.0, name="after")
        tf.identity(counter.read_value(), name="now")

    made = build_tf_graph(tmp_path, build, ["after:0", "now:0"], save=False)
    graph = import_meta_graph(made.meta)
    graph.run("init")  # the group of initializers: None, like session.run on an op
    assert graph.run("now:0") == 1.0
    first = graph.run("after:0")
    assert first == made.expected[0] == 30.0
    assert graph.run("now:0") == made.expected[1] == 3.0


def test_placeholder_with_default_stop_gradient_and_feeding_inner_tensors(tmp_path):
    def build(tf):
        x = tf.compat.v1.placeholder_with_default(np.ones((2, 2), np.float32), [None, 2], name="x")
        hidden = tf.multiply(x, 3.0, name="hidden")
        tf.stop_gradient(hidden, name="frozen")
        tf.add(hidden, 1.0, name="y")

    made = build_tf_graph(tmp_path, build, ["y:0"], save=False)
    graph = import_meta_graph(made.meta)
    assert_same(graph.run("y:0"), made.expected[0])
    assert_same(graph.run("y:0", {"x:0": X[:, :2]}), X[:, :2] * 3 + 1)
    assert_same(graph.run("y:0", {"hidden:0": np.zeros((1, 2), np.float32)}), np.ones((1, 2), np.float32))
    fed = np.full((1, 2), 7.0, np.float32)
    assert_same(graph.run("hidden:0", {"hidden:0": fed}), fed)  # a fed tensor is fetched as fed
    module = graph.to_module(inputs=["x:0"], outputs="frozen:0")
    x = torch.ones(2, 2, requires_grad=True)
    assert not module(x).requires_grad


def test_text_meta_graph_and_bytes(tmp_path):
    tf = tf_module()
    with tf.Graph().as_default() as g:
        tf.identity(tf.constant([1.5, 2.5]) * 2.0, name="y")
        tf.compat.v1.train.export_meta_graph(filename=str(tmp_path / "g.pbtxt"), graph=g, as_text=True)
        binary = tf.compat.v1.train.export_meta_graph(graph=g).SerializeToString()
    np.testing.assert_array_equal(import_meta_graph(tmp_path / "g.pbtxt").run("y:0"), [3.0, 5.0])
    np.testing.assert_array_equal(import_meta_graph(binary).run("y:0"), [3.0, 5.0])


def test_errors_name_what_and_where(tmp_path, mlp):
    graph = import_meta_graph(mlp.meta)
    graph.restore(mlp.ckpt)
    message = r"placeholder x:0 must be fed: it feeds 'MatMul' \(MatMul\); pass feed_dict="
    with pytest.raises(GraphImportError, match=message):
        graph.run("logits:0")
    with pytest.raises(GraphImportError, match=r"cannot feed a value of shape \(5, 3\) for tensor x:0, "
                                               r"which has shape \(None, 4\)"):
        graph.run("logits:0", {"x:0": X[:, :3]})
    with pytest.raises(GraphImportError, match="the graph has no node named 'nope'"):
        graph.get_tensor_by_name("nope:0")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint at"):
        graph.restore(tmp_path / "missing.ckpt")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        import_meta_graph(tmp_path / "missing.meta")
    (tmp_path / "junk.meta").write_bytes(b"\xff\x00junk")
    with pytest.raises(GraphImportError, match="not a TensorFlow MetaGraphDef or GraphDef"):
        import_meta_graph(tmp_path / "junk.meta")


def test_unsupported_op_names_type_node_and_consumer(tmp_path):
    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [3, 3], name="x")
        tf.add(tf.linalg.det(x, name="det"), 1.0, name="y")

    made = build_tf_graph(tmp_path, build, [], save=False)
    graph = import_meta_graph(made.meta)
    with pytest.raises(UnsupportedOpError, match=r"no converter for op 'MatrixDeterminant' at node 'det', "
                                                 r"which feeds 'y' \(AddV2\)"):
        graph.run("y:0", {"x:0": np.eye(3, dtype=np.float32)})


def test_plans_are_compiled_once(mlp):
    graph = import_meta_graph(mlp.meta)
    graph.restore(mlp.ckpt)
    for _ in range(3):
        graph.run("logits:0", {"x:0": X})
    graph.run(["logits:0"], {"x:0": X})
    assert len(graph._plans) == 1


def test_to_module_trains_and_shares_storage(mlp):
    graph = import_meta_graph(mlp.meta)
    graph.restore(mlp.ckpt)
    module = graph.to_module(inputs=["x:0"], outputs="logits:0")
    names = dict(module.named_parameters())
    assert set(names) == {"l1/kernel", "l1/bias", "l2/kernel", "l2/bias"}
    assert "l1/kernel/Adam" not in module.state_dict()
    assert_same(module(torch.from_numpy(X)).detach().numpy(), mlp.expected[0])
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(module(torch.from_numpy(X)), torch.from_numpy(LABELS))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = module(torch.from_numpy(X)).detach().numpy()
    np.testing.assert_allclose(graph.run("logits:0", {"x:0": X}), trained, rtol=1e-6)  # shared storage


def test_saver_file_of_module_restores_into_fresh_import(tmp_path, mlp):
    from lightning_saver import Saver

    graph = import_meta_graph(mlp.meta)
    graph.restore(mlp.ckpt)
    module = graph.to_module(inputs=["x:0"], outputs="logits:0")
    with torch.no_grad():
        module.get_parameter("l2/bias").add_(1.0)
    changed = module(torch.from_numpy(X)).detach().numpy()
    path = Saver(max_to_keep=2).save(module, str(tmp_path / "ft"), global_step=2)
    fresh = import_meta_graph(mlp.meta)
    assert fresh.restore(path) == ["l1/bias", "l1/kernel", "l2/bias", "l2/kernel"]
    np.testing.assert_allclose(fresh.run("logits:0", {"x:0": X}), changed, rtol=1e-6)
    np.testing.assert_allclose(fresh.run("logits:0", {"x:0": X}), mlp.expected[0] + 1.0, rtol=1e-5, atol=1e-5)
    other = Saver().save({"junk": torch.zeros(1)}, str(tmp_path / "other"))
    with pytest.raises(StateMismatchError, match=r"none of its 1 keys \(junk\) names a variable of the"):
        fresh.restore(other)


def _proto(tf, field, values, shape, dtype):
    """A TensorProto with fewer values than its shape holds, which TF fills with the last one."""
    from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2

    dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]
    proto = tensor_pb2.TensorProto(dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims))
    getattr(proto, field).extend(values)
    return proto


CONSTANTS = {
    "float_scalar_broadcast": (lambda tf: tf.constant(2.5, shape=[2, 3])),
    "float_content": (lambda tf: tf.constant(RNG.normal(size=(3, 4)).astype(np.float32))),
    "double": (lambda tf: tf.constant([1e-300, 2.0, -3.5], dtype=tf.float64)),
    "half": (lambda tf: tf.constant([0.5, -1.25, 65504.0], dtype=tf.float16)),
    "half_broadcast": (lambda tf: tf.constant(1.5, shape=[4], dtype=tf.float16)),
    "bfloat16": (lambda tf: tf.constant([0.5, -3.0, 1e30], dtype=tf.bfloat16)),
    "int8": (lambda tf: tf.constant([-128, 0, 127], dtype=tf.int8)),
    "uint8_content": (lambda tf: tf.constant(np.arange(256, dtype=np.uint8).reshape(16, 16))),
    "int16": (lambda tf: tf.constant([-32768, 7], dtype=tf.int16)),
    "int32_repeat_last": (lambda tf: tf.constant(_proto(tf, "int_val", [1, 2], shape=[5], dtype=3))),
    "float_repeat_last": (lambda tf: tf.constant(_proto(tf, "float_val", [1.5, -2.0], shape=[3], dtype=1))),
    "int64": (lambda tf: tf.constant([2**40, -(2**62)], dtype=tf.int64)),
    "bool": (lambda tf: tf.constant([True, False, True])),
    "bool_broadcast": (lambda tf: tf.constant(True, shape=[2, 2])),
    "empty": (lambda tf: tf.constant([], shape=[0, 3], dtype=tf.float32)),
    "complex64": (lambda tf: tf.constant([1 + 2j, -3j], dtype=tf.complex64)),
}


@pytest.mark.parametrize("case", sorted(CONSTANTS))
def test_constants_decode_like_tensorflow(tmp_path, case):
    def build(tf):
        tf.identity(CONSTANTS[case](tf), name="c")

    made = build_tf_graph(tmp_path, build, ["c:0"], save=False)
    got = import_meta_graph(made.meta).run("c:0")
    expected = made.expected[0]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got.astype(np.complex128 if got.dtype.kind == "c" else np.float64),
                                  expected.astype(np.complex128 if got.dtype.kind == "c" else np.float64))


def test_multi_output_fetch_and_to_module_refuses_assignments(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [4, 6], name="x")
        a, b, c = tf.split(x, [1, 2, 3], axis=1, name="parts")
        v = v1.get_variable("v", initializer=0.0, use_resource=True)
        with tf.control_dependencies([v1.assign_add(v, tf.reduce_sum(b))]):
            tf.identity(c * 2.0, name="y")

    made = build_tf_graph(tmp_path, build, ["parts:1", "parts:2", "y:0"], {"x:0": X[:4, :2].repeat(3, 1)},
                          save=False)
    graph = import_meta_graph(made.meta)
    got = graph.run(["parts:1", "parts:2", "y:0"], made.feed)
    for ours, theirs in zip(got, made.expected, strict=True):
        assert_same(ours, theirs)
    message = r"to_module: node '\S*AssignAddVariableOp' \(AssignAddVariableOp\) changes variable 'v'"
    with pytest.raises(GraphImportError, match=message):
        graph.to_module(inputs="x:0", outputs="y:0")
    module = graph.to_module(inputs="x:0", outputs=["parts:1", "parts:2"])
    for ours, theirs in zip(module(torch.from_numpy(made.feed["x:0"])), made.expected, strict=False):
        assert_same(ours.numpy(), theirs)


def test_sharded_saver_keys(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        a = v1.get_variable("a", initializer=np.ones(3, np.float32), use_resource=False)
        b = v1.get_variable("b", initializer=np.full(2, 4.0, np.float32), use_resource=True)
        tf.identity(tf.reduce_sum(a) * tf.reduce_sum(b), name="y")
        v1.group(v1.assign(a, a * 2.0), v1.assign(b, b + 1.0), name="change")

    def renamed(tf):
        return {f"shard/{v.op.name}": v for v in tf.compat.v1.global_variables()}

    made = build_tf_graph(tmp_path, build, ["y:0"], train=lambda tf, sess: sess.run("change"), sharded=True,
                          saver_var_list=renamed)
    assert made.expected[0] == 60.0
    graph = import_meta_graph(made.meta)
    assert "save/restore_shard" in graph.get_operation_names()
    assert {n: v.checkpoint_key for n, v in graph.variables.items()} == {"a": "shard/a", "b": "shard/b"}
    graph.restore(made.ckpt, strict=True)
    assert graph.run("y:0") == 60.0


def test_in_place_activations_never_touch_live_tensors(tmp_path):
    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [2, 6], name="x")
        h = x * 2.0
        viewed = tf.nn.relu(tf.reshape(h, [3, 4]))  # the Reshape output is a view of h, read again below
        tf.identity(tf.reduce_sum(viewed, 0), name="a")
        tf.identity(h + 1.0, name="b")
        tf.nn.relu6(tf.sigmoid(tf.tanh(h * 3.0)) * 8.0 - 2.0, name="chain")
        tf.identity(tf.nn.relu(h - 0.5, name="fetched_too"), name="c")
        # StopGradient of the feed is an alias torch cannot flag as a view (detach): never in place
        tf.identity(tf.nn.relu(tf.stop_gradient(x)), name="d")
        tf.identity(tf.nn.sigmoid(tf.stop_gradient(h)) + x, name="e")

    fetches = ["a:0", "b:0", "chain:0", "c:0", "fetched_too:0", "d:0", "e:0"]
    made = build_tf_graph(tmp_path, build, fetches, {"x:0": X[:2, :3].repeat(2, 1)}, save=False)
    graph = import_meta_graph(made.meta)
    for _ in range(2):
        got = graph.run(fetches, made.feed)
        for ours, theirs in zip(got, made.expected, strict=True):
            assert_same(ours, theirs)
    np.testing.assert_array_equal(made.feed["x:0"], X[:2, :3].repeat(2, 1))  # the feed is untouched


_DTYPES = ["float32", "float64", "float16", "bfloat16", "int8", "uint8", "int16", "uint16", "int32", "int64",
           "uint32", "uint64", "bool", "complex64", "complex128"]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(_DTYPES), shape=st.lists(st.integers(0, 4), max_size=3),
       seed=st.integers(0, 2**16), single=st.booleans())
def test_decode_tensor_matches_tensorflow(dtype, shape, seed, single):
    """Any TensorProto TF writes (packed content, or one value broadcast to a shape) decodes like TF's."""
    from tensorboard.compat.proto import tensor_pb2

    from lightning_saver.graph.tf_import.attrs import decode_tensor

    tf = tf_module()
    np_dtype = tf.as_dtype(dtype).as_numpy_dtype
    single = single and 0 not in shape  # TF refuses one value for an empty shape
    rng = np.random.default_rng(seed)
    values = rng.normal(size=1 if single else shape) * 100
    if np.dtype(np_dtype).kind == "c":
        values = values + 1j * rng.normal(size=values.shape)
    array = np.asarray(values).astype(np_dtype)
    proto = tf.make_tensor_proto(array, shape=shape if single else None)
    expected = tf.make_ndarray(proto)
    got = decode_tensor(tensor_pb2.TensorProto.FromString(proto.SerializeToString()))
    assert tuple(got.shape) == expected.shape
    if dtype == "bfloat16":
        got = got.float().numpy()
        expected = expected.astype(np.float32)
    else:
        got = got.numpy()
    assert got.dtype == expected.dtype
    np.testing.assert_array_equal(got, expected)


def _v1_cond_graph(tf):
    """A TF1-style tf.cond (Switch/Merge, as TF 1.x wrote it) on a placeholder_with_default flag."""
    from tensorflow.python.ops import control_flow_util

    v1 = tf.compat.v1
    old, control_flow_util.ENABLE_CONTROL_FLOW_V2 = control_flow_util.ENABLE_CONTROL_FLOW_V2, False
    try:
        x = v1.placeholder(tf.float32, [None, 3], name="x")
        training = v1.placeholder_with_default(False, [], name="training")
        v = v1.get_variable("v", initializer=np.array([1.0, 2.0, 3.0], np.float32), use_resource=False)
        y = tf.cond(training, lambda: tf.nn.relu(x * 10.0 + v), lambda: x - tf.constant(0.5) * v)
        tf.identity(y, name="y")
        tf.identity(tf.cond(training, lambda: tf.reduce_sum(x), lambda: tf.constant(-1.0)), name="z")
    finally:
        control_flow_util.ENABLE_CONTROL_FLOW_V2 = old


@pytest.mark.parametrize("training", [False, True])
def test_tf1_cond_switch_merge(tmp_path, training):
    feed = {"x:0": X[:2, :3], "training:0": training}
    made = build_tf_graph(tmp_path, _v1_cond_graph, ["y:0", "z:0"], feed)
    graph = import_meta_graph(made.meta)
    assert {"Switch", "Merge"} <= {n.op for n in graph.meta_graph_def.graph_def.node}
    graph.restore(made.ckpt)
    for ours, theirs in zip(graph.run(["y:0", "z:0"], feed), made.expected, strict=True):
        assert_same(ours, theirs)
    untaken = "cond/Relu:0" if not training else "cond/sub:0"
    with pytest.raises(GraphImportError, match=f"fetched tensor {untaken} has no value: it is in a tf.cond"):
        graph.run(untaken, feed)
    x = torch.from_numpy(feed["x:0"])
    # the flag left out of the inputs keeps its default (False): the cond is folded away
    folded = graph.to_module(inputs=["x:0"], outputs="y:0")
    assert not any(isinstance(m, torch.nn.Module) and "Region" in type(m).__name__ for m in folded.modules())
    assert_same(folded(x).detach().numpy(), graph.run("y:0", {"x:0": feed["x:0"]}))
    # the flag as an input: the Switch is decided at run time, inside the module
    module = graph.to_module(inputs=["x:0", "training:0"], outputs=["y:0", "z:0"])
    for ours, theirs in zip(module(x, torch.tensor(training)), made.expected, strict=True):
        assert_same(ours.detach().numpy(), theirs)


def _v2_functional_graph(tf):
    """TF2-style graph ops: tf.cond as If (branches in the function library), a tf.function call."""
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 3], name="x")
    training = v1.placeholder_with_default(False, [], name="training")
    v = v1.get_variable("v", initializer=np.array([1.0, 2.0, 3.0], np.float32), use_resource=True)
    y = tf.cond(training, lambda: tf.nn.relu(x * 10.0 + v), lambda: x - tf.constant(0.5) * v)
    tf.identity(y, name="y")
    mean, var = tf.function(lambda a: tf.nn.moments(a * 2.0, axes=[1]))(x)
    tf.identity(mean + var, name="called")
    det = tf.cond(training, lambda: tf.linalg.det(tf.reshape(x[0, 0], [1, 1])), lambda: tf.constant(0.0))
    tf.identity(det, name="unsupported")


@pytest.mark.parametrize("training", [False, True])
def test_tf2_functional_if_and_partitioned_call(tmp_path, training):
    feed = {"x:0": X[:2, :3], "training:0": training}
    made = build_tf_graph(tmp_path, _v2_functional_graph, ["y:0", "called:0"], feed)
    graph = import_meta_graph(made.meta)
    ops = {n.op for n in graph.meta_graph_def.graph_def.node}
    assert "If" in ops or "StatelessIf" in ops
    assert ops & {"PartitionedCall", "StatefulPartitionedCall"}
    graph.restore(made.ckpt)
    for ours, theirs in zip(graph.run(["y:0", "called:0"], feed), made.expected, strict=True):
        assert_same(ours, theirs)
    if training:
        message = r"op 'MatrixDeterminant' at node '\S+' in function '\w+' \(called by 'cond_1'\)"
        with pytest.raises(UnsupportedOpError, match=message):
            graph.run("unsupported:0", feed)
    else:
        assert graph.run("unsupported:0", feed) == 0.0  # the untaken branch is never compiled
        # the flag left at its default is a constant: the module inlines the branch and the call
        module = graph.to_module(inputs=["x:0"], outputs=["y:0", "called:0"])
        assert not any(n.op == "call_function" and "If" in str(n.target) for n in module.graph.nodes)
        assert set(dict(module.named_parameters())) == {"v"}
        for ours, theirs in zip(module(torch.from_numpy(feed["x:0"])), made.expected, strict=True):
            assert_same(ours.detach().numpy(), theirs)
    # the flag as an input: the module picks the branch when it runs
    module = graph.to_module(inputs=["x:0", "training:0"], outputs="y:0")
    assert_same(module(torch.from_numpy(feed["x:0"]), torch.tensor(training)).detach().numpy(),
                made.expected[0])


def test_conv_batch_norm_fusion_matches_tensorflow(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 9, 9, 3], name="x")

        def bn(h, name):
            c = h.shape[-1]
            init = v1.random_uniform_initializer(0.2, 1.5, seed=len(name))
            params = [v1.get_variable(f"{name}/{p}", [c], initializer=init) for p in ("g", "b", "m", "v")]
            return v1.nn.fused_batch_norm(h, *params, epsilon=1e-3, is_training=False)

        k1 = v1.get_variable("k1", [3, 3, 3, 4], initializer=v1.glorot_uniform_initializer(seed=1))
        h = tf.nn.relu(bn(tf.nn.conv2d(x, k1, 2, "SAME"), "bn1")[0])                 # fused
        k2 = v1.get_variable("k2", [3, 3, 4, 2], initializer=v1.glorot_uniform_initializer(seed=2))
        d = tf.nn.depthwise_conv2d(h, k2, [1, 1, 1, 1], "VALID")
        y2, mean2, _ = bn(d, "bn2")                                                    # fused
        tf.identity(tf.nn.relu6(y2), name="fused")
        k3 = v1.get_variable("k3", [1, 1, 8, 8], initializer=v1.glorot_uniform_initializer(seed=3))
        c3 = tf.nn.conv2d(y2, k3, 1, "SAME")
        tf.identity(bn(c3, "bn3")[0] + c3, name="shared_conv")                         # not fused: c3 reused
        y4, mean4, _ = bn(tf.nn.conv2d(y2, k3, 1, "SAME"), "bn4")
        tf.identity(y4, name="y4")
        tf.identity(mean4, name="mean4")                                               # not fused: mean used

    fetches = ["fused:0", "shared_conv:0", "y4:0", "mean4:0"]
    x = RNG.normal(size=(2, 9, 9, 3)).astype(np.float32)
    made = build_tf_graph(tmp_path, build, fetches, {"x:0": x})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    for ours, theirs in zip(graph.run(fetches, {"x:0": x}), made.expected, strict=True):
        assert_same(ours, theirs, rtol=1e-5, atol=1e-5)
    fused = [s.op for s in graph.plan([("fused", 0)], frozenset({("x", 0)}))._fast_steps if "+" in s.op]
    assert fused == ["Conv2D+FusedBatchNormV3+Relu", "DepthwiseConv2dNative+FusedBatchNormV3+Relu6"]
    rest = [s.op for s in graph.plan([("shared_conv", 0), ("mean4", 0)], frozenset({("x", 0)}))._fast_steps]
    assert rest.count("Conv2D") == 2 and rest.count("FusedBatchNormV3") == 2  # bn3 and bn4 stay apart
    # the folded filters follow the variables: change the module's parameters in place
    module = graph.to_module(inputs="x:0", outputs="fused:0")
    with torch.no_grad():
        module.get_parameter("bn1/g").mul_(3.0)
        module.get_parameter("k2").add_(0.25)
        expected = module(torch.from_numpy(x)).numpy()
    assert not np.allclose(expected, made.expected[0], atol=1e-3)
    np.testing.assert_allclose(graph.run("fused:0", {"x:0": x}), expected, rtol=1e-5, atol=1e-5)


def test_to_module_defaults_to_the_serving_signature(tmp_path):
    tf = tf_module()
    v1 = tf.compat.v1
    with tf.Graph().as_default() as g:
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        w = tf.constant(RNG.normal(size=(4, 3)).astype(np.float32))
        logits = tf.matmul(x, w, name="logits")
        probs = tf.nn.softmax(logits, name="probs")
        meta = v1.train.export_meta_graph(graph=g)
        info = v1.saved_model.utils.build_tensor_info
        meta.signature_def["serving_default"].CopyFrom(v1.saved_model.signature_def_utils.build_signature_def(
            inputs={"x": info(x)}, outputs={"output_10": info(logits), "output_2": info(probs)}))
        with v1.Session() as sess:
            expected = sess.run([probs, logits], {x: X})
    graph = import_meta_graph(meta.SerializeToString())
    assert graph.signature() == (["x:0"], ["probs:0", "logits:0"])
    got = graph.to_module()(torch.from_numpy(X))
    for ours, theirs in zip(got, expected, strict=True):
        assert_same(ours.numpy(), theirs)
    with pytest.raises(GraphImportError, match=r"no signature 'train' \(it has \['serving_default'\]\)"):
        graph.signature("train")


_UNARY = ["relu", "tanh", "sigmoid", "identity", "stop_gradient", "relu6", "negative"]
_BINARY = ["add", "multiply", "subtract", "maximum"]


@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_random_graphs_match_tensorflow(tmp_path_factory, data):
    """Random DAGs of element-wise ops, random fetches and an optional fed intermediate: pruning,
    ordering, aliasing, folding, dropping and in-place activations against session.run."""
    size = data.draw(st.integers(2, 9))
    plan = []
    for i in range(size):
        if data.draw(st.booleans()):
            plan.append((data.draw(st.sampled_from(_UNARY)), data.draw(st.integers(-2, i - 1))))
        else:
            plan.append((data.draw(st.sampled_from(_BINARY)), data.draw(st.integers(-2, i - 1)),
                         data.draw(st.integers(-2, i - 1))))
    fetched = sorted(set(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=3))))
    fed = data.draw(st.one_of(st.none(), st.integers(0, size - 1)))

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [2, 3], name="x")
        nodes = {-2: x, -1: tf.constant(np.linspace(-1.0, 1.0, 6, dtype=np.float32).reshape(2, 3))}
        for i, (op, *args) in enumerate(plan):
            fn = getattr(tf.nn, op, None) or getattr(tf.math, op, None) or getattr(tf, op)
            nodes[i] = tf.identity(fn(*[nodes[a] for a in args]), name=f"n{i}")

    feed = {"x:0": X[:2, :3]}
    if fed is not None:
        feed[f"n{fed}:0"] = np.full((2, 3), 0.5, np.float32)
    fetches = [f"n{i}:0" for i in fetched]
    # TF's remapper turns maximum(x, x * c) into a wrong LeakyRelu for c > 1 (see unremapped_config)
    made = build_tf_graph(tmp_path_factory.mktemp("random"), build, fetches, feed, save=False,
                          config=unremapped_config(tf_module()))
    graph = import_meta_graph(made.meta)
    # tolerance: chained tanh/sigmoid differ by a few ulp between Eigen and torch; a wrongly mutated
    # tensor is off by far more
    for _ in range(2):  # a second run reuses the cached plan
        for ours, theirs in zip(graph.run(fetches, feed), made.expected, strict=True):
            assert_same(ours, theirs, rtol=1e-5, atol=1e-5)
    module = graph.to_module(inputs=list(feed), outputs=fetches)
    outputs = module(*[torch.from_numpy(v) for v in feed.values()])
    for ours, theirs in zip(outputs, made.expected, strict=True):
        assert_same(ours.numpy(), theirs, rtol=1e-5, atol=1e-5)


def test_maximum_of_x_and_scaled_x_is_not_a_leaky_relu(tmp_path):
    """maximum(x, 2x) is x where x < 0 and 2x elsewhere; a LeakyRelu rewrite would give 2x and x."""

    def build(tf):
        x = tf.compat.v1.placeholder(tf.float32, [4], name="x")
        tf.identity(tf.maximum(x, x * 2.0), name="y")
        tf.identity(tf.maximum(x, x * 0.5), name="z")

    feed = {"x:0": np.array([0.5, -1.0, 2.0, -3.0], np.float32)}
    made = build_tf_graph(tmp_path, build, ["y:0", "z:0"], feed, save=False,
                          config=unremapped_config(tf_module()))
    graph = import_meta_graph(made.meta)
    for ours, theirs in zip(graph.run(["y:0", "z:0"], feed), made.expected, strict=True):
        assert_same(ours, theirs, rtol=0, atol=0)
    module = graph.to_module(inputs=["x:0"], outputs=["y:0", "z:0"])
    for ours, theirs in zip(module(torch.from_numpy(feed["x:0"])), made.expected, strict=True):
        assert_same(ours.numpy(), theirs, rtol=0, atol=0)
