"""``graph.run``'s per-call work, resolved once per call signature.

A signature is the fetch structure's names and the feed dict's keys, in order. Resolving names to
refs, looking up each feed's dtype and shape, flattening the fetches and finding the plan took 30 us
of the 210 us a small CNN's ``graph.run`` took at batch 1 (against the same plan run directly); a
cached ``Call`` does only what depends on the values: convert and check the feeds, run the plan,
turn the results into numpy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import GraphImportError
from lightning_saver.graph.tf_import.importer import Ref, ref_name

MAX_CALLS = 64  # signatures kept per graph; a program cycling through more rebuilds them


def call_key(fetches: Any, feed_dict: Any, leaf: tuple[type, ...]) -> tuple[Any, ...] | None:
    """A hashable key naming ``run``'s signature, or None (dicts of fetches, odd types: not cached).

    ``leaf`` are the types a fetch name can have (str and ``Tensor``).
    """
    kind = type(fetches)
    if kind in leaf:
        key: tuple[Any, ...] = (fetches,)
    elif (kind is list or kind is tuple) and all(type(f) in leaf for f in fetches):
        key = (kind, *fetches)
    else:
        return None
    if feed_dict is None:
        return (*key, None)
    if type(feed_dict) is not dict:
        return None
    return (*key, len(key), *feed_dict)  # the length keeps fetch names apart from feed keys


def checker(ref: Ref, dtype: Any, shape: list[int] | None) -> Callable[[Any], torch.Tensor]:
    """Converts a fed value to a tensor of the placeholder's dtype and checks its shape."""
    want_dtype = dtype if isinstance(dtype, torch.dtype) else None
    rank = None if shape is None else len(shape)
    fixed = () if shape is None else tuple((i, d) for i, d in enumerate(shape) if d != -1)

    def convert(value: Any) -> torch.Tensor:
        if type(value) is torch.Tensor:
            tensor = value
        elif type(value) is np.ndarray and value.dtype.isnative and value.flags.writeable:
            tensor = torch.from_numpy(value)  # what as_tensor does, in a third of its 2 us
        else:
            tensor = torch.as_tensor(np.asarray(value))
        if want_dtype is not None and tensor.dtype != want_dtype:
            tensor = tensor.to(want_dtype)
        if rank is not None:
            got = tensor.shape
            if len(got) != rank or any(got[i] != d for i, d in fixed):
                assert shape is not None
                raise GraphImportError(
                    f"cannot feed a value of shape {tuple(got)} for tensor {ref_name(ref)}, "
                    f"which has shape {tuple(None if d < 0 else d for d in shape)}"
                )
        return tensor

    return convert


def to_numpy(value: Any) -> Any:
    """A fetched value as numpy (a copy: the value may be a variable or a constant of the graph)."""
    if not isinstance(value, torch.Tensor):
        return value
    value = value.detach().cpu()
    if value.dtype == torch.bfloat16:
        import ml_dtypes

        array = value.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    else:
        array = value.numpy().copy()
    return array[()] if array.ndim == 0 else array


class Call:
    """``run`` for one signature: fetch and feed refs, feed converters and the plan, all resolved.

    ``execute(feeds)`` runs the plan; ``rebuild`` gives the numpy results the fetches' shape.
    """

    def __init__(self, rebuild: Callable[[Any], Any], single: bool, feed_refs: list[Ref],
                 converters: list[Callable[[Any], torch.Tensor]],
                 execute: Callable[[dict[Ref, Any]], list[Any]]) -> None:
        self.rebuild, self.single, self.execute = rebuild, single, execute
        self.pairs = list(zip(feed_refs, converters, strict=True))

    def __call__(self, feed_dict: Mapping[Any, Any] | None) -> Any:
        feeds: dict[Ref, Any] = {}
        if feed_dict:
            for (ref, convert), value in zip(self.pairs, feed_dict.values(), strict=True):
                feeds[ref] = convert(value)
        with torch.no_grad():
            values = self.execute(feeds)
        if self.single:
            return to_numpy(values[0])
        return self.rebuild(iter([to_numpy(v) for v in values]))
