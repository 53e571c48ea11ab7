"""Nested training state <-> flat tensors + tagged JSON, without pickle.

A Lightning checkpoint is a tree of dicts, lists and tuples holding tensors, numbers, strings and a
few library types. ``encode_state`` splits it into

* ``tensors``: a flat ``{name: Tensor}``. The weights (``state["state_dict"]``) keep their own key
  names, so any safetensors tool sees them; every other tensor (optimizer moments, RNG states, ...)
  is named under ``RESERVED_PREFIX`` after its key path, e.g.
  ``__state__/optimizer_states/0/state/0/exp_avg``;
* ``metadata``: one string entry (``STATE_KEY``) holding the tree as JSON, with each tensor replaced by
  a reference to its name.

JSON cannot say "tuple", "int key", "NaN" or "torch.float16", so such values are tagged: a tag is a
one-key object whose key starts with ``$``::

    (1, 2)              -> {"$tuple": [1, 2]}
    {3: "a"}            -> {"$dict": [[3, "a"]]}       (also used when a str key starts with "$")
    float("nan")        -> {"$float": "nan"}
    torch.float16       -> {"$dtype": "float16"}
    Path("runs/x")      -> {"$path": ["PosixPath", "runs/x"]}
    TrainerFn.FITTING   -> {"$enum": ["pytorch_lightning.trainer.states", "TrainerFn", "FITTING"]}

Anything else raises :class:`EncodingError` naming its key path and type, unless the caller opts in
to pickle with ``allow_pickle=True`` (and then must opt in again to load it).
"""

from __future__ import annotations

import base64
import enum
import functools
import json
import math
import pathlib
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from lightning_saver.errors import CorruptCheckpointError, EncodingError, FormatVersionError
from lightning_saver.formats.state_decoder import PATH_TYPES, decode_document

__all__ = [
    "STATE_KEY",
    "STATE_VERSION",
    "RESERVED_PREFIX",
    "EncodedState",
    "encode_state",
    "decode_state",
    "has_state",
]

STATE_KEY = "lightning_saver.training_state"
STATE_VERSION = 1
RESERVED_PREFIX = "__state__/"
# numpy arrays up to this size go into the JSON; larger ones become tensors
_INLINE_ARRAY_BYTES = 1 << 16
_PATH_TYPES = PATH_TYPES
# values JSON holds as they are, by exact type (a subclass, e.g. an IntEnum, takes encode's long way)
_AS_IS = frozenset({int, str, bool, type(None)})
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.\-]")


@dataclass
class EncodedState:
    """The two halves of an encoded state: tensors for the file body, strings for its header."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def has_state(metadata: Mapping[str, str]) -> bool:
    """Whether a file's header metadata holds an encoded training state (vs. bare weights)."""
    return STATE_KEY in metadata


def encode_state(
    state: Mapping[str, Any], *, weights_key: str | None = "state_dict", allow_pickle: bool = False,
    sharded: bool = False,
) -> EncodedState:
    """Split a nested training state into flat tensors and tagged-JSON metadata.

    Args:
        state: the tree to encode; its top level must be a mapping with str keys.
        weights_key: the top-level entry whose ``{name: Tensor}`` is stored under its own names.
        allow_pickle: store values that have no JSON form pickled instead of raising.
        sharded: accept DTensors (a sharded set stores each rank's pieces; ``saving/sharded.py``).

    Returns:
        An :class:`EncodedState`; ``decode_state(out.tensors, out.metadata)`` gives the state back.

    Raises:
        EncodingError: a value cannot be encoded (the message names its key path and type), or a
            weight name collides with the reserved prefix.

    Example:
        >>> out = encode_state({"state_dict": {"w": torch.zeros(2)}, "epoch": 3, "betas": (0.9, 0.99)})
        >>> sorted(out.tensors), decode_state(out.tensors, out.metadata)["betas"]
        (['w'], (0.9, 0.99))
    """
    encoder = _Encoder(allow_pickle, sharded)
    root: dict[str, Any] = {}
    for key, value in state.items():
        if not isinstance(key, str):
            raise EncodingError(f"top-level keys of a training state must be str; found {key!r} "
                                f"({_type(key)})")
        if key == weights_key and _is_weights(value):
            root[key] = {"$weights": encoder.add_weights(value)}
        else:
            root[key] = encoder.encode(value, (key,))
    document = {"version": STATE_VERSION, "state": root}
    text = json.dumps(document, allow_nan=False, separators=(",", ":"))
    return EncodedState(tensors=encoder.tensors, metadata={STATE_KEY: text})


def decode_state(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    allow_pickle: bool = False,
    source: str = "<memory>",
) -> dict[str, Any]:
    """Rebuild the nested state written by :func:`encode_state`.

    Args:
        tensors: the file's tensors, by name.
        metadata: the file's header metadata.
        allow_pickle: unpickle values stored with ``allow_pickle=True``; only for trusted files.
        source: the file name, for error messages.

    Returns:
        The state, with the same types it was encoded from.

    Raises:
        FormatVersionError: the state was written by a newer lightning_saver.
        EncodingError: the state holds pickled values and ``allow_pickle`` is False.
        CorruptCheckpointError: the state is malformed, or refers to a tensor the file does not hold
            (names ``source`` and the key path). Decoding never imports a module and never allocates
            more than the file's bytes justify (see ``state_decoder``).
    """
    if STATE_KEY not in metadata:
        raise CorruptCheckpointError(
            f"{source}: no training state in the header (metadata key {STATE_KEY!r} missing)"
        )
    try:
        document = json.loads(metadata[STATE_KEY])
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{source}: the training state is not valid JSON ({exc})") from None
    version = document.get("version") if isinstance(document, dict) else None
    if type(version) is not int or version < 1:
        raise CorruptCheckpointError(f"{source}: the training state has no valid version ({version!r})")
    if version > STATE_VERSION:
        raise FormatVersionError(
            f"{source}: training state format version {version!r} is newer than the {STATE_VERSION} this "
            "lightning_saver reads; upgrade lightning_saver to load it"
        )
    return decode_document(document, tensors, allow_pickle=allow_pickle, source=source)


def _type(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _format_path(path: tuple[Any, ...]) -> str:
    return "state" + "".join(f"[{part!r}]" for part in path)


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    )


@functools.lru_cache(maxsize=4096)
def _name_part(text: str) -> str:
    """One key of a tensor's path as it appears in its name (a save names the same paths each time)."""
    return _UNSAFE_NAME_CHARS.sub("_", text)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class _Encoder:
    def __init__(self, allow_pickle: bool, sharded: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self.plain_types: tuple[type, ...] = (torch.Tensor, torch.nn.Parameter)
        if sharded:
            from torch.distributed.tensor import DTensor

            self.plain_types += (DTensor,)
        self.tensors: dict[str, torch.Tensor] = {}
        self._names_by_id: dict[int, str] = {}

    def add_weights(self, weights: Mapping[str, torch.Tensor]) -> list[str]:
        for name, tensor in weights.items():
            if name.startswith(RESERVED_PREFIX):
                raise EncodingError(
                    f"weight name {name!r} starts with the reserved prefix {RESERVED_PREFIX!r}; rename it"
                )
            self.tensors[name] = tensor
            self._names_by_id.setdefault(id(tensor), name)
        return list(weights)

    def add_tensor(self, tensor: torch.Tensor, path: tuple[Any, ...]) -> str:
        if type(tensor) not in self.plain_types or tensor.layout != torch.strided:
            raise EncodingError(
                f"cannot encode the tensor at {_format_path(path)}: {_type(tensor)} with layout "
                f"{tensor.layout} is not a plain dense tensor (sharded/DTensor states need a full state dict)"
            )
        known = self._names_by_id.get(id(tensor))
        if known is not None:
            return known
        base = RESERVED_PREFIX + "/".join(_name_part(str(p)) for p in path)
        name, n = base, 1
        while name in self.tensors:
            n += 1
            name = f"{base}#{n}"
        self.tensors[name] = tensor
        self._names_by_id[id(tensor)] = name
        return name

    def encode(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, enum.Enum):
            return self._enum(value, path)
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int) and type(value) is int:
            return value
        if type(value) is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"$tensor": self.add_tensor(value, path)}
        if type(value) is tuple:
            return {"$tuple": self._items(value, path)}
        if type(value) is torch.Size:
            return {"$size": list(value)}
        if type(value) is list:
            return self._items(value, path)
        if isinstance(value, dict):
            return self._dict(value, path)
        return self._other(value, path)

    def _items(self, value: list[Any] | tuple[Any, ...], path: tuple[Any, ...]) -> list[Any]:
        # Python's RNG state is a tuple of 625 ints: one pass over their types instead of one
        # encode() call each (0.5 ms of every Lightning save, in the training loop)
        if _AS_IS.issuperset(map(type, value)):  # in C, stopping at the first other type
            return list(value)
        return [self.encode(v, (*path, i)) for i, v in enumerate(value)]

    def _dict(self, value: dict[Any, Any], path: tuple[Any, ...]) -> Any:
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            if _AS_IS.issuperset(map(type, value.values())):
                return dict(value)  # e.g. the loops' progress counters, most of a Lightning state's dicts
            return {k: self.encode(v, (*path, k)) for k, v in value.items()}
        return {"$dict": [[self.encode(k, (*path, f"<key {k!r}>")), self.encode(v, (*path, k))]
                          for k, v in value.items()]}

    def _enum(self, value: enum.Enum, path: tuple[Any, ...]) -> Any:
        cls = type(value)
        if "<locals>" in cls.__qualname__:
            return self._other(value, path)
        return {"$enum": [cls.__module__, cls.__qualname__, value.name]}

    def _other(self, value: Any, path: tuple[Any, ...]) -> Any:
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": str(value)}
        if isinstance(value, pathlib.PurePath) and type(value).__name__ in _PATH_TYPES:
            return {"$path": [type(value).__name__, str(value)]}
        if type(value) is bytes:
            return {"$bytes": _b64(value)}
        if type(value) in (set, frozenset):
            items = [self.encode(v, (*path, "<item>")) for v in value]
            return {f"${type(value).__name__}": items}
        if isinstance(value, np.generic) and value.dtype.kind in "biufc":
            return {"$npscalar": [value.dtype.str, _b64(value.tobytes())]}
        if isinstance(value, np.ndarray) and value.dtype.kind in "biufc":
            return self._array(value, path)
        if self.allow_pickle:
            return {"$pickle": [_type(value), _b64(pickle.dumps(value))]}
        hint = ""
        if path and path[0] == "hyper_parameters":
            hint = " (or leave it out of the checkpoint: self.save_hyperparameters(ignore=[...]))"
        raise EncodingError(
            f"cannot encode the value at {_format_path(path)} of type {_type(value)} without pickle. "
            "Supported: None, bool, int, float, str, bytes, list, tuple, dict, set, tensors, torch.dtype, "
            "torch.device, torch.Size, pathlib paths, enums, numpy numbers and arrays. Convert it to one "
            f"of these (e.g. in state_dict()){hint}, or pass allow_pickle=True if you accept that loading "
            "it runs code."
        )

    def _array(self, value: np.ndarray, path: tuple[Any, ...]) -> Any:
        spec: dict[str, Any] = {"dtype": value.dtype.str, "shape": list(value.shape)}
        # complex and big-endian arrays have no safetensors dtype, so they always stay inline
        if value.nbytes <= _INLINE_ARRAY_BYTES or value.dtype.kind == "c" or value.dtype.byteorder == ">":
            spec["data"] = _b64(np.ascontiguousarray(value).tobytes())
        else:
            spec["tensor"] = self.add_tensor(torch.from_numpy(np.ascontiguousarray(value)), path)
        return {"$ndarray": spec}
