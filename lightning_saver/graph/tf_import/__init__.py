"""Import a TensorFlow MetaGraph (and its checkpoint) into runnable, trainable PyTorch.

TensorFlow is not needed: the graph is parsed with the protos in ``tensorboard.compat.proto``
and each op runs through a small torch converter from the op table (``table.py``).
"""

from __future__ import annotations

from typing import Any

from lightning_saver.graph.tf_import.compiled import CompiledModule, compile_module
from lightning_saver.graph.tf_import.graph import ImportedGraph, Tensor
from lightning_saver.graph.tf_import.importer import load_meta_graph

__all__ = ["import_meta_graph", "compile_module", "CompiledModule", "ImportedGraph", "Tensor"]


def import_meta_graph(path_or_bytes: Any) -> ImportedGraph:
    """Read a MetaGraphDef written by TensorFlow and return it as an ``ImportedGraph``.

    Args:
        path_or_bytes: a ``.meta`` file (binary or text), its bytes, a ``MetaGraphDef`` message,
            or a GraphDef (a frozen ``.pb``), which then has no collections.

    Returns:
        The graph: ``restore(path)``, ``get_tensor_by_name(name)``, ``run(fetches, feed_dict)``,
        ``to_module(inputs, outputs)``.

    Raises:
        CheckpointNotFoundError: the file does not exist.
        GraphImportError: the file is not a MetaGraphDef, or a node names a missing input.

    Example::

        graph = import_meta_graph("model.ckpt.meta")
        graph.restore("model.ckpt")
        graph.run("y:0")                                        # -> numpy value
        module = graph.to_module(inputs=["x:0"], outputs=["logits:0"])
    """
    return ImportedGraph(load_meta_graph(path_or_bytes))
