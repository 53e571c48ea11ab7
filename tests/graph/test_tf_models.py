"""Whole models built and trained in real TensorFlow, imported, and compared with session.run."""

from __future__ import annotations

import numpy as np
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module

from lightning_saver import import_meta_graph

tf_module()
RNG = np.random.default_rng(11)
TOL = {"rtol": 1e-5, "atol": 1e-5}


def _variable(tf, name, shape, resource=False, init=None):
    v1 = tf.compat.v1
    return v1.get_variable(name, shape, use_resource=resource,
                           initializer=init or v1.glorot_uniform_initializer(seed=len(name)))


def build_mlp(tf):
    """A TF1 MLP (tanh, relu, dropout-free), softmax cross entropy, Adam with a global step."""
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 6], name="x")
    labels = v1.placeholder(tf.int32, [None], name="labels")
    h = x
    for i, (units, act) in enumerate([(16, tf.tanh), (16, tf.nn.relu), (4, None)]):
        with v1.variable_scope(f"dense{i}"):
            w = _variable(tf, "kernel", [h.shape[-1], units])
            b = _variable(tf, "bias", [units], init=v1.zeros_initializer())
        h = tf.matmul(h, w) + b
        h = act(h) if act else h
    logits = tf.identity(h, name="logits")
    tf.nn.softmax(logits, name="probs")
    tf.argmax(logits, axis=1, name="classes")
    xent = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    loss = tf.reduce_mean(xent, name="loss")
    step = v1.train.get_or_create_global_step()
    v1.train.AdamOptimizer(0.01).minimize(loss, global_step=step, name="train")


def test_mlp_trained_with_adam(tmp_path):
    x = RNG.normal(size=(32, 6)).astype(np.float32)
    labels = RNG.integers(0, 4, size=32).astype(np.int32)

    def train(tf, sess):
        for _ in range(5):
            sess.run("train", {"x:0": x, "labels:0": labels})

    fetches = ["logits:0", "probs:0", "classes:0", "loss:0"]
    made = build_tf_graph(tmp_path, build_mlp, fetches, {"x:0": x, "labels:0": labels}, train=train)
    graph = import_meta_graph(made.meta)
    restored = graph.restore(made.ckpt, strict=True)
    assert "dense0/kernel/Adam" in restored and "global_step" in restored
    got = graph.run(fetches, {"x:0": x, "labels:0": labels})
    for ours, theirs in zip(got, made.expected, strict=True):
        assert_same(ours, theirs, **TOL)
    assert graph.run("global_step:0") == made.variables["global_step"] == 5


def _batch_norm(tf, x, name, training):
    v1 = tf.compat.v1
    c = x.shape[-1]
    with v1.variable_scope(name):
        gamma = _variable(tf, "gamma", [c], init=v1.random_uniform_initializer(0.5, 1.5, seed=2))
        beta = _variable(tf, "beta", [c], init=v1.random_uniform_initializer(-0.2, 0.2, seed=3))
        mean = v1.get_variable("moving_mean", [c], initializer=v1.zeros_initializer(), trainable=False,
                               use_resource=False)
        var = v1.get_variable("moving_variance", [c], initializer=v1.ones_initializer(), trainable=False,
                              use_resource=False)
    if not training:
        return v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=1e-3, is_training=False)[0]
    y, batch_mean, batch_var = v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3, is_training=True)
    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, v1.assign(mean, 0.9 * mean + 0.1 * batch_mean))
    v1.add_to_collection(v1.GraphKeys.UPDATE_OPS, v1.assign(var, 0.9 * var + 0.1 * batch_var))
    return y


def _cnn(tf, x, training):
    v1 = tf.compat.v1
    with v1.variable_scope("cnn", reuse=v1.AUTO_REUSE):
        k1 = _variable(tf, "conv1/kernel", [3, 3, 3, 8])
        h = tf.nn.conv2d(x, k1, strides=2, padding="SAME")
        h = tf.nn.relu(_batch_norm(tf, h, "bn1", training))
        h = tf.nn.max_pool2d(h, 2, 2, "VALID")
        k2 = _variable(tf, "conv2/kernel", [3, 3, 8, 8])
        h = tf.nn.conv2d(h, k2, strides=1, padding="VALID", dilations=1)
        h = tf.nn.relu6(_batch_norm(tf, h, "bn2", training))
        h = tf.nn.avg_pool2d(h, 3, 2, "SAME")
        h = tf.reshape(h, [-1, int(np.prod(h.shape[1:]))])
        w = _variable(tf, "dense/kernel", [h.shape[-1], 5])
        b = _variable(tf, "dense/bias", [5], init=tf.compat.v1.zeros_initializer())
        return tf.nn.bias_add(tf.matmul(h, w), b)


def build_cnn(tf):
    """A CNN with reference variables and fused batch norm; its training graph updates the averages."""
    v1 = tf.compat.v1
    x = v1.placeholder(tf.float32, [None, 12, 12, 3], name="x")
    labels = v1.placeholder(tf.int32, [None], name="labels")
    train_logits = _cnn(tf, x, training=True)
    tf.identity(train_logits, name="train_logits")
    tf.identity(_cnn(tf, x, training=False), name="logits")
    loss = v1.losses.sparse_softmax_cross_entropy(labels, train_logits)
    with tf.control_dependencies(v1.get_collection(v1.GraphKeys.UPDATE_OPS)):
        v1.train.MomentumOptimizer(0.05, 0.9).minimize(loss, name="train")


def test_cnn_fused_batch_norm_reference_variables(tmp_path):
    x = RNG.normal(size=(6, 12, 12, 3)).astype(np.float32)
    labels = RNG.integers(0, 5, size=6).astype(np.int32)

    def train(tf, sess):
        for _ in range(3):
            sess.run("train", {"x:0": x, "labels:0": labels})

    made = build_tf_graph(tmp_path, build_cnn, ["logits:0", "train_logits:0"], {"x:0": x}, train=train)
    graph = import_meta_graph(made.meta)
    assert {v.op for v in graph.variables.values()} == {"VariableV2"}
    graph.restore(made.ckpt, strict=True)
    np.testing.assert_array_equal(graph.run("cnn/bn1/moving_mean:0"), made.variables["cnn/bn1/moving_mean"])
    logits, train_logits = graph.run(["logits:0", "train_logits:0"], {"x:0": x})
    assert_same(logits, made.expected[0], **TOL)
    assert_same(train_logits, made.expected[1], **TOL)
    module = graph.to_module(inputs="x:0", outputs="logits:0")
    assert "cnn/bn1/moving_mean" in dict(module.named_buffers())
    assert "cnn/bn1/gamma" in dict(module.named_parameters())
    assert_same(module(torch.from_numpy(x)).detach().numpy(), made.expected[0], **TOL)


def test_frozen_keras_depthwise_gelu_layer_norm(tmp_path):
    tf = tf_module()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    keras = tf.keras
    tf.keras.utils.set_random_seed(5)
    inputs = keras.Input((10, 10, 4), name="image")
    h = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=2)(inputs)
    h = keras.layers.Conv2D(6, 1, activation="gelu")(h)
    h = keras.layers.DepthwiseConv2D(3, strides=2, padding="valid", activation="relu")(h)
    h = keras.layers.LayerNormalization(epsilon=1e-5)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    h = keras.layers.Dense(8, activation=keras.activations.gelu)(h)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    x = RNG.normal(size=(2, 10, 10, 4)).astype(np.float32)
    expected = model(x).numpy()

    spec = tf.TensorSpec([None, 10, 10, 4], tf.float32)
    fn = tf.function(lambda image: model(image)).get_concrete_function(spec)
    frozen = convert_variables_to_constants_v2(fn)
    graph_def = frozen.graph.as_graph_def()
    ops = {n.op for n in graph_def.node}
    assert "DepthwiseConv2dNative" in ops and not ops & {"VarHandleOp", "ReadVariableOp"}
    path = tmp_path / "frozen.meta"
    with tf.Graph().as_default():
        tf.compat.v1.train.export_meta_graph(filename=str(path), graph_def=graph_def)
    graph = import_meta_graph(path)
    got = graph.run(frozen.outputs[0].name, {frozen.inputs[0].name: x})
    assert_same(got, expected, **TOL)
    # a bare frozen GraphDef (.pb bytes) imports too
    bare = import_meta_graph(graph_def.SerializeToString())
    assert_same(bare.run(frozen.outputs[0].name, {frozen.inputs[0].name: x}), expected, **TOL)


def test_fine_tune_with_lightning_then_tensorflow_reads_the_weights(tmp_path):
    import pytorch_lightning as pl

    from lightning_saver import Saver
    from lightning_saver.tf import write_checkpoint

    tf = tf_module()
    x = RNG.normal(size=(32, 6)).astype(np.float32)
    labels = RNG.integers(0, 4, size=32).astype(np.int32)
    made = build_tf_graph(tmp_path, build_mlp, ["loss:0"], {"x:0": x, "labels:0": labels})
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt)

    class FineTune(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = graph.to_module(inputs="x:0", outputs="logits:0")

        def training_step(self, batch, _):
            inputs, targets = batch
            return torch.nn.functional.cross_entropy(self.net(inputs), targets.long())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    model = FineTune()
    dataset = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(labels))
    data = torch.utils.data.DataLoader(dataset, batch_size=8)
    trainer = pl.Trainer(max_steps=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, data)
    assert trainer.global_step == 6
    with torch.no_grad():
        tuned = model.net(torch.from_numpy(x)).numpy()
    loss_after = torch.nn.functional.cross_entropy(torch.from_numpy(tuned), torch.from_numpy(labels).long())
    assert float(loss_after) < made.expected[0]

    path = Saver(max_to_keep=1).save(model, str(tmp_path / "tuned"), global_step=trainer.global_step)
    fresh = import_meta_graph(made.meta)
    fresh.restore(made.ckpt)  # Adam slots and global_step from TF
    assert "dense0/kernel" in fresh.restore(path)  # the fine-tuned weights, keys "net.dense0/kernel"
    np.testing.assert_allclose(fresh.run("logits:0", {"x:0": x}), tuned, rtol=1e-6, atol=1e-6)

    # the peer check: TensorFlow restores the fine-tuned values and computes the same logits
    prefix = str(tmp_path / "tuned_tf")
    values = fresh.variable_values()
    write_checkpoint(prefix, {fresh.variables[n].checkpoint_key: v for n, v in values.items()})
    with tf.Graph().as_default():
        saver = tf.compat.v1.train.import_meta_graph(made.meta)
        with tf.compat.v1.Session() as sess:
            saver.restore(sess, prefix)
            theirs = sess.run("logits:0", {"x:0": x})
    assert_same(theirs, tuned, **TOL)
