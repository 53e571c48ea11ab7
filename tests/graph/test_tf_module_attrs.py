"""The reading properties attr_access.py puts on a ``to_module`` module's class, against real TensorFlow.

The generated ``forward`` reads every parameter and folded constant by name; the properties make
those reads fast and must read what ``nn.Module`` would: a replaced parameter, a deep copy, a
new buffer, and an error for a name the module does not have.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from tf_graphs import assert_same, build_tf_graph, tf_module
from torch import nn

from lightning_saver import import_meta_graph

tf_module()
TOL = {"rtol": 1e-5, "atol": 1e-6}
X = np.random.default_rng(1617).normal(size=(3, 4)).astype(np.float32)


def _builder(seed):
    def build(tf):
        v1 = tf.compat.v1
        x = v1.placeholder(tf.float32, [None, 4], name="x")
        init = v1.random_normal_initializer(seed=seed)
        w = v1.get_variable("w", [4, 5], initializer=init, use_resource=False)
        shift = tf.constant(np.linspace(-1.0, 1.0, 5, dtype=np.float32)) * 2.0  # folded: a buffer
        tf.identity(tf.nn.relu(tf.matmul(x, w) + shift), name="y")

    return build


def _module(tmp_path, seed=1):
    made = build_tf_graph(tmp_path, _builder(seed), ["y:0"], {"x:0": X}, name=f"m{seed}")
    graph = import_meta_graph(made.meta)
    graph.restore(made.ckpt, strict=True)
    return made, graph.to_module(inputs="x:0", outputs="y:0")


def _targets(module):
    return [n.target for n in module.graph.nodes if n.op == "get_attr"]


def test_every_read_is_a_reader_on_this_modules_class_only(tmp_path):
    made, module = _module(tmp_path)
    names = _targets(module)
    assert "w" in names and any(name.startswith("const:") for name in names)
    assert all(type(type(module).__dict__.get(name)).__name__ == "_Reader" for name in names)
    assert_same(module(torch.from_numpy(X)).detach().numpy(), made.expected[0], **TOL)
    _, other = _module(tmp_path / "other")
    assert type(other) is not type(module)


def test_reads_follow_a_replaced_parameter_and_a_deep_copy(tmp_path):
    made, module = _module(tmp_path)
    stepped, _ = _module(tmp_path / "stepped", seed=2)
    assert not np.allclose(stepped.expected[0], made.expected[0])
    copied = copy.deepcopy(module)
    module.w = nn.Parameter(torch.from_numpy(stepped.variables["w"]))  # a new tensor, not a copy into w
    assert_same(module(torch.from_numpy(X)).detach().numpy(), stepped.expected[0], **TOL)
    assert_same(copied(torch.from_numpy(X)).detach().numpy(), made.expected[0], **TOL)


def test_other_names_behave_as_in_nn_module(tmp_path):
    _, module = _module(tmp_path)
    module.register_buffer("extra", torch.ones(2))
    assert torch.equal(module.extra, torch.ones(2))
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        module.missing  # noqa: B018
    with pytest.raises(KeyError, match="already exists"):
        module.register_buffer("w", torch.zeros(1))


def test_a_parameter_replaced_by_a_plain_tensor_is_read_as_in_nn_module(tmp_path):
    # what torch.nn.utils.prune and the old weight_norm do: drop the parameter, set a plain attribute
    _, module = _module(tmp_path)
    stepped, _ = _module(tmp_path / "stepped", seed=2)
    del module.w
    module.w = torch.from_numpy(stepped.variables["w"])
    assert "w" not in module._parameters
    assert_same(module(torch.from_numpy(X)).detach().numpy(), stepped.expected[0], **TOL)
