"""TensorFlow import converters: ops_core (graph plumbing).

Placeholder, Const, the identities, NoOp and Assert. Variable nodes and the Assign family are not
table converters: they read and write the imported graph's variable store, so the plan compiler
(``plan.py``) handles ``VariableV2``/``Variable``/``VarHandleOp``, ``Assign*`` and
``VarIsInitializedOp``/``IsVariableInitialized`` itself. ``ReadVariableOp`` receives the variable's
current value (the plan reads it just before), so here it is an identity.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.table import TF_OPS


@TF_OPS.register("Placeholder")
def Placeholder(*, dtype: Any = None, shape: list[int] | None = None) -> torch.Tensor:
    raise GraphImportError(f"a Placeholder (dtype {dtype}, shape {shape}) must be fed through feed_dict")


@TF_OPS.register("PlaceholderWithDefault")
def PlaceholderWithDefault(input: torch.Tensor, *, dtype: Any = None, shape: Any = None) -> torch.Tensor:
    return input


@TF_OPS.register("Const")
def Const(*, value: torch.Tensor | np.ndarray, dtype: Any = None) -> torch.Tensor | np.ndarray:
    return value


@TF_OPS.register("Identity", "Snapshot")
def Identity(input: torch.Tensor) -> torch.Tensor:
    return input


@TF_OPS.register("IdentityN")
def IdentityN(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(inputs)


@TF_OPS.register("NoOp")
def NoOp(*inputs: Any) -> None:
    return None


@TF_OPS.register("StopGradient")
def StopGradient(input: torch.Tensor) -> torch.Tensor:
    return input.detach()


@TF_OPS.register("PreventGradient")
def PreventGradient(input: torch.Tensor, *, message: str = "") -> torch.Tensor:
    return input


@TF_OPS.register("ReadVariableOp")
def ReadVariableOp(resource: torch.Tensor, *, dtype: Any = None) -> torch.Tensor:
    return resource


@TF_OPS.register("Assert")
def Assert(condition: torch.Tensor, *data: Any, summarize: int = 3) -> None:
    if not bool(torch.as_tensor(condition).all()):
        shown = [d.decode("utf-8", "replace") if isinstance(d, bytes) else d for d in _flat(data)][:summarize]
        raise ValueError(f"TensorFlow Assert failed: {shown}")
    return None


def _flat(data: tuple[Any, ...]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        if isinstance(item, np.ndarray):
            out.extend(item.reshape(-1).tolist())
        elif isinstance(item, torch.Tensor):
            out.extend(item.reshape(-1).tolist())
        else:
            out.append(item)
    return out
