"""Loops and conditionals built in real TensorFlow: TF1 frames, functional While/If, TensorLists,
TensorArrays, Keras recurrent layers; compared with ``session.run`` and ``tf.gradients``.

Each graph is built once per module (TF graph construction is slow) and fed several inputs.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from tf_graphs import assert_same, control_flow, session_values, tf_module

from lightning_saver import Saver, import_meta_graph
from lightning_saver.errors import GraphImportError

tf_module()
TOL = {"rtol": 1e-5, "atol": 1e-5}
RNG = np.random.default_rng(16)
X = RNG.normal(size=(2, 3)).astype(np.float32)


# ---- plain loops and conds, as TF1 frames and as functional ops ----------------------------------
LOOP_FETCHES = ["h:0", "i:0", "nested:0", "stacked:0", "cond_out:0", "case_out:0", "cond_in_loop:0",
                "loop_in_cond:0"]
LOOP_FEEDS = [{"x:0": X, "n:0": 3, "k:0": 0}, {"x:0": -X * 2, "n:0": 0, "k:0": 1},
              {"x:0": X * 0.5, "n:0": 5, "k:0": 7}]  # k = 7: switch_case's default, the last branch


def _loops(v2):
    def build(tf):
        v1 = tf.compat.v1
        with control_flow(v2):
            x = v1.placeholder(tf.float32, [None, 3], name="x")
            n = v1.placeholder(tf.int32, [], name="n")  # the trip count depends on the input
            w = v1.get_variable("w", initializer=RNG.normal(size=(3, 3)).astype(np.float32) * 0.5,
                                use_resource=v2)
            i, h = tf.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, tf.tanh(tf.matmul(h, w) + 0.1)),
                                 [tf.constant(0), x])
            tf.identity(h, name="h")
            tf.identity(i, name="i")

            def outer(i, acc):
                _, acc = tf.while_loop(lambda j, a: j < i,
                                       lambda j, a: (j + 1, a + tf.cast(j, tf.float32) * x), [0, acc])
                return i + 1, acc

            tf.identity(tf.while_loop(lambda i, a: i < 4, outer, [0, tf.zeros_like(x)])[1], name="nested")
            array = tf.TensorArray(tf.float32, size=n, element_shape=[3])
            def write(k, t):
                return k + 1, t.write(k, tf.reduce_sum(x * w[k % 3], 0))

            _, array = tf.while_loop(lambda k, t: k < n, write, [0, array])
            tf.identity(array.stack(), name="stacked")
            positive = tf.reduce_sum(x) > 0
            tf.identity(tf.cond(positive, lambda: tf.matmul(x, w) * 2.0, lambda: x - 1.0), name="cond_out")
            k = v1.placeholder(tf.int32, [], name="k")
            branches = [lambda: x * 3.0, lambda: tf.matmul(x, w), lambda: tf.sin(x)]
            tf.identity(tf.switch_case(k, branches), name="case_out")

            def odd_even(i, h):
                h = tf.cond(tf.equal(i % 2, 0), lambda: tf.tanh(tf.matmul(h, w)), lambda: h * 0.5 + 1.0)
                return i + 1, h

            looped = tf.while_loop(lambda i, h: i < n, odd_even, (0, x), maximum_iterations=4)[1]
            tf.identity(looped, name="cond_in_loop")

            def loop():
                return tf.while_loop(lambda i, h: i < 3, lambda i, h: (i + 1, h * w[0]), [0, x])[1]

            tf.identity(tf.cond(n > 2, loop, lambda: x), name="loop_in_cond")
    return build


@pytest.fixture(scope="module", params=["frames", "functional"])
def loops(request, tmp_path_factory):
    v2 = request.param == "functional"
    directory = tmp_path_factory.mktemp(request.param)
    grads = [("h:0", ["w:0", "x:0"]), ("cond_out:0", ["x:0"]), ("cond_in_loop:0", ["w:0", "x:0"]),
             ("loop_in_cond:0", ["w:0", "x:0"])]
    made = session_values(directory, "loops", _loops(v2), LOOP_FEEDS, LOOP_FETCHES, grads, v2)
    return request.param, *made


def test_loops_run_like_session_run(loops):
    kind, meta, ckpt, values, _ = loops
    graph = import_meta_graph(meta)
    ops = Counter(n.op for n in graph.meta_graph_def.graph_def.node)
    if kind == "frames":
        assert ops["Enter"] and ops["LoopCond"] >= 4 and ops["TensorArrayV3"] and ops["Switch"]
    else:
        assert ops["While"] + ops["StatelessWhile"] >= 3 and ops["TensorListReserve"]
        assert ops["If"] + ops["StatelessIf"] >= 1 and ops["Case"] + ops["StatelessCase"] == 1
    graph.restore(ckpt)
    for feed, expected in zip(LOOP_FEEDS, values, strict=True):
        for ours, theirs in zip(graph.run(LOOP_FETCHES, feed), expected, strict=True):
            assert_same(ours, theirs, **TOL)


def test_loops_module_matches_and_trains_like_tf_gradients(loops, tmp_path):
    kind, meta, ckpt, values, grads = loops
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    module = graph.to_module(inputs=["x:0", "n:0", "k:0"], outputs=LOOP_FETCHES)
    assert "loop" in module.code and isinstance(module.get_submodule("loop"), torch.nn.Module)
    children = Counter(type(m).__name__ for _, m in module.named_children())
    assert children["LoopModule"] == 4  # the loop in a cond body is inside that cond
    # an if/else per tf.cond (cond_out, loop_in_cond; TF1's Switch/Merge too) and one for switch_case
    assert children["BranchModule"] == 3 and not children["RegionModule"]
    w = dict(module.named_parameters())["w"]
    for feed, expected, want in zip(LOOP_FEEDS, values, grads, strict=True):
        x = torch.tensor(feed["x:0"], requires_grad=True)
        outs = module(x, torch.tensor(feed["n:0"]), torch.tensor(feed["k:0"]))
        for ours, theirs in zip(outs, expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
        got = [*_grads(outs[0], [w, x]), *_grads(outs[4], [x]), *_grads(outs[6], [w, x]),
               *_grads(outs[7], [w, x])]
        for ours, theirs in zip(got, want, strict=True):
            assert_same(ours.numpy(), theirs, **TOL)
    # saved with our Saver, read back into a fresh graph by its TF variable name
    with torch.no_grad():
        w.mul_(0.5)
    path = Saver(max_to_keep=1).save(module, str(tmp_path / "loops"), global_step=1)
    fresh = import_meta_graph(meta)
    assert fresh.restore(path) == ["w"]
    feed = LOOP_FEEDS[0]
    expected = module(torch.from_numpy(feed["x:0"]), torch.tensor(feed["n:0"]), torch.tensor(0))[0]
    expected = expected.detach().numpy()
    assert_same(fresh.run("h:0", feed), expected, **TOL)


def _grads(output, wrt):
    """d sum(output) / d wrt; zeros where the output does not depend on it (as TF reports)."""
    got = torch.autograd.grad(output.sum(), wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt, strict=True)]


def test_reading_inside_a_loop_is_refused_with_the_frame_name(loops):
    kind, meta, *_ = loops
    graph = import_meta_graph(meta)
    if kind == "frames":
        with pytest.raises(GraphImportError, match=r"inside the TF1 while_loop frame 'while/while_context'"):
            graph.run("while/Identity_1:0", LOOP_FEEDS[0])
    else:  # a functional loop's body is a function of the library, not nodes of the graph
        library = {f.signature.name for f in graph.meta_graph_def.graph_def.library.function}
        loops_ = [n for n in graph.meta_graph_def.graph_def.node if n.op in ("While", "StatelessWhile")]
        assert all(n.attr["body"].func.name in library for n in loops_)


# ---- Keras recurrent layers, frozen the default way (TF1 frames) and with functional While ------
KERAS_X = [RNG.normal(size=(2, 5, 3)).astype(np.float32), RNG.normal(size=(1, 5, 3)).astype(np.float32)]


@pytest.fixture(scope="module", params=["lstm", "gru", "bidirectional"])
def keras_rnn(request, tmp_path_factory):
    """The layer frozen both ways, each with TF's outputs and input gradients from session.run."""
    tf = tf_module()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    tf.keras.utils.set_random_seed(7)
    layers = tf.keras.layers
    layer = {"lstm": lambda: layers.LSTM(4), "gru": lambda: layers.GRU(3, return_sequences=True),
             "bidirectional": lambda: layers.Bidirectional(layers.LSTM(3))}[request.param]()
    inputs = tf.keras.Input((5, 3))
    model = tf.keras.Model(inputs, layer(inputs))
    concrete = tf.function(lambda x: model(x)).get_concrete_function(tf.TensorSpec([None, 5, 3], tf.float32))
    grads = []  # TF cannot differentiate a frozen lowered loop (no while context): the tape on the model
    for batch in KERAS_X:
        x = tf.constant(batch)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x)
            loss = tf.reduce_sum(y * y)
        grads.append(tape.gradient(loss, x).numpy())
    made = {}
    for lower in (True, False):
        frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=lower)
        graph_def = frozen.graph.as_graph_def()
        names = frozen.inputs[0].name, frozen.outputs[0].name
        path = str(tmp_path_factory.mktemp(request.param) / "frozen.meta")
        with tf.Graph().as_default() as graph:
            tf.compat.v1.train.export_meta_graph(filename=path, graph_def=graph_def)
            tf.compat.v1.import_graph_def(graph_def, name="")
            with tf.compat.v1.Session(graph=graph) as sess:
                values = [sess.run(names[1], {names[0]: batch}) for batch in KERAS_X]
        expected = list(zip(values, grads, strict=True))
        made[lower] = (path, names, expected, Counter(n.op for n in graph_def.node))
    return made


@pytest.mark.parametrize("lower", [True, False], ids=["frames", "functional"])
def test_frozen_keras_rnn_runs_and_trains_like_tensorflow(keras_rnn, lower):
    path, (x_name, y_name), expected, ops = keras_rnn[lower]
    assert (ops["Enter"] > 0) == lower and (ops["While"] + ops["StatelessWhile"] > 0) != lower
    assert ops["TensorListFromTensor"]
    graph = import_meta_graph(path)
    module = graph.to_module(inputs=x_name, outputs=y_name)
    for batch, (want, want_grad) in zip(KERAS_X, expected, strict=True):
        assert_same(graph.run(y_name, {x_name: batch}), want, **TOL)
        x = torch.tensor(batch, requires_grad=True)
        y = module(x)
        assert_same(y.detach().numpy(), want, **TOL)
        (got_grad,) = torch.autograd.grad((y * y).sum(), x)
        assert_same(got_grad.numpy(), want_grad, **TOL)


# ---- TF1 dynamic_rnn over an LSTM cell, batch norm in tf.cond(training), restored from a Saver ---
class _LSTMCell:
    """``tf.compat.v1.nn.rnn_cell.LSTMCell``'s math (forget bias 1) and variable names; Keras 3
    removed the class, ``dynamic_rnn`` only needs this much of it."""

    def __init__(self, tf, units, kernel, bias):
        self.tf, self.units, self.kernel, self.bias = tf, units, kernel, bias
        self.state_size, self.output_size = (units, units), units

    def get_initial_state(self, inputs=None, batch_size=None, dtype=None):
        zeros = self.tf.zeros([batch_size, self.units], dtype)
        return zeros, zeros

    def zero_state(self, batch_size, dtype):
        return self.get_initial_state(batch_size=batch_size, dtype=dtype)

    def __call__(self, inputs, state):
        tf = self.tf
        c, h = state
        gates = tf.matmul(tf.concat([inputs, h], 1), self.kernel) + self.bias
        i, j, f, o = tf.split(gates, 4, axis=1)
        c = tf.sigmoid(f + 1.0) * c + tf.sigmoid(i) * tf.tanh(j)
        h = tf.sigmoid(o) * tf.tanh(c)
        return h, (c, h)


RNN_FETCHES = ["outputs:0", "logits:0"]
RNN_X = RNG.normal(size=(3, 4, 2)).astype(np.float32)
RNN_FEEDS = [{"x:0": RNN_X, "lengths:0": np.array([4, 2, 3], np.int32)},
             {"x:0": RNN_X[:2], "lengths:0": np.array([1, 4], np.int32)}]


def _dynamic_rnn(tf):
    v1 = tf.compat.v1
    with control_flow(False):
        x = v1.placeholder(tf.float32, [None, 4, 2], name="x")
        lengths = v1.placeholder(tf.int32, [None], name="lengths")
        training = v1.placeholder_with_default(False, [], name="training")
        with v1.variable_scope("rnn/lstm_cell"):
            kernel = v1.get_variable("kernel", [2 + 3, 12], initializer=v1.glorot_uniform_initializer(seed=1))
            bias = v1.get_variable("bias", [12], initializer=v1.zeros_initializer())
        outputs, (_, h) = v1.nn.dynamic_rnn(_LSTMCell(tf, 3, kernel, bias), x, sequence_length=lengths,
                                            dtype=tf.float32)
        tf.identity(outputs, name="outputs")
        with v1.variable_scope("bn"):
            gamma = v1.get_variable("gamma", [3], initializer=v1.ones_initializer())
            beta = v1.get_variable("beta", [3], initializer=v1.zeros_initializer())
            mean = v1.get_variable("moving_mean", [3], initializer=v1.constant_initializer(0.1),
                                   trainable=False)
            var = v1.get_variable("moving_variance", [3], initializer=v1.ones_initializer(), trainable=False)
        image = tf.reshape(h, [-1, 1, 1, 3])

        def train():
            return v1.nn.fused_batch_norm(image, gamma, beta, epsilon=1e-3, is_training=True)[0]

        def infer():
            return v1.nn.fused_batch_norm(image, gamma, beta, mean, var, epsilon=1e-3, is_training=False)[0]

        normed = tf.reshape(tf.cond(training, train, infer), [-1, 3])
        tf.identity(tf.matmul(normed, kernel[:3, :2]), name="logits")


@pytest.fixture(scope="module")
def dynamic_rnn(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dynamic_rnn")
    grads = [("logits:0", ["rnn/lstm_cell/kernel:0", "bn/gamma:0", "x:0"])]
    return session_values(directory, "rnn", _dynamic_rnn, RNN_FEEDS, RNN_FETCHES, grads, v2=False)


def test_tf1_dynamic_rnn_restored_from_a_saver_checkpoint(dynamic_rnn):
    meta, ckpt, values, grads = dynamic_rnn
    graph = import_meta_graph(meta)
    ops = Counter(n.op for n in graph.meta_graph_def.graph_def.node)
    assert ops["TensorArrayV3"] and ops["TensorArrayScatterV3"] and ops["TensorArrayReadV3"]
    assert ops["TensorArrayWriteV3"] and ops["TensorArrayGatherV3"] and ops["LoopCond"] and ops["Switch"]
    assert set(graph.restore(ckpt, strict=True)) >= {"rnn/lstm_cell/kernel", "bn/gamma"}
    for feed, expected in zip(RNN_FEEDS, values, strict=True):
        for ours, theirs in zip(graph.run(RNN_FETCHES, feed), expected, strict=True):
            assert_same(ours, theirs, **TOL)
    # training left at its default: the batch norm's tf.cond is folded and the module builds
    module = graph.to_module(inputs=["x:0", "lengths:0"], outputs=RNN_FETCHES)
    assert not [m for m in module.modules() if type(m).__name__ == "RegionModule"]
    params = dict(module.named_parameters())
    for feed, expected, want in zip(RNN_FEEDS, values, grads, strict=True):
        x = torch.tensor(feed["x:0"], requires_grad=True)
        outs = module(x, torch.from_numpy(feed["lengths:0"]))
        for ours, theirs in zip(outs, expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
        got = torch.autograd.grad(outs[1].sum(), [params["rnn/lstm_cell/kernel"], params["bn/gamma"], x])
        for ours, theirs in zip(got, want, strict=True):
            assert_same(ours.numpy(), theirs, **TOL)


def test_tensor_list_ops_match_tensorflow(tmp_path):
    from tf_graphs import check_one_op

    def lists(tf, x):
        raw, shape, f32 = tf.raw_ops, tf.constant([2]), tf.float32
        items = raw.TensorListFromTensor(tensor=x, element_shape=shape)
        items = raw.TensorListPushBack(input_handle=items, tensor=x[0] * 2.0)
        items, last = raw.TensorListPopBack(input_handle=items, element_shape=shape, element_dtype=f32)
        items = raw.TensorListSetItem(input_handle=items, index=1, item=last + 1.0)
        reserved = raw.TensorListReserve(element_shape=shape, num_elements=3, element_dtype=f32)
        reserved = raw.TensorListSetItem(input_handle=reserved, index=1, item=x[2])
        return [raw.TensorListStack(input_handle=items, element_shape=shape, element_dtype=f32),
                raw.TensorListGather(input_handle=items, indices=[2, 0], element_shape=shape,
                                     element_dtype=f32),
                raw.TensorListLength(input_handle=items), last,
                raw.TensorListElementShape(input_handle=items, shape_type=tf.int32),
                raw.TensorListGetItem(input_handle=reserved, index=0, element_shape=shape, element_dtype=f32),
                raw.TensorListStack(input_handle=reserved, element_shape=shape, element_dtype=f32)]

    check_one_op(tmp_path, lists, {"x": RNG.normal(size=(3, 2)).astype(np.float32)})


def test_tensor_array_v3_ops_match_tensorflow(tmp_path):
    from tf_graphs import check_one_op

    def arrays(tf, x):
        with control_flow(False):  # TF1 TensorArrayV3 (v2 control flow writes TensorLists)
            split = tf.TensorArray(tf.float32, size=2, infer_shape=False, clear_after_read=False)
            split = split.split(x, [1, 3])
            unstacked = tf.TensorArray(tf.float32, size=4).unstack(x)
            written = tf.TensorArray(tf.float32, size=3, element_shape=[2]).write(2, x[0] * 3.0)
            return [split.concat(), split.read(1), split.size(), unstacked.gather([3, 1]), written.stack()]

    check_one_op(tmp_path, arrays, {"x": RNG.normal(size=(4, 2)).astype(np.float32)})


def test_malformed_frame_fails_when_needed_and_names_the_frame():
    from tensorboard.compat.proto import graph_pb2, node_def_pb2

    def node(name, op, *inputs, frame=None):
        made = node_def_pb2.NodeDef(name=name, op=op, input=list(inputs))
        if frame:
            made.attr["frame_name"].s = frame.encode()
        return made

    graph = graph_pb2.GraphDef(node=[  # a loop without its LoopCond
        node("x", "Placeholder"), node("enter", "Enter", "x", frame="f"),
        node("merge", "Merge", "enter", "next"), node("next", "NextIteration", "merge"),
        node("exit", "Exit", "merge"), node("y", "Identity", "x")])
    imported = import_meta_graph(graph)
    assert imported.run("y:0", {"x:0": np.float32(2.0)}) == 2.0  # the broken loop is not needed
    message = r"TF1 while_loop frame 'f' cannot be imported: it has 0 LoopCond"
    with pytest.raises(GraphImportError, match=message):
        imported.run("exit:0", {"x:0": np.float32(2.0)})


def test_a_loop_that_assigns_a_variable_is_refused(tmp_path):
    def build(tf):
        v1 = tf.compat.v1
        with control_flow(False):
            v = v1.get_variable("v", initializer=1.0, use_resource=False)
            counted = tf.while_loop(lambda i: i < 3,
                                    lambda i: i + tf.cast(v1.assign_add(v, 1.0), tf.int32), [0])
            tf.identity(counted, name="counted")

    meta, ckpt, _, _ = session_values(tmp_path, "assign", build, [], [], v2=False)
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    message = r"node 'while/AssignAdd' in while_loop body 'while/while_context' .* assigns a variable"
    with pytest.raises(GraphImportError, match=message):
        graph.run("counted:0")
