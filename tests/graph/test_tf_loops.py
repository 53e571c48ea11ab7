"""Loops and conditionals built in real TensorFlow: TF1 frames, functional While/If/Case, TensorLists,
TensorArrays; compared with ``session.run`` and ``tf.gradients`` (recurrent models: test_tf_rnn.py,
TF1 conds decided at run time: test_tf_conds.py).

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
                "loop_in_cond:0", "pure_cond:0", "pure_case:0", "grown:0", "grown_size:0", "popped:0",
                "left:0"]
# (fetch, what tf.gradients differentiates it by)
LOOP_GRADS = [("h:0", ["w:0", "x:0"]), ("nested:0", ["x:0"]), ("stacked:0", ["w:0", "x:0"]),
              ("cond_out:0", ["x:0"]), ("case_out:0", ["w:0", "x:0"]), ("cond_in_loop:0", ["w:0", "x:0"]),
              ("loop_in_cond:0", ["w:0", "x:0"]), ("pure_cond:0", ["x:0"]), ("pure_case:0", ["x:0"]),
              ("grown:0", ["w:0", "x:0"]), ("popped:0", ["w:0", "x:0"])]


def _loop_grads(kind):
    """TF1 while_loop gradients fail on a TensorList loop variable (zeros_like of a variant, in TF)."""
    return [g for g in LOOP_GRADS if kind == "functional" or g[0] != "popped:0"]


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
            # no variable read in the branches: StatelessIf and StatelessCase as functional ops
            tf.identity(tf.cond(n > 1, lambda: x * 2.0, lambda: tf.sin(x)), name="pure_cond")
            tf.identity(tf.switch_case(k, [lambda: x + 1.0, lambda: tf.cos(x)]), name="pure_case")
            # a TensorArray that grows as the loop writes (n + 1 elements)
            grown = tf.TensorArray(tf.float32, size=0, dynamic_size=True, element_shape=[3])
            _, grown = tf.while_loop(
                lambda j, t: j < n + 1,
                lambda j, t: (j + 1, t.write(j, x[0] * tf.cast(j + 1, tf.float32) + w[j % 3])), [0, grown])
            tf.identity(grown.stack(), name="grown")
            tf.identity(grown.size(), name="grown_size")
            # TensorListPushBack in one loop, TensorListPopBack in the next
            raw, shape = tf.raw_ops, tf.constant([3])
            empty = raw.EmptyTensorList(element_shape=shape, max_num_elements=-1, element_dtype=tf.float32)

            def push(j, items):
                return j + 1, raw.TensorListPushBack(input_handle=items,
                                                     tensor=tf.tanh(x[0] * tf.cast(j, tf.float32)) + w[0])

            _, pushed = tf.while_loop(lambda j, items: j < n + 1, push, [0, empty])

            def pop(j, items, acc):
                items, last = raw.TensorListPopBack(input_handle=items, element_shape=shape,
                                                    element_dtype=tf.float32)
                return j + 1, items, acc * 0.5 + tf.reshape(last, [3])

            _, left, popped = tf.while_loop(lambda j, items, acc: j < n, pop, [0, pushed, tf.zeros([3])])
            tf.identity(popped, name="popped")
            tf.identity(raw.TensorListLength(input_handle=left), name="left")
    return build


@pytest.fixture(scope="module", params=["frames", "functional"])
def loops(request, tmp_path_factory):
    v2 = request.param == "functional"
    directory = tmp_path_factory.mktemp(request.param)
    grads = _loop_grads(request.param)
    made = session_values(directory, "loops", _loops(v2), LOOP_FEEDS, LOOP_FETCHES, grads, v2)
    return request.param, *made


def test_loops_run_like_session_run(loops):
    kind, meta, ckpt, values, _ = loops
    graph = import_meta_graph(meta)
    graph_def = graph.meta_graph_def.graph_def  # the ops of the graph and of its functions' bodies
    ops = Counter([n.op for n in graph_def.node] +
                  [n.op for f in graph_def.library.function for n in f.node_def])
    if kind == "frames":
        assert ops["Enter"] and ops["LoopCond"] >= 4 and ops["TensorArrayV3"] and ops["Switch"]
        assert [n.attr["dynamic_size"].b for n in graph.meta_graph_def.graph_def.node
                if n.op == "TensorArrayV3"] == [False, True]
    else:
        assert ops["While"] and ops["StatelessWhile"] and ops["TensorListReserve"]
        assert ops["If"] and ops["StatelessIf"] and ops["Case"] and ops["StatelessCase"]
    assert ops["TensorListPushBack"] and ops["TensorListPopBack"]
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
    assert children["LoopModule"] == 7  # the loop in a cond body is inside that cond
    # an if/else per tf.cond (TF1's Switch/Merge too) and per switch_case
    assert children["BranchModule"] == 5 and not children["RegionModule"]
    w = dict(module.named_parameters())["w"]
    for feed, expected, want in zip(LOOP_FEEDS, values, grads, strict=True):
        x = torch.tensor(feed["x:0"], requires_grad=True)
        outs = module(x, torch.tensor(feed["n:0"]), torch.tensor(feed["k:0"]))
        for ours, theirs in zip(outs, expected, strict=True):
            assert_same(ours.detach().numpy(), theirs, **TOL)
        at = {name: k for k, name in enumerate(LOOP_FETCHES)}
        got = [g for target, wrt in _loop_grads(kind) for g in _grads(outs[at[target]], [w, x][-len(wrt):])]
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
    # and loaded into a module built afresh (w from its initializer until then)
    rebuilt = import_meta_graph(meta).to_module(inputs=["x:0", "n:0", "k:0"], outputs=LOOP_FETCHES)
    Saver().restore(rebuilt, path)
    for feed in LOOP_FEEDS:
        args = torch.from_numpy(feed["x:0"]), torch.tensor(feed["n:0"]), torch.tensor(feed["k:0"])
        for ours, theirs in zip(rebuilt(*args), module(*args), strict=True):
            assert_same(ours.detach().numpy(), theirs.detach().numpy(), rtol=0, atol=0)


def _grads(output, wrt):
    """d sum(output) / d wrt; zeros where the output does not depend on it (as TF reports)."""
    if not output.requires_grad:  # e.g. the stack of a TensorArray the loop never wrote
        return [torch.zeros_like(t) for t in wrt]
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
