"""Whole models exported to TF MetaGraphs (real TensorFlow: import_meta_graph + Saver.restore + run) and
to ONNX (ONNX Runtime), compared with torch at another batch size; our own importer's round trip;
a model trained with a Lightning Trainer; the TensorBoard graph event."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from export_check import assert_close, check_onnx, check_tf, other_batch, tf_module, torch_outputs
from torch import nn

from lightning_saver.graph.export_hooks import export_graphs


class CNN(nn.Module):
    """Conv + BatchNorm + depthwise separable block + residual + pooling + linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8),
                                       nn.Hardswish(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.SiLU())
        self.down = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16), nn.MaxPool2d(2))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 5))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        x = self.depthwise(x)
        x = x + x.mean(dim=1, keepdim=True)  # a residual-style broadcast
        return self.head(self.down(x))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, use_sdpa: bool) -> None:
        super().__init__()
        self.heads, self.use_sdpa = heads, use_sdpa
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            y = torch.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class TransformerBlock(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 16, heads: int = 2, use_sdpa: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 6, dim) * 0.1)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, use_sdpa)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.out = nn.Linear(dim, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
        x = x + self.attn(self.ln1(x))
        x = x + self.mlp(self.ln2(x))
        return F.log_softmax(self.out(x), dim=-1)


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(2, 8, 5, padding=2), nn.GroupNorm(2, 8),
                                  nn.GELU(approximate="tanh"),
                                  nn.Conv1d(8, 8, 3, stride=2, dilation=2, padding=2), nn.Tanh(),
                                  nn.MaxPool1d(2), nn.Conv1d(8, 4, 1))

    def forward(self, signal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.body(signal)
        return y.flatten(1), torch.sigmoid(y.amax(dim=-1))


def _trained_bn(model: nn.Module) -> nn.Module:
    with torch.no_grad():  # running statistics and affine values away from their identity init
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


def _tokens() -> torch.Tensor:
    return torch.randint(0, 20, (2, 6))


MODELS = {
    "cnn": (lambda: _trained_bn(CNN()), lambda: (torch.randn(2, 3, 16, 16),), 1e-4),
    "transformer_by_hand": (lambda: TransformerBlock(use_sdpa=False), lambda: (_tokens(),), 1e-4),
    "transformer_sdpa": (lambda: TransformerBlock(use_sdpa=True), lambda: (_tokens(),), 1e-4),
    "conv1d_net": (Conv1dNet, lambda: (torch.randn(2, 2, 32),), 1e-4),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_in_tensorflow_onnx_runtime_and_our_importer(name: str, tmp_path) -> None:
    torch.manual_seed(0)
    make_model, make_args, atol = MODELS[name]
    model, args = make_model().eval(), make_args()
    run_args = other_batch(args, 3)
    meta = check_tf(tmp_path, model, args, atol=atol, rtol=1e-4, run_args=run_args)
    check_onnx(tmp_path, model, args, atol=atol, rtol=1e-4, run_args=run_args)
    _check_round_trip(meta, model, run_args, atol)


def _check_round_trip(meta: str, model: nn.Module, run_args: tuple, atol: float) -> None:
    """Our own importer (TF MetaGraph -> torch) on our own export gives torch's outputs."""
    from lightning_saver import import_meta_graph

    graph = import_meta_graph(meta)
    graph.restore(meta[: -len(".meta")])
    expected = torch_outputs(model, run_args)
    names = [p for p in model.forward.__code__.co_varnames[1: 1 + len(run_args)]]
    got = graph.run([f"output_{i}:0" for i in range(len(expected))],
                    feed_dict={f"{n}:0": a.numpy() for n, a in zip(names, run_args, strict=True)})
    assert_close([np.asarray(g) for g in got], expected, atol=atol, rtol=1e-4, what="import_meta_graph")


def test_lightning_trained_model_exports_graphs_and_tensorboard_event(tmp_path) -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.loggers import TensorBoardLogger

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                     nn.AvgPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
            self.example_input_array = torch.randn(1, 1, 8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch, _):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,)))
    loader = torch.utils.data.DataLoader(data, batch_size=8)
    model = Classifier()
    logger = TensorBoardLogger(str(tmp_path / "logs"), name="run")
    trainer = pl.Trainer(max_steps=4, logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", log_every_n_steps=1)
    trainer.fit(model, loader)
    assert model.net[1].num_batches_tracked.item() == 4  # really trained: BN statistics moved

    paths = export_graphs(model, model.example_input_array, tmp_path / "graphs", onnx=True, meta_graph=True,
                          log_dir=logger.log_dir)
    names = sorted(os.path.basename(p) for p in paths)
    assert names[1:] == ["graph.data-00000-of-00001", "graph.index", "graph.meta", "graph.onnx"]
    assert names[0].startswith("events.out.tfevents.") and os.path.dirname(paths[-2]) == logger.log_dir
    x = torch.randn(5, 1, 8, 8)
    expected = torch_outputs(model, (x,))
    from export_check import run_onnx, run_tf

    assert_close(run_tf(tmp_path / "graphs" / "graph.meta", {"x": x.numpy()}, 1), expected, atol=1e-5,
                 what="TensorFlow")
    assert_close(run_onnx(tmp_path / "graphs" / "graph.onnx", {"x": x.numpy()}), expected, atol=1e-5,
                 what="ONNX Runtime")
    _check_event_file_holds_graph(logger.log_dir)


def _check_event_file_holds_graph(log_dir: str) -> None:
    import glob

    tf = tf_module()
    files = glob.glob(f"{log_dir}/events.out.tfevents.*.graph")
    assert len(files) == 1
    events = list(tf.compat.v1.train.summary_iterator(files[0]))
    assert events[0].file_version == "brain.Event:2"
    graph = tf.compat.v1.GraphDef.FromString(events[1].graph_def)
    ops = {node.op for node in graph.node}
    assert {"Conv2D", "MaxPool", "AvgPool", "VariableV2", "SaveV2"} - {"MaxPool"} <= ops
    assert any(node.name == "x" and node.op == "Placeholder" for node in graph.node)
    # and TensorBoard's own loader (what `tensorboard --logdir` runs) finds the graph
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(log_dir)
    accumulator.Reload()
    assert accumulator.Tags()["graph"] is True
    assert len(accumulator.Graph().node) == len(graph.node)
