"""The whole cycle: torch -> export_meta_graph -> TensorFlow trains a few steps over the exported
variables (``GradientDescentOptimizer(...).minimize``) and saves with the graph's own ``Saver`` ->
the original torch module restores TensorFlow's checkpoint (``Saver().restore`` / ``load``) and
computes what TensorFlow computes. Names and layouts (HWIO filters, ``[in, out]`` matmul weights) go
back strictly through the record the export left in the ``.meta``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from export_check import tf_module, torch_outputs, trained_bn
from torch import nn

from lightning_saver import Saver, load
from lightning_saver.errors import StateMismatchError
from lightning_saver.graph.tf_export import export_meta_graph


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 4, 1), nn.GELU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.LayerNorm(4), nn.Linear(4, 3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class Tagger(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(self.encoder(self.embed(tokens)))


def _example(kind: str, batch: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if kind == "tagger":
        return torch.randint(0, 20, (batch, 5), generator=gen)
    return torch.randn(batch, 3, 8, 8, generator=gen)


def _train_in_tensorflow(meta: Path, prefix: Path, feeds: dict[str, np.ndarray], steps: int = 3
                         ) -> tuple[np.ndarray, str]:
    """Restore, take ``steps`` gradient steps on mean(output^2), save; returns the output after."""
    tf = tf_module()
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(str(meta))
        output = graph.get_tensor_by_name("output_0:0")
        loss = tf.reduce_mean(tf.square(output - 1.0))
        step = tf.compat.v1.train.GradientDescentOptimizer(0.5).minimize(
            loss, var_list=tf.compat.v1.trainable_variables())
        named = {f"{k}:0": v for k, v in feeds.items()}
        with tf.compat.v1.Session(graph=graph) as session:
            saver.restore(session, str(meta)[: -len(".meta")])
            for _ in range(steps):
                session.run(step, named)
            saved = saver.save(session, str(prefix))
            return session.run(output, named), saved


@pytest.mark.parametrize("kind", ["convnet", "tagger"])
def test_tensorflow_trained_weights_come_back_into_the_torch_module(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ConvNet() if kind == "convnet" else Tagger()
    model.eval()
    meta = Path(export_meta_graph(model, (_example(kind, 2, 0),), tmp_path / "model.meta"))
    x = _example(kind, 3, 1)
    name = "images" if kind == "convnet" else "tokens"
    trained_output, saved = _train_in_tensorflow(meta, tmp_path / "model_trained", {name: x.numpy()})
    assert saved == str(tmp_path / "model_trained")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = Saver().restore(model, saved)

    assert result.missing_keys == [] and result.unexpected_keys == []
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "out.weight" in changed or "head.3.weight" in changed  # TensorFlow really trained them
    np.testing.assert_allclose(torch_outputs(model, (x,))[0], trained_output, atol=1e-5, rtol=1e-5)
    # load() gives the same state_dict, keyed and laid out as torch's
    loaded = load(saved)
    assert loaded.keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_restore_of_a_tf_checkpoint_into_another_model_names_the_keys(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    export_meta_graph(model, (torch.randn(2, 4),), tmp_path / "model.meta")
    with pytest.raises(StateMismatchError, match=r"model.*missing \['1\.weight'"):
        Saver().restore(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), str(tmp_path / "model"))
    with pytest.raises(StateMismatchError, match=r"'0\.weight'.*\(3, 5\)"):
        Saver().restore(nn.Sequential(nn.Linear(5, 3)), str(tmp_path / "model"))


def test_a_tf_checkpoint_not_from_our_export_is_refused(tmp_path: Path) -> None:
    from lightning_saver.tf import write_checkpoint

    write_checkpoint(tmp_path / "foreign", {"dense/kernel": np.zeros((4, 3), np.float32)})
    with pytest.raises(Exception, match="foreign.meta"):
        Saver().restore(nn.Linear(4, 3), str(tmp_path / "foreign"))


def test_tensorflow_gradients_of_conv_batch_norm_variables_match_torch(tmp_path: Path) -> None:
    """Conv (with and without bias) -> BN reaches TF as FusedBatchNormV3 on the conv: TensorFlow's
    gradients for every trainable variable (conv bias included, which the export moves into the batch
    norm's offset) equal torch's autograd gradients, mapped into the stored layouts."""
    from lightning_saver.formats.tf_layouts import apply_steps, read_layouts

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 4, 3, bias=False), nn.BatchNorm2d(4),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, affine=False)).eval()
    for bn in (model[1], model[4], model[6]):
        trained_bn(bn)
    meta = Path(export_meta_graph(model, (torch.randn(2, 3, 8, 8),), tmp_path / "model.meta"))
    x, probe = torch.randn(3, 3, 8, 8), torch.randn(3, 5, 6, 6)
    (model(x) * probe).sum().backward()
    tf = tf_module()
    graph = tf.Graph()
    with graph.as_default():
        saver = tf.compat.v1.train.import_meta_graph(str(meta))
        (placeholder,) = [op.name for op in graph.get_operations() if op.type == "Placeholder"]
        loss = tf.reduce_sum(graph.get_tensor_by_name("output_0:0") * probe.numpy())
        variables = tf.compat.v1.trainable_variables()
        grads = tf.gradients(loss, variables)
        untrained = [v.op.name for v, grad in zip(variables, grads, strict=True) if grad is None]
        assert not untrained, f"TensorFlow gives {untrained} no gradient: they would not train"
        with tf.compat.v1.Session(graph=graph) as session:
            saver.restore(session, str(meta)[: -len(".meta")])
            values = session.run(grads, {f"{placeholder}:0": x.numpy()})
    layouts = read_layouts(meta)
    params = dict(model.named_parameters())
    assert {layouts[v.op.name][0] for v in variables} == set(params)
    for var, got in zip(variables, values, strict=True):
        key, _, steps = layouts[var.op.name]
        wanted = apply_steps(params[key].grad.numpy(), steps)
        np.testing.assert_allclose(got, wanted, rtol=1e-4, atol=1e-4, err_msg=key)
