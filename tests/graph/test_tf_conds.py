"""TF1 ``tf.cond`` decided at run time (``Switch``/``Merge`` on a fed input), built in real TensorFlow:
``graph.run`` and ``to_module`` run one structured if/else per cond, computing only the branch taken,
and match ``session.run`` and ``tf.gradients``; the module saves with our Saver and loads into a fresh one.
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
RNG = np.random.default_rng(61)
X = RNG.normal(size=(2, 3)).astype(np.float32)
# p = sum(x) > 0 and q = mean(x) > 0.5 take every combination; n is the while_loop's trip count
FEEDS = [{"x:0": np.abs(X) + 1.0, "n:0": 3}, {"x:0": np.abs(X) * 0.1, "n:0": 4},
         {"x:0": -np.abs(X) - 0.2, "n:0": 0}, {"x:0": np.concatenate([X, -X * 2.0]), "n:0": 5}]
FETCHES = ["nested:0", "two_0:0", "two_1:0", "again:0", "merged:0", "merge_index:0", "guarded:0",
           "looped:0"]
# (fetch, what tf.gradients differentiates it by): every pair is connected in some branch
GRADS = [("nested:0", ["w:0", "x:0"]), ("two_0:0", ["w:0", "x:0"]), ("two_1:0", ["w:0", "x:0"]),
         ("again:0", ["w:0", "x:0"]), ("guarded:0", ["x:0"]), ("looped:0", ["w:0", "x:0"])]


def _conds(tf):
    from tensorflow.python.ops import control_flow_ops

    v1 = tf.compat.v1
    with control_flow(False):
        x = v1.placeholder(tf.float32, [None, 3], name="x")
        n = v1.placeholder(tf.int32, [], name="n")
        w = v1.get_variable("w", initializer=RNG.normal(size=(3, 3)).astype(np.float32) * 0.5,
                            use_resource=False)
        p = tf.reduce_sum(x) > 0
        q = tf.reduce_mean(x) > 0.5
        # nested, with branches of different lengths (five ops, one op, one op)
        inner = lambda: tf.cond(q, lambda: tf.tanh(tf.matmul(x, w)) * 2.0 + w[0], lambda: x * w[1])  # noqa: E731
        tf.identity(tf.cond(p, inner, lambda: x - 1.0), name="nested")
        # two results; the else branch passes x through and returns a constant (hung off its pivot)
        two = tf.cond(p, lambda: (tf.matmul(x, w), tf.reduce_sum(x * w[2])), lambda: (x, tf.constant(0.5)))
        tf.identity(two[0], name="two_0")
        tf.identity(two[1], name="two_1")
        # the same predicate twice, with a step outside between the two conds
        first = tf.cond(p, lambda: x * 2.0, lambda: tf.sin(x))
        middle = tf.matmul(first, w)
        tf.identity(tf.cond(p, lambda: middle + 1.0, lambda: middle * w[0]), name="again")
        # Switch and Merge written by hand: one Switch, one Merge of its two sides and the index taken
        false_x, true_x = control_flow_ops.switch(x, p)
        merged, index = control_flow_ops.merge([false_x * 2.0, tf.matmul(true_x, w)])
        tf.identity(merged, name="merged")
        tf.identity(index, name="merge_index")

        # each branch asserts it was taken: running the other branch too would fail
        def then():
            with tf.control_dependencies([tf.debugging.Assert(p, ["the then branch ran with p false"])]):
                return tf.identity(x * 3.0)

        def otherwise():
            with tf.control_dependencies([tf.debugging.Assert(tf.logical_not(p), ["the else branch ran"])]):
                return tf.identity(tf.exp(x))

        tf.identity(tf.cond(p, then, otherwise), name="guarded")

        # conds (one nested) in a while_loop body
        def body(i, h):
            positive = lambda: tf.cond(tf.reduce_sum(h) > 0, lambda: tf.tanh(tf.matmul(h, w)),  # noqa: E731
                                       lambda: h * 0.5)
            return i + 1, tf.cond(tf.equal(i % 2, 0), positive, lambda: h + w[2])

        tf.identity(tf.while_loop(lambda i, h: i < n, body, [0, x])[1], name="looped")


@pytest.fixture(scope="module")
def conds(tmp_path_factory):
    return session_values(tmp_path_factory.mktemp("conds"), "conds", _conds, FEEDS, FETCHES, GRADS, v2=False)


def _branch_modules(module):
    kinds = Counter(type(m).__name__ for m in module.modules())
    assert not kinds["RegionModule"]  # never the dead-tensor fallback
    return kinds["BranchModule"]


def _grads(output, wrt):
    """d sum(output) / d wrt; zeros where the branch taken does not read it (as TF reports)."""
    if not output.requires_grad:  # the branch taken returned a constant
        return [torch.zeros_like(t) for t in wrt]
    got = torch.autograd.grad(output.sum(), wrt, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, wrt, strict=True)]


def _module_matches_tf(module, feed, expected, grad, params):
    """The module's output for ``feed`` (x, training) and its gradients for ``params`` and x match TF's."""
    x = torch.tensor(feed["x:0"], requires_grad=True)
    y = module(x, torch.tensor(feed["training:0"]))
    assert_same(y.detach().numpy(), expected, **TOL)
    got = torch.autograd.grad(y.sum(), [*params, x])
    for ours, theirs in zip(got, grad, strict=True):
        assert_same(ours.numpy(), theirs, **TOL)


def test_tf1_conds_run_like_session_run(conds):
    meta, ckpt, values, _ = conds
    graph = import_meta_graph(meta)
    ops = Counter(n.op for n in graph.meta_graph_def.graph_def.node)
    assert ops["Switch"] >= 10 and ops["Merge"] >= 8 and not ops["If"] + ops["StatelessIf"]
    graph.restore(ckpt)
    plan = graph.plan([graph._ref(f) for f in FETCHES], frozenset([("x", 0), ("n", 0)]))
    assert not plan.conditional and not [s for s in plan.steps if s.op in ("Switch", "Merge")]
    for feed, expected in zip(FEEDS, values, strict=True):
        for name, ours, theirs in zip(FETCHES, graph.run(FETCHES, feed), expected, strict=True):
            assert_same(ours, theirs, **TOL), name


def test_tf1_conds_module_is_if_else_and_trains_like_tf_gradients(conds):
    meta, ckpt, values, grads = conds
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    module = graph.to_module(inputs=["x:0", "n:0"], outputs=FETCHES)
    top = Counter(type(m).__name__ for _, m in module.named_children())
    # nested: 1 (its inner cond inside), two: 1, again: 2 (an op between), hand-written: 1, guarded: 1
    assert top["BranchModule"] == 6 and top["LoopModule"] == 1
    assert _branch_modules(module) == 6 + 1 + 2  # + nested's inner cond + the loop body's two
    w = dict(module.named_parameters())["w"]
    at = {name: k for k, name in enumerate(FETCHES)}
    for feed, expected, want in zip(FEEDS, values, grads, strict=True):
        x = torch.tensor(feed["x:0"], requires_grad=True)
        outs = module(x, torch.tensor(feed["n:0"]))
        for ours, theirs in zip(outs, expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
        got = [g for target, wrt in GRADS for g in _grads(outs[at[target]], [w, x][-len(wrt):])]
        for ours, theirs in zip(got, want, strict=True):
            assert_same(ours.numpy(), theirs, **TOL)


def test_tf1_cond_module_saves_with_the_saver_and_loads_into_a_fresh_module(conds, tmp_path):
    meta, ckpt, _, _ = conds
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    module = graph.to_module(inputs=["x:0", "n:0"], outputs=FETCHES)
    with torch.no_grad():
        dict(module.named_parameters())["w"].mul_(-0.7)  # as a training step would
    path = Saver(max_to_keep=1).save(module, str(tmp_path / "conds"), global_step=3)
    # a module built afresh (w from its initializer), then loaded from our checkpoint
    fresh = import_meta_graph(meta).to_module(inputs=["x:0", "n:0"], outputs=FETCHES)
    Saver().restore(fresh, path)
    for feed in FEEDS:
        args = torch.from_numpy(feed["x:0"]), torch.tensor(feed["n:0"])
        for ours, theirs in zip(fresh(*args), module(*args), strict=True):
            assert_same(ours.detach().numpy(), theirs.detach().numpy(), rtol=0, atol=0)
    # and graph.run reads the same checkpoint by the TF variable names
    restored = import_meta_graph(meta)
    assert restored.restore(path) == ["w"]
    args = torch.from_numpy(FEEDS[0]["x:0"]), torch.tensor(FEEDS[0]["n:0"])
    assert_same(restored.run("nested:0", FEEDS[0]), module(*args)[0].detach().numpy(), **TOL)


# ---- TF1 batch norm inside tf.cond(is_training, ...): folded when unfed, an if/else when fed ------
BN_FEEDS = [{"x:0": RNG.normal(size=(4, 2, 2, 3)).astype(np.float32), "training:0": t} for t in (True, False)]


def _batch_norm(tf):
    v1 = tf.compat.v1
    with control_flow(False):
        x = v1.placeholder(tf.float32, [None, 2, 2, 3], name="x")
        training = v1.placeholder_with_default(False, [], name="training")
        gamma = v1.get_variable("gamma", initializer=np.float32([1.0, 0.5, 2.0]))
        beta = v1.get_variable("beta", initializer=np.float32([0.1, 0.0, -0.3]))
        mean = v1.get_variable("moving_mean", initializer=np.float32([0.2, -0.1, 0.0]), trainable=False)
        var = v1.get_variable("moving_variance", initializer=np.float32([1.5, 0.8, 1.0]), trainable=False)
        y = tf.cond(training,
                    lambda: v1.nn.fused_batch_norm(x, gamma, beta, epsilon=1e-3, is_training=True)[0],
                    lambda: v1.nn.fused_batch_norm(x, gamma, beta, mean, var, epsilon=1e-3,
                                                   is_training=False)[0])
        tf.identity(tf.nn.relu(y) * 2.0, name="y")


def test_tf1_batch_norm_in_cond_is_training_folded_or_branched(tmp_path):
    grads = [("y:0", ["gamma:0", "beta:0", "x:0"])]
    meta, ckpt, values, want = session_values(tmp_path, "bn", _batch_norm, BN_FEEDS, ["y:0"], grads, v2=False)
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    for feed, (expected,) in zip(BN_FEEDS, values, strict=True):
        assert_same(graph.run("y:0", feed), expected, **TOL)
    # is_training left at its default: the cond is decided now, the module has no branch
    folded = graph.to_module(inputs="x:0", outputs="y:0")
    assert _branch_modules(folded) == 0
    assert_same(folded(torch.from_numpy(BN_FEEDS[1]["x:0"])).detach().numpy(), values[1][0], **TOL)
    # is_training an input: one if/else, trained through the branch the flag picks
    module = graph.to_module(inputs=["x:0", "training:0"], outputs="y:0")
    assert _branch_modules(module) == 1
    params = dict(module.named_parameters())
    for feed, (expected,), grad in zip(BN_FEEDS, values, want, strict=True):
        _module_matches_tf(module, feed, expected, grad, [params["gamma"], params["beta"]])


def test_module_names_the_tensors_it_was_asked_for(conds):
    meta, ckpt, _, _ = conds
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    module = graph.to_module(inputs=["x:0", "n:0"], outputs=FETCHES)
    assert module.tf_inputs == ["x:0", "n:0"] and module.tf_outputs == FETCHES


# ---- more of what TF1 writes with Switch/Merge ---------------------------------------------------
MORE_FETCHES = ["case_v1:0", "cond_in_condition:0", "shape_out:0", "max_or_min:0", "pred_from_cond:0",
                "bn_like:0"]
MORE_FEEDS = [{"x:0": X * s, "k:0": k, "training:0": t} for k, s, t in
              [(0, 1.0, False), (0, -1.0, True), (1, 1.0, True), (1, 2.0, False), (2, -1.0, False),
               (2, 1.0, True)]]


def _more(tf):
    v1 = tf.compat.v1
    with control_flow(False):
        x = v1.placeholder(tf.float32, [None, 3], name="x")
        k = v1.placeholder(tf.int32, [], name="k")
        training = v1.placeholder_with_default(False, [], name="training")
        w = v1.get_variable("w", initializer=RNG.normal(size=(3, 3)).astype(np.float32), use_resource=False)
        moving = v1.get_variable("moving", initializer=np.zeros(3, np.float32), trainable=False,
                                 use_resource=False)
        # tf.compat.v1.case: a chain of nested conds
        pairs = [(tf.equal(k, 0), lambda: x * 2.0), (tf.equal(k, 1), lambda: tf.matmul(x, w))]
        tf.identity(v1.case(pairs, default=lambda: tf.sin(x), exclusive=False), name="case_v1")
        # a cond in a while_loop's condition
        below = lambda i: tf.cond(k > 0, lambda: i < k * 2, lambda: i < 3)  # noqa: E731
        tf.identity(tf.while_loop(below, lambda i: i + 1, [0]), name="cond_in_condition")
        # an int and a float out of one cond
        size, extreme = tf.cond(tf.reduce_sum(x) > 0, lambda: (tf.shape(x)[0], tf.reduce_max(x)),
                                lambda: (tf.constant(7), tf.reduce_min(x)))
        tf.identity(size, name="shape_out")
        tf.identity(extreme, name="max_or_min")
        # a predicate that is itself a cond's result
        which = tf.cond(k > 1, lambda: tf.reduce_sum(x) > 0, lambda: tf.reduce_sum(x) < 0)
        tf.identity(tf.cond(which, lambda: x + 10.0, lambda: x * w[0]), name="pred_from_cond")

        # a moving average assigned in the branch taken when training (a ref variable through RefSwitch)
        def train():
            mean = tf.reduce_mean(x, 0)
            with tf.control_dependencies([v1.assign(moving, moving * 0.9 + mean * 0.1)]):
                return tf.identity(x - mean)

        tf.identity(tf.cond(training, train, lambda: x - moving), name="bn_like")


def test_tf1_case_cond_in_a_loop_condition_and_an_assignment_in_a_branch(tmp_path):
    meta, ckpt, values, _ = session_values(tmp_path, "more", _more, MORE_FEEDS, MORE_FETCHES, v2=False)
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    feeds = frozenset([("x", 0), ("k", 0), ("training", 0)])
    assert not graph.plan([graph._ref(f) for f in MORE_FETCHES], feeds).conditional
    # one graph fed in TF's order: the moving average moves only when the training branch runs
    for feed, expected in zip(MORE_FEEDS, values, strict=True):
        for ours, theirs in zip(graph.run(MORE_FETCHES, feed), expected, strict=True):
            assert_same(ours, theirs, **TOL)
    assert not np.allclose(graph.variable_values()["moving"].numpy(), 0.0)
    pure = MORE_FETCHES[:-1]
    module = graph.to_module(inputs=["x:0", "k:0", "training:0"], outputs=pure)
    assert _branch_modules(module) >= 6
    for feed, expected in zip(MORE_FEEDS, values, strict=True):
        args = torch.from_numpy(feed["x:0"]), torch.tensor(feed["k:0"]), torch.tensor(feed["training:0"])
        for ours, theirs in zip(module(*args), expected[:-1], strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
    with pytest.raises(GraphImportError, match=r"changes variable 'moving'"):
        graph.to_module(inputs=["x:0", "training:0"], outputs="bn_like:0")


def test_a_branch_that_fails_fails_only_when_taken(tmp_path):
    """A constant computation that cannot run (TF's shape inference could not see it) in one branch."""

    def build(tf):
        v1 = tf.compat.v1
        with control_flow(False):
            x = v1.placeholder(tf.float32, [None, 3], name="x")
            shape = v1.placeholder_with_default([2, 2], [2], name="shape")  # unfed: a constant here
            broken = lambda: x + tf.reduce_sum(tf.reshape(tf.constant([1.0, 2.0, 3.0]), shape))  # noqa: E731
            tf.identity(tf.cond(tf.reduce_sum(x) > 0, broken, lambda: x * 2.0), name="y")

    negative = {"x:0": -np.abs(X)}
    meta, _, (expected,), _ = session_values(tmp_path, "broken", build, [negative], ["y:0"], v2=False)
    graph = import_meta_graph(meta)
    assert_same(graph.run("y:0", negative), expected[0], **TOL)
    module = graph.to_module(inputs="x:0", outputs="y:0")
    assert_same(module(torch.from_numpy(negative["x:0"])).detach().numpy(), expected[0], **TOL)
    with pytest.raises(RuntimeError, match="shape"):  # TF: "Input to reshape is a tensor with 3 values"
        graph.run("y:0", {"x:0": np.abs(X)})


# ---- TF2 conds frozen the default way: If lowered to Switch/Merge, Case to _SwitchN/Merge ---------
LOWERED_FEEDS = [(np.abs(X) + 1.0, 0), (np.abs(X) + 1.0, 1), (np.abs(X) * 0.1, 1), (-np.abs(X), 0),
                 (np.abs(X) + 1.0, 5)]  # 5: out of range, switch_case's default (the last branch)


def test_frozen_tf2_conds_lowered_to_switch_merge_and_switchn(tmp_path):
    tf = tf_module()
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    w = tf.constant(RNG.normal(size=(3, 3)).astype(np.float32))

    @tf.function
    def model(x, k):
        y = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.matmul(x, w) * 2.0, lambda: tf.tanh(x) - 1.0)
        z = tf.cond(tf.reduce_mean(x) > 0.5, lambda: tf.cond(k > 0, lambda: y + 1.0, lambda: y * w[0]),
                    lambda: y)
        return tf.switch_case(k, [lambda: z * 2.0, lambda: tf.sin(z), lambda: tf.exp(-z)])

    concrete = model.get_concrete_function(tf.TensorSpec([None, 3], tf.float32), tf.TensorSpec([], tf.int32))
    graph_def = convert_variables_to_constants_v2(concrete, lower_control_flow=True).graph.as_graph_def()
    ops = Counter(n.op for n in graph_def.node)
    assert ops["_SwitchN"] and ops["Switch"] and ops["Merge"] and not ops["If"] + ops["Case"]
    expected, grads = [], []
    for x, k in LOWERED_FEEDS:
        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = model(x, tf.constant(k))
        expected.append(y.numpy())
        grads.append(tape.gradient(y, x).numpy())
    path = str(tmp_path / "lowered.meta")
    with tf.Graph().as_default():
        tf.compat.v1.train.export_meta_graph(filename=path, graph_def=graph_def)
    graph = import_meta_graph(path)
    module = graph.to_module(inputs=["x:0", "k:0"], outputs="Identity:0")
    assert _branch_modules(module) == 4  # two conds, the one nested in a branch, the switch_case
    for (x, k), want, want_grad in zip(LOWERED_FEEDS, expected, grads, strict=True):
        assert_same(graph.run("Identity:0", {"x:0": x, "k:0": k}), want, **TOL)
        x = torch.tensor(x, requires_grad=True)
        y = module(x, torch.tensor(k, dtype=torch.int32))
        assert_same(y.detach().numpy(), want, **TOL)
        assert_same(torch.autograd.grad(y.sum(), x)[0].numpy(), want_grad, **TOL)


# ---- a convolution, a batch norm in tf.cond(is_training) fed at run time, a fused conv after it ----
def _cnn(tf):
    v1 = tf.compat.v1
    rng = np.random.default_rng(5)
    with control_flow(False):
        x = v1.placeholder(tf.float32, [None, 8, 8, 3], name="x")
        training = v1.placeholder_with_default(False, [], name="training")
        k1 = v1.get_variable("k1", initializer=rng.normal(size=(3, 3, 3, 4)).astype(np.float32) * 0.3)
        k2 = v1.get_variable("k2", initializer=rng.normal(size=(3, 3, 4, 4)).astype(np.float32) * 0.3)
        bias = v1.get_variable("b2", initializer=rng.normal(size=(4,)).astype(np.float32))
        gamma = v1.get_variable("gamma", initializer=np.ones(4, np.float32))
        beta = v1.get_variable("beta", initializer=np.zeros(4, np.float32))
        mean = v1.get_variable("mean", initializer=np.full(4, 0.1, np.float32), trainable=False)
        var = v1.get_variable("var", initializer=np.full(4, 2.0, np.float32), trainable=False)
        h = tf.nn.conv2d(x, k1, 1, "SAME")
        norm = v1.nn.fused_batch_norm
        h = tf.cond(training, lambda: norm(h, gamma, beta, epsilon=1e-3, is_training=True)[0],
                    lambda: norm(h, gamma, beta, mean, var, epsilon=1e-3, is_training=False)[0])
        h = tf.nn.relu(tf.nn.bias_add(tf.nn.conv2d(tf.nn.relu(h), k2, 1, "SAME"), bias))
        tf.identity(tf.reduce_mean(h, [1, 2]), name="y")


def test_tf1_cnn_with_batch_norm_in_a_fed_cond_fuses_around_it(tmp_path):
    x = RNG.normal(size=(2, 8, 8, 3)).astype(np.float32)
    feeds = [{"x:0": x, "training:0": t} for t in (True, False)]
    grads = [("y:0", ["k1:0", "k2:0", "x:0"])]
    meta, ckpt, values, want = session_values(tmp_path, "cnn", _cnn, feeds, ["y:0"], grads, v2=False)
    graph = import_meta_graph(meta)
    graph.restore(ckpt)
    plan = graph.plan([("y", 0)], frozenset([("x", 0), ("training", 0)]))
    # the cond is one step, so the convolution after it is fused as in a graph without conds
    ops = [s.op for s in plan.fused_steps]
    assert ops.count("If") == 1 and ops.index("If") < ops.index("Conv2D+BiasAdd+Relu")
    module = graph.to_module(inputs=["x:0", "training:0"], outputs="y:0")
    params = dict(module.named_parameters())
    for feed, (expected,), grad in zip(feeds, values, want, strict=True):
        assert_same(graph.run("y:0", feed), expected, **TOL)
        _module_matches_tf(module, feed, expected, grad, [params["k1"], params["k2"]])


def test_merge_index_counts_inputs_decided_dead_at_import(tmp_path):
    """A hand-written Merge of three inputs: one behind a constant predicate (dead when compiled),
    two behind a fed one; value_index is the input's position among all three, as in TF."""

    def build(tf):
        from tensorflow.python.ops import control_flow_ops

        v1 = tf.compat.v1
        with control_flow(False):
            x = v1.placeholder(tf.float32, [None, 3], name="x")
            never, _ = control_flow_ops.switch(x * 5.0, tf.constant(True))
            false_x, true_x = control_flow_ops.switch(x, tf.reduce_sum(x) > 0)
            merged, index = control_flow_ops.merge([never, true_x * 2.0, tf.sin(false_x)])
            tf.identity(merged, name="merged")
            tf.identity(index, name="index")

    feeds = [{"x:0": np.abs(X)}, {"x:0": -np.abs(X)}]
    meta, _, values, _ = session_values(tmp_path, "merge3", build, feeds, ["merged:0", "index:0"], v2=False)
    assert [int(v[1]) for v in values] == [1, 2]
    graph = import_meta_graph(meta)
    module = graph.to_module(inputs="x:0", outputs=["merged:0", "index:0"])
    for feed, expected in zip(feeds, values, strict=True):
        for ours, theirs in zip(graph.run(["merged:0", "index:0"], feed), expected, strict=True):
            assert_same(ours, theirs, **TOL)
        for ours, theirs in zip(module(torch.from_numpy(feed["x:0"])), expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
