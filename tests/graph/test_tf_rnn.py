"""Recurrent models built in real TensorFlow: Keras LSTM/GRU/bidirectional LSTM frozen with their loops
lowered to TF1 frames and as functional ``While``, and a TF1 ``dynamic_rnn`` over an LSTM cell restored
from a TF ``Saver`` checkpoint; compared with ``session.run`` and TF's gradients at 1e-5.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from tf_graphs import assert_same, control_flow, session_values, tf_module

from lightning_saver import Saver, import_meta_graph

tf_module()
TOL = {"rtol": 1e-5, "atol": 1e-5}
RNG = np.random.default_rng(17)


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
             {"x:0": RNN_X[:2], "lengths:0": np.array([1, 4], np.int32)},
             {"x:0": RNN_X, "lengths:0": np.array([3, 4, 1], np.int32), "training:0": True}]


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


def test_tf1_dynamic_rnn_restored_from_a_saver_checkpoint(dynamic_rnn, tmp_path):
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
    assert not [m for m in module.modules() if type(m).__name__ in ("RegionModule", "BranchModule")]
    # training as an input: the cond is an if/else in the module
    branched = graph.to_module(inputs=["x:0", "lengths:0", "training:0"], outputs=RNN_FETCHES)
    assert [type(m).__name__ for _, m in branched.named_children()].count("BranchModule") == 1
    params = dict(module.named_parameters())
    for feed, expected, want in zip(RNN_FEEDS, values, grads, strict=True):
        x = torch.tensor(feed["x:0"], requires_grad=True)
        args = [x, torch.from_numpy(feed["lengths:0"])]
        if "training:0" in feed:
            params = dict(branched.named_parameters())
            outs = branched(*args, torch.tensor(feed["training:0"]))
        else:
            outs = module(*args)
        for ours, theirs in zip(outs, expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
        got = torch.autograd.grad(outs[1].sum(), [params["rnn/lstm_cell/kernel"], params["bn/gamma"], x])
        for ours, theirs in zip(got, want, strict=True):
            assert_same(ours.numpy(), theirs, **TOL)
    # saved with our Saver, loaded into a module built afresh from the .meta (its initializers' values)
    with torch.no_grad():
        params["rnn/lstm_cell/kernel"].mul_(0.5)
    path = Saver(max_to_keep=1).save(branched, str(tmp_path / "rnn"), global_step=1)
    fresh = import_meta_graph(meta).to_module(inputs=["x:0", "lengths:0", "training:0"], outputs=RNN_FETCHES)
    Saver().restore(fresh, path)
    for feed in RNN_FEEDS:
        args = (torch.from_numpy(feed["x:0"]), torch.from_numpy(feed["lengths:0"]),
                torch.tensor(feed.get("training:0", False)))
        for ours, theirs in zip(fresh(*args), branched(*args), strict=True):
            assert_same(ours.detach().numpy(), theirs.detach().numpy(), rtol=0, atol=0)
