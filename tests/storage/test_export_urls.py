"""The exporters write through the store: ONNX and the TF MetaGraph + checkpoint land in memory://."""

from __future__ import annotations

import uuid

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from lightning_saver.graph.export_hooks import export_graphs
from lightning_saver.storage import storage_for


def test_export_graphs_to_a_url():
    root = f"memory://exports-{uuid.uuid4().hex[:8]}"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.randn(5, 4)
    written = export_graphs(model, x, root, onnx=True, meta_graph=True)
    store = storage_for(root)
    names = store.listdir(root)
    assert {"graph.onnx", "graph.meta", "graph.index", "graph.data-00000-of-00001"} <= set(names), names
    assert all(p.startswith(root + "/") for p in written)
    session = ort.InferenceSession(store.read_bytes(store.join(root, "graph.onnx")))
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, model(x).detach().numpy(), rtol=1e-5, atol=1e-6)
