"""The one call the Lightning ``Saver`` makes to write a run's graphs (ONNX, TF MetaGraph, TensorBoard).

Example::

    paths = export_graphs(module, module.example_input_array, "checkpoints/", meta_graph=True,
                          log_dir=trainer.logger.log_dir)
    # -> ["checkpoints/graph.meta", "checkpoints/graph.index", ...]
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

__all__ = ["export_graphs"]

GRAPH_NAME = "graph"


def _as_args(example_inputs: Any) -> tuple[Any, ...]:
    # Lightning's example_input_array is one tensor, or a tuple/list of positional inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs)
    raise TypeError(f"export_graphs: example inputs must be a tensor or a tuple of them, got "
                    f"{type(example_inputs).__name__}; set `self.example_input_array` on the LightningModule")


def export_graphs(module: nn.Module, example_inputs: Any, directory: str | os.PathLike[str], *,
                  onnx: bool = False, meta_graph: bool = False, log_dir: str | None = None) -> list[str]:
    """Export ``module`` as ``<directory>/graph.onnx`` and/or ``graph.meta`` (+ its TF checkpoint).

    Args:
        module: the model (a LightningModule works); exported in eval mode, its mode restored.
        example_inputs: a tensor or a tuple of positional inputs (``example_input_array``).
        directory: where to write (created if missing).
        onnx: write ``graph.onnx``.
        meta_graph: write ``graph.meta`` and the TF V2 checkpoint ``graph.index``/``graph.data-*``.
        log_dir: also write the TF graph to a TensorBoard event file there (e.g. the
            ``TensorBoardLogger``'s ``log_dir``); needs ``meta_graph=True``'s graph, built if absent.

    Returns:
        The paths written.

    Raises:
        TypeError: ``example_inputs`` is missing or of the wrong type.
        CaptureError / UnsupportedOpError: the model cannot be exported (the message says where).

    Example::

        export_graphs(model, torch.randn(2, 4), "out", onnx=True, meta_graph=True)
    """
    if not (onnx or meta_graph or log_dir):
        return []
    args = _as_args(example_inputs)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    if device.type != "cpu":  # export a CPU copy; the training copy stays where it is
        module = copy.deepcopy(module).cpu()
        args = tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
    from lightning_saver.storage import storage_for

    target = storage_for(os.fspath(directory))  # a folder or a URL (s3://...): the exports go there
    target.makedirs(os.fspath(directory))
    written: list[str] = []
    if meta_graph or log_dir:
        from lightning_saver.graph.tf_export import build_graph, write_meta_graph

        meta, store = build_graph(module, args)
        if meta_graph:
            path = target.join(os.fspath(directory), f"{GRAPH_NAME}.meta")
            written.extend(write_meta_graph(meta, store, path))
        if log_dir:
            from lightning_saver.graph.events import write_graph_event

            written.append(write_graph_event(meta.graph_def, log_dir))
    if onnx:
        from lightning_saver.graph.onnx_export import export_onnx

        written.append(export_onnx(module, args, target.join(os.fspath(directory), f"{GRAPH_NAME}.onnx")))
    return written
