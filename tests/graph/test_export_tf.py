"""The MetaGraph export against real TensorFlow: structure, Saver, variables, signature, attrs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from export_check import (
    assert_attrs_tf_knows_and_not_default,
    check_tf,
    other_batch,
    run_tf,
    run_tf_many,
    tf_module,
    torch_outputs,
)
from tensorboard.compat.proto import meta_graph_pb2, saver_pb2
from torch import nn

from lightning_saver import export_meta_graph
from lightning_saver.errors import CaptureError, UnsupportedOpError
from lightning_saver.graph.tf_export.op_defs import known_ops, op_def


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(features)))


@pytest.fixture(scope="module")
def mlp_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[MLP, str]:
    torch.manual_seed(0)
    model = MLP()
    path = tmp_path_factory.mktemp("mlp") / "model.meta"
    export_meta_graph(model, (torch.randn(2, 4),), path)
    return model, str(path)


def _meta(path: str) -> meta_graph_pb2.MetaGraphDef:
    meta = meta_graph_pb2.MetaGraphDef()
    with open(path, "rb") as f:
        meta.ParseFromString(f.read())
    return meta


def test_mlp_restores_and_runs_in_tensorflow_at_any_batch(mlp_export: tuple[MLP, str]) -> None:
    model, path = mlp_export
    for batch in (1, 5):
        x = torch.randn(batch, 4)
        got = run_tf(path, {"features": x.numpy()}, 1)
        np.testing.assert_allclose(got[0], torch_outputs(model, (x,))[0], atol=1e-5)


def test_variables_collections_and_saver_in_tensorflow(mlp_export: tuple[MLP, str], tmp_path) -> None:
    tf = tf_module()
    model, path = mlp_export
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(path)
        names = sorted(v.op.name for v in tf.compat.v1.global_variables())
        trainable = sorted(v.op.name for v in tf.compat.v1.trainable_variables())
        placeholder = graph.get_tensor_by_name("features:0")
        with tf.compat.v1.Session(graph=graph) as session:
            saver.restore(session, path[: -len(".meta")])
            kernel = session.run("fc1/weight:0")
            # the Saver works both ways: save again, restore into fresh zeros
            saved = saver.save(session, str(tmp_path / "again"))
            session.run(tf.compat.v1.global_variables_initializer())
            assert not session.run("fc1/weight:0").any()
            saver.restore(session, saved)
            np.testing.assert_array_equal(session.run("fc1/weight:0"), kernel)
    assert names == trainable == ["fc1/bias", "fc1/weight", "fc2/bias", "fc2/weight"]
    assert placeholder.op.type == "Placeholder" and placeholder.shape.as_list() == [None, 4]
    # stored as TensorFlow's MatMul reads it, [in, out]: no transpose runs per batch
    np.testing.assert_array_equal(kernel, model.fc1.weight.detach().numpy().T)


def test_signature_saver_def_and_op_list(mlp_export: tuple[MLP, str]) -> None:
    meta = _meta(mlp_export[1])
    signature = meta.signature_def["serving_default"]
    assert signature.inputs["features"].name == "features:0"
    assert [d.size for d in signature.inputs["features"].tensor_shape.dim] == [-1, 4]
    assert signature.outputs["output_0"].name == "output_0:0"
    assert meta.saver_def.version == saver_pb2.SaverDef.V2
    assert list(meta.meta_info_def.tags) == ["serve"] and meta.meta_info_def.stripped_default_attrs
    used = {node.op for node in meta.graph_def.node}
    assert {op.name for op in meta.meta_info_def.stripped_op_list.op} == used


def test_no_attr_left_at_its_default_and_every_attr_known_to_tensorflow(mlp_export: tuple[MLP, str]) -> None:
    assert_attrs_tf_knows_and_not_default(_meta(mlp_export[1]).graph_def)


@pytest.mark.parametrize("op", known_ops())
def test_our_op_defs_match_tensorflow_registry(op: str) -> None:
    tf_module()
    from tensorflow.python.framework import op_def_registry

    theirs = op_def_registry.get(op)
    ours = op_def(op)
    strip = type(theirs)()
    strip.CopyFrom(theirs)
    for attr in strip.attr:
        attr.ClearField("allowed_values")
        attr.ClearField("description")
    for arg in [*strip.input_arg, *strip.output_arg]:
        arg.ClearField("description")
        arg.ClearField("experimental_full_type")
    for field in ("summary", "description", "is_distributed_communication"):
        strip.ClearField(field)
    assert ours == type(ours).FromString(strip.SerializeToString())


def test_freeze_embeds_weights_and_needs_no_checkpoint(tmp_path) -> None:
    torch.manual_seed(1)
    model = MLP()
    path = check_tf(tmp_path, model, (torch.randn(2, 4),), atol=1e-5, freeze=True,
                    run_args=other_batch((torch.randn(2, 4),), 7))
    meta = _meta(path)
    assert not meta.HasField("saver_def") and "variables" not in meta.collection_def
    assert not (tmp_path / "model.index").exists()
    assert "VariableV2" not in {n.op for n in meta.graph_def.node}


def test_unsupported_op_names_op_and_module(tmp_path) -> None:
    class Angle(nn.Module):
        def forward(self, x):
            return torch.cummax(x, 1).values

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Sequential(nn.Linear(3, 3), Angle())

        def forward(self, x):
            return self.head(x)

    expected = r"op aten\.cummax\.default at node .*module 'head\.1' \(.*Angle\).*in forward"
    with pytest.raises(UnsupportedOpError, match=expected):
        export_meta_graph(Net(), (torch.randn(2, 3),), tmp_path / "m.meta")
    assert not (tmp_path / "m.meta").exists()


def test_capture_error_names_the_model_line(tmp_path) -> None:
    class DataDependent(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent branch
                return x * 2
            return x

    expected = r"DataDependent.*test_export_tf\.py:\d+ in forward.*x\.sum\(\) > 0"
    with pytest.raises(CaptureError, match=expected):
        export_meta_graph(DataDependent(), (torch.randn(2, 3),), tmp_path / "m.meta")


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.depthwise = nn.Conv2d(4, 8, 3, groups=4)
        self.conv1d = nn.Conv1d(8, 2, 3)
        self.fc = nn.Linear(2 * 4, 5)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.depthwise(torch.relu(self.conv(images)))  # (N, 8, 4, 4)
        x = self.conv1d(x.flatten(2))  # (N, 2, 14)
        return self.fc(x[:, :, :4].flatten(1)) + self.fc.weight.sum()  # fc.weight read in two layouts


def test_variables_in_tensorflow_layouts_and_no_transpose_runs(tmp_path) -> None:
    from lightning_saver.formats.tf_layouts import read_layouts, to_torch
    from lightning_saver.tf import read_checkpoint

    torch.manual_seed(0)
    model = ConvNet()
    path = check_tf(tmp_path, model, (torch.randn(2, 3, 6, 6),), atol=1e-5, rtol=1e-5,
                    run_args=(torch.randn(3, 3, 6, 6),))
    stored = read_checkpoint(path[: -len(".meta")])
    assert stored["conv/weight"].shape == (3, 3, 3, 4)  # HWIO
    assert stored["depthwise/weight"].shape == (3, 3, 4, 2)  # H, W, in, multiplier
    assert stored["fc/weight"].shape == (8, 5)  # [in, out]
    # only the input's, the outputs' and fc.weight's second layout transpose: never a filter
    transposed = [n for n in _meta(path).graph_def.node if n.op == "Transpose"]
    assert all("weight" not in n.input[0] for n in transposed) or \
        [n.input[0] for n in transposed if "weight" in n.input[0]] == ["fc/weight/read"]
    # the recorded layouts map the checkpoint back to the state_dict, exactly
    back = to_torch(read_layouts(path), read_checkpoint(path[: -len(".meta")], framework="torch"), path)
    assert back.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(back[key], value, rtol=0, atol=0)


def test_batch_norm_of_variables_runs_inside_tensorflows_conv_kernel(tmp_path) -> None:
    """With variables, conv -> BN -> ReLU reaches TensorFlow as Conv2D -> FusedBatchNormV3 -> Relu, which
    TensorFlow (as shipped) runs as one fused conv kernel: no multiply-add pass over the activations."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(3, 3, 10, 10)
    path = tmp_path / "m.meta"
    export_meta_graph(model, (torch.randn(2, 3, 10, 10),), path)
    ran: set[str] = set()
    (name,) = [n.name for n in _meta(str(path)).graph_def.node if n.op == "Placeholder"]
    (out,) = run_tf_many(path, [{name: x.numpy()}], 1, fused=ran)[0]
    np.testing.assert_allclose(out, torch_outputs(model, (x,))[0], atol=1e-5, rtol=1e-5)
    fused_bn = {op for op in ran if op.endswith("FusedConv2D:FusedBatchNorm")}
    assert fused_bn, f"no conv kernel with the batch norm fused in; TensorFlow ran {sorted(ran)}"
    # no batch norm or ReLU of its own (a Mul and an AddV2 remain: the first conv's bias moved into
    # the batch norm's offset, on the 8 channels' vectors)
    assert not ran & {"FusedBatchNormV3", "_MklFusedBatchNormV3", "_MklNativeFusedBatchNormV3", "Relu",
                      "_MklRelu", "_MklNativeRelu"}, sorted(ran)
