"""The TensorFlow export op table and the converter calling convention.

Converter contract (every ``ops_*`` module registering into ``TF_EXPORT`` follows it):

* Registered with ``@TF_EXPORT.register(torch.ops.aten.<op>.<overload>, ...)``, one small function
  per ATen op (or per family sharing one TensorFlow op).
* The first parameter is the ``Ctx``: ``cx.g`` is the ``GraphBuilder``; ``cx.dtype``/``cx.shape`` are
  the TensorFlow dtype and static shape (``None`` = dynamic dim) of the node's output as torch
  recorded it. The remaining parameters are the ATen op's arguments, in schema order with its
  defaults, where every tensor is a ``TfTensor`` and a symbolic size is a scalar int32 ``TfTensor``.
* Returns a ``TfTensor``, or a list of them for an op with several outputs (``getitem`` picks).
  A converter that cannot express an argument raises ``UnsupportedOpError`` saying which and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lightning_saver.formats import tf_dtypes
from lightning_saver.graph.capture import static_size
from lightning_saver.graph.registry import OpTable
from lightning_saver.graph.tf_export.builder import GraphBuilder, Shape

TF_EXPORT = OpTable("TensorFlow export")


def load_converters() -> OpTable:
    """Import every converter module once (explicit imports register them) and return the table."""
    from lightning_saver.graph.tf_export import (  # noqa: F401
        ops_index,
        ops_logic,
        ops_math,
        ops_nn,
        ops_pool,
        ops_reduce,
        ops_sample,
        ops_segment,
        ops_select,
        ops_shape,
        ops_unary,
    )

    return TF_EXPORT


def meta_shape(val: Any) -> Shape:
    """A static shape from an fx ``meta["val"]``: ints, with ``None`` for symbolic sizes."""
    if not isinstance(val, torch.Tensor):
        return ()
    return tuple(static_size(d) for d in val.shape)


def meta_dtype(val: Any) -> int:
    if isinstance(val, torch.Tensor):
        return tf_dtypes.from_torch(val.dtype)
    if isinstance(val, bool):
        return tf_dtypes.DT_BOOL
    return tf_dtypes.DT_INT32 if isinstance(val, int | torch.SymInt) else tf_dtypes.DT_FLOAT


@dataclass
class Ctx:
    """What a converter knows about the node it converts."""

    g: GraphBuilder
    node: torch.fx.Node

    def _val(self, index: int) -> Any:
        val = self.node.meta.get("val")
        return val[index] if isinstance(val, list | tuple) else val

    @property
    def dtype(self) -> int:
        return meta_dtype(self._val(0))

    @property
    def shape(self) -> Shape:
        return meta_shape(self._val(0))

    def out(self, index: int) -> tuple[int, Shape]:
        val = self._val(index)
        return meta_dtype(val), meta_shape(val)
