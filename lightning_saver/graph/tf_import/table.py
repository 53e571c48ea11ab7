"""The TensorFlow import op table and the one place that calls a converter.

Converter contract (every module registering into ``TF_OPS`` follows it):

* Registered with ``@TF_OPS.register("OpType", ...)``; the function is named after the op.
* Positional parameters are the node's data inputs in NodeDef order (control inputs ``^x`` are
  dropped), as torch tensors. Ops with a list input (AddN, ConcatV2, Pack, ...) take ``*inputs``.
  Inputs that TF reads statically (shapes, axes, perms, paddings, begin/end/strides, multiples)
  also arrive as tensors: execution is eager, so ``.tolist()`` on them is fine.
* Keyword-only parameters are the op's attrs, spelled as in the OpDef, with TF's documented
  defaults. Only the attrs named in the signature are passed (``**kwargs`` receives all).
  Decoded attr values: i -> int, f -> float, b -> bool, s -> str, type -> torch.dtype,
  shape -> list[int] (-1 unknown) or None (unknown rank), tensor -> torch.Tensor,
  list -> list of those, func -> str.
* Returns one tensor, or a tuple of tensors for an op with several outputs (output ``i`` is
  ``result[i]``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from typing import Any

from lightning_saver.graph.registry import OpTable

TF_OPS = OpTable("TensorFlow import")


def load_converters() -> OpTable:
    """Import every converter module once (explicit imports register them) and return the table.

    This list is the one place that says which modules register converters; a new ``ops_*``
    module must be added here.
    """
    from lightning_saver.graph.tf_import import (  # noqa: F401
        ops_activation,
        ops_array,
        ops_core,
        ops_image,
        ops_list,
        ops_math,
        ops_nn,
        ops_norm,
        ops_random,
        ops_reduce,
        ops_segment,
        ops_shape,
        ops_space,
    )

    return TF_OPS


@cache
def _accepted(func: Callable[..., Any]) -> frozenset[str] | None:
    params = inspect.signature(func).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def bind_attrs(func: Callable[..., Any], attrs: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of decoded ``attrs`` that ``func`` declares (all of them for ``**kwargs``)."""
    accepted = _accepted(func)
    if accepted is None:
        return dict(attrs)
    return {k: v for k, v in attrs.items() if k in accepted}


def call(op_type: str, inputs: Sequence[Any], attrs: Mapping[str, Any], where: str = "") -> Any:
    """Look up ``op_type`` and run its converter on ``inputs`` with the attrs it declares."""
    func = load_converters().lookup(op_type, where)
    return func(*inputs, **bind_attrs(func, attrs))
