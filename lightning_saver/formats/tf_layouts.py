"""How our TensorFlow export lays variables out, and the way back to the torch ``state_dict``.

The MetaGraph export stores each weight in the layout TensorFlow's kernels read (a Conv2d filter
OIHW -> HWIO, a Linear weight ``[out, in]`` -> ``[in, out]``, a depthwise filter reshaped and
transposed), so the graph has no per-run transposes. The steps from the torch tensor to the stored
one are recorded per variable, as JSON, in the ``.meta`` file's collection ``lightning_saver_layouts``
(a ``bytes_list`` with one entry; TensorFlow keeps it through ``import_meta_graph`` and writes it
again with ``Saver.save``'s ``.meta``)::

    {"version": 1, "variables": {"fc/weight": {"key": "fc.weight", "shape": [3, 6],
                                               "steps": [["transpose", [1, 0]]]}}}

``to_torch`` undoes the steps (strictly: every variable in the checkpoint, every shape checked).

Example::

    layouts = read_layouts("model.meta")
    state_dict = to_torch(layouts, read_checkpoint("model_trained", framework="torch"), "model_trained")
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import CheckpointNotFoundError, StateMismatchError

COLLECTION = "lightning_saver_layouts"
VERSION = 1
Step = tuple[str, tuple[int, ...]]


def apply_steps(value: np.ndarray, steps: Sequence[Step]) -> np.ndarray:
    """The torch-layout ``value`` in the stored layout."""
    for kind, arg in steps:
        value = np.transpose(value, arg) if kind == "transpose" else value.reshape(arg)
    return value.copy(order="C") if steps else value  # (np.ascontiguousarray would make 0-d 1-d)


def shapes_along(shape: Sequence[int], steps: Sequence[Step]) -> list[tuple[int, ...]]:
    """The shape before each step, then the stored shape."""
    shapes = [tuple(shape)]
    for kind, arg in steps:
        before = shapes[-1]
        shapes.append(tuple(before[p] for p in arg) if kind == "transpose" else tuple(arg))
    return shapes


def undo_steps(value: torch.Tensor, steps: Sequence[Step], shape: Sequence[int]) -> torch.Tensor:
    """The stored ``value`` back in torch's layout (``shape`` is the torch shape)."""
    shapes = shapes_along(shape, steps)
    for (kind, arg), before in zip(reversed(steps), reversed(shapes[:-1]), strict=True):
        if kind == "transpose":
            value = value.permute(tuple(int(i) for i in np.argsort(arg)))
        else:
            value = value.reshape(before)
    return value.contiguous()


def encode(variables: Mapping[str, tuple[str, Sequence[int], Sequence[Step]]]) -> bytes:
    """``{variable name: (state_dict key, torch shape, steps)}`` as the JSON stored in the ``.meta``."""
    body = {name: {"key": key, "shape": list(shape), "steps": [[kind, list(arg)] for kind, arg in steps]}
            for name, (key, shape, steps) in variables.items()}
    return json.dumps({"version": VERSION, "variables": body}, sort_keys=True).encode()


def decode(data: bytes, source: str) -> dict[str, tuple[str, tuple[int, ...], list[Step]]]:
    try:
        raw = json.loads(data)
        if raw.get("version") != VERSION:
            raise ValueError(f"version {raw.get('version')!r}, expected {VERSION}")
        return {name: (str(v["key"]), tuple(int(d) for d in v["shape"]),
                       [(str(kind), tuple(int(i) for i in arg)) for kind, arg in v["steps"]])
                for name, v in raw["variables"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StateMismatchError(f"{source}: collection {COLLECTION!r} is not our layout record: "
                                 f"{error}") from None


def read_layouts(meta_path: str | os.PathLike[str]) -> dict[str, tuple[str, tuple[int, ...], list[Step]]]:
    """The layout record of a ``.meta`` written by our export (or re-saved by TensorFlow's Saver).

    Raises:
        CheckpointNotFoundError: no such file.
        StateMismatchError: the graph was not exported by us (no layout record).
    """
    from tensorboard.compat.proto import meta_graph_pb2

    path = os.fspath(meta_path)
    try:
        with open(path, "rb") as f:
            meta = meta_graph_pb2.MetaGraphDef.FromString(f.read())
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{path}: no such MetaGraph; the TF checkpoint's layouts are "
                                      "read from the .meta beside it") from None
    if COLLECTION not in meta.collection_def:
        raise StateMismatchError(f"{path}: has no {COLLECTION!r} collection, so it was not written by "
                                 "lightning_saver's export_meta_graph; map its names with convert --name-map")
    values = meta.collection_def[COLLECTION].bytes_list.value
    if len(values) != 1:
        raise StateMismatchError(f"{path}: collection {COLLECTION!r} holds {len(values)} entries, expected 1")
    return decode(values[0], path)


def to_torch(layouts: Mapping[str, tuple[str, tuple[int, ...], list[Step]]], tensors: Mapping[str, Any],
             source: str) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (TF names, stored layouts) -> ``state_dict`` (torch keys and layouts).

    Raises:
        StateMismatchError: a recorded variable is missing from the checkpoint, or has another shape.
    """
    out: dict[str, torch.Tensor] = {}
    for name, (key, shape, steps) in layouts.items():
        if name not in tensors:
            raise StateMismatchError(f"{source}: variable {name!r} (state_dict key {key!r}) is not in the "
                                     f"checkpoint; it has {sorted(tensors)[:8]}")
        value = tensors[name]
        value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
        stored = shapes_along(shape, steps)[-1]
        if tuple(value.shape) != stored:
            raise StateMismatchError(f"{source}: variable {name!r} has shape {tuple(value.shape)}, the "
                                     f"export stored {key!r} as {stored}")
        out[key] = undo_steps(value, steps, shape)
    return out
