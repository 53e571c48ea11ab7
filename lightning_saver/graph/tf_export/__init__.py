"""Export a torch model as a TensorFlow MetaGraph (``.meta``) plus a TF V2 checkpoint of its weights.

The model is captured once (``graph.capture``: torch.export lowered to core ATen); each ATen op is
converted by one small function in ``ops_*.py`` (the ``TF_EXPORT`` op table) into TensorFlow ops
that TensorFlow's CPU kernels run: convolutions and pools in NHWC with transposes around them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from tensorboard.compat.proto import meta_graph_pb2
from torch import nn

from lightning_saver.graph.capture import capture
from lightning_saver.graph.tf_export.builder import GraphBuilder
from lightning_saver.graph.tf_export.convert import convert
from lightning_saver.graph.tf_export.meta_graph import build_meta_graph
from lightning_saver.graph.tf_export.variables import VariableStore

__all__ = ["export_meta_graph", "build_graph", "write_meta_graph", "checkpoint_prefix"]


def checkpoint_prefix(path: str | os.PathLike[str]) -> str:
    """The TF checkpoint prefix beside a ``.meta`` path: ``runs/model.meta`` -> ``runs/model``."""
    text = os.fspath(path)
    return text[: -len(".meta")] if text.endswith(".meta") else text


def _write_atomic(path: str, data: bytes) -> None:
    from lightning_saver.storage import storage_for

    storage_for(path).write_bytes(path, data)


def build_graph(model: nn.Module, args: Sequence[Any], *, freeze: bool = False, dynamic_batch: bool = True,
                kwargs: dict[str, Any] | None = None
                ) -> tuple[meta_graph_pb2.MetaGraphDef, VariableStore | None]:
    """Capture ``model`` and build its MetaGraphDef; the store holds the variable values (None: frozen)."""
    captured = capture(model, args, kwargs, dynamic_batch=dynamic_batch)
    g = GraphBuilder()
    store = None if freeze else VariableStore(g)
    converted = convert(captured.program, g, store)
    if store is not None:
        store.finish()
    keep = {t.node_name for t in converted.outputs}
    keep |= {name for v in (store.variables if store else ()) for name in v.node_names()}
    g.prune(keep)
    return build_meta_graph(g, converted.inputs, converted.outputs, store), store


def write_meta_graph(meta: meta_graph_pb2.MetaGraphDef, store: VariableStore | None,
                     path: str | os.PathLike[str]) -> list[str]:
    """Write the checkpoint (when there are variables), then the ``.meta``; returns the paths written."""
    out = os.fspath(path)
    written = []
    if store is not None and store.variables:
        from lightning_saver.tf import write_checkpoint

        prefix = checkpoint_prefix(out)
        write_checkpoint(prefix, store.checkpoint_tensors())
        written += [f"{prefix}.index", f"{prefix}.data-00000-of-00001"]
    _write_atomic(out, meta.SerializeToString())
    return [out, *written]


def export_meta_graph(model: nn.Module, args: Sequence[Any], path: str | os.PathLike[str], *,
                      freeze: bool = False, dynamic_batch: bool = True,
                      kwargs: dict[str, Any] | None = None) -> str:
    """Write ``model`` as a TensorFlow MetaGraph that ``tf.compat.v1.train.import_meta_graph`` loads.

    The graph has one ``Placeholder`` per forward argument (named after it, batch dimension unknown),
    outputs ``output_0``, ``output_1``, ... (also in the ``serving_default`` signature), and one
    variable per ``state_dict`` entry the graph uses (``fc1.weight`` -> ``fc1/weight``), stored in the
    TF V2 checkpoint ``<prefix>.index`` + ``<prefix>.data-00000-of-00001`` beside the ``.meta``.

    Args:
        model: the torch module (captured in eval mode; its mode is restored).
        args: example positional inputs (``()`` when all are given by keyword).
        path: where to write the ``.meta``; the checkpoint prefix is the path without ``.meta``.
        freeze: embed the weights as ``Const`` nodes instead of variables (no checkpoint written).
        dynamic_batch: leave dim 0 of the inputs unknown when the model allows it.
        kwargs: example keyword inputs (``{"input_ids": ids, "attention_mask": mask}``); their
            placeholders are named after the keywords (``input_ids:0``).

    Returns:
        The path of the ``.meta`` file.

    Raises:
        CaptureError: the model cannot be captured (the message names the model line).
        UnsupportedOpError: an op has no TensorFlow converter (the message names it and its module).

    Example::

        export_meta_graph(model, (torch.randn(2, 4),), "out/model.meta")
        # TF: saver = tf.compat.v1.train.import_meta_graph("out/model.meta")
        #     saver.restore(sess, "out/model"); sess.run("output_0:0", {"x:0": batch})
    """
    meta, store = build_graph(model, args, freeze=freeze, dynamic_batch=dynamic_batch, kwargs=kwargs)
    return write_meta_graph(meta, store, path)[0]
